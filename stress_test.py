"""Load-test the service and report what it did: python stress_test.py [--requests N] [--concurrency C].

The defaults reproduce the original test (500 requests, one every 0.05 s, jemma.png) but, unlike the
original, every request thread is joined, so the run ends when the last answer arrives, not after a fixed
sleep, and the summary counts what really happened.

Overload: `--rate R --duration S` sends R requests/s for S s, open loop (each request on its own thread,
started on schedule whatever the others are doing), and reports against `--deadline` (REQUEST_TIMEOUT by
default): answers 200 within the deadline and the goodput they make, 503s and how fast they came, answers
later than the deadline + 1 s, and client timeouts.
"""

import argparse
import collections
import http.client
import json
import math
import select
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

from settings import Settings

DEFAULT_IMAGE = Path(__file__).resolve().parent / "jemma.png"  # the beagle the original test sent


# Past the deadline, the service promises an answer within this much more.
LATE_AFTER = 1.0


class _Outcome:
    __slots__ = ("started", "seconds", "status", "retry_after")

    def __init__(self, started, seconds, status, retry_after=None):
        self.started, self.seconds, self.status, self.retry_after = started, seconds, status, retry_after


class _Client:
    """What `requests.Session().post(url, files={"image": ("image", image)})` sends, for a fraction of its CPU.

    The load tool shares the machine with the service it measures: with requests, the client cost ~1 ms of CPU per
    request, a tenth of the web server's. This is plain HTTP/1.1 all the same: a multipart/form-data body with a
    new boundary for each request, one kept-alive connection per thread, reopened when the server closed it.
    Failures are named as requests names them (ConnectionError, ConnectTimeout, ReadTimeout), so that the
    summaries read as before.
    """

    def __init__(self, url, timeout):
        parts = urllib.parse.urlsplit(url)
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._connection = None

    def post_image(self, image):
        """(status, Retry-After header, body) of one upload; raises OSError or http.client.HTTPException."""
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n\r\n'.encode(),
                image,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}
        connection = self._connect()
        try:
            connection.request("POST", self._path, body, headers)
            response = connection.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.getheader("Retry-After"), data

    def _connect(self):
        if self._connection is not None and self._connection.sock is not None and _dropped(self._connection.sock):
            self.close()  # the server closed the kept-alive connection meanwhile (as urllib3 checks before reuse)
        if self._connection is None:
            self._connection = self._connection_class(self._host, self._port, timeout=self._timeout)
            try:
                self._connection.connect()
            except TimeoutError:
                self.close()
                raise _ConnectTimeout() from None
        return self._connection

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class _ConnectTimeout(TimeoutError):
    pass


def _dropped(sock):
    """A kept-alive socket that is readable between requests has been closed by the server (or sent junk)."""
    return bool(select.select([sock], [], [], 0)[0])


def _failure_name(exc):
    if isinstance(exc, _ConnectTimeout):
        return "ConnectTimeout"
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    if isinstance(exc, (ConnectionError, http.client.HTTPException)):
        return "ConnectionError"
    return type(exc).__name__


def _send(client, image):
    started, retry_after = time.perf_counter(), None
    try:
        status, retry_after, data = client.post_image(image)
        if status == 200 and not _succeeded(data):
            status = "bad-body"
    except (OSError, http.client.HTTPException) as exc:
        status = _failure_name(exc)
    return started, time.perf_counter() - started, status, retry_after


def _succeeded(data):
    try:
        return bool(json.loads(data).get("success"))
    except (ValueError, AttributeError):
        return False


