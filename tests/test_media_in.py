"""ctrl_img decoding (serve_app/media_in.py): every way a value can be wrong gets its stable code;
every picture mode PIL can open becomes an RGB picture of exactly the requested size.

The expected pixels always come from PIL's own calls (open -> convert("RGB") -> resize LANCZOS),
the reference server's recipe, never from the code under test.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from deployments.config import FetchConfig
from deployments.errors import InvalidRequest
from serve_app.config import LimitsConfig
from serve_app.errors import http_status
from serve_app.media_in import decode_image, image_bytes, prepare_ctrl_image

from .conftest import make_image, png_bytes

LIMITS = LimitsConfig()
FETCH = FetchConfig()
W, H = 40, 24  # the requested size: neither the source's size nor its aspect ratio


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def prepare(value: str, limits: LimitsConfig = LIMITS, width: int = W, height: int = H) -> Image.Image:
    out = prepare_ctrl_image(value, width, height, 3, limits, FETCH)
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG"  # lossless hand-over to the replica
    return img


def reference_rgb(raw: bytes, width: int = W, height: int = H) -> np.ndarray:
    """What the reference server feeds the pipeline: first frame, .convert('RGB'), LANCZOS stretch."""
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB").resize((width, height), Image.LANCZOS))


def error_code(fn, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fn(*args)
    assert http_status(info.value) == 400
    return info.value


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, rows: int) -> bytes:
    """A greyscale PNG claiming width x height whose pixel data stops (mid zlib stream) after ``rows`` rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj()
    data = compressor.compress(b"\x00" * (width + 1) * rows) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data)


# ---------------------------------------------------------------------------------------------
# rejected values, each with its code
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["not base64 at all!", "abc", "====", "aGVsbG8=-_", "%%%%"],
    ids=["punctuation", "bad-padding", "only-padding", "urlsafe-chars", "percent"],
)
def test_invalid_base64(value):
    err = error_code(image_bytes, value, 3, LIMITS, FETCH)
    assert err.code == "INVALID_BASE64"
    assert err.details["prompt_index"] == 3


@pytest.mark.parametrize("mime", ["text/plain", "application/octet-stream", "video/mp4", ""])
def test_data_uri_with_non_image_type(mime):
    value = f"data:{mime};base64," + b64(png_bytes(make_image()))
    err = error_code(prepare_ctrl_image, value, W, H, 0, LIMITS, FETCH)
    assert err.code == "INVALID_IMAGE_TYPE"


def test_data_uri_not_base64_encoded():
    err = error_code(image_bytes, "data:image/png,rawbytes", 0, LIMITS, FETCH)
    assert err.code == "INVALID_DATA_URI"


