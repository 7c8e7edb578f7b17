"""LoRA adapters on the real tiny pipeline: every accepted layout does what stock diffusers does.

Two independent references: stock ``WanImageToVideoPipeline.load_lora_weights(file)`` +
``set_adapters`` on a pristine pipeline (the reference server's path), and the dense deltas merged
into a copy of a never-LoRA'd transformer by hand (``W + m * dW``). The generators under test load
their own pipelines too, so nothing here touches the session-shared ``generator``.
"""

from __future__ import annotations

import copy
import io
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from deployments.engine import models
from deployments.engine import pipeline as pipeline_mod
from deployments.engine.pipeline import WanGenerator
from deployments.errors import GenerationFailed, LoraIncompatible, LoraInvalid, LoraNotFound
from deployments.lora.files import detect_format, load_state_dict, read_header
from deployments.spec import LoraRef, adapter_name

from .conftest import load_tiny, stock_frames, tiny_spec
from .lora_factory import (  # noqa: F401 (base, base_out, inputs, shapes are fixtures)
    FORMATS,
    LAYOUTS,
    base,
    base_out,
    file_keys,
    forward,
    inputs,
    make_layout,
    make_lora,
    merge_into,
    merged_copy,
    save_state_dict,
    shapes,
    transformer_inputs,
    write_raw,
)

ATOL = 1e-5
VISIBLE = 1e-2  # a LoRA must move the transformer output at least this much


@pytest.fixture(scope="module")
def base_gen(base):
    return WanGenerator(base)


@pytest.fixture(scope="module")
def base_frames(base_gen, small_spec_module):
    return base_gen.generate(small_spec_module()).frames


@pytest.fixture(scope="module")
def small_spec_module():
    """``small_spec`` for module-scoped fixtures (the conftest one is function-scoped)."""
    return tiny_spec


@pytest.fixture(scope="module")
def module_gen(model_cache):
    """The generator under test, on its own pipeline (shared by this module's tests)."""
    return WanGenerator(load_tiny(model_cache))


@pytest.fixture
def gen(module_gen):
    """``module_gen``, left with no adapter resident and LoRA disabled after each test."""
    yield module_gen
    for ref in list(module_gen.adapters.values()):
        module_gen.delete_adapter(ref)
    module_gen._activate(_NoLora())
    assert module_gen.adapters == {}
    assert not getattr(module_gen.pipe.transformer, "peft_config", {})


class _NoLora:
    loras = ()


def _spec_with(small_spec, *pairs):
    return small_spec(loras=tuple(LoraRef(ref=ref, multiplier=m) for ref, m in pairs))


def _lora_forward(gen, small_spec, inputs, *pairs):
    gen._activate(_spec_with(small_spec, *pairs))
    return forward(gen.pipe.transformer, inputs)


def _maxdiff(a, b) -> float:
    return float((a - b).abs().max())


# -- 1. each format == hand merge ---------------------------------------------------------------


@pytest.mark.parametrize("multiplier", [1.0, -0.7])
@pytest.mark.parametrize("fmt", FORMATS)
def test_single_lora_equals_hand_merge(gen, base, base_out, shapes, inputs, small_spec, tmp_path, fmt, multiplier):
    lora = make_lora(tmp_path / f"{fmt}.safetensors", fmt, shapes, seed=1)
    assert len(lora.deltas) == 24  # 12 Linears x 2 blocks, all of them targeted
    gen.load_adapter(f"{fmt}.safetensors", str(lora.path))

    out = _lora_forward(gen, small_spec, inputs, (f"{fmt}.safetensors", multiplier))
    expected = forward(merged_copy(base.pipe.transformer, [(lora, multiplier)]), inputs)

    assert _maxdiff(out, expected) <= ATOL
    assert _maxdiff(out, base_out) > VISIBLE


@pytest.mark.parametrize("multiplier", [1.0, -0.7])
@pytest.mark.parametrize("fmt", FORMATS)
def test_single_lora_frames_equal_hand_merged_pipeline(
    gen, model_cache, base_frames, shapes, small_spec, tmp_path, fmt, multiplier
):
    lora = make_lora(tmp_path / f"{fmt}.safetensors", fmt, shapes, seed=2)
    gen.load_adapter("style", str(lora.path))
    frames = gen.generate(_spec_with(small_spec, ("style", multiplier))).frames

    merged = load_tiny(model_cache)
    merge_into(merged.pipe.transformer, [(lora, multiplier)])
    expected = WanGenerator(merged).generate(small_spec()).frames

    # Float differences of ~1e-7 may flip a rounding to uint8, never more than one level.
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(frames.astype(int) - base_frames.astype(int)).max() > 1


