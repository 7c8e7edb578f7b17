"""Speed modes in one pipeline (deployments/speed/modes.py, and their use in deployments/engine/pipeline.py).

On CPU there is no FP8: the kernel swap is exercised with a stand-in conversion (weights rounded to
bfloat16), which is enough to check that a mode's copies are used in that mode only, under LoRAs,
and that exact mode gets its own modules back bit for bit. The LoRA stack of turbo mode (the
distillation LoRA under the user's) is checked against hand merges of both files, on the eager
(peft) path, on the LoRA-slot path the compiled model uses, and against stock diffusers with both
adapters active.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from deployments.config import SpeedConfig
from deployments.engine import compat
from deployments.engine import pipeline as pipeline_mod
from deployments.engine.models import pipeline_loads
from deployments.errors import SpeedModeNotSupported, SpeedModeUnavailable
from deployments.spec import LoraRef
from deployments.speed.exact import LoraSlots
from deployments.speed.modes import SpeedModes, torchao_fp8_converter

from .conftest import load_tiny
from .lora_factory import (  # noqa: F401 (base, base_out, inputs, shapes are fixtures)
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
DISTILL_STRENGTH = 0.8


def bf16_round(linear: torch.nn.Linear) -> torch.nn.Linear:
    """The CPU stand-in for the FP8 conversion: a copy with its weight rounded to bfloat16."""
    out = copy.deepcopy(linear)
    with torch.no_grad():
        out.weight.copy_(out.weight.to(torch.bfloat16).float())
    return out


def rounded_copy(transformer):
    """A plain transformer whose block linears are what ``bf16_round`` makes of them."""
    out = copy.deepcopy(transformer)
    for name, module in list(out.named_modules()):
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, bf16_round(module))
    return out


@pytest.fixture(scope="module")
def distill(shapes, tmp_path_factory):
    """A random distillation LoRA in LightX2V's layout (kohya keys, .alpha, diff_b, head)."""
    return make_layout(tmp_path_factory.mktemp("distill") / "distill.safetensors", "lightx2v", shapes, seed=90,
                       rank=6)


