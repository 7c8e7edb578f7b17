"""The per-node LoRA cache: turn a LoRA reference into a verified local file, fetching it at most once.

References (``LoraRef.ref``):
  * ``path/to/x.safetensors``: relative to ``LoraCacheConfig.root``, never outside it (no ``..``, not
    absolute). A directory root: checked on the real path (symlinks cannot lead out), verified in
    place, not copied. An object-store root (``s3://bucket/prefix``): the object ``<root>/<path>``,
    fetched and cached like an ``s3://`` reference.
  * ``https://...`` (``http://`` with ``FetchConfig.allow_http``), Hugging Face ``/blob/`` page URLs
    rewritten to ``/resolve/``, and ``hf://owner/repo[@rev]/path.safetensors``.
  * ``s3://`` / ``gs://`` through fsspec (``fetch.object_fs``), only where its backend is installed.

Downloads land in ``cache_dir``: streamed into a temp file in the same directory, header-checked,
fsync'ed, then ``os.replace``'d, so the final name only ever names a complete, verified file. An
http(s) download is named ``<sha256 of the normalised URL>.safetensors`` and never looked up again.
An object is looked up (one HEAD) on every resolve, so a missing one is ``LORA_NOT_FOUND``, an
oversized one is refused before any byte is read, and a replaced one (another ETag) is fetched again:
it is named ``<sha256 of its URL>.<digest of its ETag>.safetensors``. Where the store cannot be
reached, the most recently used cached copy of that object is served (and logged), as a CDN serves
stale on error. Files are evicted least-recently-used (by an explicitly set access time) to stay
under ``disk_quota_bytes``.

HTTP(S) downloads that fail for a reason that may pass (connection error, read timeout, a cut body,
HTTP 5xx or 429) are retried with exponential backoff and full jitter, bounded by
``LoraCacheConfig.retry``; anything else (4xx, refused address, size, format) fails at once.

The hub token (``ModelConfig.token()``) comes with each ``resolve`` call as a ``SecretStr``, so no
repr, log line or actor name ever holds it, and a redeploy with a rotated token never meets an actor
that kept the old one. It is sent only to ``FetchConfig.hf_endpoint``'s origin, and the fetcher drops
it on a redirect to any other origin (the hub's CDN included).

``LoraStore`` is the plain, blocking implementation; ``LoraCacheActor`` wraps it as one async Ray
actor per node so concurrent requests for one reference share one download.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from pydantic import SecretStr
from tenacity import Retrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay
from tenacity import wait_random_exponential

from ..config import FetchConfig, LoraCacheConfig, RetryConfig, url_scheme
from ..errors import LoraFetchFailed, LoraNotFound, ServiceError, first_line
from ..fetch import (
    FetchFailed,
    FetchTooLarge,
    fetch_to_file,
    is_hub_url,
    normalize_lora_url,
    object_fs,
)
from .files import read_header
from .refs import (
    FSSPEC_SCHEMES,
    SUFFIX,
    LoraSchemeUnsupported,
    LoraTooLarge,
    find_in_root,
    object_url,
    storage_options,
    validate_ref,
)

log = logging.getLogger(__name__)

TEMP_PREFIX = ".part-"  # temp downloads; a leading dot keeps them out of the *.safetensors listing
CHUNK = 1024 * 1024
# A download must average at least this rate (plus one read timeout of slack): a server that drips
# bytes just fast enough to dodge the read timeout cannot hold a fetch (and the GPU waiting on it).
MIN_DOWNLOAD_BYTES_PER_S = 2 * 1024**2


def object_version(info: dict[str, Any]) -> str:
    """What changes when an object is replaced: its ETag (S3, GCS) or generation, else size and time."""
    for key in ("ETag", "etag", "generation", "VersionId", "md5Hash"):
        if info.get(key):
            return f"{key}={info[key]}"
    stamp = info.get("LastModified") or info.get("updated") or info.get("mtime")
    return f"size={info.get('size')};time={stamp}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()



# ---------------------------------------------------------------------------------------------
# Retries


def is_transient(err: BaseException) -> bool:
    """A download failure that a later attempt may not meet: connection, read timeout, 5xx, 429.

    Not: 4xx (the file is missing or private), a refused address, a size or format error, DNS (a name
    that does not resolve rarely starts to), too many redirects, or the whole-download time limit (a
    server too slow for it stays too slow, and retrying would multiply the time a replica waits).
    """
    if not isinstance(err, FetchFailed):
        return False
    reason = err.details.get("reason")
    if reason == "timeout":
        return "limit_s" not in err.details
    if reason == "status":
        status = err.details.get("upstream_status", 0)
        return status >= 500 or status == 429
    return reason == "connection"


class _Backoff:
    """Exponential backoff with full jitter, at least the server's ``Retry-After`` (capped alike)."""

    def __init__(self, cfg: RetryConfig):
        self._cfg = cfg
        self._jittered = wait_random_exponential(multiplier=cfg.initial_backoff_s, max=cfg.max_backoff_s)

    def __call__(self, state: RetryCallState) -> float:
        wait = self._jittered(state)
        err = state.outcome.exception() if state.outcome is not None else None
        asked = getattr(err, "details", {}).get("retry_after_s")
        if isinstance(asked, int):
            wait = max(wait, min(float(asked), self._cfg.max_backoff_s))
        return wait


