"""Exact mode's attention choice, and FlashAttention-4's op wired through diffusers and torch.compile.

The FlashAttention-4 kernel itself needs a Hopper card (``benchmarks/attention_bench.py`` measures it
there). On CPU the op gets a math-SDPA kernel registered for the CPU device, which stands in for the
kernel only: what is tested is the wiring a GPU run depends on (diffusers' dispatch reaches the op from
every attention, compiled blocks keep it in one graph through its fake, exact mode's state is restored).
"""

from __future__ import annotations

import pytest
import torch

from deployments.config import CompileCacheConfig, SpeedConfig
from deployments.speed import attention
from deployments.speed.compile_cache import for_generator

from .conftest import load_tiny
from .lora_factory import forward, transformer_inputs

CALLS = {"n": 0}


@pytest.fixture(scope="module")
def cpu_kernel():
    """A CPU kernel for the op (math SDPA, (B, S, H, D) layout) that counts its calls."""

    def sdpa(query, key, value, scale):
        CALLS["n"] += 1
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).contiguous()

    attention.flash4_attention.register_kernel("cpu")(sdpa)
    return CALLS


def test_auto_takes_cudnn_or_the_default_where_flash4_cannot_run():
    assert attention.resolve("auto", "cpu") == (None, "device cpu")
    assert attention.resolve("_native_cudnn", "cpu") == ("_native_cudnn", None)
    assert attention.resolve(None, "cpu") == (None, None)
    assert "not sm90" not in (attention.flash4_unavailable("cpu") or "")


def test_flash4_asked_for_where_it_cannot_run_is_a_startup_error():
    with pytest.raises(ValueError, match="flash4 cannot run here: device cpu"):
        attention.resolve("flash4", "cpu")


def test_sequence_parallel_ranks_take_cudnn_for_auto_everywhere_and_refuse_flash4():
    speed = SpeedConfig(fast={"attention_backend": "auto"}, turbo={"attention_backend": "_native_flash"})
    ranks = attention.for_sequence_parallel(speed, "cuda")
    assert (ranks.attention_backend, ranks.fast.attention_backend, ranks.turbo.attention_backend) == (
        "_native_cudnn", "_native_cudnn", "_native_flash")
    assert ranks.fast.step_cache == speed.fast.step_cache  # only the attention changed
    for flash4 in (SpeedConfig(attention_backend="flash4"), SpeedConfig(fast={"attention_backend": "flash4"})):
        with pytest.raises(ValueError, match="sequence-parallel"):
            attention.for_sequence_parallel(flash4, "cuda")


def _math_then_flash4(model_cache, calls, seed: int, compile_blocks: bool):
    """One forward on math SDPA, then the same on ``flash4`` (compiled blocks if asked): both outputs and
    how many times the op ran."""
    import torch._dynamo

    loaded = load_tiny(model_cache)
    transformer = loaded.pipe.transformer
    inputs = transformer_inputs(seed=seed)
    with torch.no_grad():
        transformer.set_attention_backend("_native_math")
        expected = forward(transformer, inputs)
        attention.set_backend(transformer, attention.FLASH4)
        if compile_blocks:
            torch._dynamo.reset()
            # fullgraph: a graph break (dynamo tracing into the kernel) would be an error, not a slow path
            transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        before = calls["n"]
        got = forward(transformer, inputs)
    return expected, got, calls["n"] - before, transformer.config.num_layers


def test_flash4_backend_runs_every_attention_through_the_op(model_cache, cpu_kernel):
    expected, got, op_calls, layers = _math_then_flash4(model_cache, cpu_kernel, seed=3, compile_blocks=False)
    # self-attention and cross-attention (text; image when the model has image tokens) in every block
    assert op_calls >= 2 * layers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiled_blocks_keep_the_op_in_one_graph(model_cache, cpu_kernel):
    expected, got, op_calls, layers = _math_then_flash4(model_cache, cpu_kernel, seed=4, compile_blocks=True)
    assert op_calls >= 2 * layers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_compile_cache_keys_on_the_backend_chosen_not_on_auto(model_cache):
    class Gen:  # what for_generator reads of a WanGenerator
        def __init__(self, loaded, chosen):
            self.pipe, self.loaded, self.speed = loaded.pipe, loaded, SpeedConfig()
            self.speed_report = {"attention_backend": chosen}

    loaded = load_tiny(model_cache)
    cfg = CompileCacheConfig()
    keys = {chosen: for_generator(cfg, Gen(loaded, chosen)).key for chosen in ("flash4", "_native_cudnn")}
    assert keys["flash4"] != keys["_native_cudnn"]
