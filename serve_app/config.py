"""The one application config: the ``args:`` of the Serve YAML, validated once in ``build_app``."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.config import GpuConfig
from deployments.spec import OutputFormat, Sampler


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsConfig(_Strict):
    """Every request limit, each with the error code it raises (see SECURITY.md)."""

    max_body_bytes: int = Field(32 * 1024**2, description="REQUEST_TOO_LARGE (413)")
    max_prompts: int = Field(8, description="TOO_MANY_PROMPTS")
    max_prompt_chars: int = Field(4000, description="PROMPT_TOO_LONG")
    min_side: int = Field(16, description="SIZE_OUT_OF_RANGE, after snapping to 16")
    max_long_side: int = Field(1280, description="SIZE_OUT_OF_RANGE: a 480P model, up to 1280 on the long side")
    max_short_side: int = Field(1280, description="SIZE_OUT_OF_RANGE")
    max_frames: int = Field(81, description="FRAMES_OUT_OF_RANGE, after snapping to 4k+1")
    max_steps: int = Field(100, description="STEPS_OUT_OF_RANGE")
    max_work: int = Field(
        832 * 480 * 81 * 50, description="WORK_TOO_LARGE: width x height x frames x steps per prompt"
    )
    max_image_bytes: int = Field(20 * 1024**2, description="IMAGE_TOO_LARGE (inline or fetched)")
    image_fetch_timeout_s: float = Field(
        30.0, description="FETCH_FAILED (504, reason timeout): the whole ctrl_img download, slow drips included"
    )
    max_image_pixels: int = Field(40_000_000, description="IMAGE_TOO_LARGE (decompression bombs)")
    max_loras: int = Field(4, description="TOO_MANY_LORAS")
    max_queue_total: int = Field(1000, description="QUEUE_FULL (429): jobs queued or running, all keys")
    max_queue_per_key: int = Field(100, description="QUEUE_FULL (429): jobs queued or running, one key")
    retry_after_s: int = Field(30, description="Retry-After sent with 429")


class AuthConfig(_Strict):
    """API keys. With none configured, every route is open (fine on 127.0.0.1, refused on public)."""

    api_keys: list[str] = Field(default_factory=list)
    api_keys_file: str | None = Field(None, description="a file with one key per line")
    api_keys_env: str | None = Field(None, description="an environment variable with comma-separated keys")
    public_by_choice: bool = Field(False, description="allow starting without keys where keys are required")
    require_keys: bool = Field(False, description="refuse to start without keys unless public_by_choice")

    def load_keys(self) -> list[str]:
        """Every configured key (list, file, environment), read now, in the calling process.

        Raises:
            ValueError: ``api_keys_file`` is set but cannot be read.
        """
        keys = [k.strip() for k in self.api_keys if k.strip()]
        if self.api_keys_file:
            try:
                text = Path(self.api_keys_file).read_text()
            except OSError as e:
                raise ValueError(f"auth.api_keys_file {self.api_keys_file!r} cannot be read: {e}") from e
            keys += [k.strip() for k in text.splitlines() if k.strip() and not k.strip().startswith("#")]
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        return keys

    @staticmethod
    def matches(candidate: str, keys: list[str]) -> str | None:
        """The key that equals ``candidate``, or None.

        Constant time: every key is compared (no early exit), and digests of equal length are
        compared rather than the strings, so neither a key's content nor its length leaks.
        """
        digest = hashlib.sha256(candidate.encode("utf-8", "surrogatepass")).digest()
        found = None
        for key in keys:
            if hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()):
                found = key
        return found


class StorageConfig(_Strict):
    outputs_dir: str = Field("./outputs/videos", description="finished videos")
    jobs_db: str = Field("./outputs/jobs.sqlite3", description="the job database (SQLite)")


class JobsConfig(_Strict):
    """How jobs are dispatched and recovered."""

    lease_s: float = Field(15.0, description="a running job's lease; expired leases are taken over")
    sweep_interval_s: float = Field(2.0, description="how often orphaned jobs are looked for")
    max_attempts: int = Field(2, description="a job whose replica dies is retried once, then failed")
    retention_s: float | None = Field(None, description="delete finished jobs and files after this long")


class DefaultsConfig(_Strict):
    """Per-model defaults, kept apart from the request schema (832x480: the reference's 1024x1024 is a defect)."""

    width: int = 832
    height: int = 480
    num_frames: int = 41
    fps: int = 16
    sample_steps: int = 25
    guidance_scale: float = 4.0
    negative_prompt: str = ""
    sampler: Sampler = "unipc"
    output_format: OutputFormat = "mp4"
    base_seed: int = 42


class IngressConfig(_Strict):
    num_replicas: int = 1
    num_cpus: float = 0.1
    lora_root_visible: bool = Field(
        True,
        description="gpu.lora.root is the same directory for the ingress as for the GPU replicas (one machine, or "
        "shared storage): a root-relative LoRA that is not there is refused at submit (400 LORA_NOT_FOUND). Set "
        "false where the root exists only on GPU nodes; such a LoRA then fails its job with that code",
    )


class AppConfig(_Strict):
    """Everything the application needs; one object from the YAML to every deployment."""

    gpu: GpuConfig = Field(default_factory=GpuConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    public_base_url: str | None = Field(None, description="prefix for URLs in responses; default: relative")

    @model_validator(mode="after")
    def _keys_where_required(self):
        # Runs again in every ingress replica (it re-validates its args), so a replica whose
        # environment lacks the keys refuses to start instead of serving an open API.
        auth = self.auth
        if auth.public_by_choice:
            return self
        keys = auth.load_keys()
        if auth.require_keys and not keys:
            raise ValueError(
                "auth.require_keys is set but no API key is configured; add keys or set auth.public_by_choice"
            )
        if (auth.api_keys_file or auth.api_keys_env) and not keys:
            raise ValueError(
                "auth.api_keys_file/api_keys_env is set but yields no key; refusing to start open "
                "(set auth.public_by_choice to run without keys)"
            )
        return self
