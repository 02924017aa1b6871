"""What several test files share: the images, a client's POST, a load of them, the service's processes, a stand-in
model, crafted inputs."""

import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import requests

import launcher
from launcher import free_port, wait_for  # noqa: F401 - the tests' one import for these

ROOT = Path(__file__).resolve().parent.parent
CASTLE = ROOT / "castle_image.jpg"
JEMMA = ROOT / "jemma.png"  # the beagle the original stress test sent


def post(url, path=CASTLE, timeout=60, **kwargs):
    """POST an image file to a running service's /predict, the way a client does."""
    with open(path, "rb") as f:
        return requests.post(f"{url}/predict", files={"image": f}, timeout=timeout, **kwargs)


class Load:
    """`clients` threads POSTing the castle to a running service one request after another until `stop()`;
    `outcomes` holds (status or the client's exception, when sent, seconds taken) for each request."""

    def __init__(self, url, clients=4):
        self.url, self.outcomes, self._stop = url, [], threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _loop(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = post(self.url, timeout=20).status_code
            except requests.RequestException as exc:
                status = repr(exc)
            self.outcomes.append((status, started, time.monotonic() - started))

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def statuses(self):
        return [status for status, _, _ in self.outcomes]

    def longest(self):
        return max(seconds for _, _, seconds in self.outcomes)


def lite0_service(redis_url, logdir, model_cache_dir, **env):
    """Real workers and web servers against `redis_url`; EfficientNet-Lite0 with its real weights, fast heartbeats
    for the sweeps."""
    return launcher.Processes(
        redis_url,
        logdir,
        MODEL="efficientnet_lite0",
        MODEL_CACHE_DIR=model_cache_dir,
        HEARTBEAT_INTERVAL="0.5",
        HEARTBEAT_TTL="2",
        **env,
    )


def worker_name(service, process):
    """The name a worker process of `service` registered under."""
    wait_for(lambda: "worker_ready" in service.log_text(process), 60, "worker_ready")
    return service.log_text(process).split("worker_ready worker=")[1].split()[0]


class CountingClassifier:
    """Stands in for the model so that a test is about the queue, not about TensorFlow.

    Each image's first two pixel values encode a number; `seen` records the numbers it classified.
    """

    name = "counting"
    rechecked = 0  # images a bf16 model answered in f32 (models.Classifier.rechecked): none here

    def __init__(self):
        self.seen = []
        self.lock = threading.Lock()

    def predict(self, pixels):
        time.sleep(0.002)
        with self.lock:
            self.seen.extend(int(p[0, 0, 0]) + 256 * int(p[0, 0, 1]) for p in pixels)
        return np.full((len(pixels), 1000), 1e-3, dtype=np.float32)

    def top_k(self, probabilities, k):
        return [{"label": "x", "probability": float(probabilities[0])}] * k


def png_header(width, height):
    """A valid PNG header that declares `width` x `height` RGB pixels; the pixel data need not exist."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def png_bomb():
    """A valid PNG header that declares 30000x30000 pixels."""
    return png_header(30000, 30000)


def sample(text, name, labels=""):
    """The value of one sample in Prometheus's text format (labels as the exposition writes them), or None."""
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else None
