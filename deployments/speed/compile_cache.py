"""Compiled kernels kept across replicas and restarts: torch's compile cache artifacts in one place.

A replica compiles its transformer blocks at warm-up (``speed.compile_blocks``), tens of seconds of
its cold start. torch can pack everything that compile produced in this process (inductor's graphs,
the Triton kernels' binaries, AOTAutograd entries, autotuning results) into one blob
(``torch.compiler.save_cache_artifacts``) and pre-load such a blob into a fresh process
(``torch.compiler.load_cache_artifacts``), after which the same compile is mostly cache hits.

We keep one blob per key in ``gpu.compile_cache.location`` (a node-local directory, or an fsspec URL
such as ``s3://bucket/prefix`` that every node reaches), so the first replica of a configuration to
warm up pays the compile and every later one, on any node, and after restarts, loads it. The key
covers what the compiled code depends on (software versions, GPU model, architecture, dtype, speed
settings, this rank's place in a parallel group), never the weights: the real checkpoint and the
``random-full`` benchmark model share entries.

The config class imports no torch (the ingress validates the config too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

KEY_VERSION = "1"  # bump when what goes into a key changes


class CompileCacheConfig(BaseModel):
    """Where compiled artifacts are kept (``gpu.compile_cache``)."""

    model_config = ConfigDict(extra="forbid")

    location: str | None = Field(
        None, description="a directory on the node, or an fsspec URL (s3://..., gs://...); null: off"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for location")
    inductor_dir: str | None = Field(
        None, description="TORCHINDUCTOR_CACHE_DIR for replica processes (a node disk that outlives them); "
        "null keeps torch's default under /tmp",
    )
    save: bool = Field(True, description="write the artifacts after warm-up when none were found for the key")


def environment_fingerprint() -> dict:
    """Software and device facts compiled code depends on."""
    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": os.sys.version.split()[0]}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    import diffusers

    facts["diffusers"] = diffusers.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        facts["device"] = f"{props.name} sm_{props.major}{props.minor}"
    else:
        facts["device"] = "cpu"
    return facts


def cache_key(transformer_config: dict, dtype: str, speed: dict, parallel: dict | None, rank: int = 0) -> str:
    """The blob's name: a digest of everything the compiled code depends on, and the rank."""
    spec = {
        "v": KEY_VERSION,
        "env": environment_fingerprint(),
        "transformer": {k: v for k, v in sorted(transformer_config.items()) if not k.startswith("_")},
        "dtype": dtype,
        "speed": speed,
        "parallel": parallel,
        "rank": rank,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"wan-i2v-{digest}-rank{rank}"


class CompileCache:
    """Load the artifacts for one key before the first compile; save them after warm-up if missing."""

    def __init__(self, cfg: CompileCacheConfig, key: str):
        self.cfg = cfg
        self.key = key
        self.report: dict = {"enabled": cfg.location is not None, "key": key}
        self._hit = False

    @staticmethod
    def use_inductor_dir(cfg: CompileCacheConfig) -> None:
        """Point inductor's on-disk cache at the configured directory (read by torch at each compile), and
        FlashAttention-4's kernel cache beside it (read when ``flash_attn.cute`` is first imported; without it
        every replica start JIT-compiles FA4's kernels again, a few seconds per shape)."""
        if cfg.inductor_dir:
            path = os.path.expanduser(cfg.inductor_dir)
            os.makedirs(path, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
            os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
            os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", os.path.join(path, "flash4"))

    def _path(self):
        """(filesystem, path of this key's blob, whether it is a local file)."""
        from ..fetch import object_fs

        location = self.cfg.location
        local = "://" not in location or location.startswith("file://")
        if "://" not in location:
            location = os.path.expanduser(location)
        # The object-store defaults every store here opens with (short SDK timeouts, no listing cache).
        fs, root = object_fs(location, self.cfg.storage_options)
        return fs, f"{root.rstrip('/')}/{self.key}.bin", local

    def load(self) -> dict:
        """Pre-load this key's artifacts into this process's compile caches; a miss or an error only reports."""
        if self.cfg.location is None:
            return self.report
        import torch

        t0 = time.perf_counter()
        try:
            fs, path, _ = self._path()
            if fs.exists(path):
                data = fs.cat_file(path)
                torch.compiler.load_cache_artifacts(data)
                self._hit = True
                self.report.update(hit=True, bytes=len(data))
            else:
                self.report["hit"] = False
        except Exception as e:  # a broken cache must cost a compile, never a replica
            log.warning("compile cache %s could not be loaded: %s: %s", self.key, type(e).__name__, e)
            self.report.update(hit=False, load_error=f"{type(e).__name__}: {e}"[:300])
        self.report["load_s"] = round(time.perf_counter() - t0, 3)
        return self.report

    def save(self) -> dict:
        """Write what this process compiled under the key, unless it came from the cache (or saving is off)."""
        if self.cfg.location is None or self._hit or not self.cfg.save:
            return self.report
        import torch

        t0 = time.perf_counter()
        try:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None:
                self.report["saved"] = False
                return self.report
            data, _info = artifacts
            fs, path, local = self._path()
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            # Written aside then moved, so a replica loading meanwhile never reads half a blob; on an
            # object store one put is already all or nothing.
            if local:
                tmp = f"{path}.{os.getpid()}.tmp"
                fs.pipe_file(tmp, data)
                os.replace(tmp, path)
            else:
                fs.pipe_file(path, data)
            self.report.update(saved=True, bytes=len(data))
        except Exception as e:
            log.warning("compile cache %s could not be saved: %s: %s", self.key, type(e).__name__, e)
            self.report.update(saved=False, save_error=f"{type(e).__name__}: {e}"[:300])
        self.report["save_s"] = round(time.perf_counter() - t0, 3)
        return self.report


def for_generator(cfg: CompileCacheConfig, generator, parallel: dict | None = None, rank: int = 0) -> CompileCache:
    """The cache of a ``WanGenerator``'s compiled transformer (its architecture, dtype and speed settings)."""
    pipe = generator.pipe
    speed = generator.speed.model_dump(mode="json")
    # What only decides whether and when we warm up, not what gets compiled.
    for k in ("warmup", "stream_video"):
        speed.pop(k, None)
    # "auto" compiles FlashAttention-4's op on one machine and cuDNN on another: key on what was chosen
    speed["attention_backend"] = generator.speed_report.get("attention_backend", speed.get("attention_backend"))
    key = cache_key(dict(pipe.transformer.config), str(generator.loaded.dtype), speed, parallel, rank)
    return CompileCache(cfg, key)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process: constant after warm-up means no recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
