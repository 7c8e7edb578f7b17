"""GPU-side configuration: model source, dtype, speed options, LoRA cache, outbound fetches.

These models are nested inside the app's ``AppConfig`` (``serve_app/config.py``), which is the
``args:`` of the Serve YAML; replicas receive their part of it, validated once.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .generator import DEFAULT_GENERATOR_FACTORY, ImportedFactory, parse_factory_path
from .parallel.layout import ParallelConfig
from .speed.compile_cache import CompileCacheConfig

DEFAULT_CHECKPOINT = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"


class StrictModel(BaseModel):
    """A config section that refuses unknown keys, so a typo in the YAML is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


# MagCache's magnitude ratios for Wan 2.1 I2V 14B 480P, calibrated by its authors on the real checkpoint
# (the script's I2V 480P defaults: 832x480, 40 UniPC steps, shift 3, CFG 5): one ratio per transformer forward, cond and uncond interleaved, the
# first pair padding. Source: Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py (the '480P' table
# of i2v mag_ratios). Data, not code: recalibrate with that script's --magcache_calibration for another
# checkpoint, sampler or shift and put the printed "norm ratio" list in speed.fast.step_cache.mag_ratios.
MAGCACHE_WAN21_I2V_480P = (
    1.0, 1.0, 0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878,
    0.98762, 0.98759, 0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065,
    0.99068, 0.98845, 0.98847, 0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823,
    0.98756, 0.98759, 0.98808, 0.98814, 0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157,
    0.98165, 0.98411, 0.98413, 0.97952, 0.97953, 0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826,
    0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055, 0.96588, 0.96587, 0.96113, 0.96124, 0.9567,
    0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224, 0.91878, 0.91896, 0.90955, 0.90954,
    0.92617, 0.92616,
)
MAGCACHE_SOURCE = "MagCache4Wan2.1 (Zehong-Ma/MagCache), Wan2.1-I2V-14B-480P, calibrated on the real checkpoint"


class StepCacheConfig(StrictModel):
    """Fast mode's step cache: MagCache's rule on calibrated magnitude ratios, decided before each request.

    A forward is skipped (the branch's last residual reused) while the accumulated error
    ``sum |1 - prod(ratios)|`` since the last computed forward stays under ``threshold`` and at most
    ``max_skips`` forwards in a row are skipped; the first ``retention_ratio`` of the forwards are always
    computed. The cond and uncond passes each keep their own residual and accumulators.
    """

    enabled: bool = True
    # MagCache's faster published setting for Wan 2.1 I2V 14B 480P, E024K6R02 (its MagCache4Wan2.1 README);
    # E012K2R02 before: 39.6 against 39.3 dB vs exact on the benchmark's inputs, 24 against 18 forwards (RESULTS.md).
    threshold: float = Field(0.24, ge=0, description="MagCache's E: the accumulated error bound")
    max_skips: int = Field(6, ge=0, description="MagCache's K: at most this many forwards in a row reuse a residual")
    retention_ratio: float = Field(
        0.2, ge=0, le=1, description="MagCache's R: this fraction of the forwards, the first ones, always computed"
    )
    mag_ratios: list[float] = Field(
        default_factory=lambda: list(MAGCACHE_WAN21_I2V_480P),
        min_length=2,
        description="one magnitude ratio per forward of the calibration run, cond and uncond interleaved; resampled "
        "to each request's step count (nearest) as MagCache does",
    )
    ratios_source: str = Field(MAGCACHE_SOURCE, description="where mag_ratios came from, reported with each result")

    @field_validator("mag_ratios")
    @classmethod
    def _pairs(cls, v: list[float]) -> list[float]:
        if len(v) % 2 or any(not 0 < r < 10 for r in v):
            raise ValueError("mag_ratios must hold positive (cond, uncond) pairs")
        return v


class FastModeConfig(StrictModel):
    """``speed: fast``: FP8 block linears (CUDA, compute capability >= 8.9, torchao), the step cache."""

    enabled: bool = True
    fp8: bool = Field(
        True,
        description="torchao float8 (dynamic, per-row scales) copies of the block linears, used in this mode only; "
        "needs torchao (pip install '.[cuda]') on CUDA, where a missing torchao stops the replica at start. On CPU the "
        "mode runs without it and says so in each result",
    )
    attention_backend: str | None = Field(
        None, description="diffusers attention backend in this mode; null: the one exact mode uses"
    )
    step_cache: StepCacheConfig = Field(default_factory=StepCacheConfig)