@pytest.mark.parametrize(
    "raw",
    [b"hello world, certainly not a picture" * 4, b"\x00" * 500, b"GIF89a" + b"\x00" * 3],
    ids=["text", "zeros", "gif-magic-only"],
)
def test_bytes_that_are_not_a_picture(raw):
    err = error_code(prepare_ctrl_image, b64(raw), W, H, 0, LIMITS, FETCH)
    assert err.code in ("INVALID_IMAGE", "IMAGE_TRUNCATED")
    if not raw.startswith(b"GIF"):
        assert err.code == "INVALID_IMAGE"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_picture(fmt):
    raw = encoded(make_image(64, 48, seed=5), fmt)
    cut = raw[: len(raw) // 2]
    err = error_code(decode_image, cut, 0, LIMITS)
    assert err.code == "IMAGE_TRUNCATED", err.message
    # and through the whole path
    assert error_code(prepare_ctrl_image, b64(cut), W, H, 0, LIMITS, FETCH).code == "IMAGE_TRUNCATED"


def test_pixel_data_ending_early_is_truncated():
    raw = crafted_png(64, 48, rows=3)
    assert Image.open(io.BytesIO(raw)).size == (64, 48)  # the header is fine
    err = error_code(decode_image, raw, 0, LIMITS)
    assert err.code == "IMAGE_TRUNCATED"


def test_too_many_bytes():
    raw = png_bytes(make_image(64, 48, seed=1))  # random pixels: barely compressible
    exact = LimitsConfig(max_image_bytes=len(raw))
    assert image_bytes(b64(raw), 0, exact, FETCH) == raw  # exactly at the limit: accepted
    smaller = LimitsConfig(max_image_bytes=len(raw) - 1)
    err = error_code(image_bytes, b64(raw), 0, smaller, FETCH)
    assert err.code == "IMAGE_TOO_LARGE"
    err = error_code(prepare_ctrl_image, "data:image/png;base64," + b64(raw), W, H, 0, smaller, FETCH)
    assert err.code == "IMAGE_TOO_LARGE"


def test_oversized_base64_rejected_before_decoding():
    # Far over the limit: refused on its length, whatever the characters are.
    limits = LimitsConfig(max_image_bytes=1000)
    err = error_code(image_bytes, "A" * 10_000, 0, limits, FETCH)
    assert err.code == "IMAGE_TOO_LARGE"


def test_too_many_pixels_in_few_bytes():
    raw = encoded(Image.new("L", (5000, 5000)), "PNG")
    assert len(raw) < 200_000  # a compression bomb in miniature
    limits = LimitsConfig(max_image_pixels=1_000_000)
    err = error_code(prepare_ctrl_image, b64(raw), W, H, 0, limits, FETCH)
    assert err.code == "IMAGE_TOO_LARGE"
    assert (err.details["width"], err.details["height"]) == (5000, 5000)


@pytest.mark.parametrize("side", [7000, 30000], ids=["over-our-limit", "pillow-bomb"])
def test_pixel_limit_is_checked_before_decoding(side):
    # A header claiming side x side over almost no data: refused on its size, not reported as truncated.
    # 7000^2 = 49 M pixels is over our 40 M but under Pillow's own bomb threshold; 30000^2 is over both.
    raw = crafted_png(side, side, rows=1)
    assert len(raw) < 1000
    err = error_code(decode_image, raw, 0, LIMITS)
    assert err.code == "IMAGE_TOO_LARGE"


def test_pixel_limit_boundary():
    raw = png_bytes(make_image(64, 48))
    assert decode_image(raw, 0, LimitsConfig(max_image_pixels=64 * 48)).size == (64, 48)
    assert error_code(decode_image, raw, 0, LimitsConfig(max_image_pixels=64 * 48 - 1)).code == "IMAGE_TOO_LARGE"


# ---------------------------------------------------------------------------------------------
# accepted values: RGB, exactly W x H, pixels as the reference computes them
# ---------------------------------------------------------------------------------------------


def _rgba():
    img = make_image(64, 48, seed=2, mode="RGBA")
    return encoded(img, "PNG")


def _palette():
    return encoded(make_image(64, 48, seed=3).convert("P", palette=Image.ADAPTIVE, colors=16), "PNG")


def _palette_transparent():
    img = make_image(64, 48, seed=3).convert("P", palette=Image.ADAPTIVE, colors=16)
    return encoded(img, "PNG", transparency=0)


def _cmyk_jpeg():
    return encoded(make_image(64, 48, seed=4).convert("CMYK"), "JPEG", quality=95)


def _la():
    grey = make_image(64, 48, seed=6, mode="L")
    alpha = make_image(64, 48, seed=7, mode="L")
    return encoded(Image.merge("LA", (grey, alpha)), "PNG")


def _grey():
    return encoded(make_image(64, 48, seed=8, mode="L"), "PNG")


def _jpeg():
    return encoded(make_image(64, 48, seed=9), "JPEG", quality=90)


def _bmp():
    return encoded(make_image(64, 48, seed=10), "BMP")


@pytest.mark.parametrize(
    "make_raw, source_mode",
    [
        (lambda: png_bytes(make_image(64, 48)), "RGB"),
        (_rgba, "RGBA"),
        (_palette, "P"),
        (_palette_transparent, "P"),
        (_cmyk_jpeg, "CMYK"),
        (_la, "LA"),
        (_grey, "L"),
        (_jpeg, "RGB"),
        (_bmp, "RGB"),
    ],
    ids=["rgb-png", "rgba", "palette", "palette-transparency", "cmyk-jpeg", "la", "grey", "jpeg", "bmp"],
)
def test_modes_become_rgb_of_the_requested_size(make_raw, source_mode):
    raw = make_raw()
    assert Image.open(io.BytesIO(raw)).mode == source_mode  # the case is what it claims to be
    img = prepare(b64(raw))
    assert img.mode == "RGB" and img.size == (W, H)
    np.testing.assert_array_equal(np.asarray(img), reference_rgb(raw))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype("uint16")  # 0 .. 64491
    raw = encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(raw)).mode == "I;16"
    img = decode_image(raw, 0, LIMITS)
    assert img.mode == "RGB" and img.size == (64, 48)
    got = np.asarray(img).astype(int)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    # The full 16-bit range maps onto 0..255 (plain .convert('RGB') would clip most of it to 255).
    assert np.abs(got[..., 0] - values / 256).max() <= 1
    assert got.max() >= 250 and got.min() == 0
    sized = prepare(b64(raw))
    assert sized.mode == "RGB" and sized.size == (W, H)


def _frames():
    # Three flat, clearly different colours: the first must win.
    return [Image.new("RGB", (64, 48), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"], ids=["gif", "webp", "apng"])
def test_animated_picture_gives_its_first_frame(fmt):
    frames = _frames()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    raw = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)
    opened = Image.open(io.BytesIO(raw))
    assert getattr(opened, "n_frames", 1) == 3 and opened.is_animated
    img = prepare(b64(raw))
    assert img.mode == "RGB" and img.size == (W, H)
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    assert np.abs(pixels - np.array([200, 30, 30])).max() <= 8  # red, the first frame
    np.testing.assert_array_equal(np.asarray(img), reference_rgb(raw))


@pytest.mark.parametrize(
    "prefix",
    [
        "data:image/png;base64,",
        "DATA:IMAGE/PNG;BASE64,",
        "data:image/jpeg;base64,",
        "data:image/png;name=a.png;base64,",
    ],
    ids=["png", "uppercase", "mislabelled-jpeg", "with-parameter"],
)
def test_data_uri_with_image_type(prefix):
    raw = png_bytes(make_image(64, 48, seed=11))
    img = prepare(prefix + b64(raw))
    assert img.mode == "RGB" and img.size == (W, H)
    np.testing.assert_array_equal(np.asarray(img), reference_rgb(raw))


def test_base64_with_line_breaks_and_surrounding_space():
    raw = png_bytes(make_image(64, 48, seed=12))
    text = b64(raw)
    wrapped = "\n  " + "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n"
    assert image_bytes(wrapped, 0, LIMITS, FETCH) == raw


def test_stretch_is_exact_size_without_crop():
    # A 64x48 picture whose left half is black and right half white, stretched to 100x20:
    # a stretch keeps the split in the middle (a crop or letterbox would not).
    arr = np.zeros((48, 64, 3), "uint8")
    arr[:, 32:] = 255
    raw = png_bytes(Image.fromarray(arr))
    img = np.asarray(prepare(b64(raw), width=96, height=16))
    assert img.shape == (16, 96, 3)
    assert (img[:, :40] < 10).all() and (img[:, 56:] > 245).all()
    np.testing.assert_array_equal(img, reference_rgb(raw, 96, 16))
