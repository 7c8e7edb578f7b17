"""Memory modes (``gpu.memory``) on the tiny model: fp8 and offload give full mode's frames, LoRAs apply
the same in each, the block mover keeps at most two blocks resident, and a too-small card is refused at
start with the mode that fits named."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deployments.config import GpuConfig
from deployments.engine.memory import NEED_GIB, check_card, need_gib
from deployments.engine.pipeline import WanGenerator
from deployments.errors import GpuTooSmall
from deployments.spec import LoraRef
from tests.conftest import tiny_spec
from tests.lora_factory import make_layout

GIB = 2**30


def fp8_round(linear: torch.nn.Linear) -> torch.nn.Linear:
    """The CPU stand-in for torchao's FP8 weights: per-row scaled float8_e4m3fn, rounded back."""
    out = copy.deepcopy(linear)
    with torch.no_grad():
        w = out.weight
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        out.weight.copy_((w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale)
    return out


def _load(model_cache, memory: str, convert=None):
    from deployments.config import ModelConfig
    from deployments.engine.models import load_pipeline

    return load_pipeline(ModelConfig(source="tiny", cache_dir=str(model_cache), device="cpu"), memory=memory,
                         convert=convert)


@pytest.fixture(scope="module")
def shapes(model_cache):
    from deployments.lora.files import linear_shapes

    return linear_shapes(_load(model_cache, "full").pipe.transformer)


@pytest.fixture(scope="module")
def lora(shapes, tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("memlora") / "user.safetensors", "ai-toolkit", shapes, seed=7, rank=4)


@pytest.fixture(scope="module")
def full_frames(model_cache, lora):
    """Full mode's frames without and with the LoRA: what every other mode is compared with."""
    gen = WanGenerator(_load(model_cache, "full"))
    gen.load_adapter("user", str(lora.path))
    spec = tiny_spec()
    return gen.generate(spec).frames, gen.generate(spec.model_copy(update={"loras": (LoraRef(ref="user"),)})).frames


def _run(gen, lora):
    gen.load_adapter("user", str(lora.path))
    spec = tiny_spec()
    with_lora = spec.model_copy(update={"loras": (LoraRef(ref="user"),)})
    return gen.generate(spec), gen.generate(with_lora), gen.generate(spec)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_offload_gives_full_modes_frames_and_keeps_two_blocks_resident(model_cache, lora, full_frames):
    from deployments.engine.models import pipeline_loads

    loaded = _load(model_cache, "offload")
    plan = loaded.memory
    blocks = loaded.pipe.transformer.blocks
    # between requests the blocks' base weights are in host memory: the device copies are empty
    assert all(p.numel() == 0 for p in blocks[1].parameters())
    assert all(p.numel() == 0 for p in loaded.pipe.text_encoder.parameters())
    gen = WanGenerator(loaded)
    loads = pipeline_loads()
    base, with_lora, base_again = _run(gen, lora)
    # CPU: no FP8 (the result says so), and the mover's copies are exact: full mode's frames bit for bit
    assert base.speed["memory"]["mode"] == "offload" and base.speed["memory"]["fp8_weights"] is False
    assert "FP8 weights need CUDA" in base.speed["memory"]["note"]
    np.testing.assert_array_equal(base.frames, full_frames[0])
    np.testing.assert_array_equal(with_lora.frames, full_frames[1])
    np.testing.assert_array_equal(base_again.frames, full_frames[0])  # the LoRA switched off cleanly
    assert pipeline_loads() == loads  # adapters on and off: the base model was not loaded again
    report = plan.describe()
    n = len(blocks)
    forwards = 3 * 2 * tiny_spec().steps  # three requests, CFG
    assert report["max_blocks_resident"] == 2
    # every block fetched once per forward (block 0's fetch for the next forward done ahead), each encoder
    # once per request
    assert report["loads"] >= forwards * n and report["loads"] <= forwards * n + 2 * 3 + 1
    # the encoders went back to the host once the VAE encode began: nothing of them is left on the device
    assert all(p.numel() == 0 for p in loaded.pipe.text_encoder.parameters())
    assert all(p.numel() == 0 for p in loaded.pipe.image_encoder.parameters())
    # the adapter's weights were never moved: they stay on the device while the base weights are away
    layer = blocks[1].attn1.to_q  # (block 0 is already back: fetched ahead for the next forward)
    assert all(a.weight.numel() > 0 for a in layer.lora_A.values()) and layer.base_layer.weight.numel() == 0


def test_fp8_converts_the_block_linears_in_place_and_a_lora_applies_the_same(model_cache, lora, full_frames, shapes):
    loaded = _load(model_cache, "fp8", convert=fp8_round)
    block_linears = [n for n in shapes if n.startswith("blocks.")]
    assert loaded.memory.converted == len(block_linears) and loaded.memory.fp8
    gen = WanGenerator(loaded)
    assert gen.modes.kernels is None and gen.modes.weights_fp8  # fast mode needs no FP8 copies of its own
    base, with_lora, base_again = _run(gen, lora)
    assert base.speed["memory"] == {"mode": "fp8", "fp8_weights": True}
    np.testing.assert_array_equal(base_again.frames, base.frames)
    assert not np.array_equal(with_lora.frames, base.frames)
    # rounded weights: close to full mode's frames, and the LoRA moves them as it moves full mode's
    assert _psnr(base.frames, full_frames[0]) > 30 and _psnr(with_lora.frames, full_frames[1]) > 30
    lora_effect = with_lora.frames.astype(float) - base.frames
    full_effect = full_frames[1].astype(float) - full_frames[0]
    assert np.corrcoef(lora_effect.ravel(), full_effect.ravel())[0, 1] > 0.9


def test_offload_with_fp8_weights_moves_the_converted_linears(model_cache, lora):
    fp8 = WanGenerator(_load(model_cache, "fp8", convert=fp8_round))
    offload = WanGenerator(_load(model_cache, "offload", convert=fp8_round))
    for a, b in zip(_run(fp8, lora), _run(offload, lora)):
        np.testing.assert_array_equal(a.frames, b.frames)
    assert offload.memory.describe()["fp8_linears"] == fp8.memory.converted


def test_cpu_fp8_without_a_converter_keeps_the_weights_and_says_so(model_cache, full_frames):
    gen = WanGenerator(_load(model_cache, "fp8"))
    frames = gen.generate(tiny_spec())
    np.testing.assert_array_equal(frames.frames, full_frames[0])
    assert frames.speed["memory"]["fp8_weights"] is False and "on cpu" in frames.speed["memory"]["note"]


@pytest.mark.parametrize("mode, free_gib, fits", [
    ("full", 79.0, None), ("fp8", 45.0, None), ("offload", 22.0, None),
    ("full", 44.5, "fp8"), ("full", 22.0, "offload"), ("fp8", 22.0, "offload"),
])
def test_startup_check_names_the_mode_that_fits(mode, free_gib, fits):
    if fits is None:
        check_card(mode, int(free_gib * GIB), int(80 * GIB))
        return
    with pytest.raises(GpuTooSmall) as e:
        check_card(mode, int(free_gib * GIB), int(48 * GIB))
    assert e.value.code == "GPU_TOO_SMALL" and e.value.details["fits"] == fits
    assert f"gpu.memory: {fits}" in e.value.message and f"gpu.memory: {mode} needs" in e.value.message


def test_startup_check_on_a_card_too_small_for_any_mode():
    with pytest.raises(GpuTooSmall, match="no mode fits") as e:
        check_card("offload", int(8 * GIB), int(12 * GIB))
    assert e.value.details["fits"] is None
    assert need_gib("offload") < need_gib("fp8") < need_gib("full") and set(NEED_GIB) == {"full", "fp8", "offload"}


def test_config_refuses_offload_with_compiled_blocks_and_parallel_ranks():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="compile_blocks: false"):
        GpuConfig(memory="offload")
    assert GpuConfig(memory="offload", model={"speed": {"compile_blocks": False}}).memory == "offload"
    with pytest.raises(ValidationError, match="one-GPU replicas"):
        GpuConfig(memory="fp8", parallel={"degree": 2, "cfg_degree": 2})