# LightX2V's Wan 2.1 I2V step-distillation setting: ModelTC/LightX2V
# configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json (infer_steps 4, denoising_step_list
# [1000, 750, 500, 250], sample_shift 5, enable_cfg false, LoRA strength 1.0) run by its
# WanStepDistillScheduler (lightx2v/models/schedulers/wan/step_distill/scheduler.py).
DISTILL_STEP_LIST = (1000, 750, 500, 250)
DISTILL_SHIFT = 5.0


class TurboModeConfig(StrictModel):
    """``speed: turbo``: a step-and-CFG-distillation LoRA under the user's LoRAs, its own scheduler, fast kernels."""

    enabled: bool = False
    lora: str | None = Field(
        None,
        description="the distillation LoRA: an absolute path, or a path under gpu.lora.root (a directory or an "
        "object-store prefix; e.g. LightX2V's wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors) or a LoRA URL, "
        "fetched and checked through the node's LoRA cache like a request's LoRA; loaded once per replica",
    )
    strength: float = Field(1.0, description="the distillation LoRA's multiplier")
    denoising_step_list: list[int] = Field(
        default_factory=lambda: list(DISTILL_STEP_LIST),
        min_length=1,
        description="the distillation's timesteps on the unshifted 1000-step grid, as LightX2V's config writes them",
    )
    shift: float = Field(DISTILL_SHIFT, gt=0, description="LightX2V's sample_shift")
    fp8: bool = Field(True, description="FP8 block linears as in fast mode (CUDA only)")
    attention_backend: str | None = Field(None, description="null: the one exact mode uses")

    @property
    def steps(self) -> int:
        return len(self.denoising_step_list)

    @field_validator("denoising_step_list")
    @classmethod
    def _descending(cls, v: list[int]) -> list[int]:
        if any(not 0 < t <= 1000 for t in v) or any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError("denoising_step_list must be strictly decreasing timesteps in (0, 1000]")
        return v

    @model_validator(mode="after")
    def _needs_lora(self):
        if self.enabled and not self.lora:
            raise ValueError("speed.turbo.enabled needs speed.turbo.lora (the distillation LoRA file)")
        return self


class SpeedConfig(StrictModel):
    """Exact-mode speed-ups (each keeps results within bf16 noise of the plain diffusers path), and the
    per-request ``fast`` and ``turbo`` modes that trade accuracy for speed."""

    compile_blocks: bool = Field(True, description="regional torch.compile of the transformer blocks (CUDA only)")
    attention_backend: str | None = Field(
        "auto",
        description="exact mode's attention on CUDA: auto (FlashAttention-4 where installed and able to run, "
        "else _native_cudnn), flash4 (a startup error where it cannot run), a diffusers backend name, or null "
        "(diffusers' default)",
    )
    warmup: bool = Field(True, description="run one small generation at start so no user pays compile time")
    warmup_width: int = 832
    warmup_height: int = 480
    warmup_frames: int = 41
    extra_warmup_sizes: list[tuple[int, int, int]] = Field(
        default_factory=list,
        description="more (width, height, frames) to compile at start; any other size compiles on first use",
    )
    stream_video: bool = Field(
        True, description="encode MP4 chunk by chunk while the VAE decodes, instead of after it (same bytes)"
    )
    vae_encode_cache: int = Field(
        4, ge=0, le=64,
        description="first-frame VAE encodings kept per replica and reused, bit for bit, when the same first "
        "frame comes again at the same size (0: off; each holds a few MB of GPU memory)",
    )
    vae_channels_last: bool = Field(
        True, description="the VAE's convolution weights in channels-last layout on CUDA (faster cuDNN 3D "
        "convolutions; results within bf16 rounding of the default layout)",
    )
    lora_hotswap_rank: int = Field(
        64, description="max LoRA rank that can be swapped into a compiled model without recompiling"
    )
    fast: FastModeConfig = Field(default_factory=FastModeConfig)
    turbo: TurboModeConfig = Field(default_factory=TurboModeConfig)

    def enabled_modes(self) -> tuple[str, ...]:
        """The speed modes requests may ask for: exact always, then fast and turbo where enabled."""
        return ("exact",) + tuple(m for m in ("fast", "turbo") if getattr(self, m).enabled)


