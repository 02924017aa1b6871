"""Benchmark: the bare model beside the whole service, in one run, on this machine.

`make bench` (or `python bench.py`) measures, for each model (ResNet50 with random weights: the same compute
as ImageNet's, offline; and EfficientNet-Lite0, the default) and each runtime (Keras on TensorFlow, OpenVINO
f32 and bf16):
- the bare runtime on ready float32 input at batch 1 and 32, in this process (TensorFlow's
  `predict_on_batch` is the reference every ratio is taken against);
- the service end to end over HTTP at concurrency 1 and 32, with the CPU time each process (web, worker,
  Redis) spent per request at 32, and Redis commands per request (INFO commandstats);
then plain polling (WAIT_MODE=poll) on TensorFlow for comparison, Redis commands per idle second, and, on
OpenVINO f32: the same service fed 12-megapixel JPEGs and then a 224x224 BMP (nothing to decode or resize: the
request path's own cost) instead of the castle, and an open-loop overload row at twice the capacity just measured
(REQUEST_TIMEOUT=10, 40 s), with how latency recovers once the load is gone. Beside them, the CPU that
`prepare_image` alone costs for each of the three images in this process, before and after the service (the faster
of the two): an estimate of the floor under the web's CPU. For ResNet50 it also says whether issue 10's two
targets, 12 MP uploads at 0.9x the castle's throughput and OpenVINO f32 at 1.2x bare TensorFlow, can both hold in
the run, given what the 12 MP JPEG's preparation costs more than the castle's.
Last, with EfficientNet-Lite0, how far OpenVINO f32's and bf16's answers are from TensorFlow's on real photos
(measure_precision.py).
The castle image is sent. Ratios are what matter on a shared machine; the JSON goes to bench-results/.
"""

import argparse
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import launcher
import measure_precision
import models
import stress_test
from helpers import prepare_image
from jobs import IMAGE_SHAPE
from settings import Settings

ROOT = Path(__file__).resolve().parent
BENCH_ONLY = {"info", "config|resetstat", "flushall", "ping"}
# Every row sets all three: launcher.Processes passes on the shell's environment, where they may be exported.
RUNTIMES = {
    "tensorflow": {"RUNTIME": "tensorflow", "PRECISION": "f32", "RECHECK_MARGIN": "0"},
    "openvino f32": {"RUNTIME": "openvino", "PRECISION": "f32", "RECHECK_MARGIN": "0"},
    "openvino bf16": {"RUNTIME": "openvino", "PRECISION": "bf16", "RECHECK_MARGIN": "0"},
}
BATCHES = (1, 32)
CONCURRENCIES = (1, 32)
TICKS = os.sysconf("SC_CLK_TCK")


def bare(classifier, seconds):
    """{batch: {images_per_s, ms_per_batch}} of the runtime alone on preprocessed float32 input."""
    results = {}
    for batch in BATCHES:
        x = classifier.preprocess(np.random.default_rng(0).integers(0, 256, (batch, *IMAGE_SHAPE), dtype=np.uint8))
        for _ in range(2):
            classifier.infer(x)
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < seconds:
            classifier.infer(x)
            runs += 1
        elapsed = time.perf_counter() - started
        results[batch] = {"images_per_s": batch * runs / elapsed, "ms_per_batch": elapsed / runs * 1000}
    return results


def bare_runtimes(model, cache_dir, seconds):
    classifier = models.load(
        Settings(model=model, model_weights=_weights(model), model_cache_dir=cache_dir, runtime="tensorflow")
    )
    report = {"tensorflow": bare(classifier, seconds)}
    for name, env in list(RUNTIMES.items())[1:]:
        classifier.use_runtime("openvino", env["PRECISION"], Path(cache_dir) / "openvino")
        report[name] = bare(classifier, seconds)
    return report


def _weights(model):
    return "none" if model == "resnet50" else ""


def count_commands(client):
    """Total calls since the last CONFIG RESETSTAT, the benchmark's own left out (commands run by our Lua
    scripts included: INFO commandstats counts them)."""
    stats = client.info("commandstats")
    return sum(v["calls"] for name, v in stats.items() if name.removeprefix("cmdstat_") not in BENCH_ONLY)


