"""What decoding large JPEGs at reduced scale costs and changes: one run, ratios only (the machine is noisy).

(i) CPU time of prepare_image, full decode (as the original) vs reduced decoding, on a 12-megapixel JPEG and on the
castle (800x480). (ii) On real photos that scikit-image ships, saved as JPEG at four sizes: mean absolute pixel
difference, and with EfficientNet-Lite0's real weights, top-1 agreement and the largest probability difference.
The variants: gap 2 (the rule until the web-CPU work: keep 2x 224 pixels a side, so the castle was decoded in full)
and gap 1 (the service's rule now, `helpers._DRAFT_GAP` = 1: the smallest scale that covers 224x224), each against
the full decode, and gap 1 against gap 2 (what the change did to the pixels the service used to send).

    python measure_decoding.py [--rounds 15] [--model-cache /tmp/decode-cache]
"""

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as photos

import helpers
import models
from settings import Settings

CASTLE = Path(__file__).resolve().parent / "castle_image.jpg"
LIMIT = 40_000_000
VARIANTS = {"full": None, "gap 2 (before)": 2.0, "gap 1 (service)": 1.0}
# (variant, reference) pairs compared in (ii)
PAIRS = [("gap 2 (before)", "full"), ("gap 1 (service)", "full"), ("gap 1 (service)", "gap 2 (before)")]
PHOTOS = {
    "astronaut": photos.astronaut,
    "coffee": photos.coffee,
    "chelsea": photos.chelsea,
    "rocket": photos.rocket,
    "motorcycle_left": lambda: photos.stereo_motorcycle()[0],
    "immunohistochemistry": photos.immunohistochemistry,
    "hubble_deep_field": photos.hubble_deep_field,
    "retina": photos.retina,
    "camera (grey)": photos.camera,
    "castle": lambda: np.asarray(Image.open(CASTLE)),
}


def jpeg(image, size, quality=90):
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def prepare(data, gap):
    helpers._DRAFT_GAP = gap
    return helpers.prepare_image(data, LIMIT)


def cpu_times(data, rounds):
    """CPU seconds of one prepare_image per variant: the median over rounds that take the variants in turn."""
    times = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, gap in VARIANTS.items():
            start = time.process_time()
            prepare(data, gap)
            times[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def sizes(width, height):
    """As shipped, shorter side 900 (1/2 scale), 1800 (1/4) and 12 megapixels, keeping the aspect ratio."""
    yield width, height
    for factor in (900 / min(width, height), 1800 / min(width, height), (12e6 / (width * height)) ** 0.5):
        yield round(width * factor), round(height * factor)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--model-cache", default="/tmp/decode-cache")
    args = parser.parse_args()

    print("(i) CPU time of prepare_image, full decode / reduced decode (median of interleaved rounds)")
    large = jpeg(Image.fromarray(photos.coffee()), (4000, 3000))
    prepare(large, None)  # warm up the codecs
    for label, data, rounds in [("4000x3000 JPEG", large, args.rounds), ("castle 800x480", CASTLE.read_bytes(), 100)]:
        median = cpu_times(data, rounds)
        ratios = ", ".join(f"{name} {median['full'] / median[name]:.2f}x" for name in VARIANTS if name != "full")
        print(f"  {label}: full {median['full'] * 1000:.1f} ms of CPU; faster by: {ratios}")

    print("(ii) real photos as JPEG (quality 90) at four sizes: reduced decoding against the full decode")
    classifier = models.load(Settings(model="efficientnet_lite0", model_cache_dir=args.model_cache))
    rows = []
    for name, load in PHOTOS.items():
        original = Image.fromarray(load())
        for size in sizes(*original.size):
            data = jpeg(original, size)
            pixels = {variant: prepare(data, gap) for variant, gap in VARIANTS.items()}
            probabilities = dict(zip(pixels, classifier.predict(np.stack(list(pixels.values()))), strict=True))
            top = classifier.top_k(probabilities["full"], 1)[0]
            row = {"photo": name, "size": size, "label": top["label"], "p": top["probability"]}
            for variant, reference in PAIRS:
                row[variant, reference] = (
                    np.abs(pixels[variant].astype(np.int16) - pixels[reference]).mean(),
                    np.argmax(probabilities[variant]) == np.argmax(probabilities[reference]),
                    np.abs(probabilities[variant] - probabilities[reference]).max(),
                )
            rows.append(row)
            cells = "; ".join(
                f"{v} vs {r}: mad {m:.2f} top-1 {'same' if a else 'DIFFERS'} dp {d:.3f}"
                for (v, r), (m, a, d) in ((pair, row[pair]) for pair in PAIRS)
            )
            print(f"  {name:21} {size[0]:>4}x{size[1]:<4} {row['label'][:18]:18} {row['p']:.2f}  {cells}")
    for variant, reference in PAIRS:
        mad, agree, dp = zip(*(row[variant, reference] for row in rows), strict=True)
        print(
            f"  {variant} vs {reference}: top-1 agrees on {sum(agree)}/{len(rows)}; mean abs pixel difference mean"
            f" {np.mean(mad):.2f} max {max(mad):.2f}; largest probability difference {max(dp):.3f}"
        )
    print(f"  photos: {len(PHOTOS)} ({', '.join(PHOTOS)}), {len(rows)} JPEGs")


if __name__ == "__main__":
    main()
