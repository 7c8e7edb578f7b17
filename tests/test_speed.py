"""Speed modes: a no-op on CPU, and the compile-safe LoRA slot does exactly W + sum(m * dW).

The slot path normally runs only with compiled blocks on CUDA; here it is installed on the tiny
CPU pipeline without compiling, so its arithmetic is checked against the same hand merges as the
peft path (tests/test_lora.py). The compile test (zero recompiles across loads, switches and
multiplier changes) takes minutes on a small CPU: it runs in the full tier (``-m ""``).
"""

from __future__ import annotations

import pytest
import torch

from deployments.config import SpeedConfig
from deployments.engine import pipeline as pipeline_mod
from deployments.errors import LoraIncompatible
from deployments.spec import LoraRef
from deployments.speed.exact import SLOT, LoraSlots, apply_speed_modes

from .conftest import load_tiny
from .lora_factory import (  # noqa: F401 (base, base_out, inputs, shapes are fixtures)
    LAYOUTS,
    base,
    base_out,
    forward,
    inputs,
    make_layout,
    make_lora,
    merged_copy,
    shapes,
)

ATOL = 1e-5
VISIBLE = 1e-2
SLOT_RANK = 16


@pytest.fixture(scope="module")
def slot_gen(model_cache):
    """A generator whose adapters go through a LoRA slot (no compile: CPU arithmetic check)."""
    loaded = load_tiny(model_cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            pipeline_mod,
            "apply_speed_modes",
            lambda pipe, speed, device: {"applied": False, "lora_slots": LoraSlots(pipe.transformer, SLOT_RANK)},
        )
        gen = pipeline_mod.WanGenerator(loaded)
    assert gen._slots is not None
    return gen


@pytest.fixture
def sgen(slot_gen):
    yield slot_gen
    for ref in list(slot_gen.adapters.values()):
        slot_gen.delete_adapter(ref)
    slot_gen._activate(_NoLora())
    assert slot_gen.adapters == {} and slot_gen._resident == {}


class _NoLora:
    loras = ()


def _lora_forward(gen, small_spec, inputs, *pairs):
    gen._activate(small_spec(loras=tuple(LoraRef(ref=r, multiplier=m) for r, m in pairs)))
    return forward(gen.pipe.transformer, inputs)


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def test_apply_speed_modes_is_a_noop_on_cpu(base, base_out, inputs):
    report = apply_speed_modes(base.pipe, SpeedConfig(), torch.device("cpu"))
    assert report["applied"] is False and report["lora_slots"] is None
    t = base.pipe.transformer
    assert not getattr(t, "peft_config", {})
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in t.blocks)
    assert torch.equal(forward(t, inputs), base_out)


def test_default_generator_on_cpu_has_no_slot(generator):
    assert generator._slots is None
    assert generator.speed_report["applied"] is False


def test_slot_is_created_at_the_configured_rank_and_off(slot_gen, shapes, base_out, inputs):
    slots = slot_gen._slots
    assert set(slots.layers) == set(shapes)
    for name, (fan_in, fan_out) in shapes.items():
        assert slots.A[name].shape == (SLOT_RANK, fan_in) and slots.B[name].shape == (fan_out, SLOT_RANK)
        assert slots.bias[name].shape == (fan_out,) and not slots.bias[name].any()
        assert slots.layers[name].scaling[SLOT] == 1.0
    assert not slots.enabled
    assert torch.equal(forward(slot_gen.pipe.transformer, inputs), base_out)


@pytest.mark.parametrize("multiplier", [1.0, -0.7])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_slot_single_lora_equals_hand_merge(
    sgen, base, base_out, shapes, inputs, small_spec, tmp_path, layout, multiplier
):
    """Every layout through the slot: the scale stock gives each layer (.alpha, metadata, rsLoRA,
    patterns) and the bias deltas, as the hand merge computes them from the file's numbers."""
    lora = make_layout(tmp_path / f"{layout}.safetensors", layout, shapes, seed=1)
    sgen.load_adapter(layout, str(lora.path))
    out = _lora_forward(sgen, small_spec, inputs, (layout, multiplier))
    expected = forward(merged_copy(base.pipe.transformer, [(lora, multiplier)]), inputs)
    assert _maxdiff(out, expected) <= ATOL
    assert _maxdiff(out, base_out) > VISIBLE


