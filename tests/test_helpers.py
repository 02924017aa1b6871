"""Image preparation: as the original prepare_image (a JPEG of 448+ pixels a side decoded at reduced scale), and clear
errors for what is not an image."""

import io

import numpy as np
import pytest
from PIL import Image

import helpers
from support import CASTLE, png_bomb

LIMIT = 40_000_000


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_castle_pixels_are_close_to_the_original_preparation():
    # The castle (800x480) is decoded at half scale (helpers._DRAFT_GAP): no longer the same pixels, close ones.
    original = np.asarray(Image.open(CASTLE).convert("RGB").resize((224, 224)), dtype=np.uint8)
    pixels = helpers.prepare_image(CASTLE.read_bytes(), LIMIT)
    assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
    assert np.abs(pixels.astype(np.int16) - original).mean() < 2.0  # measured 1.76


def _gradient(mode, size=(64, 48)):
    array = np.linspace(0, 255, size[0] * size[1], dtype=np.float64).reshape(size[1], size[0])
    return Image.fromarray(array.astype(np.uint8), "L").convert(mode)


def _sixteen_bit_png():
    array = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def _animated_gif():
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data",
    [
        ("grayscale", lambda: encode(_gradient("L"), "PNG")),
        ("rgba", lambda: encode(_gradient("RGBA"), "PNG")),
        ("palette", lambda: encode(_gradient("RGB").convert("P"), "PNG")),
        ("16-bit", _sixteen_bit_png),
        ("cmyk jpeg", lambda: encode(_gradient("CMYK"), "JPEG")),
        ("1x1", lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")),
        (
            "spider",
            lambda: encode(Image.fromarray(np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)), "SPIDER"),
        ),
    ],
)
def test_unusual_but_valid_images_are_prepared(name, data):
    pixels = helpers.prepare_image(data(), LIMIT)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 0 or name == "1x1"


def test_sixteen_bit_image_keeps_its_tones():
    pixels = helpers.prepare_image(_sixteen_bit_png(), LIMIT)
    assert pixels.min() < 20 and pixels.max() > 235  # not clipped to white


def _castle_gray():
    return np.asarray(Image.open(CASTLE).convert("L"), dtype=np.float64)


@pytest.mark.parametrize(
    "samples, mode",
    [
        (lambda gray: gray / 255, "F"),  # floats in [0, 1], the usual convention
        (lambda gray: gray, "F"),  # floats in [0, 255]
        (lambda gray: gray * 1e6 - 5e7, "F"),  # floats in a range of their own
        (lambda gray: gray * 257, "I"),  # 16-bit samples in a 32-bit image
        (lambda gray: gray * (1 << 23) - (1 << 31), "I"),  # the whole 32-bit range
        (lambda gray: np.where(np.arange(gray.size).reshape(gray.shape) % 9973 == 0, np.inf, gray / 255), "F"),
        (lambda gray: np.where(np.arange(gray.size).reshape(gray.shape) % 9973 == 0, np.nan, gray / 255), "F"),
    ],
    ids=["float-0-1", "float-0-255", "float-own-range", "int32-16-bit", "int32-full", "float-0-1-inf", "float-0-1-nan"],
)
def test_a_wide_tiff_is_classified_with_its_tones(samples, mode):
    """Found by review: a float TIFF in [0, 1] came out black and a 32-bit one using its range white."""
    array = samples(_castle_gray())
    image = Image.fromarray(array.astype(np.float32 if mode == "F" else np.int32), mode)
    pixels = helpers.prepare_image(encode(image, "TIFF"), LIMIT)
    gray = helpers.prepare_image(encode(Image.open(CASTLE).convert("L"), "PNG"), LIMIT)
    assert np.abs(pixels.astype(np.int16) - gray).mean() < 2.0


def test_animated_gif_uses_the_first_frame():
    pixels = helpers.prepare_image(_animated_gif(), LIMIT)
    assert tuple(pixels[100, 100]) == (255, 0, 0)


def _corrupted(image, fmt, at, value):
    """The image saved as `fmt`, then `value` written over its header at offset `at`."""
    data = bytearray(encode(image, fmt))
    data[at : at + len(value)] = value
    return bytes(data)


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"", 400, "empty"),
        (b"hello, this is text and not an image", 400, "not an image"),
        (b"%PDF-1.4\n1 0 obj << >> endobj\n", 400, "not an image"),
        (CASTLE.read_bytes()[:5000], 400, "could not be decoded"),
        (png_bomb(), 413, "too large"),
        # Pillow raises NotImplementedError for these, which was answered 500.
        (_corrupted(Image.new("P", (16, 16)), "BLP", at=8, value=b"\x09"), 400, "could not be decoded.*BLP encoding"),
        (
            _corrupted(Image.new("RGB", (16, 16)), "DDS", at=80, value=bytes(4)),
            400,
            "could not be decoded.*pixel format",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(data, status, message):
    with pytest.raises(helpers.ImageError, match=message) as err:
        helpers.prepare_image(data, LIMIT)
    assert err.value.status == status
