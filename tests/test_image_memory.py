"""A small upload must not cost a large amount of memory: a 6300x6300 16-bit PNG is ~90 KB on the wire and
79 MB decoded (2 bytes a pixel); scaling it to 8 bits through float64 once took ~1 GB.

The budgets below come from what prepare_image cannot avoid for such an image, in bytes per pixel: the decoded
16-bit image (2, held by the caller), numpy's copy of it (2), the 8-bit grey result (1) and Pillow's full-size
RGB conversion before the resize (4, Pillow keeps RGB as 4 bytes).
"""

import io
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from test_open_inference import triton_request

import helpers
from job_queue import JobQueue
from settings import Settings
from support import ROOT, wait_for
from v2 import HEADER_LENGTH
from worker_registration import WorkerRegistry

SIDE = 6300
PIXELS = SIDE * SIDE
DECODED = 2 * PIXELS  # the 16-bit image as Pillow holds it: 79 MB
LIMIT = 40_000_000


@pytest.fixture(scope="module")
def large_png(tmp_path_factory):
    # Every row the same ramp: the PNG compresses to ~90 KB, as in the report.
    ramp = np.linspace(0, 65535, SIDE).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp, (SIDE, SIDE)))).save(buffer, "PNG")
    path = tmp_path_factory.mktemp("large") / "16-bit.png"
    path.write_bytes(buffer.getvalue())
    return path


def test_the_large_png_is_small_on_the_wire(large_png):
    assert large_png.stat().st_size < 200_000


