"""HTTP request/response models: the reference server's field names, unchanged, plus our additions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["in_queue", "in_progress", "succeeded", "failed", "canceled"]
FINAL_STATUSES = ("succeeded", "failed", "canceled")


class _Request(BaseModel):
    # Unknown fields are ignored as the reference does; NaN/inf are never valid numbers.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LoraIn(_Request):
    path: str = Field(min_length=1, max_length=2048, description="LoRA path under the LoRA root, https URL or hf:// URI")
    network_multiplier: float = Field(1.0, ge=-2.0, le=2.0)
    transformer: Literal["low", "high"] | None = Field(None, description="Wan 2.2 MoE only: must be null here")


class PromptIn(_Request):
    prompt: str = Field(max_length=100_000)
    neg: str = Field("", max_length=100_000, description="negative prompt")
    trigger_word: str | None = Field(None, max_length=256, description="replaces [trigger]; wins over the request's")
    width: int | None = Field(None, ge=16, le=4096, description="default 832; floored to a multiple of 16")
    height: int | None = Field(None, ge=16, le=4096, description="default 480; floored to a multiple of 16")
    num_frames: int | None = Field(None, ge=1, le=1000, description="default 41; snapped to 4k+1")
    fps: int | None = Field(None, ge=1, le=120, description="default 16")
    sample_steps: int | None = Field(None, ge=1, le=150, description="default 25")
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0, description="default 4.0; CFG only when > 1")
    seed: int | None = Field(None, ge=-1, lt=2**63, description="default 42 + prompt index; -1: random")
    ctrl_img: str | None = Field(None, description="first frame: https URL, base64 or data: URI")
    sampler: str | None = Field(None, description="unipc (default) or flowmatch_euler (ai-toolkit previews)")
    output_format: str | None = Field(None, description="mp4 (default) or webp")


class InferenceRequest(_Request):
    """The reference's request shape (model ``wan21_i2v_14b480p``), with up to 4 LoRAs."""

    model: str
    loras: list[LoraIn] = Field(default_factory=list, max_length=64)
    prompts: list[PromptIn] = Field(min_length=1, max_length=1000)
    trigger_word: str | None = Field(None, max_length=256)
    hf_token: str | None = Field(None, description="accepted for compatibility; never stored or forwarded")
    sampler: str | None = None
    output_format: str | None = None
    webhook_url: str | None = Field(
        None, max_length=2048, description="our addition: receives the result, signed, when the job ends "
        "(same address rules as ctrl_img URLs)")

    model_config = ConfigDict(
        extra="ignore",
        allow_inf_nan=False,
        json_schema_extra={
            "example": {
                "model": "wan21_i2v_14b480p",
                "trigger_word": "sks",
                "prompts": [
                    {
                        "prompt": "[trigger] a cinematic shot of a runner on a beach, handheld camera",
                        "neg": "",
                        "seed": 42,
                        "width": 832,
                        "height": 480,
                        "num_frames": 41,
                        "fps": 16,
                        "sample_steps": 25,
                        "guidance_scale": 4.0,
                        "ctrl_img": "https://example.com/first_frame.png",
                    }
                ],
                "loras": [{"path": "my_wan_job/my_wan_job.safetensors", "network_multiplier": 1.0}],
            }
        },
    )


class SubmitResponse(BaseModel):
    request_id: str
    status: str = "queued"
    status_url: str
    result_url: str
    cancel_url: str
    created_at: str


class ProgressPublic(BaseModel):
    prompt_index: int = 0
    num_prompts: int = 1
    stage: str = "queued"
    step: int = 0
    total_steps: int = 0


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class WebhookAttempt(BaseModel):
    at: str
    status_code: int | None = Field(None, description="the receiver's answer; any 2xx is a delivery")
    error: str | None = Field(None, description="why no answer came (refused address, connection, timeout)")


class WebhookPublic(BaseModel):
    url: str
    state: Literal["pending", "delivered", "failed"]
    delivery_id: str = Field(description="the Wan-Webhook-Id header: the same on every attempt of a delivery")
    attempts: list[WebhookAttempt] = Field(default_factory=list)
    next_attempt_at: str | None = Field(None, description="while pending after a failed attempt")


class StatusResponse(BaseModel):
    request_id: str
    status: JobStatus
    progress: ProgressPublic
    attempts: int = 0
    error: ErrorBody | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    webhook: WebhookPublic | None = None


class WebhookSecretResponse(BaseModel):
    secret: str = Field(description="this API key's webhook signing secret")
    header: str = "Wan-Signature"
    scheme: str = "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.<raw body>')>"


class RequestList(BaseModel):
    """One page of the caller's jobs, newest first."""

    requests: list[StatusResponse]
    next_before: str | None = Field(None, description="pass as `before` for the next page; null on the last page")


class VideoPublic(BaseModel):
    format: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    file_path: str
    url: str
    content_type: str
    bytes: int


class Outputs(BaseModel):
    images: list[dict] = Field(default_factory=list)
    videos: list[VideoPublic] = Field(default_factory=list)


class ResultResponse(BaseModel):
    request_id: str
    status: JobStatus
    outputs: Outputs
    error: ErrorBody | None = None
    created_at: str
    finished_at: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class ModelPublic(BaseModel):
    id: str
    base_model: str
    resolution_divisor: int = 16
    default_steps: int
    default_guidance_scale: float
    requires_control_image: bool = True
    is_video_model: bool = True
    default_num_frames: int
    default_fps: int
    default_width: int
    default_height: int
    samplers: list[str]
    output_formats: list[str]
    max_loras: int


class ModelsResponse(BaseModel):
    models: list[ModelPublic]