def test_kohya_alpha_is_applied(gen, base, shapes, inputs, small_spec, tmp_path):
    """The same A/B with alpha = rank/2 must act like the unscaled file at half strength."""
    kohya = make_lora(tmp_path / "k.safetensors", "kohya", shapes, seed=3, rank=4, alpha=2.0)
    plain = make_lora(tmp_path / "p.safetensors", "diffusers", shapes, seed=3, rank=4)
    gen.load_adapter("k", str(kohya.path))
    gen.load_adapter("p", str(plain.path))
    assert _maxdiff(_lora_forward(gen, small_spec, inputs, ("k", 1.0)), _lora_forward(gen, small_spec, inputs, ("p", 0.5))) <= ATOL


# -- 1b. every layout == stock diffusers, video level -------------------------------------------


@pytest.fixture(scope="module")
def pristine_source(model_cache):
    """A pipeline nothing ever touches: each test takes a deep copy as its pristine stock pipeline."""
    return load_tiny(model_cache).pipe


@pytest.fixture
def pristine(pristine_source):
    return lambda: copy.deepcopy(pristine_source)


def product_frames(gen, spec) -> np.ndarray:
    """Float frames of ``gen.generate(spec)``, taken just before they are rounded to uint8."""
    seen = []
    real = pipeline_mod.frames_to_uint8
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "frames_to_uint8", lambda frames: seen.append(frames.copy()) or real(frames))
        gen.generate(spec)
    return seen[0]


def stock_with(pristine, path, multiplier: float):
    stock = pristine()
    stock.load_lora_weights(str(path), adapter_name="lora")
    stock.set_adapters(["lora"], [multiplier])
    return stock


@pytest.fixture(scope="module")
def base_float_frames(base_gen, small_spec_module):
    return product_frames(base_gen, small_spec_module())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_video_equals_stock_diffusers(gen, pristine, base_float_frames, shapes, small_spec, tmp_path, layout):
    """The product's video is bit-identical (fp32, CPU) to stock load_lora_weights(file) + set_adapters."""
    lora = make_layout(tmp_path / f"{layout}.safetensors", layout, shapes, seed=5)
    multiplier = 0.8
    gen.load_adapter("style", str(lora.path))
    spec = _spec_with(small_spec, ("style", multiplier))

    ours = product_frames(gen, spec)
    expected = stock_frames(stock_with(pristine, lora.path, multiplier), spec)

    assert np.array_equal(ours, expected), float(np.abs(ours - expected).max())
    assert np.abs(ours - base_float_frames).max() > 1e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_hand_merge(gen, base, base_out, shapes, inputs, small_spec, tmp_path, layout):
    """Each layout's scale (alpha / r from .alpha or metadata, rsLoRA, patterns) and bias deltas, by hand."""
    lora = make_layout(tmp_path / f"{layout}.safetensors", layout, shapes, seed=6)
    gen.load_adapter("style", str(lora.path))
    out = _lora_forward(gen, small_spec, inputs, ("style", -0.6))
    expected = forward(merged_copy(base.pipe.transformer, [(lora, -0.6)]), inputs)
    assert _maxdiff(out, expected) <= ATOL
    assert _maxdiff(out, base_out) > VISIBLE


def test_metadata_alpha_is_applied(gen, shapes, inputs, small_spec, tmp_path):
    """lora_alpha = 2 * r in the metadata: the same tensors without metadata at multiplier 2."""
    meta = make_lora(tmp_path / "m.safetensors", "diffusers", shapes, seed=8, metadata={"lora_alpha": 8})
    plain = make_lora(tmp_path / "p.safetensors", "diffusers", shapes, seed=8)
    gen.load_adapter("m", str(meta.path))
    gen.load_adapter("p", str(plain.path))
    out = _lora_forward(gen, small_spec, inputs, ("m", 0.5))
    assert _maxdiff(out, _lora_forward(gen, small_spec, inputs, ("p", 1.0))) <= ATOL
    assert _maxdiff(out, _lora_forward(gen, small_spec, inputs, ("p", 0.5))) > VISIBLE


