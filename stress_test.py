"""Load-test the service and report what it did: python stress_test.py [--requests N] [--concurrency C].

The defaults reproduce the original test (500 requests, one every 0.05 s, jemma.png) but, unlike the
original, every request thread is joined, so the run ends when the last answer arrives, not after a fixed
sleep, and the summary counts what really happened.
"""

import argparse
import collections
import json
import math
import sys
import threading
import time
from pathlib import Path

import requests

from settings import Settings

DEFAULT_IMAGE = Path(__file__).resolve().parent / "jemma.png"  # the beagle the original test sent


class _Outcome:
    __slots__ = ("started", "seconds", "status")

    def __init__(self, started, seconds, status):
        self.started, self.seconds, self.status = started, seconds, status


def _send(session, url, image, timeout):
    started = time.perf_counter()
    try:
        response = session.post(url, files={"image": ("image", image)}, timeout=timeout)
        status = response.status_code if response.status_code != 200 or response.json().get("success") else "bad-body"
    except requests.RequestException as exc:
        status = type(exc).__name__
    return started, time.perf_counter() - started, status


def run(url, image, requests_total, concurrency=None, interval=None, timeout=60, progress=None):
    """Send the requests, closed loop (`concurrency` at a time) or open loop (one every `interval` s).

    Returns the outcomes, each with its start (perf_counter), latency in seconds and HTTP status.
    """
    outcomes, lock, local = [], threading.Lock(), threading.local()

    def one():
        if not hasattr(local, "session"):
            local.session = requests.Session()
        started, seconds, status = _send(local.session, url, image, timeout)
        with lock:
            outcomes.append(_Outcome(started, seconds, status))
        if progress:
            progress.update(1)

    if concurrency:
        remaining = iter(range(requests_total))
        claim = threading.Lock()

        def loop():
            while True:
                with claim:
                    if next(remaining, None) is None:
                        return
                one()

        threads = [threading.Thread(target=loop) for _ in range(min(concurrency, requests_total))]
        for thread in threads:
            thread.start()
    else:
        threads, start = [], time.perf_counter()
        for i in range(requests_total):
            time.sleep(max(0.0, start + i * interval - time.perf_counter()))
            threads.append(threading.Thread(target=one))
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
    config = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=f"http://{config.host}:{config.port}/predict")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--requests", type=int, default=500)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: keep C requests in flight")
    mode.add_argument(
        "--interval", type=float, default=0.05, help="open loop: start one request every S seconds (default 0.05)"
    )
    parser.add_argument("--timeout", type=float, default=config.request_timeout + 10)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--plot", type=Path, help="write latency-over-time and histogram to this PNG")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.requests < 1 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--requests and --concurrency must be at least 1")
    interval = None if args.concurrency else args.interval
    image = args.image.read_bytes()
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.requests, unit="req", file=sys.stderr)
    outcomes = run(args.url, image, args.requests, args.concurrency, interval, args.timeout, progress)
    if progress:
        progress.close()
    summary = summarize(outcomes)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if args.plot:
        plot(outcomes, args.plot)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