def test_slot_stacked_switch_multiplier_and_off(sgen, base, base_out, shapes, inputs, small_spec, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", "ai-toolkit", shapes, seed=10, rank=4)
    k = make_lora(tmp_path / "k.safetensors", "kohya", shapes, seed=11, rank=8, alpha=4.0)
    d = make_lora(tmp_path / "d.safetensors", "diffusers", shapes, seed=12, rank=2, targets=["self_attn.q", "ffn.2"])
    for name, lora in (("a", a), ("k", k), ("d", d)):
        sgen.load_adapter(name, str(lora.path))
    ref = base.pipe.transformer

    cases = [
        [("a", 0.8), ("k", -0.5)],
        [("k", 1.3), ("d", 1.0), ("a", -1.1)],  # ranks 8 + 2 + 4 = 14 <= 16
        [("d", 0.6)],  # a smaller set after a larger one: stale columns must be cleared
        [("d", 0.3)],  # multiplier change only
        [("a", 0.8), ("k", -0.5)],  # and back
    ]
    for pairs in cases:
        out = _lora_forward(sgen, small_spec, inputs, *pairs)
        expected = forward(merged_copy(ref, [({"a": a, "k": k, "d": d}[n], m) for n, m in pairs]), inputs)
        assert _maxdiff(out, expected) <= ATOL, pairs

    sgen._activate(small_spec())
    assert torch.equal(forward(sgen.pipe.transformer, inputs), base_out)  # off: the plain Linear path


def test_slot_stacked_with_bias_deltas_and_metadata_scales(sgen, base, shapes, inputs, small_spec, tmp_path):
    x = make_layout(tmp_path / "x.safetensors", "lightx2v", shapes, seed=13)  # diff_b on every layer
    b = make_layout(tmp_path / "b.safetensors", "diffusers-metadata-rslora-patterns", shapes, seed=14)
    m = make_layout(tmp_path / "m.safetensors", "diffusers-metadata", shapes, seed=15)
    files = {"x": x, "b": b, "m": m}
    for name, lora in files.items():
        sgen.load_adapter(name, str(lora.path))
    cases = [
        [("x", 0.7), ("b", -1.2)],  # two biases add up in the slot's one bias vector
        [("x", 0.7), ("b", -1.2), ("m", 0.4)],
        [("m", 1.0)],  # no bias: the previous biases must be cleared
        [("b", 0.5)],
        [("x", 1.5)],
    ]
    for pairs in cases:
        out = _lora_forward(sgen, small_spec, inputs, *pairs)
        expected = forward(merged_copy(base.pipe.transformer, [(files[n], mult) for n, mult in pairs]), inputs)
        assert _maxdiff(out, expected) <= ATOL, pairs


def test_slot_delete_then_reload_under_same_name_rewrites(sgen, base, shapes, inputs, small_spec, tmp_path):
    one = make_lora(tmp_path / "1.safetensors", "ai-toolkit", shapes, seed=20)
    two = make_lora(tmp_path / "2.safetensors", "ai-toolkit", shapes, seed=21)
    sgen.load_adapter("x", str(one.path))
    _lora_forward(sgen, small_spec, inputs, ("x", 1.0))
    sgen.delete_adapter("x")
    sgen.load_adapter("x", str(two.path))
    out = _lora_forward(sgen, small_spec, inputs, ("x", 1.0))
    assert _maxdiff(out, forward(merged_copy(base.pipe.transformer, [(two, 1.0)]), inputs)) <= ATOL


def test_slot_rank_limits(sgen, shapes, small_spec, tmp_path):
    big = make_lora(tmp_path / "big.safetensors", "ai-toolkit", shapes, seed=30, rank=SLOT_RANK + 1)
    with pytest.raises(LoraIncompatible):
        sgen.load_adapter("big", str(big.path))
    assert "big" not in sgen.adapters.values()
    for i in range(2):
        sgen.load_adapter(f"r{i}", str(make_lora(tmp_path / f"r{i}.safetensors", "ai-toolkit", shapes, seed=31 + i, rank=12).path))
    with pytest.raises(LoraIncompatible):
        sgen._activate(small_spec(loras=(LoraRef(ref="r0"), LoraRef(ref="r1"))))  # 24 > 16


def test_slot_keeps_generation_api(sgen, shapes, small_spec, tmp_path):
    lora = make_lora(tmp_path / "g.safetensors", "ai-toolkit", shapes, seed=40)
    loads = sgen.adapter_loads
    name = sgen.load_adapter("g", str(lora.path))
    assert sgen.load_adapter("g", str(lora.path)) == name and sgen.adapter_loads == loads + 1
    with_lora = sgen.generate(small_spec(loras=(LoraRef(ref="g"),))).frames
    without = sgen.generate(small_spec()).frames
    assert with_lora.shape == without.shape and (with_lora != without).any()


@pytest.mark.full
@pytest.mark.compile
def test_compiled_slot_never_recompiles(model_cache, base, shapes, inputs, small_spec, tmp_path):
    """Loads, switches and multipliers never recompile, for every kind of file the slot takes
    (bias deltas, metadata scales included), and the compiled slot still computes W + sum(m * dW)."""
    from deployments.speed import exact as speed_mod

    loaded = load_tiny(model_cache)
    speed = SpeedConfig(attention_backend=None, warmup_width=64, warmup_height=48, warmup_frames=5, lora_hotswap_rank=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "apply_speed_modes", lambda p, s, d: speed_mod._apply(p, s))
        gen = pipeline_mod.WanGenerator(loaded, speed)  # compiles both variants in the warm-up
    assert gen.speed_report["compiled"] and "warmup" in gen.speed_report and gen.adapter_loads == 0
    files = {f"l{i}": make_lora(tmp_path / f"l{i}.safetensors", "ai-toolkit", shapes, seed=50 + i) for i in range(2)}
    files["x"] = make_layout(tmp_path / "x.safetensors", "lightx2v", shapes, seed=52, rank=2)
    files["m"] = make_layout(tmp_path / "m.safetensors", "diffusers-metadata-rslora-patterns", shapes, seed=53, rank=2)
    for name, lora in files.items():
        gen.load_adapter(name, str(lora.path))
    requests = [[("l0", 1.0)], [("l1", 1.0)], [("l1", 0.5)], [("l0", 1.0), ("l1", -0.3)], [],
                [("x", 1.0)], [("x", 0.6), ("m", -1.0)], [("m", 0.8)], [("l0", 1.0), ("x", 0.5)], []]
    torch._dynamo.config.error_on_recompile = True
    try:
        for loras in requests:
            gen.generate(small_spec(loras=tuple(LoraRef(ref=r, multiplier=m) for r, m in loras)))
    finally:
        torch._dynamo.config.error_on_recompile = False
    pairs = [("l0", 0.9), ("x", -0.6), ("m", 1.3)]  # ranks 4 + 2 + 2 = 8
    out = _lora_forward(gen, small_spec, inputs, *pairs)  # other shapes than the warm-up's: compiles again
    expected = forward(merged_copy(base.pipe.transformer, [(files[n], m) for n, m in pairs]), inputs)
    assert _maxdiff(out, expected) <= 1e-4


def test_warmup_runs_every_configured_size_through_both_slot_variants(sgen):
    """Warm-up generates at the warm-up size and at each extra size, in every enabled speed mode, with
    the slot off and on, and leaves no adapter behind (real generations on the tiny model; the slot
    path without compile)."""
    from deployments.speed.exact import warmup

    speed = SpeedConfig(warmup_width=64, warmup_height=48, warmup_frames=5, extra_warmup_sizes=[(48, 64, 9)])
    assert sgen.modes.enabled == ("exact", "fast")
    seen = []
    original = sgen.generate

    def recording(spec, *args, **kwargs):
        seen.append((spec.width, spec.height, spec.num_frames, spec.speed, bool(spec.loras)))
        return original(spec, *args, **kwargs)

    sgen.generate = recording
    loads = sgen.adapter_loads
    try:
        report = warmup(sgen, speed)
    finally:
        del sgen.generate
    assert seen == [(w, h, n, mode, lora) for w, h, n in ((64, 48, 5), (48, 64, 9)) for mode in ("exact", "fast")
                    for lora in (False, True)]
    assert {"base_s", "lora_s", "base_48x64x9_s", "lora_48x64x9_s", "fast_base_s", "fast_lora_48x64x9_s",
            "total_s"} <= set(report)
    assert sgen.adapters == {} and sgen.adapter_loads == loads
