"""How far OpenVINO's answers are from Keras on TensorFlow's, on real photos: what f32 keeps and bf16 trades.

EfficientNet-Lite0 with its real weights (ResNet50's random weights answer nothing worth comparing) classifies each
photo, prepared as the service prepares an upload (`helpers.prepare_image`), on TensorFlow, OpenVINO f32 and, where
the CPU has it, OpenVINO bf16. For each OpenVINO precision: on how many photos the top-1 label is TensorFlow's, on
how many the top-5 labels are the same set, the largest change of any probability, and the photos whose top-1
moved, with TensorFlow's own top-1 probability (a near tie flips on the smallest change).

The photos: the castle, jemma, the photographs scikit-image ships in its wheel, and the image files of any
folder given with --photos (your own, say, before you switch PRECISION to bf16). `make bench` prints this too.

    python measure_precision.py [--photos DIR] [--model-cache /tmp/precision-cache]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import helpers
import models
import runtimes
from settings import Settings

ROOT = Path(__file__).resolve().parent
# Photographs in scikit-image's data folder (no download): its other files are drawings, charts, text and test
# patterns. Three are micrographs (cell, ihc, microaneurysms), not what ImageNet's classes describe.
SCIKIT_IMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)  # fmt: skip
CONFIDENT = 0.2  # "TensorFlow is sure": its top-1 probability at least this
RECHECK_MARGIN = 0.02  # the RECHECK_MARGIN measured beside plain bf16 (README: "What bf16 trades")
LIMIT = 100_000_000  # pixels: a folder of large photos is measured, not refused


def photos(folder=None):
    """{name: file bytes}: the castle, jemma, scikit-image's photos and the files of `folder`."""
    from skimage import data

    found = {"castle": (ROOT / "castle_image.jpg").read_bytes(), "jemma": (ROOT / "jemma.png").read_bytes()}
    shipped = Path(data.__file__).parent
    found.update((name.rsplit(".", 1)[0], (shipped / name).read_bytes()) for name in SCIKIT_IMAGE_PHOTOS)
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        found.update((f"{Path(folder).name}/{p.relative_to(folder)}", p.read_bytes()) for p in files)
    return found


def prepared(files):
    """{name: pixels} of the files the service would accept; the others are named on stdout and left out."""
    pixels = {}
    for name, data in files.items():
        try:
            pixels[name] = helpers.prepare_image(data, LIMIT)
        except helpers.ImageError as exc:
            print(f"  left out {name}: {exc}")
    return pixels


def compare(reference, candidate, names):
    """Agreement of `candidate`'s probabilities (n, classes) with `reference`'s, row by row."""
    top1 = reference.argmax(axis=1) == candidate.argmax(axis=1)
    best = reference.max(axis=1)
    top5 = [set(r) == set(c) for r, c in zip(np.argsort(-reference)[:, :5], np.argsort(-candidate)[:, :5], strict=True)]
    sure = best >= CONFIDENT
    change = np.abs(reference - candidate).max(axis=1)
    return {
        "photos": len(names),
        "top1_same": int(top1.sum()),
        "top5_same_set": int(sum(top5)),
        "confident": int(sure.sum()),
        "confident_top1_same": int((top1 & sure).sum()),
        "largest_change": float(change.max()),
        "largest_change_photo": names[int(change.argmax())],
        "top1_moved": {name: float(p) for name, p, same in zip(names, best, top1, strict=True) if not same},
    }


def measure(cache_dir, folder=None, batch=32, margin=RECHECK_MARGIN):
    """{"photos": [...], variant: compare(...) and its speed} for each OpenVINO precision this CPU runs, and bf16
    with its near ties (two best classes less than `margin` apart) classified again in f32 (RECHECK_MARGIN)."""
    pixels = prepared(photos(folder))
    names = list(pixels)
    stacked = np.stack([pixels[name] for name in names])
    classifier = models.load(Settings(model="efficientnet_lite0", model_cache_dir=cache_dir, runtime="tensorflow"))

    def probabilities():
        return np.concatenate([classifier.predict(stacked[i : i + batch]) for i in range(0, len(names), batch)])

    def timed():
        probabilities()  # the first call of each batch shape costs more
        started, rechecked = time.perf_counter(), classifier.rechecked
        result = probabilities()
        return result, len(names) / (time.perf_counter() - started), classifier.rechecked - rechecked

    reference, report = probabilities(), {"photos": names}
    variants = [("f32", "f32", 0.0)]
    if runtimes.bf16_supported():
        variants += [("bf16", "bf16", 0.0)] + ([("bf16_recheck", "bf16", margin)] if margin else [])
    for variant, precision, recheck_margin in variants:
        classifier.use_runtime("openvino", precision, Path(cache_dir) / "openvino", recheck_margin)
        candidate, speed, in_f32 = timed()
        report[variant] = {**compare(reference, candidate, names), "images_per_s": speed}
        if recheck_margin:
            report[variant].update(margin=recheck_margin, answered_in_f32=in_f32)
    return report


LABELS = {"f32": "openvino f32", "bf16": "openvino bf16", "bf16_recheck": "bf16, near ties again in f32"}


def print_report(report):
    print(f"\nOpenVINO against Keras on TensorFlow, EfficientNet-Lite0 (real weights), {len(report['photos'])} photos")
    sure = f"top-1 same where TF's top-1 p >= {CONFIDENT}"
    print(f"| precision | top-1 same | top-5 same set | {sure} | largest change | images/s |")
    print("|---|---|---|---|---|---|")
    for variant, label in LABELS.items():
        if variant in report:
            r = report[variant]
            print(
                f"| {label} | {r['top1_same']}/{r['photos']} ({100 * r['top1_same'] / r['photos']:.1f} %) "
                f"| {r['top5_same_set']}/{r['photos']} | {r['confident_top1_same']}/{r['confident']} "
                f"| {r['largest_change']:.2g} ({r['largest_change_photo']}) | {r['images_per_s']:.0f} |"
            )
            moved = ", ".join(f"{name} ({p:.2f})" for name, p in r["top1_moved"].items())
            if moved:
                print(f"  {label}: top-1 moved on {moved} (TensorFlow's top-1 probability)")
    if "bf16_recheck" in report:
        r = report["bf16_recheck"]
        print(f"  RECHECK_MARGIN={r['margin']}: {r['answered_in_f32']} of {r['photos']} photos answered in f32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, help="a folder of photos to measure as well")
    parser.add_argument("--model-cache", help="where the converted models are kept (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        print_report(measure(args.model_cache or scratch, args.photos))


if __name__ == "__main__":
    main()
