"""What the HTTP floor (``serve_app``) may use of the GPU floor: the one module of ``deployments`` it imports.

Everything here imports no torch, diffusers or peft, so the ingress runs without them: the generation
contract (``spec``), the typed errors, the config models, the outbound fetcher, job log context, the
LoRA reference checks run at submit time, and the parallel layout's request check. The few things
that need the GPU stack (the replica's deployment, the tiny checkpoint, the sample LoRA) are functions
that import it when called. ``tests/test_layers.py`` holds both rules (no torch on import; no other
``deployments`` import in ``serve_app``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import FetchConfig, GpuConfig, StrictModel, url_scheme
from .errors import InvalidRequest, ServiceError, first_line, is_client_error, jsonable
from .fetch import (
    FetchError,
    FetchFailed,
    FetchTooLarge,
    UrlNotAllowed,
    fetch_bytes,
    object_fs,
    vet_url,
)
from .fetch import post as fetch_post
from .joblog import JOB_ID, job_logger
from .lora.refs import check_in_root, is_root_relative, validate_ref
from .parallel.layout import check_splittable
from .spec import (
    MAX_LORAS,
    OUTPUT_FORMATS,
    SAMPLERS,
    SPEED_MODES,
    GenerationResult,
    GenerationSpec,
    LoraRef,
    OutputFormat,
    Sampler,
    SpeedMode,
    snap_frames,
    snap_size,
)

__all__ = [
    "FetchConfig", "GpuConfig", "StrictModel", "url_scheme",
    "InvalidRequest", "ServiceError", "first_line", "is_client_error", "jsonable",
    "FetchError", "FetchFailed", "FetchTooLarge", "UrlNotAllowed", "fetch_bytes", "fetch_post", "object_fs",
    "vet_url",
    "JOB_ID", "job_logger",
    "check_in_root", "is_root_relative", "validate_ref",
    "check_splittable",
    "MAX_LORAS", "OUTPUT_FORMATS", "SAMPLERS", "SPEED_MODES", "GenerationResult", "GenerationSpec", "LoraRef",
    "OutputFormat", "Sampler", "SpeedMode", "snap_frames", "snap_size",
    "make_deployment", "build_tiny", "sample_lora",
]


def make_deployment(cfg: GpuConfig):
    """The GPU replica's Serve deployment (``replica.deployment.make_deployment``); imports Ray Serve."""
    from .replica.deployment import make_deployment as make

    return make(cfg)


def build_tiny(out: str | os.PathLike) -> Path:
    """Save the tiny checkpoint to ``out`` (``engine.models.build_tiny``); imports torch and diffusers."""
    from .engine.models import build_tiny as build

    return build(out)


def sample_lora() -> dict[str, Any]:
    """The sample LoRA's tensors for the tiny checkpoint (``lora.writer.sample_lora``); imports torch."""
    from .lora.writer import sample_lora as sample

    return sample()