def cpu_seconds(pid):
    """User + system CPU of a process and of its live children (gunicorn's workers), from /proc."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += cpu_seconds(int(child))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return total + (int(fields[11]) + int(fields[12])) / TICKS


def service_run(url, redis, image, concurrency, total, pids):
    stress_test.run(url, image, min(concurrency * 2, 16), concurrency=concurrency)  # warm connections
    redis.config_resetstat()
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    summary = stress_test.summarize(stress_test.run(url, image, total, concurrency=concurrency))
    summary["cpu_ms_per_request"] = {
        name: (cpu_seconds(pid) - before[name]) * 1000 / total for name, pid in pids.items()
    }
    summary["redis_commands_per_request"] = count_commands(redis) / total
    return summary


def overload_run(service, image, capacity, seconds, deadline, recovery_seconds=15.0):
    """Open loop at twice the measured capacity; and, from the moment the arrivals stop, one request at a time
    for `recovery_seconds` (load back under capacity), to see how soon latency is back to normal."""
    web = service.start_web(REQUEST_TIMEOUT=str(deadline))
    url, rate = f"{service.url}/predict", 2 * capacity
    probes = []

    def probe():
        time.sleep(seconds)  # the last arrival
        end = time.perf_counter() + recovery_seconds
        while time.perf_counter() < end:
            probes.extend(stress_test.run(url, image, 1, concurrency=1, timeout=deadline + 10))

    prober = threading.Thread(target=probe)
    prober.start()
    began = time.perf_counter()
    outcomes = stress_test.run(url, image, max(1, round(rate * seconds)), interval=1 / rate, timeout=deadline + 10)
    prober.join()
    service.stop(web)
    summary = stress_test.summarize_overload(outcomes, rate, seconds, deadline)
    load_gone = began + seconds
    summary["recovery"] = [
        {"after_s": round(o.started - load_gone, 2), "ms": round(o.seconds * 1000, 1), "status": o.status}
        for o in probes
    ]
    return summary


def twelve_megapixels():
    """A 4000x3000 JPEG of a real photo (scikit-image's astronaut, enlarged), as a phone would upload it."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((4000, 3000), Image.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def small_bmp(image):
    """The image as a 224x224 BMP: a request whose preparation costs next to nothing."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").resize(IMAGE_SHAPE[1::-1]).save(buffer, "BMP")
    return buffer.getvalue()


def uploads(image):
    """The images the service is fed: the castle, then, on OpenVINO f32, two more."""
    return {"castle": image, "12 MP JPEG": twelve_megapixels(), "224x224 BMP": small_bmp(image)}


def prepare_ms(images, seconds=1.0):
    """{name: CPU ms} of `prepare_image` alone on each image in this thread, the best of three rounds: what the web
    spends on it at the least, whatever the rest of its request path costs."""
    costs = {}
    for name, data in images.items():
        rounds = []
        for _ in range(3):
            runs, started = 0, time.thread_time()  # not the runtimes' idle pool threads of this process
            while runs < 5 or time.thread_time() - started < seconds / 3:
                prepare_image(data, 50_000_000)
                runs += 1
            rounds.append((time.thread_time() - started) / runs * 1000)
        costs[name] = min(rounds)
    return costs


def service_runtimes(model, cache_dir, images, requests, idle_seconds, overload_seconds):
    image = images["castle"]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = launcher.RedisServer(tmp)
        server.start()
        redis = server.client()
        common = {"MODEL": model, "MODEL_WEIGHTS": _weights(model), "MODEL_CACHE_DIR": cache_dir}
        try:
            for name, env in RUNTIMES.items():
                service = launcher.Processes(server.url, tmp, **common, **env)
                try:
                    worker = service.start_worker()
                    web = service.start_web()
                    url = f"{service.url}/predict"
                    pids = {"web": web.pid, "worker": worker.pid, "redis": server.process.pid}
                    # Both runtimes prepare kernels per batch size on first use: warm the sizes a run will see.
                    for concurrency in (32, 16, 8, 4):
                        stress_test.run(url, image, 4 * concurrency, concurrency=concurrency)
                    report[name] = {
                        c: service_run(url, redis, image, c, max(48, c * requests), pids) for c in CONCURRENCIES
                    }
                    _print_service(model, name, report[name])
                    if name == "openvino f32":
                        for upload in ("12 MP JPEG", "224x224 BMP"):
                            report[upload] = {
                                32: service_run(url, redis, images[upload], 32, max(48, 32 * requests), pids)
                            }
                            _print_service(model, upload, report[upload])
                    if name == "openvino f32" and overload_seconds:
                        service.stop(web)
                        capacity = report[name][32]["throughput_rps"]
                        report["overload"] = overload_run(service, image, capacity, overload_seconds, deadline=10.0)
                        report["overload"]["normal_p50_ms"] = report[name][1]["latency_ms"]["p50"]
                        print(f"{model} {_overload_line(report['overload'])}", flush=True)
                    if name == "tensorflow":
                        service.stop(web)
                        pids["web"] = service.start_web(WAIT_MODE="poll").pid
                        report["tensorflow, polling"] = {
                            c: service_run(f"{service.url}/predict", redis, image, c, max(48, c * requests), pids)
                            for c in CONCURRENCIES
                        }
                        _print_service(model, "tensorflow, polling", report["tensorflow, polling"])
                        redis.config_resetstat()
                        time.sleep(idle_seconds)
                        report["idle_commands_per_s"] = count_commands(redis) / idle_seconds
                finally:
                    service.stop_all()
        finally:
            server.stop()
    return report


def _print_service(model, name, runs):
    for concurrency, s in runs.items():
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in s["cpu_ms_per_request"].items())
        print(
            f"{model} service {name} c={concurrency}: {s['throughput_rps']:.2f} req/s, p50 {s['latency_ms']['p50']}"
            f" ms, {s['redis_commands_per_request']:.2f} Redis commands/req, CPU ms/req: {cpu}, "
            f"{s['failed']} failed",
            flush=True,
        )


def print_tables(model, bare_before, bare_after, service, prepare):
    reference = {
        b: (bare_before["tensorflow"][b]["images_per_s"] + bare_after["tensorflow"][b]["images_per_s"]) / 2
        for b in BATCHES
    }
    print(f"\n### {model}\n")
    print("| measurement | images/s | ms (bare: per batch; service: p50) | x bare TF predict_on_batch |")
    print("|---|---|---|---|")
    for name in RUNTIMES:
        for b in BATCHES:
            ips = (bare_before[name][b]["images_per_s"] + bare_after[name][b]["images_per_s"]) / 2
            ms = (bare_before[name][b]["ms_per_batch"] + bare_after[name][b]["ms_per_batch"]) / 2
            print(f"| bare {name}, batch {b} | {ips:.1f} | {ms:.1f} | {ips / reference[b]:.2f}x |")
    rows = [(name, service[name]) for name in (*RUNTIMES, "tensorflow, polling") if name in service]
    for name, runs in rows:
        for c, s in runs.items():
            ratio = s["throughput_rps"] / reference[32 if c > 1 else 1]
            print(
                f"| service {name}, concurrency {c} | {s['throughput_rps']:.1f} | {s['latency_ms']['p50']:.1f} "
                f"| {ratio:.2f}x |"
            )
    print(
        "\n| service at concurrency 32 | web CPU ms/req | worker CPU ms/req | Redis CPU ms/req | Redis commands/req |"
    )
    print("|---|---|---|---|---|")
    for name, runs in rows:
        cpu, s = runs[32]["cpu_ms_per_request"], runs[32]
        print(
            f"| {name} | {cpu['web']:.2f} | {cpu['worker']:.2f} | {cpu['redis']:.2f} | "
            f"{s['redis_commands_per_request']:.2f} |"
        )
    if "12 MP JPEG" in service:
        _print_uploads(service, prepare)
        if model == "resnet50":  # the model of issue 10's targets
            _print_two_targets(prepare, reference[32])
    print(f"\nidle: {service['idle_commands_per_s']:.2f} Redis commands/s")
    if "overload" in service:
        print(_overload_line(service["overload"]))


def _print_uploads(service, prepare):
    castle = service["openvino f32"][32]
    runs = {"castle": castle, "12 MP JPEG": service["12 MP JPEG"][32], "224x224 BMP": service["224x224 BMP"][32]}
    print(
        "\n| upload, openvino f32, concurrency 32 | requests/s | x the castle's | web CPU ms/req "
        "| prepare_image alone, CPU ms (its best) | the rest of the web's request, ms |"
    )
    print("|---|---|---|---|---|---|")
    for name, s in runs.items():
        rps, web = s["throughput_rps"], s["cpu_ms_per_request"]["web"]
        print(
            f"| {name} | {rps:.1f} | {rps / castle['throughput_rps']:.2f}x | {web:.2f} | {prepare[name]:.2f} "
            f"| {web - prepare[name]:.2f} |"
        )
    # Estimates, not bounds: they take the castle row's other costs for the 12 MP row's, where the worker's CPU a
    # request moves by 10 % from row to row and the cores are 85-95 % busy (the load tool's CPU not counted).
    total = sum(castle["cpu_ms_per_request"].values())
    extra = prepare["12 MP JPEG"] - prepare["castle"]
    path = runs["224x224 BMP"]["cpu_ms_per_request"]["web"] - prepare["224x224 BMP"]
    print(
        f"estimates, not bounds: a castle request cost {total:.1f} ms of CPU in all (web, worker, Redis) and a 12 MP "
        f"JPEG's preparation alone costs {extra:.1f} ms more: with everything else as the castle's, 12 MP uploads "
        f"would reach about {total / (total + extra):.2f}x the castle's throughput (measured "
        f"{runs['12 MP JPEG']['throughput_rps'] / castle['throughput_rps']:.2f}x); the castle's preparation alone, "
        f"{prepare['castle']:.2f} ms, and the request path around it, {path:.2f} ms as the BMP measures it (taking it "
        f"to cost the same for every upload), come to {prepare['castle'] + path:.2f} ms of web CPU (measured "
        f"{castle['cpu_ms_per_request']['web']:.2f} ms)"
    )


def _print_two_targets(prepare, bare_tf_32):
    """Whether issue 10's 12 MP target (0.9x the castle's throughput) and f32 target (1.2x bare TensorFlow at
    batch 32) can both hold in this run. Throughput on busy cores goes with the inverse of a request's CPU, so a 12
    MP request, costing at least its extra preparation more than a castle request, reaches 0.9x only when a castle
    request costs 9x that; the cores then serve at most cores / (9 x extra) castle requests a second."""
    extra = prepare["12 MP JPEG"] - prepare["castle"]
    cores = len(os.sched_getaffinity(0))
    fastest = 1000 * cores / (9 * extra) if extra > 0 else float("inf")
    print(
        f"issue 10's two targets in one run: 12 MP at 0.9x the castle's throughput needs a castle request to cost at "
        f"least 9x {extra:.1f} = {9 * extra:.0f} ms of CPU, so at most {fastest:.1f} castle requests/s on {cores} "
        f"cores; f32 at 1.2x bare TensorFlow needs at least {1.2 * bare_tf_32:.1f}: "
        + (
            "both within reach"
            if fastest >= 1.2 * bare_tf_32
            else "not both, unless the worker's own CPU a request falls from one row to the other"
        )
    )


def _overload_line(o):
    rejected, capacity = o["rejected_latency_ms"], o["offered_rps"] / 2
    recovered = [p["ms"] for p in o["recovery"] if p["after_s"] >= 5 and p["status"] == 200]
    p50 = stress_test.percentile(sorted(recovered), 50)
    return (
        f"overload, open loop at 2x capacity ({o['offered_rps']:.2f} requests/s for {o['offered_s']:g} s, deadline "
        f"{o['deadline_s']:g} s): goodput {o['goodput_rps']:.2f} requests/s = {o['goodput_rps'] / capacity:.2f}x "
        f"capacity ({o['goodput_over_span_rps'] / capacity:.2f}x over the span to the last answer); "
        f"{o['on_time_200']} on time, {o['rejected_503']} refused (p95 {rejected['p95']} ms, p99 "
        f"{rejected['p99']} ms), {o['timed_out_504']} 504, {o['late']} late, {o['client_timeouts']} client timeouts; "
        f"from 5 s after the load stopped, p50 {p50} ms at concurrency 1 (normal {o['normal_p50_ms']} ms)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--seconds", type=float, default=4, help="time per bare measurement")
    parser.add_argument("--requests", type=int, default=8, help="requests per unit of concurrency (min 48)")
    parser.add_argument("--idle", type=float, default=10, help="seconds to count idle Redis commands")
    parser.add_argument("--overload", type=float, default=40, help="seconds of the overload row (0: none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    args = parser.parse_args(argv)
    images = uploads((ROOT / "castle_image.jpg").read_bytes())
    report = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for model in args.models:
            # The machine is shared: measuring the bare runtimes before and after the service and averaging
            # keeps a drift in the machine's speed from favouring either side.
            before, prepare_before = bare_runtimes(model, cache_dir, args.seconds), prepare_ms(images)
            service = service_runtimes(model, cache_dir, images, args.requests, args.idle, args.overload)
            after, prepare_after = bare_runtimes(model, cache_dir, args.seconds), prepare_ms(images)
            # The faster of the two: a slow moment of the machine must not raise the estimate of the floor.
            prepare = {name: min(prepare_before[name], prepare_after[name]) for name in images}
            report[model] = {"bare_before": before, "bare_after": after, "service": service, "prepare_ms": prepare}
            print_tables(model, before, after, service, prepare)
        if "efficientnet_lite0" in args.models:  # the model with real weights: its answers can be compared
            report["precision"] = measure_precision.measure(cache_dir)
            measure_precision.print_report(report["precision"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
