"""ctrl_img decoding: URL, base64 or data: URI -> an RGB picture, within limits.

Converts to RGB as the reference does (palette, alpha, CMYK, 16-bit and animated pictures are
accepted; an animated one gives its first frame), then stretches to exactly width x height with
LANCZOS. Everything that is not a whole picture gets a 400 with a stable code.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image

from deployments.config import FetchConfig

from .config import LimitsConfig
from .errors import ApiError

_DATA_URI = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL | re.IGNORECASE)  # RFC 2397: case-insensitive


def _bad(code: str, message: str, index: int, **details) -> ApiError:
    return ApiError(400, code, message, {"prompt_index": index, **details})


def image_bytes(ctrl_img: str, index: int, limits: LimitsConfig, fetch: FetchConfig) -> bytes:
    """The raw bytes behind a ctrl_img value (fetched for a URL), size-limited."""
    value = ctrl_img.strip()
    if value.lower().startswith(("http://", "https://")):
        from deployments.fetch import fetch_bytes

        return fetch_bytes(value, fetch, limits.max_image_bytes)
    if value.lower().startswith("data:"):
        m = _DATA_URI.match(value)
        if not m:
            raise _bad("INVALID_DATA_URI", "ctrl_img data: URI is malformed", index)
        mime, params, payload = m.group(1).lower(), m.group(2).lower(), m.group(3)
        if not mime.startswith("image/"):
            raise _bad("INVALID_IMAGE_TYPE", f"ctrl_img data: URI has type {mime or 'none'!r}, not image/*", index,
                       mime=mime)
        if ";base64" not in params:
            raise _bad("INVALID_DATA_URI", "ctrl_img data: URI must be base64-encoded", index)
        value = payload
    if len(value) > limits.max_image_bytes * 4 // 3 + 4:
        raise _bad("IMAGE_TOO_LARGE", f"ctrl_img is larger than {limits.max_image_bytes} bytes", index,
                   limit=limits.max_image_bytes)
    try:
        raw = base64.b64decode(re.sub(r"\s+", "", value), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("INVALID_BASE64", "ctrl_img is neither an http(s) URL, a data: URI nor valid base64", index)
    if len(raw) > limits.max_image_bytes:
        raise _bad("IMAGE_TOO_LARGE", f"ctrl_img is larger than {limits.max_image_bytes} bytes", index,
                   limit=limits.max_image_bytes)
    return raw


def decode_image(raw: bytes, index: int, limits: LimitsConfig) -> Image.Image:
    """Open, check and fully decode a picture; returns it in RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise _bad("IMAGE_TOO_LARGE", f"ctrl_img has {width}x{height} pixels, more than "
                           f"{limits.max_image_pixels}", index, width=width, height=height,
                           limit=limits.max_image_pixels)
            img.seek(0)  # animated: the first frame
            img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad("IMAGE_TOO_LARGE", "ctrl_img is a decompression bomb", index)
    except Image.UnidentifiedImageError:
        raise _bad("INVALID_IMAGE", "ctrl_img bytes are not a picture PIL can read", index)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _bad("IMAGE_TRUNCATED", f"ctrl_img is truncated or corrupt: {e}", index)
    if width < 1 or height < 1:
        raise _bad("INVALID_IMAGE", "ctrl_img has no pixels", index)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the reference gets it (``.convert("RGB")``); 16-bit greyscale is scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def prepare_ctrl_image(ctrl_img: str, width: int, height: int, index: int, limits: LimitsConfig,
                       fetch: FetchConfig) -> bytes:
    """ctrl_img -> RGB, stretched to exactly width x height with LANCZOS, as lossless PNG bytes."""
    img = decode_image(image_bytes(ctrl_img, index, limits, fetch), index, limits)
    img = img.resize((width, height), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
