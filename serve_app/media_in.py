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

from deployments.contract import FetchConfig, FetchError, FetchFailed, FetchTooLarge, InvalidRequest, fetch_bytes

from .config import LimitsConfig

_DATA_URI = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL | re.IGNORECASE)  # RFC 2397: case-insensitive


# Formats PIL may open: the common picture formats only. PIL has many more plugins (EPS runs
# Ghostscript, PDF, PSD, FITS, ...), each more parsing code an attacker could reach.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Upstream answers that mean "your URL is wrong" rather than "the remote is broken".
_CLIENT_FAULT_STATUSES = (400, 401, 403, 404, 410)


def _bad(code: str, message: str, index: int, **details) -> InvalidRequest:
    return InvalidRequest(message, {"prompt_index": index, **details}, code)


def fetch_image(url: str, index: int, limits: LimitsConfig, fetch: FetchConfig) -> bytes:
    """Download a ctrl_img URL through the one outbound fetcher, mapping its errors for the client.

    A refused URL stays URL_NOT_ALLOWED (400); too large is IMAGE_TOO_LARGE (400) as for an inline
    picture; an upstream 4xx is IMAGE_NOT_FOUND (400); everything else the remote did wrong stays
    FETCH_FAILED (502, or 504 for a timeout).
    """
    try:
        return fetch_bytes(url, fetch, limits.max_image_bytes, total_timeout_s=limits.image_fetch_timeout_s)
    except FetchTooLarge as e:
        raise _bad("IMAGE_TOO_LARGE", f"ctrl_img URL gives more than {limits.max_image_bytes} bytes", index,
                   limit=limits.max_image_bytes, url=e.details.get("url")) from e
    except FetchFailed as e:
        upstream = e.details.get("upstream_status")
        if upstream in _CLIENT_FAULT_STATUSES:
            raise _bad("IMAGE_NOT_FOUND", f"ctrl_img URL answered HTTP {upstream}", index, **e.details) from e
        e.details = {**e.details, "prompt_index": index}
        raise
    except FetchError as e:
        e.details = {**e.details, "prompt_index": index}
        raise


def image_bytes(ctrl_img: str, index: int, limits: LimitsConfig, fetch: FetchConfig) -> bytes:
    """The raw bytes behind a ctrl_img value (fetched for a URL), size-limited."""
    value = ctrl_img.strip()
    if value.lower().startswith(("http://", "https://")):
        return fetch_image(value, index, limits, fetch)
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
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise _bad("IMAGE_TOO_LARGE", f"ctrl_img has {width}x{height} pixels, more than "
                           f"{limits.max_image_pixels}", index, width=width, height=height,
                           limit=limits.max_image_pixels)
            img.seek(0)  # animated: the first frame
            img.load()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad("IMAGE_TOO_LARGE", "ctrl_img is a decompression bomb", index)
    except Image.UnidentifiedImageError:
        raise _bad("INVALID_IMAGE", "ctrl_img bytes are not a picture PIL can read", index)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _bad("IMAGE_TRUNCATED", f"ctrl_img is truncated or corrupt: {e}", index)
    except Exception as e:  # PIL's parsers raise many kinds (KeyError, struct.error, ...) on hostile bytes
        raise _bad("INVALID_IMAGE", f"ctrl_img cannot be decoded: {type(e).__name__}", index)
    if width < 1 or height < 1:
        raise _bad("INVALID_IMAGE", "ctrl_img has no pixels", index)
    try:
        return to_rgb(img)
    except (ValueError, OSError, TypeError) as e:  # a pixel mode PIL cannot convert (e.g. "La")
        raise _bad("INVALID_IMAGE", f"ctrl_img pixel mode {img.mode!r} cannot be converted to RGB", index,
                   mode=img.mode) from e


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the reference gets it (``.convert("RGB")``); 16-bit greyscale is scaled, not clipped."""
    if img.mode.startswith("I;16"):  # every byte order; point() supports only the native one
        import numpy as np

        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif img.mode == "I":
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