def run(url, image, requests_total, concurrency=None, interval=None, timeout=60, progress=None):
    """Send the requests, closed loop (`concurrency` at a time) or open loop (one every `interval` s).

    Returns the outcomes, each with its start (perf_counter), latency in seconds and HTTP status.
    """
    outcomes, lock = [], threading.Lock()

    def one(client):
        outcome = _Outcome(*_send(client, image))
        with lock:
            outcomes.append(outcome)
        if progress:
            progress.update(1)

    def single():  # open loop: each request on its own thread and connection
        client = _Client(url, timeout)
        try:
            one(client)
        finally:
            client.close()

    if concurrency:
        remaining = iter(range(requests_total))
        claim = threading.Lock()

        def loop():  # closed loop: one kept-alive connection per thread
            client = _Client(url, timeout)
            try:
                while True:
                    with claim:
                        if next(remaining, None) is None:
                            return
                    one(client)
            finally:
                client.close()

        threads = [threading.Thread(target=loop) for _ in range(min(concurrency, requests_total))]
        for thread in threads:
            thread.start()
    else:
        threads, start = [], time.perf_counter()
        for i in range(requests_total):
            time.sleep(max(0.0, start + i * interval - time.perf_counter()))
            threads.append(threading.Thread(target=single))
            threads[-1].start()
    for thread in threads:  # the original never joined its threads; it slept 300 s and hoped
        thread.join()
    return sorted(outcomes, key=lambda o: o.started)


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))  # nearest-rank definition
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def summarize(outcomes):
    latencies = sorted(o.seconds * 1000 for o in outcomes if o.status == 200)
    duration = (max(o.started + o.seconds for o in outcomes) - outcomes[0].started) if outcomes else 0
    by_status = collections.Counter(str(o.status) for o in outcomes)
    return {
        "requests": len(outcomes),
        "succeeded": by_status.get("200", 0),
        "failed": len(outcomes) - by_status.get("200", 0),
        "by_status": dict(sorted(by_status.items())),
        "duration_s": round(duration, 3),
        "throughput_rps": round(by_status.get("200", 0) / duration, 2) if duration else 0.0,
        "latency_ms": {
            name: (round(percentile(latencies, q), 1) if latencies else None)
            for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("max", 100))
        },
    }


def summarize_overload(outcomes, rate, duration, deadline):
    """What an overload run did, against the deadline: the lines the service promises to keep."""
    statuses = collections.Counter(o.status for o in outcomes)
    on_time = [o for o in outcomes if o.status == 200 and o.seconds <= deadline]
    refused = sorted(o.seconds * 1000 for o in outcomes if o.status == 503)
    span = (max(o.started + o.seconds for o in outcomes) - outcomes[0].started) if outcomes else 0
    timeouts = sum(n for status, n in statuses.items() if isinstance(status, str) and "Timeout" in status)
    return {
        "offered_rps": rate,
        "offered_s": duration,
        "deadline_s": deadline,
        "on_time_200": len(on_time),
        # On-time answers per second of arrivals: the requests sent in those seconds were answered on time at
        # this rate. Over the whole span, to the last answer, the tail after the last arrival counts too.
        "goodput_rps": round(len(on_time) / duration, 2) if duration else 0.0,
        "goodput_over_span_rps": round(len(on_time) / span, 2) if span else 0.0,
        "rejected_503": len(refused),
        "rejected_with_retry_after": sum(1 for o in outcomes if o.status == 503 and o.retry_after),
        "rejected_latency_ms": {
            name: (round(percentile(refused, q), 1) if refused else None)
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },
        "timed_out_504": statuses.get(504, 0),
        "late": sum(1 for o in outcomes if isinstance(o.status, int) and o.seconds > deadline + LATE_AFTER),
        "client_timeouts": timeouts,
        "client_errors": sum(n for status, n in statuses.items() if not isinstance(status, int)) - timeouts,
        "max_answer_s": round(max((o.seconds for o in outcomes if isinstance(o.status, int)), default=0), 3),
    }


def overload_ok(overload, summary):
    """Every request answered, none late, and only with 200, 503 (refused) or 504 (deadline passed)."""
    answered_ok = set(summary["by_status"]) <= {"200", "503", "504"}
    return answered_ok and overload["late"] == 0 and overload["client_timeouts"] == 0


