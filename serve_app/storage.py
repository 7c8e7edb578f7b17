"""Output storage: finished videos and each job's control images, in a local directory or any fsspec URL.

``storage.outputs_dir`` is a path (the embedded default) or a URL such as ``s3://bucket/prefix`` or
``gs://bucket/prefix`` (``pip install -e ".[cloud]"``); ``storage.outputs_options`` goes to fsspec
(endpoint, region; credentials normally come from the environment or the node's role). Layout:
``<root>/<job id>/<n>.<format>`` for outputs and ``<root>/<job id>/ctrl-<digest>.png`` for control
images (one object per distinct image of a job).

A reader never sees half an object: local writes go to a temporary name and are renamed; object
stores make an object visible only once its upload completed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator

from tenacity import (
    Retrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from deployments.contract import first_line, object_fs

from .config import StorageConfig
from .state_errors import OutputStoreUnavailable, OutputWriteFailed, RangeNotSatisfiable, StoreUnavailable

log = logging.getLogger("ray.serve")

CHUNK = 1024 * 1024


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range a ``Range`` header asks for, as (first, last) inclusive; None for the whole body.

    Follows RFC 9110 section 14: ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``; a header that is not
    one valid ``bytes`` range (another unit, several ranges, bad syntax) is ignored, so the whole body
    is sent (a server may do so).

    Raises:
        RangeNotSatisfiable: the range starts past the end (or asks for a suffix of zero bytes).
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash or not (first_s.isdigit() or first_s == "") or not (last_s.isdigit() or last_s == ""):
        return None
    if first_s == "":
        if last_s == "":
            return None
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - suffix), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # syntactically invalid: ignored
    if first >= size:
        raise _unsatisfiable(size)
    return first, min(int(last_s), size - 1) if last_s else size - 1


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(f"the requested range is outside the file ({size} bytes)", {"size": size})


class OutputStore:
    """Blocking access to the output store; callers on an event loop run these in a thread."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        url = os.path.expanduser(cfg.outputs_dir)
        try:
            # Short SDK timeouts and no listing cache (see object_fs): a lost store must not hold a
            # submit for a minute, and one replica must not see an object another one deleted.
            self.fs, self.root = object_fs(url, cfg.outputs_options)
        except (ImportError, ValueError) as e:  # an fsspec backend that is not installed, a bad URL
            raise ValueError(f"storage.outputs_dir {cfg.outputs_dir!r} cannot be used: {e}") from e
        self.root = self.root.rstrip("/")
        self.local = "file" in _protocols(self.fs)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
        if cfg.presigned_redirect and self.local:
            raise ValueError(f"storage.presigned_redirect needs an object store that signs URLs (s3://, gs://), "
                             f"not the local directory {cfg.outputs_dir!r}")
        # A store that comes back within the window loses no job: the video waits in memory meanwhile.
        self._retry = dict(stop=stop_after_attempt(cfg.write_attempts) | stop_after_delay(cfg.write_retry_s),
                           wait=wait_exponential_jitter(initial=0.5, max=5.0),
                           retry=retry_if_not_exception_type((FileNotFoundError, PermissionError)), reraise=True)

    # -- names ----------------------------------------------------------------------------------

    @staticmethod
    def video_key(job_id: str, index: int, fmt: str) -> str:
        return f"{job_id}/{index}.{fmt}"

    @staticmethod
    def image_key(job_id: str, png: bytes) -> str:
        return f"{job_id}/ctrl-{hashlib.sha256(png).hexdigest()[:16]}.png"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def url(self, key: str) -> str:
        """Where an object lives, as reported in results (``file_path``): a local path or a URL."""
        return self.path(key) if self.local else self.fs.unstrip_protocol(self.path(key))

    def key_of(self, output: dict) -> str | None:
        """The key of a stored output; outputs recorded before keys existed carry only a local path."""
        if output.get("key"):
            return output["key"]
        path = output.get("file_path", "")
        return path[len(self.root) + 1:] if self.local and path.startswith(self.root + "/") else None

    # -- writes ---------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store an object whole, retrying failures (``write_attempts`` tries within ``write_retry_s``).

        Raises:
            OutputWriteFailed: the store kept failing.
        """
        self._put(key, data, self._retry)

    def _put(self, key: str, data: bytes, retry: dict) -> None:
        tries = 0

        def failed(state) -> None:  # each failed try, for operators watching an outage
            log.warning("output write of %s failed (try %d): %s; retrying in %.1f s", key, state.attempt_number,
                        first_line(state.outcome.exception()), state.next_action.sleep)

        try:
            for attempt in Retrying(**retry, before_sleep=failed):
                with attempt:
                    tries += 1
                    self._put_once(key, data)
        except Exception as e:
            raise OutputWriteFailed(f"cannot store {key} after {tries} tries: {type(e).__name__}: {first_line(e)}",
                                    {"key": key, "attempts": tries}) from e

    def _put_once(self, key: str, data: bytes) -> None:
        path = self.path(key)
        if not self.local:
            self.fs.pipe_file(path, data)  # one PUT: the object appears only once complete
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".part-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # atomic: a download never sees half a file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_for_submit(self, key: str, data: bytes) -> None:
        """``put`` at submit time: one try (botocore's two attempts), as a client waits on it; a store that
        is down is a 503 the client can retry, not a failed job."""
        try:
            self._put(key, data, {**self._retry, "stop": stop_after_attempt(1)})
        except OutputWriteFailed as e:
            raise StoreUnavailable(f"the output store is unavailable: {e.message}", {"store": "outputs"}) from e

    def delete_job(self, job_id: str) -> None:
        """Remove every object of a job (outputs and control images); missing ones are fine."""
        try:
            self.fs.rm(self.path(job_id), recursive=True)
        except FileNotFoundError:
            pass

    # -- reads ----------------------------------------------------------------------------------

    def read(self, key: str) -> bytes:
        """A whole object (control images).

        Raises:
            FileNotFoundError: no such object.
            OutputStoreUnavailable: the store cannot be reached.
        """
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise _unreachable(e) from e

    def size(self, key: str) -> int | None:
        """The object's size, or None if it is not there."""
        try:
            return int(self.fs.size(self.path(key)))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise _unreachable(e) from e

    def iter_range(self, key: str, first: int, last: int) -> Iterator[bytes]:
        """Bytes ``first..last`` (inclusive) of an object, in chunks (a sync iterator: Starlette runs it in a thread)."""
        with self.fs.open(self.path(key), "rb") as f:
            f.seek(first)
            left = last - first + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def presign(self, key: str, expires_s: int, method: str = "GET") -> str:
        """A URL that lets its holder ``method`` the object directly for ``expires_s`` seconds.

        S3 signs the operation into the URL: a GET URL answers a HEAD with 403 on real S3, so a HEAD is
        signed as ``head_object``. Other stores sign GET URLs only.
        """
        if method == "HEAD" and "s3" in _protocols(self.fs):
            return self.fs.sign(self.path(key), expiration=expires_s, client_method="head_object")
        return self.fs.sign(self.path(key), expiration=expires_s)


def _unreachable(e: Exception) -> OutputStoreUnavailable:
    return OutputStoreUnavailable(f"the output store is unavailable: {first_line(e)}", {"store": "outputs"})


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)

