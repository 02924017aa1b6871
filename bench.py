"""Benchmark: the bare model beside the whole service, in one run, on this machine.

`make bench` (or `python bench.py`) measures in-process predict_on_batch at batch 1, 8 and 32; then the
service end to end over HTTP at concurrency 1, 8 and 32, with pub/sub notifications and with plain polling
(WAIT_MODE=poll); Redis commands per request and per idle second from INFO commandstats. The model is
ResNet50 with random weights (same compute as ImageNet's, and it runs offline). Ratios are what matter on
a shared machine; the JSON goes to bench-results/.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import launcher
import stress_test
from jobs import IMAGE_SHAPE

ROOT = Path(__file__).resolve().parent
BENCH_ONLY = {"info", "config|resetstat", "flushall", "ping"}
CONCURRENCIES = (1, 8, 32)


def bare_model(classifier, seconds, label):
    results = {}
    for batch in (1, 8, 32):
        x = np.random.default_rng(0).integers(0, 256, (batch, *IMAGE_SHAPE), dtype=np.uint8)
        for _ in range(2):
            classifier.predict(x)
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < seconds:
            classifier.predict(x)
            runs += 1
        elapsed = time.perf_counter() - started
        results[batch] = {
            "images_per_s": round(batch * runs / elapsed, 2),
            "ms_per_batch": round(elapsed / runs * 1000, 1),
        }
        print(
            f"bare model ({label}) batch {batch:>2}: {results[batch]['images_per_s']:6.2f} images/s, "
            f"{results[batch]['ms_per_batch']:7.1f} ms per batch",
            flush=True,
        )
    return results


def count_commands(client):
    """Total and per-command calls since the last CONFIG RESETSTAT, the benchmark's own left out.

    INFO commandstats counts every command, those our Lua scripts run included.
    """
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
    relevant = {name: n for name, n in calls.items() if name not in BENCH_ONLY}
    return sum(relevant.values()), relevant


def service_run(url, redis, image, concurrency, requests_total):
    stress_test.run(url, image, min(concurrency * 2, 16), concurrency=concurrency)  # warm connections
    redis.config_resetstat()
    summary = stress_test.summarize(stress_test.run(url, image, requests_total, concurrency=concurrency))
    total, by_command = count_commands(redis)
    summary["redis_commands_per_request"] = round(total / requests_total, 2)
    summary["redis_commands"] = by_command
    return summary


def overload_run(service, image, capacity, seconds, deadline):
    """Open loop at twice the measured capacity against a web server with a short deadline."""
    web = service.start_web(REQUEST_TIMEOUT=str(deadline))
    url = f"{service.url}/predict"
    rate = 2 * capacity
    outcomes = stress_test.run(url, image, max(1, round(rate * seconds)), interval=1 / rate, timeout=deadline + 10)
    summary = stress_test.summarize(outcomes)
    summary["overload"] = stress_test.summarize_overload(outcomes, rate, seconds, deadline)
    service.stop(web)
    return summary


def idle_rate(redis, seconds):
    redis.config_resetstat()
    time.sleep(seconds)
    total, by_command = count_commands(redis)
    return {"commands_per_s": round(total / seconds, 2), "by_command": by_command}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4, help="time per bare-model measurement")
    parser.add_argument("--requests", type=int, default=8, help="requests per unit of concurrency (min 48)")
    parser.add_argument("--idle", type=float, default=10, help="seconds to count idle Redis commands")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--overload", type=float, default=10, help="seconds of the overload row (0: none)")
    args = parser.parse_args(argv)

    import models
    from settings import Settings

    classifier = models.load(Settings(model="resnet50", model_weights="none"))
    report = {"bare_before": bare_model(classifier, args.seconds, "before"), "service": {}}
    image = (ROOT / "castle_image.jpg").read_bytes()
    worker_env = dict(item.split("=", 1) for item in args.worker_env)
    with tempfile.TemporaryDirectory() as tmp:
        server = launcher.RedisServer(tmp)
        server.start()
        redis = server.client()
        service = launcher.Processes(server.url, tmp, MODEL="resnet50", MODEL_WEIGHTS="none")
        try:
            service.start_worker(**worker_env)
            # TensorFlow (oneDNN) prepares kernels for each new batch size on first use, 15-30 % slower; a
            # long-running worker has seen them all. Warm them up so that neither mode pays for it.
            warm = launcher.Processes(server.url, tmp)
            warm.start_web()
            for concurrency in (32, 16, 8, 4):
                stress_test.run(f"{warm.url}/predict", image, 4 * concurrency, concurrency=concurrency)
            warm.stop_all()
            for mode in ("notify", "poll"):
                web = service.start_web(WAIT_MODE=mode)
                url = f"{service.url}/predict"
                report["service"][mode] = {}
                for concurrency in CONCURRENCIES:
                    summary = service_run(url, redis, image, concurrency, max(48, concurrency * args.requests))
                    report["service"][mode][concurrency] = summary
                    print(
                        f"{mode:<6} concurrency {concurrency:>2}: {summary['throughput_rps']:6.2f} requests/s, "
                        f"p50 {summary['latency_ms']['p50']:7.1f} ms, p99 {summary['latency_ms']['p99']:7.1f} ms, "
                        f"{summary['redis_commands_per_request']:.2f} Redis commands/request, "
                        f"{summary['failed']} failed",
                        flush=True,
                    )
                if mode == "notify":
                    report["idle"] = idle_rate(redis, args.idle)
                    print(f"idle: {report['idle']['commands_per_s']} Redis commands/s", flush=True)
                service.stop(web)
                if mode == "notify" and args.overload:
                    capacity = report["service"]["notify"][max(CONCURRENCIES)]["throughput_rps"]
                    report["overload"] = overload_run(service, image, capacity, args.overload, deadline=5.0)
                    o = report["overload"]["overload"]
                    print(
                        f"overload at {o['offered_rps']:.2f} requests/s (2x capacity): goodput {o['goodput_rps']:.2f} "
                        f"requests/s, {o['rejected_503']} refused (p99 {o['rejected_latency_ms']['p99']} ms), "
                        f"{o['late']} late, {o['client_timeouts']} client timeouts",
                        flush=True,
                    )
        finally:
            service.stop_all()
            server.stop()

    # The machine is shared: measuring the bare model before and after the service and averaging keeps a
    # drift in the machine's speed from favouring either side.
    report["bare_after"] = bare_model(classifier, args.seconds, "after")
    report["bare"] = {
        batch: {
            key: round((report["bare_before"][batch][key] + report["bare_after"][batch][key]) / 2, 2)
            for key in ("images_per_s", "ms_per_batch")
        }
        for batch in report["bare_before"]
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")


def print_table(report):
    bare, notify, poll = report["bare"], report["service"]["notify"], report["service"]["poll"]
    print("\n| measurement | throughput (images/s) | p50 latency (ms) | p99 latency (ms) | Redis commands/request |")
    print("|---|---|---|---|---|")
    for batch, row in bare.items():
        name = f"bare predict_on_batch, batch {batch} (mean of before and after)"
        print(f"| {name} | {row['images_per_s']:.2f} | {row['ms_per_batch']:.1f} | | |")
    for name, runs in (("notifications", notify), ("polling", poll)):
        for concurrency, s in runs.items():
            lat = s["latency_ms"]
            print(
                f"| service, {name}, concurrency {concurrency} | {s['throughput_rps']:.2f} | {lat['p50']:.1f} | "
                f"{lat['p99']:.1f} | {s['redis_commands_per_request']:.2f} |"
            )
    print(f"| idle | | | | {report['idle']['commands_per_s']} commands/s |")
    if "overload" in report:
        o = report["overload"]["overload"]
        print(
            f"| overload, open loop at 2x capacity ({o['offered_rps']:.2f} requests/s, deadline {o['deadline_s']:g} s) "
            f"| goodput {o['goodput_rps']:.2f} | {o['on_time_200']} on time, {o['rejected_503']} refused 503, "
            f"{o['late']} late | 503 p99 {o['rejected_latency_ms']['p99']} ms | |"
        )
    top = max(CONCURRENCIES)
    print(
        f"\nthroughput at concurrency {top} / bare batch {top}: notifications "
        f"{notify[top]['throughput_rps'] / bare[top]['images_per_s']:.2f}x, polling "
        f"{poll[top]['throughput_rps'] / bare[top]['images_per_s']:.2f}x"
    )
    print(
        f"p50 at concurrency 1 minus bare batch-1 latency: notifications "
        f"{notify[1]['latency_ms']['p50'] - bare[1]['ms_per_batch']:+.1f} ms, polling "
        f"{poll[1]['latency_ms']['p50'] - bare[1]['ms_per_batch']:+.1f} ms"
    )


if __name__ == "__main__":
    main()
