"""Fast mode's step cache (deployments/speed/step_cache.py): MagCache's rule, and skipping at run time.

The rule's expected schedules are worked out by hand from the ratios below (comments show the
arithmetic), and the default config's counts were computed with a line-by-line port of MagCache's
own loop (``magcache_forward`` in MagCache4Wan2.1/magcache_generate.py), not with this module.
"""

from __future__ import annotations

import pytest
import torch

from deployments.config import MAGCACHE_WAN21_I2V_480P, SpeedConfig, StepCacheConfig
from deployments.speed.step_cache import CachedBlocks, StepCache, magcache_schedule, resample_nearest

from .conftest import load_tiny
from .lora_factory import forward, transformer_inputs

T, F = True, False
# Four calibrated steps, cond and uncond interleaved.
COND = (1.0, 0.99, 0.98, 0.90)
UNCOND = (1.0, 0.95, 0.99, 0.99)
RATIOS = tuple(r for pair in zip(COND, UNCOND) for r in pair)


def test_resample_is_nearest_with_half_to_even():
    assert resample_nearest([1, 2, 3, 4], 7) == [1, 1, 2, 3, 3, 3, 4]  # indices round(i * 0.5): 0 0 1 2 2 2 3
    assert resample_nearest([1, 2, 3, 4], 4) == [1, 2, 3, 4]
    assert resample_nearest([1, 2, 3, 4], 2) == [1, 4]
    assert resample_nearest([1, 2, 3, 4], 1) == [4]


def test_rule_accumulates_error_per_branch():
    # cond:   step1 prod .99 err .01 skip; step2 prod .9702 err .0398 skip; step3 prod .87318 err .1666 compute
    # uncond: step1 prod .95 err .05 (not < .05) compute; step2 prod .99 err .01 skip; step3 prod .9801 err .0299 skip
    assert magcache_schedule(RATIOS, 4, 2, threshold=0.05, max_skips=2, retention_ratio=0) == [
        [T, T], [F, T], [F, F], [T, F]]


def test_rule_caps_consecutive_skips():
    # K = 1: the second skip in a row computes instead (and resets the accumulators)
    assert magcache_schedule(RATIOS, 4, 2, threshold=0.05, max_skips=1, retention_ratio=0) == [
        [T, T], [F, T], [T, F], [T, T]]


def test_rule_retains_the_first_forwards():
    # int(8 * 0.5) = 4 forwards = steps 0 and 1 of both branches; then cond: .98 skip, .882 compute;
    # uncond: .99 skip, .9801 (err .0299) skip
    assert magcache_schedule(RATIOS, 4, 2, threshold=0.05, max_skips=2, retention_ratio=0.5) == [
        [T, T], [T, T], [F, F], [T, F]]


def test_rule_without_cfg_uses_the_cond_ratios():
    assert magcache_schedule(RATIOS, 4, 1, threshold=0.05, max_skips=2, retention_ratio=0) == [[T], [F], [F], [T]]


def test_rule_never_skips_a_branch_first_forward_and_zero_threshold_skips_nothing():
    ones = (1.0,) * 8
    assert magcache_schedule(ones, 4, 2, threshold=1.0, max_skips=9, retention_ratio=0)[0] == [T, T]
    assert all(all(row) for row in magcache_schedule(RATIOS, 4, 2, threshold=0, max_skips=9, retention_ratio=0))


@pytest.mark.parametrize("steps, skipped", [(25, 32), (40, 50)])
def test_default_config_schedule_from_the_calibrated_ratios(steps, skipped):
    """The default (E 0.24, K 6, R 0.2 on MagCache's Wan 2.1 I2V 480P ratios: its E024K6R02) skips what
    MagCache's own loop skips at these step counts (computed with a port of its loop)."""
    c = StepCacheConfig()
    assert (c.threshold, c.max_skips, c.retention_ratio) == (0.24, 6, 0.2)
    assert tuple(c.mag_ratios) == MAGCACHE_WAN21_I2V_480P and len(c.mag_ratios) == 80
    schedule = magcache_schedule(c.mag_ratios, steps, 2, c.threshold, c.max_skips, c.retention_ratio)
    assert sum(not x for row in schedule for x in row) == skipped


@pytest.mark.parametrize("steps, skipped", [(25, 26), (40, 42)])
def test_the_closer_setting_schedule_from_the_calibrated_ratios(steps, skipped):
    """E 0.12, K 2 (the default before, for closer results): MagCache's loop's counts, from the same port."""
    c = StepCacheConfig(threshold=0.12, max_skips=2)
    schedule = magcache_schedule(c.mag_ratios, steps, 2, c.threshold, c.max_skips, c.retention_ratio)
    assert sum(not x for row in schedule for x in row) == skipped


def test_step_cache_config_rejects_bad_ratios():
    with pytest.raises(ValueError):
        StepCacheConfig(mag_ratios=[1.0, 0.9, 0.8])  # not pairs
    with pytest.raises(ValueError):
        StepCacheConfig(mag_ratios=[1.0, -1.0])