def _refused_by_stock_too(tmp_path, shapes):
    """Files stock diffusers cannot use (it fails on load or at the first forward), and what we name."""
    musubi = make_lora(tmp_path / "musubi.safetensors", "musubi", shapes, seed=90)
    partial_musubi = {k: v for k, v in musubi.state_dict.items() if not k.startswith("lora_unet_blocks_1_ffn_2.")}
    lightx2v = make_lora(tmp_path / "lightx2v.safetensors", "lightx2v", shapes, seed=91)
    partial_bias = {k: v for k, v in lightx2v.state_dict.items() if k != "diffusion_model.blocks.1.ffn.2.diff_b"}
    diffusers = make_lora(tmp_path / "d.safetensors", "diffusers", shapes, seed=92, targets=["self_attn.q"])

    def with_metadata(name, **config):
        path = tmp_path / f"{name}.safetensors"
        entries = {f"transformer.{k}": v for k, v in config.items()}
        save_file(diffusers.state_dict, str(path), metadata={"lora_adapter_metadata": json.dumps(entries)})
        return path

    return {
        "musubi file missing a layer": (
            save_state_dict(tmp_path / "x1.safetensors", partial_musubi),
            ("missing_keys", ["blocks_1_ffn_2.lora_down.weight"]),
        ),
        "diff_b on all layers but one": (
            save_state_dict(tmp_path / "x2.safetensors", partial_bias),
            ("unmatched_keys", ["transformer.blocks.1.ffn.net.2.lora_B.bias (missing; other layers have one)"]),
        ),
        "metadata rank differs from the tensors": (
            with_metadata("x3", r=8, lora_alpha=8, target_modules=["to_q"]),
            (
                "shape_mismatches",
                [f"transformer.blocks.{b}.attn1.to_q.lora_A.weight: rank 4 but lora_adapter_metadata says 8" for b in (0, 1)],
            ),
        ),
        "metadata without target_modules": (
            with_metadata("x4", r=4, lora_alpha=8),
            ("metadata_keys", ["lora_alpha", "r"]),
        ),
        "metadata turns on DoRA": (
            with_metadata("x5", r=4, lora_alpha=8, target_modules=["to_q"], use_dora=True),
            ("unsupported_options", ["use_dora"]),
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "musubi file missing a layer",
        "diff_b on all layers but one",
        "metadata rank differs from the tensors",
        "metadata without target_modules",
        "metadata turns on DoRA",
    ],
)
def test_layouts_stock_cannot_use_are_refused_naming_the_keys(
    gen, pristine, base_out, base_frames, shapes, inputs, small_spec, tmp_path, case
):
    path, (detail, named) = _refused_by_stock_too(tmp_path, shapes)[case]
    with pytest.raises(Exception):  # stock fails too: on load, or on the first forward
        stock_frames(stock_with(pristine, path, 1.0), small_spec(steps=1))

    loads = gen.adapter_loads
    with pytest.raises(LoraIncompatible) as err:
        gen.load_adapter("x", str(path))
    assert err.value.code == "LORA_INCOMPATIBLE"
    assert err.value.details[detail] == named, err.value.details
    _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec)


def test_biases_the_metadata_would_ignore_are_refused(
    gen, pristine, base_out, base_frames, shapes, inputs, small_spec, tmp_path
):
    """Stock drops lora_B.bias when the metadata says lora_bias=false: the file would be half applied."""
    lora = make_lora(tmp_path / "b.safetensors", "diffusers", shapes, seed=93, bias=True, targets=["ffn.2"])
    path = tmp_path / "ignored-bias.safetensors"
    config = {"r": 4, "lora_alpha": 4, "target_modules": ["net.2"], "lora_bias": False}
    config = {f"transformer.{k}": v for k, v in config.items()}
    save_file(lora.state_dict, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    stock = stock_with(pristine, path, 1.0)  # loads, without the biases
    assert not any("lora_B" in n and n.endswith(".bias") for n, _ in stock.transformer.named_parameters())

    loads = gen.adapter_loads
    with pytest.raises(LoraIncompatible) as err:
        gen.load_adapter("x", str(path))
    assert err.value.details["unmatched_keys"] == [
        f"transformer.blocks.{b}.ffn.net.2.lora_B.bias (ignored: lora_adapter_metadata has lora_bias false)"
        for b in (0, 1)
    ]
    _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec)