@pytest.fixture(scope="module")
def user_loras(shapes, tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    return {
        "u": make_lora(d / "u.safetensors", "ai-toolkit", shapes, seed=91, rank=4),
        "k": make_layout(d / "k.safetensors", "kohya", shapes, seed=92),
    }


def turbo_speed(distill_path, **fast) -> SpeedConfig:
    return SpeedConfig(fast=fast, turbo={"enabled": True, "lora": str(distill_path), "strength": DISTILL_STRENGTH})


@pytest.fixture(scope="module")
def eager_gen(model_cache, distill, user_loras):
    """Every mode on the eager (peft) path, the fast kernels made by ``bf16_round``."""
    gen = pipeline_mod.WanGenerator(load_tiny(model_cache), turbo_speed(distill.path), convert=bf16_round)
    for name, lora in user_loras.items():
        gen.load_adapter(name, str(lora.path))
    return gen


@pytest.fixture(scope="module")
def slot_gen(model_cache, distill, user_loras):
    """Every mode on the LoRA-slot path (what compiled blocks use), without compiling."""
    loaded = load_tiny(model_cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "apply_speed_modes",
                   lambda pipe, speed, device: {"applied": False, "lora_slots": LoraSlots(pipe.transformer, 16)})
        gen = pipeline_mod.WanGenerator(loaded, turbo_speed(distill.path), convert=bf16_round)
    assert gen._slots is not None and gen._slots.fixed is not None
    for name, lora in user_loras.items():
        gen.load_adapter(name, str(lora.path))
    return gen


def _forward(gen, spec, inputs):
    """The transformer forward of one request's setting (adapters and mode), outside a generation."""
    gen._activate(spec)
    mode = gen.modes.begin(spec, torch.Generator())
    try:
        return forward(gen.pipe.transformer, inputs)
    finally:
        gen.modes.end(mode)


def _spec(small_spec, speed="exact", loras=()):
    extra = {"steps": 4, "guidance_scale": 1.0} if speed == "turbo" else {}
    return small_spec(speed=speed, loras=tuple(LoraRef(ref=r, multiplier=m) for r, m in loras), **extra)


@pytest.mark.parametrize("path", ["eager", "slot"])
@pytest.mark.parametrize("loras", [(), (("u", 0.7),), (("u", -1.2), ("k", 0.5))])
def test_turbo_stacks_the_distill_lora_under_the_users_as_a_hand_merge(
    request, path, loras, base, base_out, inputs, small_spec, distill, user_loras
):
    """turbo = W + s * dW_distill + sum(m * dW_user) (through the fast kernels), exact = W + sum(m * dW_user)."""
    gen = request.getfixturevalue(f"{path}_gen")
    applied = [(user_loras[n], m) for n, m in loras]
    exact = _forward(gen, _spec(small_spec, "exact", loras), inputs)
    assert (exact - forward(merged_copy(base.pipe.transformer, applied), inputs)).abs().max() <= ATOL
    if not loras:
        assert torch.equal(exact, base_out)  # no adapter: the untouched base, bit for bit
    turbo = _forward(gen, _spec(small_spec, "turbo", loras), inputs)
    expected = forward(merged_copy(rounded_copy(base.pipe.transformer), [(distill, DISTILL_STRENGTH)] + applied), inputs)
    assert (turbo - expected).abs().max() <= ATOL
    assert (turbo - exact).abs().max() > 1e-2


def test_turbo_stack_equals_stock_diffusers_with_both_adapters(model_cache, inputs, small_spec, distill, user_loras):
    """The same stack as stock ``load_lora_weights`` + ``set_adapters`` with both adapters active (no fast
    kernels here, so the comparison is with the model's own weights)."""
    gen = pipeline_mod.WanGenerator(load_tiny(model_cache), turbo_speed(distill.path).model_copy(
        update={"turbo": turbo_speed(distill.path).turbo.model_copy(update={"fp8": False})}))
    gen.load_adapter("u", str(user_loras["u"].path))
    ours = _forward(gen, _spec(small_spec, "turbo", [("u", 0.6)]), inputs)
    stock = load_tiny(model_cache).pipe
    stock.load_lora_weights(str(distill.path), adapter_name="distill")
    stock.load_lora_weights(str(user_loras["u"].path), adapter_name="user")
    stock.set_adapters(["user", "distill"], [0.6, DISTILL_STRENGTH])
    assert (ours - forward(stock.transformer, inputs)).abs().max() <= ATOL


@pytest.mark.parametrize("path", ["eager", "slot"])
def test_switching_modes_loads_nothing_and_each_mode_is_deterministic(request, path, small_spec):
    gen = request.getfixturevalue(f"{path}_gen")
    loads, adapter_loads, distill_loads = pipeline_loads(), gen.adapter_loads, gen.distill_loads
    order = ["exact", "fast", "turbo", "exact", "turbo", "fast", "exact"]
    frames: dict[str, list] = {}
    for speed in order:
        out = gen.generate(_spec(small_spec, speed, [("u", 0.9)]))
        assert out.speed["mode"] == speed
        frames.setdefault(speed, []).append(out.frames)
    for speed, runs in frames.items():
        assert all((f == runs[0]).all() for f in runs), speed
    assert (frames["fast"][0] != frames["exact"][0]).any() and (frames["turbo"][0] != frames["exact"][0]).any()
    assert (pipeline_loads(), gen.adapter_loads, gen.distill_loads) == (loads, adapter_loads, distill_loads)


@pytest.mark.parametrize("path", ["eager", "slot"])
@pytest.mark.parametrize("speed", ["fast", "turbo"])
def test_between_requests_the_model_is_exact_modes(request, path, speed, small_spec, inputs, base_out):
    """After a fast or turbo request the model's own kernels are back and the distillation LoRA is off:
    a direct forward (a benchmark's, a LoRA load's) sees the base model."""
    gen = request.getfixturevalue(f"{path}_gen")
    gen.generate(_spec(small_spec, speed))
    assert not gen.modes.kernels.on
    assert torch.equal(forward(gen.pipe.transformer, inputs), base_out)


def test_exact_mode_is_bit_equal_to_a_replica_without_modes(model_cache, eager_gen, small_spec, user_loras):
    """A generator with every mode installed (and used) gives exact mode the frames of one with none."""
    plain = pipeline_mod.WanGenerator(load_tiny(model_cache), SpeedConfig(fast={"enabled": False}))
    assert plain.modes.enabled == ("exact",) and plain.modes.cache is None
    plain.load_adapter("u", str(user_loras["u"].path))
    for loras in ((), (("u", 0.9),)):
        eager_gen.generate(_spec(small_spec, "fast", loras))
        eager_gen.generate(_spec(small_spec, "turbo", loras))
        ours = eager_gen.generate(_spec(small_spec, "exact", loras))
        assert (ours.frames == plain.generate(_spec(small_spec, "exact", loras)).frames).all(), loras
        assert ours.speed["mode"] == "exact" and ours.speed["fp8"] is False and ours.speed["forwards_skipped"] == 0


def test_fast_kernels_are_used_in_fast_mode_only_and_under_loras(eager_gen, base, inputs, small_spec, user_loras):
    """On the eager path an adapter loaded after a fast request wraps the model's own Linear, and the fast
    copy goes inside the wrapper: fast + LoRA = rounded base + dW, exact + LoRA = base + dW."""
    lora = make_lora(user_loras["u"].path.parent / "late.safetensors", "ai-toolkit", dict(eager_gen._shapes), seed=93)
    eager_gen.modes.kernels.use(True)  # as if a mode's kernels were in place
    eager_gen.load_adapter("late", str(lora.path))
    assert eager_gen.modes.kernels.on is False
    try:
        fast = _forward(eager_gen, _spec(small_spec, "fast", [("late", 1.0)]), inputs)
        exact = _forward(eager_gen, _spec(small_spec, "exact", [("late", 1.0)]), inputs)
    finally:
        eager_gen.delete_adapter("late")
    assert (exact - forward(merged_copy(base.pipe.transformer, [(lora, 1.0)]), inputs)).abs().max() <= ATOL
    assert (fast - forward(merged_copy(rounded_copy(base.pipe.transformer), [(lora, 1.0)]), inputs)).abs().max() <= ATOL
    assert not torch.equal(fast, exact)


def test_an_evicted_active_adapter_leaves_the_base_model_not_the_distillation(
        eager_gen, base_out, inputs, small_spec, user_loras):
    """Deleting the active adapter (a LoRA set's eviction) makes peft activate another resident one, the
    distillation LoRA among them: the generator turns adapters off, so between requests the model stays
    exact mode's without a LoRA, and the next request sets its own adapters again."""
    lora = make_lora(user_loras["u"].path.parent / "evicted.safetensors", "ai-toolkit", dict(eager_gen._shapes),
                     seed=94)
    eager_gen.load_adapter("evicted", str(lora.path))
    _forward(eager_gen, _spec(small_spec, "exact", [("evicted", 1.0)]), inputs)
    eager_gen.delete_adapter("evicted")
    assert torch.equal(forward(eager_gen.pipe.transformer, inputs), base_out)
    assert torch.equal(_forward(eager_gen, _spec(small_spec, "exact"), inputs), base_out)


def test_disabled_and_unknown_modes_are_refused_before_anything_runs(generator, small_spec):
    assert generator.modes.enabled == ("exact", "fast")  # the defaults: turbo needs a LoRA file
    with pytest.raises(SpeedModeNotSupported) as e:
        generator.generate(_spec(small_spec, "turbo"))
    assert e.value.code == "SPEED_MODE_NOT_SUPPORTED" and e.value.details["allowed"] == ["exact", "fast"]


def test_turbo_refuses_another_step_count(eager_gen, small_spec):
    with pytest.raises(SpeedModeNotSupported, match="turbo runs 4 steps"):
        eager_gen.generate(small_spec(speed="turbo", steps=3, guidance_scale=1.0))


def test_fp8_on_cuda_without_torchao_is_a_clear_startup_error(monkeypatch, base):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails, installed or not
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(SpeedModeUnavailable, match="torchao is not installed"):
        torchao_fp8_converter(torch.device("cuda"))
    t = base.pipe.transformer
    # only when a mode that is on asks for FP8; and on CPU there is nothing to convert
    for speed in (SpeedConfig(), SpeedConfig(fast={"fp8": True})):
        with pytest.raises(SpeedModeUnavailable):
            SpeedModes(_Pipe(t), speed, torch.device("cuda"), None, [])
    for speed in (SpeedConfig(fast={"fp8": False}), SpeedConfig(fast={"enabled": False})):
        assert SpeedModes(_Pipe(copy.deepcopy(t)), speed, torch.device("cuda"), None, []).kernels is None
    modes = SpeedModes(_Pipe(copy.deepcopy(t)), SpeedConfig(), torch.device("cpu"), None, [])
    assert modes.kernels is None and "without the FP8 conversion" in modes.fp8_note


class _Pipe:
    def __init__(self, transformer):
        self.transformer = transformer


def test_a_mode_attention_backend_is_undone_exactly(model_cache, small_spec, inputs):
    """fast with its own attention backend, then exact: exact's processors are as they were, bit for bit."""
    gen = pipeline_mod.WanGenerator(load_tiny(model_cache), SpeedConfig(fast={"attention_backend": "_native_math"}))
    before = forward(gen.pipe.transformer, inputs)

    def backends():
        return [compat.processor_backend(p) for p in compat.attention_processors(gen.pipe.transformer)]

    states = backends()
    seen = set()
    hook = gen.pipe.transformer.register_forward_pre_hook(lambda *a: seen.update(
        getattr(backend, "value", None) for backend in backends()))
    try:
        fast = gen.generate(_spec(small_spec, "fast"))
    finally:
        hook.remove()
    assert seen == {"_native_math"} and fast.speed["attention_backend"] == "_native_math"
    gen.generate(_spec(small_spec, "exact"))
    assert backends() == states
    assert torch.equal(forward(gen.pipe.transformer, inputs), before)


@pytest.mark.full
@pytest.mark.compile
def test_compiled_modes_never_recompile_after_warmup(model_cache, small_spec, distill, user_loras):
    """The warm-up compiles every mode's graphs (kernels x distill LoRA x slot); alternating modes, with
    and without user LoRAs, then compiles nothing."""
    from deployments.speed import exact as speed_mod

    speed = SpeedConfig(attention_backend=None, warmup_width=64, warmup_height=48, warmup_frames=5,
                        lora_hotswap_rank=8, turbo={"enabled": True, "lora": str(distill.path)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "apply_speed_modes", lambda p, s, d: speed_mod._apply(p, s))
        gen = pipeline_mod.WanGenerator(load_tiny(model_cache), speed, convert=bf16_round)
    report = gen.speed_report["warmup"]
    assert {"base_s", "lora_s", "fast_base_s", "fast_lora_s", "turbo_base_s", "turbo_lora_s"} <= set(report)
    for name, lora in user_loras.items():
        gen.load_adapter(name, str(lora.path))
    requests = [("exact", ()), ("fast", (("u", 1.0),)), ("turbo", ()), ("turbo", (("u", 0.5), ("k", 1.0))),
                ("exact", (("k", 0.3),)), ("fast", ()), ("turbo", (("k", 1.0),)), ("exact", ())]
    torch._dynamo.config.error_on_recompile = True
    try:
        outs = {}
        for mode, loras in requests:
            outs.setdefault((mode, loras), gen.generate(_spec(small_spec, mode, loras)).frames)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert (outs["exact", ()] != outs["turbo", ()]).any()
