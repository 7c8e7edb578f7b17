"""Shared fixtures: one tiny checkpoint, one loaded pipeline, per test session."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

# Ray 2.60 turns token auth on for new local clusters and writes ~/.ray; tests need neither.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A cache dir holding the tiny checkpoint, built once per session."""
    from deployments.models import ensure_tiny

    cache = tmp_path_factory.mktemp("models")
    ensure_tiny(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache):
    return model_cache / "tiny"


@pytest.fixture(scope="session")
def loaded_model(model_cache):
    """The tiny checkpoint loaded through the same path as the real one (fp32, CPU)."""
    from deployments.config import ModelConfig
    from deployments.models import load_pipeline

    return load_pipeline(ModelConfig(source="tiny", cache_dir=str(model_cache), device="cpu"))


@pytest.fixture(scope="session")
def generator(loaded_model):
    """A WanGenerator over the session's tiny pipeline (shared: tests must not leave adapters active)."""
    from deployments.pipeline import WanGenerator

    return WanGenerator(loaded_model)


def make_image(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB"):
    """A deterministic random picture."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.rand(height, width, channels) * 255).astype("uint8")
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def small_spec():
    """A fast spec on the tiny model: 64x48, 5 frames, 2 steps, CFG on."""
    from deployments.spec import GenerationSpec

    def make(**overrides):
        values = dict(
            prompt="a runner on a beach",
            negative_prompt="",
            width=64,
            height=48,
            num_frames=5,
            fps=8,
            steps=2,
            guidance_scale=4.0,
            seed=42,
            image_png=png_bytes(make_image(64, 48)),
        )
        values.update(overrides)
        return GenerationSpec(**values)

    return make