class ModelConfig(StrictModel):
    """Which checkpoint to load and how."""

    source: str = Field(
        DEFAULT_CHECKPOINT,
        description="Hugging Face repo id, a local diffusers directory, 'tiny' or 'random-full'",
    )
    model_id: str = Field("wan21_i2v_14b480p", description="the API model id clients send")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cache_dir: str = Field("./outputs/models", description="where the tiny checkpoint is built, hub cache")
    hf_token_env: str = Field("HF_TOKEN", description="environment variable holding a hub token, if any")
    hf_token: SecretStr | None = Field(
        None,
        description="a hub token, overriding hf_token_env; masked in repr and dumps, but a Serve YAML that holds "
        "it shows it to anyone who can read the deployed config: prefer the environment variable",
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    load_direct: bool = Field(
        True, description="read safetensors weights straight onto the GPU (no copy in host memory first)"
    )

    def token(self) -> SecretStr | None:
        """The hub token for model and LoRA downloads: ``hf_token``, else the ``hf_token_env`` variable.

        Read where it is used (the replica's process, whose environment Ray gives it), kept wrapped so
        that no repr or log line can show it.
        """
        if self.hf_token is not None and self.hf_token.get_secret_value():
            return self.hf_token
        value = os.environ.get(self.hf_token_env, "")
        return SecretStr(value) if value else None


class FetchConfig(StrictModel):
    """Rules for every outbound fetch (ctrl_img URLs, LoRA URLs)."""

    allow_http: bool = Field(False, description="plain http:// is refused unless set")
    allow_private: bool = Field(False, description="allow loopback/private/link-local/reserved addresses")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="hosts or CIDR networks allowed even if private (e.g. 127.0.0.1 for tests)",
    )
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_redirects: int = 5
    hf_endpoint: str = Field(
        "https://huggingface.co",
        description="where hf:// references point (a hub mirror, or a local stand-in in tests); the only origin "
        "the hub token is ever sent to",
    )

    @field_validator("hf_endpoint")
    @classmethod
    def _plain_origin(cls, v: str) -> str:
        import httpx  # the fetcher's own parser, so the origin compared later is the one checked here

        v = v.rstrip("/")
        try:
            u = httpx.URL(v)
        except (httpx.InvalidURL, ValueError) as e:
            raise ValueError(f"hf_endpoint is not a URL: {e}") from e
        if u.scheme not in ("https", "http") or not u.host or u.userinfo or u.query or u.path not in ("", "/"):
            raise ValueError("hf_endpoint must be a bare http(s)://host[:port] origin")
        return v


class RetryConfig(StrictModel):
    """Retries of a LoRA download that failed for a reason that may pass: a connection error, a timeout,
    a cut body, HTTP 5xx or 429. Never for 4xx, size or format errors."""

    attempts: int = Field(4, ge=1, description="tries in all, the first included")
    initial_backoff_s: float = Field(
        1.0, gt=0, description="upper bound of the first wait; it doubles per retry, the wait is random below it"
    )
    max_backoff_s: float = Field(30.0, gt=0, description="upper bound of any one wait (also caps Retry-After)")
    max_elapsed_s: float = Field(
        300.0, gt=0, description="no retry starts when it would begin later than this after the first attempt"
    )


# Object stores a LoRA root or a LoRA reference may be on (through fsspec: s3fs, gcsfs).
OBJECT_STORE_SCHEMES = ("s3", "gs")


_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_scheme(value: str) -> str | None:
    """The scheme of ``scheme://...``, lower-cased; None for a plain path."""
    m = _SCHEME_RE.match(value)
    return m.group(1).lower() if m else None