def print_overload(o, out=sys.stdout):
    lat = o["rejected_latency_ms"]
    out.write(
        f"offered    {o['offered_rps']:.2f} requests/s for {o['offered_s']:g} s, deadline {o['deadline_s']:g} s\n"
    )
    out.write(
        f"on time    {o['on_time_200']} answered 200 within the deadline, goodput {o['goodput_rps']:.2f} requests/s "
        f"per second of arrivals ({o['goodput_over_span_rps']:.2f} over the span to the last answer)\n"
    )
    out.write(f"refused    {o['rejected_503']} answered 503 ({o['rejected_with_retry_after']} with Retry-After)")
    if lat["p50"] is not None:
        out.write(", latency ms " + "  ".join(f"{k} {v:.1f}" for k, v in lat.items()))
    out.write("\n")
    out.write(
        f"late       {o['late']} answered after the deadline + {LATE_AFTER:g} s, {o['client_timeouts']} client "
        f"timeouts, {o['client_errors']} other client errors; slowest answer {o['max_answer_s']:.2f} s\n"
    )


def print_summary(summary, out=sys.stdout):
    lat = summary["latency_ms"]
    out.write(f"requests   {summary['requests']}: {summary['succeeded']} succeeded, {summary['failed']} failed\n")
    out.write("by status  " + ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items()) + "\n")
    out.write(f"duration   {summary['duration_s']:.2f} s, throughput {summary['throughput_rps']:.2f} requests/s\n")
    if lat["p50"] is not None:
        out.write("latency ms " + "  ".join(f"{k} {v:.1f}" for k, v in lat.items()) + "\n")


def plot(outcomes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = outcomes[0].started
    ok = [o for o in outcomes if o.status == 200]
    bad = [o for o in outcomes if o.status != 200]
    fig, (timeline, histogram) = plt.subplots(1, 2, figsize=(12, 4.5))
    timeline.scatter([o.started - start for o in ok], [o.seconds * 1000 for o in ok], s=6, label="200")
    if bad:
        timeline.scatter(
            [o.started - start for o in bad], [o.seconds * 1000 for o in bad], s=10, c="red", label="failed"
        )
    timeline.set(xlabel="request sent at (s)", ylabel="latency (ms)", title="Latency over time")
    timeline.legend()
    histogram.hist([o.seconds * 1000 for o in ok], bins=40)
    histogram.set(xlabel="latency (ms)", ylabel="requests", title="Latency histogram")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_parser():
    config = Settings.for_program("stress_test")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=f"http://{config.host}:{config.port}/predict")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--requests", type=int, default=500)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: keep C requests in flight")
    mode.add_argument(
        "--interval", type=float, default=0.05, help="open loop: start one request every S seconds (default 0.05)"
    )
    mode.add_argument("--rate", type=float, help="overload: open loop at R requests/s for --duration seconds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of --rate (default 10)")
    parser.add_argument(
        "--deadline", type=float, default=config.request_timeout, help="the service's REQUEST_TIMEOUT (default: ours)"
    )
    parser.add_argument("--timeout", type=float, help="client timeout in seconds (default: the deadline + 10)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--plot", type=Path, help="write latency-over-time and histogram to this PNG")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.requests < 1 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--requests and --concurrency must be at least 1")
    if args.rate is not None and (args.rate <= 0 or args.duration <= 0):
        parser.error("--rate and --duration must be positive")
    timeout = args.timeout if args.timeout is not None else args.deadline + 10
    interval = None if args.concurrency else args.interval
    if args.rate:
        interval, args.requests = 1 / args.rate, max(1, round(args.rate * args.duration))
    image = args.image.read_bytes()
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.requests, unit="req", file=sys.stderr)
    outcomes = run(args.url, image, args.requests, args.concurrency, interval, timeout, progress)
    if progress:
        progress.close()
    summary = summarize(outcomes)
    if args.rate:
        summary["overload"] = summarize_overload(outcomes, args.rate, args.duration, args.deadline)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
        if args.rate:
            print_overload(summary["overload"])
    if args.plot:
        plot(outcomes, args.plot)
    if args.rate:  # refusals are the point of an overload run; lateness and silence are the failures
        return 0 if overload_ok(summary["overload"], summary) else 1
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
