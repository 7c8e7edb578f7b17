"""The one application config: the ``args:`` of the Serve YAML, validated once in ``build_app``."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from deployments.contract import GpuConfig, OutputFormat, Sampler, SpeedMode, StrictModel, url_scheme

# The placeholders of deploy/secrets.env.example: a key or password still starting with this was copied
# from the example unchanged.
PLACEHOLDER_PREFIX = "change-me"


class LimitsConfig(StrictModel):
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
    max_streams_per_key: int = Field(
        8, ge=1, description="TOO_MANY_STREAMS (429): /events streams one key holds open at once, per ingress replica"
    )


class AuthConfig(StrictModel):
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


class StorageConfig(StrictModel):
    """Where the state lives: the job database and the output store. Nothing here needs a shared disk."""

    outputs_dir: str = Field(
        "./outputs/videos",
        description="videos and control images: a local directory, or an fsspec URL (s3://bucket/prefix, gs://...)",
    )
    outputs_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options (endpoint_url in client_kwargs, region, ...)"
    )
    presigned_redirect: bool = Field(
        False, description="answer GET /outputs/{n} with a 307 to a presigned URL (object stores only)"
    )
    presign_expiry_s: int = Field(900, ge=1, le=7 * 86400, description="lifetime of a presigned URL")
    write_attempts: int = Field(10, ge=1, description="tries per output write before the job fails")
    write_retry_s: float = Field(
        60.0, gt=0, description="a failing output write is retried (backoff 0.5 s doubling, at most 5 s apart) for "
        "this long; a store back within it loses no job, after it the job fails OUTPUT_WRITE_FAILED",
    )
    jobs_db: str = Field(
        "./outputs/jobs.sqlite3",
        description="the job database: a SQLite file (one node) or a postgresql:// URL (clusters)",
    )
    jobs_db_env: str | None = Field(
        None, description="an environment variable holding the database URL; wins over jobs_db where it is set"
    )
    db_pool_size: int = Field(8, ge=1, description="PostgreSQL connections per ingress replica")
    db_timeout_s: float = Field(
        3.0, gt=0, description="a database call not answered within this is STORE_UNAVAILABLE (503); also how long "
        "a call waits for a pooled connection, and the server-side statement_timeout",
    )
    db_connect_timeout_s: int = Field(
        2, ge=2, description="PostgreSQL connect_timeout (libpq's minimum is 2); while the database is known to be "
        "down, a call waits at most this for a connection before answering STORE_UNAVAILABLE",
    )
    retention_s: float = Field(
        7 * 86400, ge=0, description="delete finished jobs, their videos and control images after this; 0 keeps all"
    )
    retention_sweep_s: float = Field(600.0, gt=0, description="how often expired jobs are looked for")

    def jobs_db_url(self) -> str:
        """The database to use, read in the calling process (each node may get it from its own environment)."""
        if self.jobs_db_env and os.environ.get(self.jobs_db_env):
            return os.environ[self.jobs_db_env]
        return self.jobs_db


class JobsConfig(StrictModel):
    """How jobs are dispatched and recovered."""

    lease_s: float = Field(15.0, description="a running job's lease; expired leases are taken over")
    sweep_interval_s: float = Field(2.0, description="how often an idle runner looks for claimable jobs")
    max_attempts: int = Field(2, description="a job whose replica dies is retried once, then failed")
    max_in_flight: int | None = Field(
        None, ge=1, description="jobs one ingress replica has at the GPU replicas at once; default 2 x max_replicas"
    )
    max_overtakes: int = Field(
        2, ge=1, description="younger jobs that may start before an older one (LoRA affinity) before the runner "
        "stops taking new jobs until the older one starts",
    )
    metrics_interval_s: float = Field(
        5.0, gt=0, description="how often each ingress replica reads the active jobs per state (the wan_jobs_active "
        "gauge) from the database",
    )


class WebhooksConfig(StrictModel):
    """Result deliveries to a request's ``webhook_url``: signed, retried, kept in the job database."""

    attempts: int = Field(10, ge=1, description="tries in all, the first included; then the delivery is failed")
    initial_backoff_s: float = Field(
        5.0, gt=0, description="upper bound of the first wait; it doubles per retry, the wait is random below it"
    )
    max_backoff_s: float = Field(900.0, gt=0, description="upper bound of any one wait")
    max_elapsed_s: float = Field(
        3600.0, gt=0, description="no attempt starts later than this after the job ended; then the delivery is failed"
    )
    timeout_s: float = Field(10.0, gt=0, description="per attempt: the connection, and each read and write")
    max_in_flight: int = Field(8, ge=1, description="deliveries one ingress replica sends at once")
    signing_secret_env: str = Field(
        "WAN_WEBHOOK_SECRET",
        description="an environment variable holding the server signing secret (each key's webhook secret is "
        "derived from it); where it is unset or empty, a random secret made once is kept in the job database",
    )

    @property
    def lease_s(self) -> float:
        """A delivery's lease: longer than one attempt can take (connect, write, read), with margin."""
        return 3 * self.timeout_s + 5