@pytest.mark.parametrize("metadata", ["{not json", "[1, 2]"])
def test_unreadable_metadata_is_invalid(gen, shapes, tmp_path, metadata):
    lora = make_lora(tmp_path / "d.safetensors", "diffusers", shapes, seed=94)
    path = tmp_path / "bad-metadata.safetensors"
    save_file(lora.state_dict, str(path), metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(LoraInvalid) as err:
        gen.load_adapter("x", str(path))
    assert "lora_adapter_metadata" in err.value.message
    assert gen.adapters == {}


def test_lora_dropout_in_metadata_is_off_at_inference(gen, pristine, shapes, inputs, small_spec, tmp_path):
    """Stock leaves peft's lora_dropout modules in training mode (random output); we run them in eval
    mode, which is stock's output with its transformer put in eval mode."""
    lora = make_lora(tmp_path / "d.safetensors", "diffusers", shapes, seed=95, metadata={"lora_alpha": 8, "lora_dropout": 0.5})
    stock = stock_with(pristine, lora.path, 0.7)
    assert _maxdiff(forward(stock.transformer, inputs), forward(stock.transformer, inputs)) > 0  # random as it is
    stock.transformer.eval()

    gen.load_adapter("d", str(lora.path))
    out = _lora_forward(gen, small_spec, inputs, ("d", 0.7))
    assert torch.equal(out, forward(stock.transformer, inputs))
    assert torch.equal(out, forward(gen.pipe.transformer, inputs))


_TARGETS = ["blocks.0.attn1.to_q", "attn1.to_q", "to_q", "ffn.net.2", "x"]
_METADATA = st.fixed_dictionaries(
    {"r": st.just(4), "target_modules": st.sampled_from([["to_q", "net.2"], ".*(to_q|net\\.2)", ["attn1.to_q", "ffn.net.2"]])},
    optional={
        "lora_alpha": st.integers(-4, 16) | st.floats(-1, 20) | st.sampled_from([None, "8", True]),
        "use_rslora": st.booleans(),
        "alpha_pattern": st.dictionaries(st.sampled_from(_TARGETS), st.integers(1, 9) | st.floats(0.1, 9), max_size=2),
        "rank_pattern": st.dictionaries(st.sampled_from(_TARGETS), st.sampled_from([4, 8, 0]), max_size=1),
        "lora_bias": st.booleans(),
        "lora_dropout": st.sampled_from([0.0, 0.2, None, 2.0]),
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
        "layers_to_transform": st.sampled_from([None, [0], 1]),
        "fan_in_fan_out": st.booleans(),
        "bias": st.sampled_from(["none", "all"]),
        "use_dora": st.booleans(),
        "bogus": st.just(1),
    },
)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(config=_METADATA, bias=st.booleans())
def test_fuzzed_metadata_is_refused_or_applied_as_stock(gen, pristine, shapes, inputs, small_spec, tmp_path, config, bias):
    """Whatever the metadata holds: a typed refusal with nothing loaded, or stock's exact output."""
    lora = make_lora(tmp_path / "t.safetensors", "diffusers", shapes, seed=96, targets=["self_attn.q", "ffn.2"], bias=bias)
    path = tmp_path / "fuzzed.safetensors"
    entries = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    save_file(lora.state_dict, str(path), metadata={"lora_adapter_metadata": entries})
    try:
        gen.load_adapter("fuzzed", str(path))
    except (LoraIncompatible, LoraInvalid):
        assert gen.adapters == {} and not getattr(gen.pipe.transformer, "peft_config", {})
        return
    try:
        out = _lora_forward(gen, small_spec, inputs, ("fuzzed", 0.7))
        stock = stock_with(pristine, path, 0.7)
        stock.transformer.eval()
        assert torch.equal(out, forward(stock.transformer, inputs)), config
    finally:
        gen.delete_adapter("fuzzed")


# -- 2. stacked LoRAs ---------------------------------------------------------------------------


def test_stacked_loras_equal_hand_merged_sum(gen, base, base_out, shapes, inputs, small_spec, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", "ai-toolkit", shapes, seed=10, rank=4)
    k = make_lora(tmp_path / "k.safetensors", "kohya", shapes, seed=11, rank=8, alpha=4.0)
    d = make_lora(tmp_path / "d.safetensors", "diffusers", shapes, seed=12, rank=2, targets=["self_attn.q", "ffn.2"])
    for name, lora in (("a", a), ("k", k), ("d", d)):
        gen.load_adapter(name, str(lora.path))

    two = _lora_forward(gen, small_spec, inputs, ("a", 0.8), ("k", -0.5))
    assert _maxdiff(two, forward(merged_copy(base.pipe.transformer, [(a, 0.8), (k, -0.5)]), inputs)) <= ATOL

    three = _lora_forward(gen, small_spec, inputs, ("k", 1.3), ("d", 1.0), ("a", -1.1))
    expected = forward(merged_copy(base.pipe.transformer, [(k, 1.3), (d, 1.0), (a, -1.1)]), inputs)
    assert _maxdiff(three, expected) <= ATOL

    # Afterwards a single-LoRA request has only that adapter active.
    one = _lora_forward(gen, small_spec, inputs, ("d", 0.6))
    assert _maxdiff(one, forward(merged_copy(base.pipe.transformer, [(d, 0.6)]), inputs)) <= ATOL
    assert _maxdiff(one, base_out) > VISIBLE


def test_stacked_layouts_with_bias_deltas_and_metadata_scales(gen, base, shapes, inputs, small_spec, tmp_path):
    files = {
        "x": make_layout(tmp_path / "x.safetensors", "lightx2v", shapes, seed=16),
        "b": make_layout(tmp_path / "b.safetensors", "diffusers-metadata-rslora-patterns", shapes, seed=17),
        "m": make_layout(tmp_path / "m.safetensors", "diffusers-metadata", shapes, seed=18),
        "u": make_layout(tmp_path / "u.safetensors", "musubi", shapes, seed=19),
    }
    for name, lora in files.items():
        gen.load_adapter(name, str(lora.path))
    for pairs in ([("x", 0.7), ("b", -1.2)], [("m", 0.4), ("u", 1.1), ("x", -0.5)], [("m", 1.0)]):
        out = _lora_forward(gen, small_spec, inputs, *pairs)
        expected = forward(merged_copy(base.pipe.transformer, [(files[n], m) for n, m in pairs]), inputs)
        assert _maxdiff(out, expected) <= ATOL, pairs


# -- 3. no LoRA after loading == base ----------------------------------------------------------


def test_no_lora_request_after_loading_is_bit_identical(model_cache, base_frames, shapes, small_spec, tmp_path):
    fresh = WanGenerator(load_tiny(model_cache))  # this test needs a generator that has never loaded
    before = fresh.generate(small_spec()).frames
    assert np.array_equal(before, base_frames)

    for i, fmt in enumerate(FORMATS):
        fresh.load_adapter(fmt, str(make_lora(tmp_path / f"{fmt}.safetensors", fmt, shapes, seed=20 + i).path))
    with_lora = fresh.generate(_spec_with(small_spec, ("kohya", 1.0), ("diffusers", 0.5))).frames
    assert not np.array_equal(with_lora, before)

    assert np.array_equal(fresh.generate(small_spec()).frames, before)
    # ... also right after loading another adapter, with no LoRA request in between
    fresh.load_adapter("late", str(make_lora(tmp_path / "late.safetensors", "ai-toolkit", shapes, seed=29).path))
    assert np.array_equal(fresh.generate(small_spec()).frames, before)

    for ref in ("ai-toolkit", "kohya", "diffusers", "late"):
        fresh.delete_adapter(ref)
    assert fresh.adapters == {}
    assert np.array_equal(fresh.generate(small_spec()).frames, before)


def test_no_lora_forward_is_bit_identical(gen, base_out, shapes, inputs, small_spec, tmp_path):
    gen.load_adapter("a", str(make_lora(tmp_path / "a.safetensors", "ai-toolkit", shapes, seed=30).path))
    assert _maxdiff(_lora_forward(gen, small_spec, inputs, ("a", 1.0)), base_out) > VISIBLE
    gen._activate(small_spec())
    assert torch.equal(forward(gen.pipe.transformer, inputs), base_out)


# -- 4. multiplier changes ----------------------------------------------------------------------


def test_multiplier_change_takes_effect_and_back(gen, base, shapes, inputs, small_spec, tmp_path):
    lora = make_lora(tmp_path / "m.safetensors", "ai-toolkit", shapes, seed=40)
    gen.load_adapter("m", str(lora.path))

    half = gen.generate(_spec_with(small_spec, ("m", 0.5))).frames
    full = gen.generate(_spec_with(small_spec, ("m", 1.0))).frames
    half_again = gen.generate(_spec_with(small_spec, ("m", 0.5))).frames
    full_again = gen.generate(_spec_with(small_spec, ("m", 1.0))).frames
    assert not np.array_equal(half, full)
    assert np.array_equal(half, half_again)
    assert np.array_equal(full, full_again)  # a change back to 1.0 is not dropped

    # The same at the transformer, against the hand merge at each strength.
    for m in (0.5, 1.0, 0.5, 1.0):
        expected = forward(merged_copy(base.pipe.transformer, [(lora, m)]), inputs)
        assert _maxdiff(_lora_forward(gen, small_spec, inputs, ("m", m)), expected) <= ATOL


# -- 5. adapters never reload the base ----------------------------------------------------------


def test_adapter_loads_keep_the_base_pipeline(gen, base, shapes, small_spec, tmp_path):
    pipe, transformer = gen.pipe, gen.pipe.transformer
    loads, pipeline_loads = gen.adapter_loads, models.pipeline_loads()
    a = make_lora(tmp_path / "a.safetensors", "ai-toolkit", shapes, seed=50)
    k = make_lora(tmp_path / "k.safetensors", "kohya", shapes, seed=51)

    assert gen.load_adapter("a", str(a.path)) == adapter_name("a")
    assert gen.load_adapter("a", str(a.path)) == adapter_name("a")  # resident: no second load
    assert gen.load_adapter("k", str(k.path)) == adapter_name("k")
    assert gen.adapter_loads == loads + 2
    assert gen.adapters == {adapter_name("a"): "a", adapter_name("k"): "k"}

    for pairs in ([("a", 1.0)], [("k", 0.3)], [("a", 1.0), ("k", -1.0)], []):
        gen.generate(_spec_with(small_spec, *pairs))
    assert gen.pipe is pipe and gen.pipe.transformer is transformer
    assert gen.adapter_loads == loads + 2

    # Adapters live beside the base weights, which stay untouched (nothing is fused).
    plain = dict(base.pipe.transformer.named_parameters())
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(param, plain[name.replace(".base_layer", "")]), name

    gen.delete_adapter("a")
    assert gen.load_adapter("a", str(a.path)) == adapter_name("a")  # evicted, so loaded again
    assert gen.adapter_loads == loads + 3
    assert gen.pipe.transformer is transformer
    assert models.pipeline_loads() == pipeline_loads  # nothing in this process loaded a pipeline


def test_request_for_an_adapter_not_loaded_fails(gen, small_spec):
    with pytest.raises(GenerationFailed, match="not loaded"):
        gen._activate(_spec_with(small_spec, ("never-loaded", 1.0)))


# -- 6. rejections, with nothing half applied ---------------------------------------------------


def _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec):
    assert gen.adapters == {}
    assert gen.adapter_loads == loads
    assert not getattr(gen.pipe.transformer, "peft_config", {})
    gen._activate(small_spec())
    assert torch.equal(forward(gen.pipe.transformer, inputs), base_out)
    assert np.array_equal(gen.generate(small_spec()).frames, base_frames)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nonexistent_blocks_are_rejected_whole(gen, base_out, base_frames, shapes, inputs, small_spec, tmp_path, fmt):
    # A 40-block LoRA on the 2-block model: blocks 0 and 1 would fit, block 39 does not.
    lora = make_lora(tmp_path / "big.safetensors", fmt, shapes, seed=60, blocks=[0, 1, 39])
    loads = gen.adapter_loads
    with pytest.raises(LoraIncompatible) as err:
        gen.load_adapter("big", str(lora.path))
    unmatched = err.value.details["unmatched_keys"]
    assert unmatched and all(".blocks.39." in key for key in unmatched)
    assert err.value.details["unmatched_count"] == 24  # 12 layers x (A, B)
    _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_shapes_are_rejected(gen, base_out, base_frames, shapes, inputs, small_spec, tmp_path, fmt):
    lora = make_lora(tmp_path / "ok.safetensors", fmt, shapes, seed=61)
    sd = dict(lora.state_dict)
    key_a, _, _ = file_keys(fmt, 1, "ffn.2")  # Linear(32, 16): give it an A made for in=20
    sd[key_a] = torch.randn(4, 20)
    path = save_state_dict(tmp_path / "bad.safetensors", sd)
    loads = gen.adapter_loads
    with pytest.raises(LoraIncompatible) as err:
        gen.load_adapter("bad", str(path))
    mismatches = err.value.details["shape_mismatches"]
    assert len(mismatches) == 1 and "blocks.1.ffn.net.2.lora_A" in mismatches[0]
    _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec)