# ---------------------------------------------------------------------------------------------
# The store


class LoraStore:
    """Resolve LoRA references to verified local files; blocking, thread-safe."""

    def __init__(self, cfg: LoraCacheConfig, fetch_cfg: FetchConfig,
                 on_count: Callable[[str, int], None] | None = None):
        """``on_count(name, amount)`` is told of every change to ``counts`` (the actor exports them)."""
        self.cfg = cfg
        self.fetch_cfg = fetch_cfg
        # "~" is the home of this node's processes: node-local paths need no per-node config.
        self.root = None if cfg.object_root else Path(os.path.realpath(os.path.expanduser(cfg.root)))
        self.cache_dir = Path(cfg.cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # eviction and counters; downloads run outside it
        self.counts = {"fetches": 0, "hits": 0, "misses": 0, "local": 0, "evictions": 0, "failures": 0,
                       "retries": 0, "fetched_bytes": 0, "stale_hits": 0}
        self._on_count = on_count
        self._clean_temps()

    # -- public ---------------------------------------------------------------------------------
    def resolve(self, ref: str, hf_token: SecretStr | None = None) -> str:
        """A local path of a verified ``.safetensors`` file for ``ref``.

        Args:
            ref: the reference as the client sent it.
            hf_token: sent as a bearer token to the hub's origin only (private repositories).
        Raises:
            LoraRefInvalid, LoraSchemeUnsupported, LoraNotFound, LoraInvalid, LoraFetchFailed,
            UrlNotAllowed, FetchTooLarge.
        """
        validate_ref(ref, self.fetch_cfg)
        scheme = url_scheme(ref)
        if scheme is None and self.root is not None:
            return self._resolve_local(ref)
        if scheme is None:
            return self._resolve_object(object_url(self.cfg, ref), ref)
        if scheme in FSSPEC_SCHEMES:
            return self._resolve_object(ref, ref)
        return self._resolve_remote(self.normalize(ref), hf_token)

    def cache_path(self, ref: str) -> Path:
        """Where an http(s) or ``hf://`` reference is (or would be) cached."""
        return self.cache_dir / (_digest(self.normalize(ref)) + SUFFIX)

    def normalize(self, ref: str) -> str:
        """The download URL of an http(s)/hf reference (hub pages and ``hf://`` on the configured hub)."""
        return normalize_lora_url(ref, self.fetch_cfg.hf_endpoint)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def _bump(self, name: str, amount: int = 1) -> None:
        """Count an event; the caller holds ``_lock``."""
        self.counts[name] += amount
        if self._on_count is not None:
            self._on_count(name, amount)

    # -- local root -----------------------------------------------------------------------------
    def _resolve_local(self, ref: str) -> str:
        real = find_in_root(self.root, ref)
        size = os.path.getsize(real)
        if size > self.cfg.max_file_bytes:
            raise LoraTooLarge(f"LoRA {ref!r} is {size} bytes; the limit is {self.cfg.max_file_bytes}",
                               {"ref": ref, "bytes": size, "limit": self.cfg.max_file_bytes})
        read_header(real, self.cfg.max_header_bytes)
        with self._lock:
            self._bump("local")
        return real

    # -- downloads ------------------------------------------------------------------------------
    def _resolve_remote(self, url: str, hf_token: SecretStr | None) -> str:
        return self._fill(self.cache_path(url), lambda tmp: self._download(url, tmp, hf_token))

    def _fill(self, final: Path, download: Callable[[Path], None]) -> str:
        """``final`` from the cache, or fetched by ``download(tmp)``, checked, and renamed into place."""
        if self._touch(final):
            with self._lock:
                self._bump("hits")
            return str(final)
        with self._lock:
            self._bump("misses")
        tmp = self.cache_dir / f"{TEMP_PREFIX}{final.stem[:16]}-{uuid.uuid4().hex}{SUFFIX}"
        try:
            download(tmp)
            read_header(tmp, self.cfg.max_header_bytes)  # before the rename: a bad file never gets the name
            os.replace(tmp, final)
        except BaseException:
            with self._lock:
                self._bump("failures")
            tmp.unlink(missing_ok=True)
            raise
        os.utime(final)
        with self._lock:
            self._bump("fetches")
            self._bump("fetched_bytes", final.stat().st_size)
        self._evict(keep=final)
        return str(final)

    def _download(self, url: str, tmp: Path, hf_token: SecretStr | None) -> None:
        headers = {}
        if hf_token is not None and is_hub_url(url, self.fetch_cfg.hf_endpoint):
            # Dropped by the fetcher on a redirect to another origin (the hub sends LFS files to its CDN).
            headers["Authorization"] = f"Bearer {hf_token.get_secret_value()}"
        retrying = Retrying(
            stop=stop_after_attempt(self.cfg.retry.attempts) | stop_before_delay(self.cfg.retry.max_elapsed_s),
            wait=_Backoff(self.cfg.retry),
            retry=retry_if_exception(is_transient),
            before_sleep=self._before_retry,
            reraise=True,
        )
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    fetch_to_file(url, tmp, self.fetch_cfg, self.cfg.max_file_bytes, headers,
                                  total_timeout_s=self.download_timeout_s())
        except FetchTooLarge as e:
            raise LoraTooLarge(f"LoRA download is larger than {self.cfg.max_file_bytes} bytes",
                               {**e.details, "limit": self.cfg.max_file_bytes}) from e
        except FetchFailed as e:
            upstream = e.details.get("upstream_status")
            if upstream in (401, 403, 404, 410):
                raise LoraNotFound(f"LoRA URL answered HTTP {upstream}: {e.details.get('url')}", e.details) from e
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            raise LoraFetchFailed(f"cannot download LoRA{tries}: {e.message}", {**e.details, "attempts": attempts}) from e

    def _before_retry(self, state: RetryCallState) -> None:
        with self._lock:
            self._bump("retries")
        err = state.outcome.exception() if state.outcome is not None else None
        # The message and details name the URL without query or userinfo, and never a header.
        log.warning("LoRA download attempt %d failed (%s); retrying in %.2fs", state.attempt_number,
                    getattr(err, "message", type(err).__name__), state.upcoming_sleep)

    def download_timeout_s(self) -> float:
        """The whole-download limit: a largest-allowed file at the minimum rate, plus a read timeout."""
        return self.fetch_cfg.read_timeout_s + self.cfg.max_file_bytes / MIN_DOWNLOAD_BYTES_PER_S

    # -- object stores ------------------------------------------------------------------------
    def _resolve_object(self, url: str, ref: str) -> str:
        """An object-store file: looked up on every call, downloaded once per version of the object."""
        try:
            fs, path = object_fs(url, storage_options(self.cfg, url))
        except (ImportError, ValueError) as e:  # a backend that is not installed, a URL fsspec cannot parse
            raise LoraSchemeUnsupported(f"cannot read {url_scheme(url)}:// LoRAs here: {e}", {"ref": ref}) from e
        try:
            info = fs.info(path)
        except (FileNotFoundError, PermissionError) as e:
            # S3 answers 403 for a missing key to a reader without s3:ListBucket: not found or not readable,
            # as an http 401/403/404 is.
            raise LoraNotFound(f"LoRA not found: {ref}", {"ref": ref}) from e
        except Exception as e:  # the store cannot be reached (each backend raises its own errors)
            return self._stale_or_raise(url, ref, e)
        if info.get("type") != "file":
            raise LoraNotFound(f"LoRA not found: {ref}", {"ref": ref})
        size = int(info.get("size") or 0)
        if size > self.cfg.max_file_bytes:
            raise LoraTooLarge(f"LoRA {ref!r} is {size} bytes; the limit is {self.cfg.max_file_bytes}",
                               {"ref": ref, "bytes": size, "limit": self.cfg.max_file_bytes})
        final = self.cache_dir / f"{_digest(url)}.{_digest(object_version(info))[:16]}{SUFFIX}"
        return self._fill(final, lambda tmp: self._download_object(fs, path, tmp, size, ref))

    def _download_object(self, fs, path: str, tmp: Path, size: int, ref: str) -> None:
        """Stream one object into ``tmp``, within the size limit and exactly the size its lookup gave."""
        total = 0
        try:
            with fs.open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    total += len(chunk)
                    if total > self.cfg.max_file_bytes:
                        limit = self.cfg.max_file_bytes
                        raise LoraTooLarge(f"LoRA {ref!r} is larger than {limit} bytes", {"ref": ref, "limit": limit})
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except (FileNotFoundError, PermissionError) as e:  # deleted since the lookup
            raise LoraNotFound(f"LoRA not found: {ref}", {"ref": ref}) from e
        except ServiceError:
            raise
        except Exception as e:
            raise LoraFetchFailed(f"cannot download LoRA {ref}: {type(e).__name__}: {first_line(e)}",
                                  {"ref": ref}) from e
        if total != size:  # replaced or cut while it was read: the next resolve looks it up again
            raise LoraFetchFailed(f"LoRA {ref} changed while it was downloaded ({total} of {size} bytes)",
                                  {"ref": ref, "bytes": total, "expected": size})

    def _stale_or_raise(self, url: str, ref: str, err: Exception) -> str:
        """The most recently used cached version of an object the store cannot be asked about now."""
        copies = []
        for p in self.cache_dir.glob(f"{_digest(url)}.*{SUFFIX}"):
            try:
                copies.append((p.stat().st_mtime, p))
            except FileNotFoundError:
                continue
        if not copies:
            with self._lock:
                self._bump("failures")
            raise LoraFetchFailed(f"cannot reach the object store for LoRA {ref}: {type(err).__name__}: "
                                  f"{first_line(err)}", {"ref": ref}) from err
        stale = max(copies, key=lambda c: c[0])[1]
        log.warning("object store unreachable for LoRA %s (%s); serving the cached copy %s", ref,
                    type(err).__name__, stale.name)
        self._touch(stale)
        with self._lock:
            self._bump("hits")
            self._bump("stale_hits")
        return str(stale)

    # -- disk housekeeping ----------------------------------------------------------------------
    def _touch(self, path: Path) -> bool:
        """Mark a cached file used now; False if it is not there. Explicit, since mounts may be noatime."""
        try:
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def _clean_temps(self) -> None:
        """Remove temp files a crashed process left; this store owns ``cache_dir`` on this node."""
        for p in self.cache_dir.glob(f"{TEMP_PREFIX}*"):
            p.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        """Delete least-recently-used cached files until the total is under quota, never ``keep``."""
        with self._lock:
            files = []
            for p in self.cache_dir.glob(f"*{SUFFIX}"):
                if p.name.startswith(TEMP_PREFIX):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_atime, st.st_size, p))
            total = sum(size for _, size, _ in files)
            for _, size, p in sorted(files, key=lambda f: f[0]):
                if total <= self.cfg.disk_quota_bytes:
                    break
                if p == keep:
                    continue
                # A replica that already opened the file keeps reading it (POSIX unlink semantics).
                p.unlink(missing_ok=True)
                total -= size
                self._bump("evictions")
                log.info("evicted cached LoRA %s (%d bytes)", p.name, size)