class EventsConfig(StrictModel):
    """The ``/events`` streams (Server-Sent Events of a job's status, read from the job database)."""

    poll_s: float = Field(0.25, gt=0, description="how often an open stream reads the job's new events")
    heartbeat_s: float = Field(
        15.0, gt=0, description="a ': keep-alive' comment after this long without an event, so proxies keep it open"
    )
    max_stream_s: float = Field(
        100.0, gt=0, description="a stream ends after this long and the client resumes it with Last-Event-ID; keep "
        "it below Serve's http_options.request_timeout_s, which would cut the stream with an error",
    )
    retry_ms: int = Field(1000, ge=0, description="the reconnection delay the stream asks of EventSource clients")


class DefaultsConfig(StrictModel):
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
    speed: SpeedMode = Field("exact", description="the speed mode of a request that names none; must be enabled")
    base_seed: int = 42


class IngressConfig(StrictModel):
    num_replicas: int = 1
    num_cpus: float = 0.1
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="spread ingress replicas over nodes (1: one per node), so one node's loss leaves others"
    )
    replica_header: bool = Field(False, description="name the answering replica (host:pid) in X-Wan-Ingress")
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="how often a stopping ingress replica looks whether its requests have ended (Serve's "
        "default); an idle one still waits this long once before it stops")
    lora_root_visible: bool = Field(
        True,
        description="the ingress sees gpu.lora.root as the GPU replicas do (one machine, shared storage, or an "
        "object-store root the ingress's credentials can read): a root-relative LoRA that is not there is refused at "
        "submit (400 LORA_NOT_FOUND; an object-store root costs one HEAD per LoRA, and a HEAD that fails for another "
        "reason lets the replica decide). Set false where the root exists only on GPU nodes or the ingress may not "
        "read it; such a LoRA then fails its job with that code",
    )


class AppConfig(StrictModel):
    """Everything the application needs; one object from the YAML to every deployment."""

    gpu: GpuConfig = Field(default_factory=GpuConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    public_base_url: str | None = Field(None, description="prefix for URLs in responses; default: relative")

    @model_validator(mode="after")
    def _one_object_store_endpoint(self):
        # One place for an S3-compatible endpoint: a LoRA root on the outputs' kind of store uses their options.
        lora = self.gpu.lora
        if lora.object_root and not lora.storage_options and url_scheme(lora.root) == url_scheme(self.storage.outputs_dir):
            lora.storage_options = dict(self.storage.outputs_options)
        return self

    @model_validator(mode="after")
    def _default_speed_enabled(self):
        enabled = self.gpu.model.speed.enabled_modes()
        if self.defaults.speed not in enabled:
            raise ValueError(f"defaults.speed {self.defaults.speed!r} is not an enabled speed mode {list(enabled)}")
        return self

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

    @model_validator(mode="after")
    def _no_example_placeholders(self):
        # Validated again in every ingress replica, so a node whose secrets came unchanged from
        # deploy/secrets.env.example refuses to start instead of serving with a published key or password.
        found = [f"API key #{n}" for n, key in enumerate(self.auth.load_keys(), 1)
                 if key.lower().startswith(PLACEHOLDER_PREFIX)]
        url = self.storage.jobs_db_url()
        if url.startswith(("postgresql:", "postgres:")):
            password = urlsplit(url).password or os.environ.get("PGPASSWORD", "")  # libpq's order
            if password.lower().startswith(PLACEHOLDER_PREFIX):
                found.append("the job database password")
        if found:
            raise ValueError(
                f"{' and '.join(found)} {'is' if len(found) == 1 else 'are'} still the example placeholder ({PLACEHOLDER_PREFIX}...) of "
                "deploy/secrets.env.example; set real secrets before starting"
            )
        return self