def _diffusers_pair(block=0, module="attn1.to_q", rank=4, fan_in=16, fan_out=16):
    stem = f"transformer.blocks.{block}.{module}"
    return {f"{stem}.lora_A.weight": torch.randn(rank, fan_in), f"{stem}.lora_B.weight": torch.randn(fan_out, rank)}


def _bad_state_dicts():
    ok = _diffusers_pair(0, "attn1.to_k")
    lone_b = {k: v for k, v in _diffusers_pair(0, "attn1.to_q").items() if "lora_B" in k}
    lone_a = {k: v for k, v in _diffusers_pair(1, "attn1.to_q").items() if "lora_A" in k}
    rank = _diffusers_pair(0, "attn1.to_q")
    rank["transformer.blocks.0.attn1.to_q.lora_B.weight"] = torch.randn(16, 8)
    return {
        # loads next to a randomly initialised lora_A if let through: garbage output
        "lone lora_B": ({**ok, **lone_b}, "unmatched_keys"),
        "lone lora_A": ({**ok, **lone_a}, "unmatched_keys"),
        "rank mismatch": (rank, "shape_mismatches"),
        "full weight, not a LoRA": ({**ok, "transformer.blocks.0.attn1.to_q.weight": torch.randn(16, 16)}, "unmatched_keys"),
        "other component": ({**ok, "text_encoder.encoder.block.0.lora_A.weight": torch.randn(4, 32)}, "unmatched_keys"),
        "unknown layer name": ({"transformer.blocks.0.attn1.to_z.lora_A.weight": torch.randn(4, 16)}, "unmatched_keys"),
        # stock loads only transformer.* keys: the unprefixed pair would be dropped without a word
        "no transformer. prefix": ({**ok, **{k.removeprefix("transformer."): v for k, v in _diffusers_pair(1).items()}}, "unmatched_keys"),
        "unrecognised prefix": ({"model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16)}, "unmatched_keys"),
        "unplaceable ai-toolkit key": ({"diffusion_model.blocks.0.self_attn.z.lora_A.weight": torch.randn(4, 16)}, None),
    }


@pytest.mark.parametrize("case", list(_bad_state_dicts()))
def test_incompatible_keys_are_rejected(gen, base_out, base_frames, inputs, small_spec, tmp_path, case):
    torch.manual_seed(0)
    state_dict, detail = _bad_state_dicts()[case]
    path = save_state_dict(tmp_path / "x.safetensors", state_dict)
    loads = gen.adapter_loads
    with pytest.raises(LoraIncompatible) as err:
        gen.load_adapter("x", str(path))
    if detail:
        assert err.value.details[detail], err.value.details
    _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec)


def _invalid_files(tmp_path, shapes):
    lora = make_lora(tmp_path / "good.safetensors", "ai-toolkit", shapes, seed=70)
    header = read_header(lora.path)
    first = next(iter(header))
    raw_len = struct.unpack("<Q", lora.path.read_bytes()[:8])[0]
    (tmp_path / "lora.bin").write_bytes(b"\0" * 64)
    (tmp_path / "lora.pt").write_bytes(lora.path.read_bytes())  # a good file, wrong extension
    (tmp_path / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all" * 4)
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    truncated = lora.path.read_bytes()[: 8 + raw_len + 16]  # header intact, data cut off
    (tmp_path / "truncated.safetensors").write_bytes(truncated)
    body = lora.path.read_bytes()[8 + raw_len :]
    return {
        "bin": tmp_path / "lora.bin",
        "pt": tmp_path / "lora.pt",
        "ints": save_state_dict(tmp_path / "ints.safetensors", {k: torch.ones(2, 2, dtype=torch.int64) for k in lora.state_dict}),
        "garbage": tmp_path / "garbage.safetensors",
        "short": tmp_path / "short.safetensors",
        "header beyond file": write_raw(tmp_path / "long.safetensors", {first: header[first]}, b"\0" * 16, header_len=10**6),
        "truncated data": tmp_path / "truncated.safetensors",
        "offsets not a pair": write_raw(tmp_path / "off.safetensors", {first: {**header[first], "data_offsets": 5}}, body),
        "size disagrees with shape": write_raw(
            tmp_path / "size.safetensors", {first: {**header[first], "shape": [3, 3]}}, body
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "bin",
        "pt",
        "ints",
        "garbage",
        "short",
        "header beyond file",
        "truncated data",
        "offsets not a pair",
        "size disagrees with shape",
    ],
)
def test_invalid_files_are_rejected(gen, base_out, base_frames, shapes, inputs, small_spec, tmp_path, case):
    path = _invalid_files(tmp_path, shapes)[case]
    loads = gen.adapter_loads
    with pytest.raises(LoraInvalid):
        gen.load_adapter("x", str(path))
    _assert_untouched(gen, loads, base_out, base_frames, inputs, small_spec)


def test_missing_file_is_not_found(gen, tmp_path):
    with pytest.raises(LoraNotFound):
        gen.load_adapter("x", str(tmp_path / "absent.safetensors"))
    assert gen.adapters == {}


# -- 7. detect_format and read_header -----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_of_each_writer(shapes, tmp_path, fmt):
    lora = make_lora(tmp_path / "x.safetensors", fmt, shapes, seed=80)
    assert detect_format(lora.state_dict) == fmt
    assert detect_format(read_header(lora.path)) == fmt  # works on header keys alone


@pytest.mark.parametrize(
    "keys, fmt",
    [
        (["diffusion_model.blocks.0.self_attn.q.lora_A.weight"], "ai-toolkit"),
        (["diffusion_model.blocks.0.self_attn.q.lora_down.weight"], "kohya"),
        (["diffusion_model.blocks.0.self_attn.q.alpha", "diffusion_model.blocks.0.self_attn.q.lora_A.weight"], "kohya"),
        (["lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.alpha"], "musubi"),
        (["transformer.blocks.0.attn1.to_q.lora_A.weight"], "diffusers"),
    ],
)
def test_detect_format_from_key_names(keys, fmt):
    assert detect_format(dict.fromkeys(keys)) == fmt


def test_detect_format_rejects_unknown_names():
    keys = [f"unet.down_blocks.{i}.lora.up.weight" for i in range(15)]
    with pytest.raises(LoraIncompatible) as err:
        detect_format(dict.fromkeys(keys))
    assert err.value.details["unmatched_keys"] == keys[:10]
    assert err.value.details["unmatched_count"] == 15
    assert err.value.code == "LORA_INCOMPATIBLE"


def test_read_header_of_a_good_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 16), "b": torch.zeros(16, 4, dtype=torch.bfloat16)}, str(path), metadata={"ss_rank": "4"})
    header = read_header(path)
    assert set(header) == {"a", "b"}  # __metadata__ is not a tensor
    assert header["a"]["dtype"] == "F32" and header["a"]["shape"] == [4, 16]
    assert header["b"]["dtype"] == "BF16"
    assert set(load_state_dict(path)) == {"a", "b"}