def test_numpy_memory_stays_a_small_multiple_of_the_16_bit_image(large_png):
    # tracemalloc sees numpy's buffers and Python's bytes, not Pillow's image memory: that is checked below.
    # Budget: numpy's copy (1x), the 8-bit result (0.5x) and one band's float64 scratch (a few MB) = ~1.6x.
    data = large_png.read_bytes()
    tracemalloc.start()
    try:
        pixels = helpers.prepare_image(data, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (224, 224, 3)
    assert peak < 2.5 * DECODED, f"numpy peak {peak / 2**20:.0f} MB for a {DECODED / 2**20:.0f} MB image"


_MEASURE = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import helpers, io, numpy as np
from PIL import Image

# Warm up on a small 16-bit PNG so lazily imported codecs do not count as the large image's cost.
small = io.BytesIO()
Image.fromarray(np.zeros((8, 8), np.uint16)).save(small, "PNG")
helpers.prepare_image(small.getvalue(), 100)
data = open(sys.argv[2], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = helpers.prepare_image(data, int(sys.argv[3]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before": before * 1024, "increase": (after - before) * 1024, "shape": pixels.shape}))  # KiB
"""

# Linux carries ru_maxrss across exec, and a forked child starts at its parent's size: measured straight from pytest
# (hundreds of MB once TensorFlow is loaded) the increase would read as zero. A small Python in between gives the
# measuring process a fresh, small parent.
_FRESH_PARENT = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def test_peak_resident_memory_stays_bounded(large_png):
    # Pillow's own image memory is not traced, so measure the process's high-water mark in a fresh interpreter.
    # Unavoidable: the 16-bit image (2 bytes a pixel) + the grey result (1) + Pillow's RGB copy (4) = 278 MB;
    # 400 MB leaves room for the allocator, and is well under the ~1 GB the float64 conversion cost.
    command = [sys.executable, "-c", _MEASURE, str(ROOT), str(large_png), str(LIMIT)]
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_PARENT, *command], capture_output=True, text=True, timeout=240, check=True
    )
    measured = json.loads(result.stdout)
    assert measured["shape"] == [224, 224, 3]
    assert measured["before"] < 200 * 2**20, "the baseline was inherited from pytest: the increase would mean nothing"
    assert measured["increase"] < 400 * 2**20, f"peak RSS grew by {measured['increase'] / 2**20:.0f} MB"


def _whole_image(image):
    """The scaling in float64 over the whole image at once: the reference for the bands."""
    array = np.asarray(image, dtype=np.float64)
    low, high = helpers._range(image.mode, np.asarray(image))
    return np.clip((array - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


def _image(mode, low, high, dtype):
    values = np.random.default_rng(0).uniform(low, high, (37, 53)).astype(dtype)
    return Image.frombytes(mode, (53, 37), values.tobytes())


@pytest.mark.parametrize(
    "image",
    [
        _image("I;16", 0, 65536, "<u2"),
        _image("I;16B", 0, 65536, ">u2"),
        _image("I", -70_000, 140_000, "<i4"),  # beyond 16 bits at both ends: clipped
        _image("I", -10, 256, "<i4"),  # fits in 8 bits: not scaled
        _image("F", -100, 80_000, "<f4"),
        _image("F", 0, 255.9, "<f4"),
    ],
    ids=["I;16", "I;16B", "I wide", "I narrow", "F wide", "F narrow"],
)
@pytest.mark.parametrize("band_pixels", [1, 53 * 5, 1 << 20])  # a row per band, bands with a short last one, one band
def test_scaling_in_bands_gives_the_same_pixels_as_the_whole_image(monkeypatch, image, band_pixels):
    monkeypatch.setattr(helpers, "_BAND_PIXELS", band_pixels)
    assert np.array_equal(np.asarray(helpers._to_rgb(image))[..., 0], _whole_image(image))


# -- a request waiting for its answer -----------------------------------------------------------------------------
def _resident(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _predict(url, upload, seconds):
    return requests.post(f"{url}/predict?timeout={seconds}", files={"image": ("noise.jpg", upload)}, timeout=60)


def _v2_infer(url, upload, seconds):
    body, header_length = triton_request([upload], timeout=int(seconds * 1e6))
    headers = {HEADER_LENGTH: str(header_length)}
    return requests.post(f"{url}/v2/models/efficientnet_lite0/infer", data=body, headers=headers, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("send", [_predict, _v2_infer], ids=["predict", "v2"])
def test_a_request_waits_for_its_answer_holding_its_pixels_not_its_upload(service, real_redis, send):
    """Up to MAX_QUEUE_LENGTH requests of one web process may wait, each until its deadline. A /predict held its body
    and the file's copy split from it (two copies of up to MAX_UPLOAD_BYTES: 10 GB at the defaults), a V2 infer its
    body. Now each holds its pixels. A worker's heartbeat says it serves, and none does: every request waits out
    its deadline."""
    WorkerRegistry(real_redis, JobQueue(real_redis, Settings()), heartbeat_ttl=300).beat(
        "asleep", {"model": "efficientnet_lite0", "ready": 1}
    )
    noise = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    upload = io.BytesIO()
    Image.fromarray(noise).save(upload, "JPEG", quality=95)  # noise hardly compresses: 1.2 MB
    upload = upload.getvalue()
    web = service.start_web(REQUEST_TIMEOUT="30")
    children = Path(f"/proc/{web.pid}/task/{web.pid}/children")
    # gunicorn's one worker: the master listens before it forks it, so the port can answer before it exists
    wait_for(lambda: children.read_text().split(), 30, "gunicorn's worker")
    pid = int(children.read_text().split()[0])
    assert [send(service.url, upload, 0.3).status_code for _ in range(3)] == [504] * 3  # the allocator warmed up
    before = _resident(pid)
    count, statuses = 50, []
    threads = [
        threading.Thread(target=lambda: statuses.append(send(service.url, upload, 10).status_code))
        for _ in range(count)
    ]
    for thread in threads:  # one after another, as a queue builds up: each is prepared before the next comes
        thread.start()
        time.sleep(0.1)
    time.sleep(0.5)
    grown = _resident(pid) - before
    for thread in threads:
        thread.join(60)
    assert statuses == [504] * count  # all of them were admitted and waited (none refused, none answered)
    # A copy of each upload held would be 60 MB; the pixels are 150 KB a request.
    assert grown < count * len(upload) / 2, f"{count} waiting requests grew the process by {grown / 2**20:.0f} MB"