class LoraCacheConfig(StrictModel):
    """Where adapters come from and how the per-node cache keeps them."""

    root: str = Field(
        "./loras",
        description="root-relative LoRA paths resolve under this only: a directory on each node, or an object-store "
        "prefix (s3://bucket/prefix, gs://bucket/prefix) each node's LoRA cache fetches from on first use",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for an object-store root and for s3:// / gs:// LoRA references of the same "
        "scheme (client_kwargs.endpoint_url for an S3-compatible store, region, ...); credentials come from the "
        "node's role or environment unless given here. Left empty, the app fills it with storage.outputs_options "
        "when the root is on the same kind of store as the outputs",
    )
    cache_dir: str = Field("./outputs/lora-cache", description="downloaded adapters live here")
    max_file_bytes: int = Field(2 * 1024**3, description="largest accepted LoRA file")
    disk_quota_bytes: int = Field(50 * 1024**3, description="LRU eviction keeps the cache under this")
    max_header_bytes: int = Field(16 * 1024**2, description="largest accepted safetensors header")
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("root")
    @classmethod
    def _root_kind(cls, v: str) -> str:
        scheme = url_scheme(v)
        if scheme is not None and scheme not in OBJECT_STORE_SCHEMES:
            raise ValueError(f"gpu.lora.root must be a directory or an object-store prefix "
                             f"({', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}), got {v!r}")
        if scheme is not None and not v.split("://", 1)[1].strip("/"):
            raise ValueError(f"gpu.lora.root {v!r} names no bucket")
        return v

    @property
    def object_root(self) -> str | None:
        """The root as an object-store URL without a trailing slash; None for a directory."""
        return self.root.rstrip("/") if url_scheme(self.root) is not None else None


class ReplicaConfig(StrictModel):
    """The GPU replica deployment's settings."""

    num_gpus: float = 0
    num_cpus: float = 0.5
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 1.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    max_loras_per_replica: int = Field(8, description="resident LoRA sets per replica before LRU eviction")
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 60.0
    graceful_shutdown_timeout_s: float = 60.0
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="how often a stopping replica looks whether its request has ended (Serve's "
        "default); an idle one still waits this long once before it stops")
    generator_factory: str = Field(
        DEFAULT_GENERATOR_FACTORY,
        description="'module:name' of what makes each process's generator from the loaded model "
        "(deployments.generator.GeneratorFactory); tests name a fake that wraps the real one",
    )
    generator_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for generator_factory (none for the default)"
    )

    @field_validator("generator_factory")
    @classmethod
    def _factory_path(cls, v: str) -> str:
        parse_factory_path(v)
        return v

    def make_generator_factory(self) -> ImportedFactory:
        """The factory the replica is given (imported where it is first called, not here)."""
        return ImportedFactory(self.generator_factory, dict(self.generator_options))


MemoryMode = Literal["full", "fp8", "offload"]


class GpuConfig(StrictModel):
    """Everything a replica needs, in one object."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    memory: MemoryMode = Field(
        "full",
        description="where the weights live (deployments/engine/memory.py): full (bf16 on the GPU, an 80 GB card), fp8 "
        "(the transformer's block linears stored in FP8: a 48 GB card), offload (fp8, and the blocks and encoders in "
        "pinned host memory, copied to the GPU just ahead of use: a 24 GB card; runs the transformer eagerly). A "
        "replica whose card is too small for its mode refuses to start and names the mode that fits",
    )
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    lora: LoraCacheConfig = Field(default_factory=LoraCacheConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    compile_cache: CompileCacheConfig = Field(default_factory=CompileCacheConfig)

    @model_validator(mode="after")
    def _memory_mode_fits(self):
        if self.memory == "offload" and self.model.speed.compile_blocks:
            raise ValueError(
                "gpu.memory: offload moves each transformer block onto the GPU around its forward, which compiled "
                "blocks cannot do: set gpu.model.speed.compile_blocks: false (configs/wan21-i2v-480p-24gb.yaml)"
            )
        if self.memory != "full" and self.parallel.degree > 1:
            raise ValueError(f"gpu.memory: {self.memory} is for one-GPU replicas; parallel.degree is "
                             f"{self.parallel.degree}")
        return self

    @model_validator(mode="after")
    def _parallel_fits(self):
        if self.parallel.degree > 1 and self.replica.num_gpus not in (0, 1):
            raise ValueError(
                f"with parallel.degree {self.parallel.degree}, replica.num_gpus is per rank and must be 1 (or 0 on "
                f"CPU), got {self.replica.num_gpus}"
            )
        return self