def _entry(**over):
    return {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **over}}


@pytest.mark.parametrize(
    "header, header_len, data",
    [
        pytest.param(_entry(), 10**9, b"\0" * 4, id="length-beyond-file"),
        pytest.param(_entry(), None, b"", id="offsets-beyond-data"),
        pytest.param(["a", "b"], None, b"", id="header-not-object"),
        pytest.param({"__metadata__": {"k": "v"}}, None, b"", id="no-tensors"),
        pytest.param(_entry(dtype="I32"), None, b"\0" * 4, id="int-dtype"),
        pytest.param(_entry(dtype="BOOL"), None, b"\0" * 4, id="bool-dtype"),
        pytest.param(_entry(dtype=["F32"]), None, b"\0" * 4, id="dtype-not-string"),
        pytest.param(_entry(data_offsets=4), None, b"\0" * 4, id="offsets-int"),
        pytest.param(_entry(data_offsets=["0", "4"]), None, b"\0" * 4, id="offsets-strings"),
        pytest.param(_entry(data_offsets=[0, 4, 8]), None, b"\0" * 8, id="offsets-three"),
        pytest.param(_entry(data_offsets=[4, 0]), None, b"\0" * 4, id="offsets-reversed"),
        pytest.param({"a": "F32"}, None, b"", id="entry-not-object"),
        pytest.param({"a": {"shape": [1], "data_offsets": [0, 4]}}, None, b"\0" * 4, id="no-dtype"),
    ],
)
def test_read_header_rejects_malformed(tmp_path, header, header_len, data):
    path = write_raw(tmp_path / "x.safetensors", header, data, header_len=header_len)
    with pytest.raises(LoraInvalid) as err:
        read_header(path)
    assert err.value.code == "LORA_INVALID"
    assert err.value.details["file"] == "x.safetensors"


