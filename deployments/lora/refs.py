"""LoRA references, checked without torch, downloads or a cache: what the ingress runs at submit time.

References (``LoraRef.ref``) are described in ``deployments/lora/cache.py``. ``validate_ref`` checks one's
syntax (no filesystem, no DNS); ``check_in_root`` looks a root-relative one up under the LoRA root
without reading it; the cache (``cache.LoraStore``) runs the same checks again where the file is read.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from ..config import OBJECT_STORE_SCHEMES, FetchConfig, LoraCacheConfig, url_scheme
from ..errors import LoraInvalid, LoraNotFound, first_line
from ..fetch import FetchTooLarge, check_url, normalize_lora_url, object_fs

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
FSSPEC_SCHEMES = OBJECT_STORE_SCHEMES


class LoraRefInvalid(LoraInvalid):
    """The reference itself is unusable: escapes the root, wrong suffix, malformed."""

    code = "LORA_REF_INVALID"
    status = 400


class LoraSchemeUnsupported(LoraRefInvalid):
    code = "LORA_SCHEME_UNSUPPORTED"
    status = 400


class LoraTooLarge(LoraInvalid, FetchTooLarge):
    """A LoRA file over ``LoraCacheConfig.max_file_bytes``, local or downloaded: one code for one limit.

    Also a ``FetchTooLarge``, so callers that catch the fetcher's error keep working.
    """

    code = "LORA_TOO_LARGE"
    status = 400


# ---------------------------------------------------------------------------------------------
# Reference syntax (no filesystem, no network): usable by the ingress at submit time


_scheme = url_scheme


def _fsspec_supports(scheme: str) -> bool:
    if importlib.util.find_spec("fsspec") is None:
        return False
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)  # imports s3fs / gcsfs: ImportError when absent
    except (ImportError, ValueError):
        return False
    return True


def _check_relative(ref: str) -> None:
    if not ref or "\x00" in ref or "\\" in ref:
        raise LoraRefInvalid(f"invalid LoRA path {ref!r}", {"ref": ref})
    if ref.startswith("/") or ref.startswith("~"):
        raise LoraRefInvalid(f"LoRA path {ref!r} must be relative to the LoRA root", {"ref": ref})
    # Any '..' is refused, even one that would stay inside: simpler to reason about than normalising.
    if any(part in ("..",) for part in ref.split("/")):
        raise LoraRefInvalid(f"LoRA path {ref!r} must not contain '..'", {"ref": ref})


def _check_suffix(path: str, ref: str) -> None:
    if not path.lower().endswith(SUFFIX):
        raise LoraRefInvalid(f"only {SUFFIX} LoRA files are accepted, got {ref!r}", {"ref": ref})


def validate_ref(ref: str, fetch_cfg: FetchConfig | None = None) -> None:
    """Pure syntax check of one LoRA reference (no filesystem, no DNS), for submit time.

    Raises:
        LoraRefInvalid (LORA_REF_INVALID), LoraSchemeUnsupported (LORA_SCHEME_UNSUPPORTED),
        UrlNotAllowed (URL_NOT_ALLOWED: credentials, private address literals, http when not allowed).
    """
    fetch_cfg = fetch_cfg or FetchConfig()
    if not isinstance(ref, str) or len(ref) > 4096:
        raise LoraRefInvalid("LoRA reference must be a string of at most 4096 characters", {})
    scheme = _scheme(ref)
    if scheme is None:
        _check_relative(ref)
        _check_suffix(ref, ref)
        return
    if scheme in FSSPEC_SCHEMES:
        if not _fsspec_supports(scheme):
            raise LoraSchemeUnsupported(
                f"{scheme}:// LoRA references need fsspec with its {scheme} backend installed", {"ref": ref}
            )
        if "@" in ref.split("/", 3)[2]:
            raise LoraRefInvalid("credentials in LoRA references are not allowed", {"scheme": scheme})
        _check_suffix(ref.split("?", 1)[0], ref)
        return
    if scheme not in ("https", "http", "hf"):
        raise LoraSchemeUnsupported(f"LoRA references with scheme {scheme!r} are not supported", {"scheme": scheme})
    url = normalize_lora_url(ref, fetch_cfg.hf_endpoint)
    check_url(url, fetch_cfg)
    _check_suffix(url.split("?", 1)[0].split("#", 1)[0], ref)


def is_root_relative(ref: str) -> bool:
    """Whether a (syntactically valid) reference names a file under the LoRA root rather than a URL."""
    return _scheme(ref) is None


# ---------------------------------------------------------------------------------------------
# Files under the root (filesystem, no network): also usable by an ingress that sees the root


def find_in_root(root: str | os.PathLike, ref: str) -> str:
    """The real path of a root-relative reference's file, without reading it.

    Raises:
        LoraRefInvalid (LORA_REF_INVALID): the real path leaves the root or is not a .safetensors name.
        LoraNotFound (LORA_NOT_FOUND): no such file.
    """
    root = os.path.realpath(os.path.expanduser(root))
    real = os.path.realpath(os.path.join(root, ref))
    # Checked on the real path: a symlink inside the root that points out is refused here.
    if os.path.commonpath([root, real]) != root:
        raise LoraRefInvalid(f"LoRA path {ref!r} leads outside the LoRA root", {"ref": ref})
    _check_suffix(real, ref)
    if not os.path.isfile(real):
        raise LoraNotFound(f"LoRA file not found: {ref}", {"ref": ref})
    return real


def object_url(cfg: LoraCacheConfig, ref: str) -> str:
    """The URL of a root-relative reference's object under an object-store root.

    Raises:
        LoraRefInvalid (LORA_REF_INVALID): as ``validate_ref``, and a ``?`` or ``#`` (s3fs would read
            ``?versionId=`` as a version and the rest as another key).
    """
    _check_relative(ref)
    _check_suffix(ref, ref)
    if "?" in ref or "#" in ref:
        raise LoraRefInvalid(f"LoRA path {ref!r} must not contain '?' or '#'", {"ref": ref})
    return f"{cfg.object_root}/{ref}"


def storage_options(cfg: LoraCacheConfig, url: str) -> dict[str, Any]:
    """The configured fsspec options where ``url`` is on the root's kind of store; else none."""
    return cfg.storage_options if _scheme(url) == _scheme(cfg.root) else {}


def check_in_root(cfg: LoraCacheConfig, ref: str) -> None:
    """Submit-time check that a root-relative reference's file is in the root, without reading it.

    A directory root: ``find_in_root``. An object-store root: one HEAD; only an answer that the object
    is not there refuses the reference. Anything else (no credentials here, access denied, the store
    unreachable) leaves the decision to the replica, which may see the root where the caller cannot.

    Raises:
        LoraRefInvalid (LORA_REF_INVALID), LoraNotFound (LORA_NOT_FOUND).
    """
    if cfg.object_root is None:
        find_in_root(cfg.root, ref)
        return
    url = object_url(cfg, ref)
    try:
        fs, path = object_fs(url, storage_options(cfg, url))
        info = fs.info(path)
    except FileNotFoundError:
        raise LoraNotFound(f"LoRA file not found: {ref}", {"ref": ref}) from None
    except Exception as e:  # each backend raises its own errors
        log.warning("cannot check LoRA %s at submit (%s: %s); the replica will", ref, type(e).__name__,
                    first_line(e))
        return
    if info.get("type") != "file":
        raise LoraNotFound(f"LoRA file not found: {ref}", {"ref": ref})
