"""Turning an uploaded file into the pixels a job carries, as the original `prepare_image` did.

The one difference: a JPEG at least twice 224 pixels on both sides is decoded at 1/2, 1/4 or 1/8 scale (see
`_DRAFT_GAP`). Neither then nor now is the EXIF orientation applied: a phone photo taken upright is classified as the
sensor stored it.
"""

import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from jobs import IMAGE_SHAPE


class ImageError(ValueError):
    """The upload is not an image we can classify; `status` is the HTTP status to answer with."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# JPEG's decoder can scale by 1/2, 1/4 or 1/8 as it decodes (DCT scaling, Pillow's `draft`): a 12-megapixel photo
# then costs ~8x less CPU. We take the smallest scale that still leaves at least this many times 224 pixels on both
# sides: with 1, the smallest that covers 224x224, so a JPEG is reduced once it is at least 448 pixels on both sides.
# That includes the castle (800x480, decoded at 400x240): its preparation costs ~1.7x less CPU (decode 1.2x, the
# bicubic resize 2.8x), the largest share of the web tier's CPU per request. It moves the pixels more than the former
# gap of 2 did (which decoded the castle in full); the top-1 answers stayed, see README "Decoding large uploads" and
# measure_decoding.py. A JPEG under 448 pixels on either side is decoded in full. None: always decode in full.
_DRAFT_GAP = 1.0

# Pillow warns past its limit (half of ours, see prepare_image) and raises past twice it: the error is the refusal.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Rows are scaled a band of about this many pixels at a time: float64 for a whole 40-megapixel image took ~1 GB.
_BAND_PIXELS = 1 << 20


def _bands(array):
    """Slices of the image's rows, about _BAND_PIXELS pixels each."""
    rows = max(1, _BAND_PIXELS // max(1, array.shape[1]))
    return [slice(start, start + rows) for start in range(0, array.shape[0], rows)]


def _range(mode, array):
    """The sample values that map to black and white: the conventions of the mode where the samples keep to them,
    the image's own range where they do not. Found by review: a float TIFF in [0, 1] (the usual convention) came out
    black, and a 32-bit one using its range white, each classified with no error."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = _finite_bounds(array)
    if mode == "F" and 0 <= low and high <= 1:
        return 0.0, 1.0
    if 0 <= low and high <= 255:
        return 0.0, 255.0
    if mode == "I" and 0 <= low and high <= 65535:
        return 0.0, 65535.0  # 16-bit samples in a 32-bit image, as Pillow reads some 16-bit files
    if low >= high:
        return 0.0, 255.0  # no finite sample, or all alike: nothing to stretch; out-of-range samples are clipped
    return low, high


def _finite_bounds(array):
    """The smallest and largest finite samples, a band at a time (a float copy of a 40-megapixel image is 160 MB).
    Infinities and NaN are left out: one infinite sample in a [0, 1] image made it black (found by review)."""
    low, high = math.inf, -math.inf
    for rows in _bands(array):
        band = array[rows]
        if band.dtype.kind == "f":
            band = band[np.isfinite(band)]
        if band.size:
            low, high = min(low, float(band.min())), max(high, float(band.max()))
    return low, high


def _wide_to_gray(image):
    """An 8-bit grey image from a 16-bit, 32-bit or float one, scaled to its range rather than clipped."""
    array = np.asarray(image)  # its own dtype: 2 bytes a pixel for 16-bit, not float64's 8
    low, high = _range(image.mode, array)
    gray = np.empty(array.shape, np.uint8)
    for rows in _bands(array):
        # The same float64 arithmetic as on the whole image, so the pixels are identical; only the peak is smaller.
        band = np.nan_to_num(array[rows].astype(np.float64), copy=False, nan=low, posinf=high, neginf=low)
        gray[rows] = np.clip((band - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray)


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow clips wide integer modes to 255 when converting, which would turn a 16-bit photo white.
        image = _wide_to_gray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _draft(image):
    """Before loading: have a JPEG decode at the smallest DCT scale that keeps `_DRAFT_GAP` x 224 pixels a side.

    Returns the box that the whole picture covers in the reduced image (its last block may be partial), or None
    when nothing was reduced. Pillow's `draft` is implemented for JPEG (and MPO, the multi-picture JPEG of many
    phones) only: PNG, GIF, WebP, TIFF and BMP have no reduced decoding, so for them it does nothing. JPEG 2000
    has one (its `reduce` attribute), left unused: a rare upload.
    """
    if _DRAFT_GAP is None:
        return None
    size = image.size
    target = IMAGE_SHAPE[1::-1]
    chosen = image.draft(None, tuple(int(side * _DRAFT_GAP) for side in target))  # None: keep the mode
    return chosen[1] if chosen and image.size != size else None


def prepare_image(data, max_pixels):
    """Decode, convert to RGB and resize to 224x224 with Pillow's default filter; returns uint8 HxWx3.

    A JPEG at least 448 pixels on both sides is decoded at reduced scale first (`_draft`).

    Raises ImageError for anything that is not a complete image of at most `max_pixels` pixels.
    """
    if not data:
        raise ImageError("the uploaded file is empty")
    # Pillow's own check raises past twice its limit: set to half of ours, it refuses at our limit, also the frame
    # that ICO and ICNS decode inside Image.open, where our check below comes too late (found by review: a 344 KB ICO
    # holding a 9400x9400 PNG took 0.74 s of CPU and 370 MB before its 413). Its warning, past its limit itself, is
    # ignored (at import). It was turned into the refusal here with warnings.catch_warnings, which swaps the
    # process's filters and is not thread-safe: two decoding threads lost each other's filter, and an image over the
    # limit was decoded (found by review).
    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:  # an odd limit's last pixel, and any format Pillow does not check
            raise ImageError(f"image is too large: {width}x{height} pixels, at most {max_pixels} accepted", 413)
        # An animated image is opened on its first frame, the one classified. (Seeking to it again, as
        # ImageSequence does, fails on a valid single-image SPIDER file.)
        box = _draft(image)  # after the size check: it changes image.size
        image.load()
        resized = _to_rgb(image).resize(IMAGE_SHAPE[1::-1], box=box)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("the uploaded file is not an image format we can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image is too large: {exc}", 413) from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise more than OSError and ValueError on bad files
        # (NotImplementedError for an unknown BLP encoding or DDS pixel format, among others): a bad upload is a 400.
        raise ImageError(f"the image could not be decoded: {exc}") from None
    return np.asarray(resized, dtype=np.uint8)