@pytest.mark.parametrize(
    "content",
    [b"", b"\x01\x02\x03", b"garbage bytes, not a header at all", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", struct.pack("<Q", 4) + b"{no "],
    ids=["empty", "short", "garbage", "not-utf8", "not-json"],
)
def test_read_header_rejects_garbage(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraInvalid):
        read_header(path)


def test_read_header_limits(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", _entry(), b"\0" * 4)
    read_header(path)
    with pytest.raises(LoraInvalid) as err:
        read_header(path, max_header_bytes=16)
    assert err.value.details["header_bytes"] > 16
    with pytest.raises(LoraInvalid):
        read_header(tmp_path / "x.ckpt")  # extension is checked before anything is opened
    with pytest.raises(LoraNotFound):
        read_header(tmp_path / "absent.safetensors")


def test_out_of_memory_while_loading_is_out_of_memory_not_an_incompatible_file(gen, shapes, tmp_path, monkeypatch):
    import torch

    from deployments.errors import OutOfMemory

    lora = make_lora(tmp_path / "a.safetensors", "ai-toolkit", shapes, seed=3)

    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(gen, "_load_into_transformer", oom)
    with pytest.raises(OutOfMemory) as e:
        gen.load_adapter("a.safetensors", str(lora.path))
    assert e.value.code == "OUT_OF_MEMORY" and gen.adapters == {}
