"""GPU-side configuration: model source, dtype, speed options, LoRA cache, outbound fetches.

These models are nested inside the app's ``AppConfig`` (``serve_app/config.py``), which is the
``args:`` of the Serve YAML; replicas receive their part of it, validated once.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .compile_cache import CompileCacheConfig
from .parallel import ParallelConfig

DEFAULT_CHECKPOINT = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpeedConfig(_Strict):
    """Exact-mode speed-ups; each keeps results within bf16 noise of the plain diffusers path."""

    compile_blocks: bool = Field(True, description="regional torch.compile of the transformer blocks (CUDA only)")
    attention_backend: str | None = Field(
        "_native_cudnn", description="diffusers attention backend on CUDA; null keeps the default"
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
    lora_hotswap_rank: int = Field(
        64, description="max LoRA rank that can be swapped into a compiled model without recompiling"
    )


class ModelConfig(_Strict):
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


class FetchConfig(_Strict):
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


class RetryConfig(_Strict):
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


class LoraCacheConfig(_Strict):
    """Where adapters come from and how the per-node cache keeps them."""

    root: str = Field("./loras", description="relative LoRA paths resolve under this directory only")
    cache_dir: str = Field("./outputs/lora-cache", description="downloaded adapters live here")
    max_file_bytes: int = Field(2 * 1024**3, description="largest accepted LoRA file")
    disk_quota_bytes: int = Field(50 * 1024**3, description="LRU eviction keeps the cache under this")
    max_header_bytes: int = Field(16 * 1024**2, description="largest accepted safetensors header")
    retry: RetryConfig = Field(default_factory=RetryConfig)


class FaultInjection(_Strict):
    """Test-only hooks, off by default: make a generation fail the way a real one can."""

    fail_prompt_substring: str | None = Field(
        None, description="a prompt containing this raises fail_kind inside the replica"
    )
    fail_kind: Literal["oom", "bad_weights"] = "oom"
    fail_stages: list[Literal["denoise", "activate", "load_lora"]] = Field(
        default_factory=lambda: ["denoise"],
        description="where the fault is raised: in a denoising step, while the request's adapters are set "
        "(outside the pipeline call), or while a LoRA whose reference contains the substring is loaded "
        "(the loader never sees the prompt)",
    )
    slow_prompt_substring: str | None = Field(
        None, description="a prompt containing this sleeps step_delay_s after each denoising step"
    )
    step_delay_s: float = Field(0.0, description="the sleep per step of a slow prompt")


class ReplicaConfig(_Strict):
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
    faults: FaultInjection = Field(default_factory=FaultInjection)


class GpuConfig(_Strict):
    """Everything a replica needs, in one object."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig)
    lora: LoraCacheConfig = Field(default_factory=LoraCacheConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    compile_cache: CompileCacheConfig = Field(default_factory=CompileCacheConfig)

    @model_validator(mode="after")
    def _parallel_fits(self):
        if self.parallel.degree > 1 and self.replica.num_gpus not in (0, 1):
            raise ValueError(
                f"with parallel.degree {self.parallel.degree}, replica.num_gpus is per rank and must be 1 (or 0 on "
                f"CPU), got {self.replica.num_gpus}"
            )
        return self
