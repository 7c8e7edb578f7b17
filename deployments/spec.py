"""The generation contract: the normalised request a replica runs and the result it returns.

Plain pydantic types without torch, shared by the ingress (which builds them) and the replicas
(which run them).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Sampler = Literal["unipc", "flowmatch_euler"]
OutputFormat = Literal["mp4", "webp"]
SpeedMode = Literal["exact", "fast", "turbo"]
SAMPLERS: tuple[str, ...] = ("unipc", "flowmatch_euler")
SPEED_MODES: tuple[str, ...] = ("exact", "fast", "turbo")
OUTPUT_FORMATS: tuple[str, ...] = ("mp4", "webp")
MAX_LORAS = 4
MULTIPLIER_RANGE = (-2.0, 2.0)


class LoraRef(BaseModel):
    """One adapter of a request: where it comes from and how strongly it applies."""

    model_config = ConfigDict(frozen=True)

    ref: str = Field(description="LoRA reference: path under the LoRA root, https URL or hf:// URI")
    multiplier: float = Field(1.0, ge=MULTIPLIER_RANGE[0], le=MULTIPLIER_RANGE[1])


def lora_set_key(loras: list[LoraRef] | tuple[LoraRef, ...]) -> str:
    """The multiplexing key of a LoRA set: its references, order-insensitive, multipliers excluded.

    Multipliers are per request (changing one needs no load), so they are not part of the key.
    Returns "" for no LoRA, which Serve routes without multiplexing.
    """
    refs = sorted({lora.ref for lora in loras})
    if not refs:
        return ""
    return "loras:" + json.dumps(refs, separators=(",", ":"))


def refs_from_key(key: str) -> list[str]:
    """Inverse of :func:`lora_set_key` for the references."""
    if not key:
        return []
    if not key.startswith("loras:"):
        raise ValueError(f"not a LoRA set key: {key!r}")
    return list(json.loads(key[len("loras:"):]))


def adapter_name(ref: str) -> str:
    """A stable, PEFT-safe adapter name for one LoRA reference (no dots allowed there)."""
    return "lora_" + hashlib.sha256(ref.encode()).hexdigest()[:16]


class GenerationSpec(BaseModel):
    """One prompt of a request after normalisation: every value is the one actually used."""

    # bytes as base64 in JSON, so a spec round-trips through the job database.
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    prompt: str
    negative_prompt: str = ""
    width: int = Field(ge=16, multiple_of=16)
    height: int = Field(ge=16, multiple_of=16)
    num_frames: int = Field(ge=1)
    fps: int = Field(ge=1)
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    seed: int = Field(ge=0, lt=2**63)
    sampler: Sampler = "unipc"
    output_format: OutputFormat = "mp4"
    speed: SpeedMode = Field("exact", description="exact (the reference's path), fast or turbo")
    image_png: bytes = Field(description="the control image, RGB, already resized to width x height, as PNG")
    loras: tuple[LoraRef, ...] = ()

    @property
    def lora_key(self) -> str:
        return lora_set_key(self.loras)


class VideoOutput(BaseModel):
    """One encoded video, as the replica returns it."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    format: OutputFormat
    content_type: str
    width: int
    height: int
    num_frames: int
    fps: int
    seed: int
    data: bytes = Field(repr=False)


class GenerationResult(BaseModel):
    """What a replica returns for one spec."""

    video: VideoOutput
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")
    speed: dict = Field(default_factory=dict, description="the speed mode used and what it did (plain JSON values)")
    replica: str = ""


class Progress(BaseModel):
    """A progress event streamed by a replica while it works on one spec, stages in this order.

    ``step`` counts denoising steps: 0 before the first, ``total_steps`` from the VAE decode on.
    """

    stage: Literal["loading_loras", "encoding_text", "encoding_image", "vae_encoding", "denoising",
                   "vae_decoding", "encoding_video"]
    step: int = 0
    total_steps: int = 0


def snap_frames(n: int, temporal: int = 4) -> int:
    """Diffusers' rule for frame counts: n -> n//4*4+1 unless (n-1) % 4 == 0."""
    if n % temporal != 1:
        n = n // temporal * temporal + 1
    return max(n, 1)


def snap_size(v: int, divisor: int = 16) -> int:
    """The reference's rule for sizes: floor to a multiple of 16."""
    return v // divisor * divisor