# -- at run time ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer(model_cache):
    return load_tiny(model_cache).pipe.transformer


@pytest.fixture(scope="module")
def cache(transformer):
    return StepCache(transformer)


def test_cached_blocks_keep_names_and_plain_iteration(model_cache, transformer, cache):
    assert isinstance(transformer.blocks, CachedBlocks)
    fresh = load_tiny(model_cache).pipe.transformer
    assert list(transformer.state_dict()) == list(fresh.state_dict())
    assert list(iter(transformer.blocks)) == [transformer.blocks[i] for i in range(len(transformer.blocks))]


def test_plain_forward_is_bit_equal_to_the_model_without_the_cache(model_cache, transformer, cache):
    other = load_tiny(model_cache).pipe.transformer
    inputs = transformer_inputs(seed=3)
    assert torch.equal(forward(transformer, inputs), forward(other, inputs))
    cache.begin([[T], [T]], branches=1)  # a schedule that computes everything: the same numbers too
    try:
        assert torch.equal(forward(transformer, inputs), forward(other, inputs))
    finally:
        run = cache.end()
    assert (run.computed, run.skipped) == (1, 0)


def test_skips_run_no_block_and_reuse_each_branch_residual(transformer, cache):
    calls = []
    hook = transformer.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    a, b = transformer_inputs(seed=1), transformer_inputs(seed=2)
    try:
        cache.begin([[T, T], [F, F], [F, T]], branches=2)
        outs = [forward(transformer, x) for x in (a, b, a, b, a, b)]  # cond, uncond per step
        run = cache.end()
    finally:
        hook.remove()
    assert len(calls) == 3 and (run.computed, run.skipped) == (3, 3) and run.skipped_forwards == [2, 3, 4]
    # a skipped forward on the same input as its branch's computed one gives (almost) the same output:
    # in + (out - in) rounds differently from out only in the last bits
    for i, j in ((0, 2), (1, 3), (0, 4)):
        assert torch.allclose(outs[i], outs[j], rtol=1e-5, atol=1e-6), (i, j)
    # and had the branches shared one residual, cond would have reused uncond's (a different input)
    assert (outs[0] - outs[1]).abs().max() > 1e-2
    assert torch.allclose(outs[5], outs[1], rtol=1e-5, atol=1e-6)  # computed again, same input
    assert not transformer.blocks.residuals and transformer.blocks.decision is None


def test_a_cfg_parallel_rank_follows_its_own_branch_schedule(transformer, cache):
    """On CFG-parallel rank 1 the step's first call computes the uncond branch (the second call is
    answered by the other rank without the blocks): the skips must be the uncond branch's."""
    calls = []
    hook = transformer.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    cache.blocks.cfg_rank = 1
    try:
        cache.begin([[T, T], [T, F], [F, T]], branches=2)
        for _ in range(3):
            forward(transformer, transformer_inputs(seed=1))
            cache._before_forward(transformer, ())  # what the module's call does before ranks answer it
        run = cache.end()
    finally:
        cache.blocks.cfg_rank = None
        hook.remove()
    assert len(calls) == 2 and (run.computed, run.skipped) == (2, 1) and run.skipped_forwards == [2]


def test_a_schedule_shorter_than_the_run_is_an_error(transformer, cache):
    cache.begin([[T]], branches=1)
    try:
        forward(transformer, transformer_inputs(seed=1))
        with pytest.raises(RuntimeError, match="past the step cache"):
            forward(transformer, transformer_inputs(seed=1))
    finally:
        cache.end()


@pytest.mark.parametrize("threshold, max_skips", [(0.0, 0), (0.12, 2), (1.0, 1)])
def test_fast_generation_computes_exactly_the_scheduled_forwards(model_cache, small_spec, threshold, max_skips):
    """A schedule skipping k of N forwards runs the blocks N - k times (counted on the blocks), and the
    result reports the same numbers."""
    from deployments.engine.pipeline import WanGenerator

    speed = SpeedConfig(fast={"step_cache": {"threshold": threshold, "max_skips": max_skips, "retention_ratio": 0.2}})
    gen = WanGenerator(load_tiny(model_cache), speed)
    steps = 6
    spec = small_spec(steps=steps, speed="fast")
    c = speed.fast.step_cache
    expected = magcache_schedule(c.mag_ratios, steps, 2, c.threshold, c.max_skips, c.retention_ratio)
    k = sum(not x for row in expected for x in row)
    calls = []
    hook = gen.pipe.transformer.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        frames = gen.generate(spec)
    finally:
        hook.remove()
    assert len(calls) == 2 * steps - k
    assert frames.speed["forwards_computed"] == 2 * steps - k and frames.speed["forwards_skipped"] == k
    assert frames.speed["mode"] == "fast" and frames.speed["step_cache"]["ratios_source"] == c.ratios_source
    if threshold == 0.0:
        assert k == 0
        assert (frames.frames == gen.generate(small_spec(steps=steps)).frames).all()  # nothing skipped: exact's frames
    else:
        assert k > 0
