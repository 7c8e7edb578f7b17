"""GPU-side configuration: model source, dtype, speed options, LoRA cache, outbound fetches.

These models are nested inside the app's ``AppConfig`` (``serve_app/config.py``), which is the
``args:`` of the Serve YAML; replicas receive their part of it, validated once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
    speed: SpeedConfig = Field(default_factory=SpeedConfig)


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


class LoraCacheConfig(_Strict):
    """Where adapters come from and how the per-node cache keeps them."""

    root: str = Field("./loras", description="relative LoRA paths resolve under this directory only")
    cache_dir: str = Field("./outputs/lora-cache", description="downloaded adapters live here")
    max_file_bytes: int = Field(2 * 1024**3, description="largest accepted LoRA file")
    disk_quota_bytes: int = Field(50 * 1024**3, description="LRU eviction keeps the cache under this")
    max_header_bytes: int = Field(16 * 1024**2, description="largest accepted safetensors header")


class FaultInjection(_Strict):
    """Test-only hooks, off by default: make a generation fail the way a real one can."""

    fail_prompt_substring: str | None = Field(
        None, description="a prompt containing this raises fail_kind inside the replica"
    )
    fail_kind: Literal["oom", "bad_weights"] = "oom"
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
