"""The ``gpu.parallel`` config: the split of N GPUs, its validation at startup, and the rank arithmetic."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.config import GpuConfig
from deployments.parallel.layout import ParallelConfig, RankLayout, check_splittable, sequence_tokens


@pytest.mark.parametrize("degree, split", [(1, (1, 1, 1)), (2, (2, 1, 1)), (4, (2, 2, 1)), (8, (2, 4, 1))])
def test_default_split_is_cfg_then_ulysses(degree, split):
    p = ParallelConfig(degree=degree)
    assert (p.cfg_degree, p.ulysses_degree, p.ring_degree) == split
    assert p.sequence_degree == split[1] * split[2]


def test_an_explicit_split_is_kept_and_missing_factors_are_one():
    p = ParallelConfig(degree=4, cfg_degree=1, ulysses_degree=2, ring_degree=2)
    assert (p.cfg_degree, p.ulysses_degree, p.ring_degree, p.sequence_degree) == (1, 2, 2, 4)
    p = ParallelConfig(degree=2, ring_degree=2)
    assert (p.cfg_degree, p.ulysses_degree, p.ring_degree) == (1, 1, 2)
    # The dump validates to the same thing (the ingress and every replica re-validate it).
    assert ParallelConfig.model_validate(p.model_dump()) == p


@pytest.mark.parametrize("values, message", [
    ({"degree": 3}, "must divide the transformer's 40 attention heads"),
    ({"degree": 6}, "must divide the transformer's 40 attention heads"),
    ({"degree": 4, "cfg_degree": 2}, r"must equal cfg_degree x ulysses_degree x ring_degree \(2 x 1 x 1 = 2\)"),
    ({"degree": 2, "cfg_degree": 2, "ulysses_degree": 2}, "must equal"),
    ({"degree": 16, "attention_heads": 48}, "does not fit one node of 8 GPUs"),
    ({"degree": 4, "gpus_per_node": 2}, "does not fit one node of 2 GPUs"),
    ({"degree": 2, "attention_heads": 5}, "must divide the transformer's 5 attention heads"),
    ({"degree": 2, "cfg_degree": 3}, "less than or equal to 2"),
    ({"degree": 0}, "greater than or equal to 1"),
])
def test_bad_splits_are_refused_with_the_reason(values, message):
    with pytest.raises(ValidationError, match=message):
        ParallelConfig(**values)


def test_ranks_take_one_gpu_each():
    with pytest.raises(ValidationError, match="replica.num_gpus is per rank and must be 1"):
        GpuConfig(parallel={"degree": 2}, replica={"num_gpus": 2})
    GpuConfig(parallel={"degree": 2}, replica={"num_gpus": 1})
    GpuConfig(parallel={"degree": 1}, replica={"num_gpus": 2})  # one replica, one process: not our business


def test_a_bad_parallel_section_is_a_startup_error_of_the_app():
    from serve_app.app import build_app

    with pytest.raises(ValidationError, match="must divide the transformer's 40 attention heads"):
        build_app({"gpu": {"parallel": {"degree": 3}}})


def test_the_loaded_model_is_checked_too():
    # The config says 40 heads; a model with 2 (the tiny one) cannot take Ulysses over 4 ranks.
    p = ParallelConfig(degree=4)
    p.check_heads(40)
    with pytest.raises(ValueError, match="must divide the transformer's 2 attention heads"):
        p.check_heads(2)


def test_rank_layout_is_row_major_over_cfg_ring_ulysses():
    p = ParallelConfig(degree=8, cfg_degree=2, ring_degree=2, ulysses_degree=2)
    coords = [p.layout(r).coordinate for r in range(8)]
    assert coords == [(c, g, u) for c in range(2) for g in range(2) for u in range(2)]
    assert [p.layout(r).cfg_rank for r in range(8)] == [0] * 4 + [1] * 4
    assert [p.layout(r).sequence_rank for r in range(8)] == [0, 1, 2, 3] * 2
    assert p.layout(5).cfg_peers() == [1, 5]
    with pytest.raises(ValueError):
        RankLayout(8, 8, 2, 2, 2)


def test_sizes_must_split_over_the_sequence_ranks():
    assert sequence_tokens(832, 480, 41) == 11 * 30 * 52 == 17160
    assert sequence_tokens(832, 480, 81) == 21 * 30 * 52
    eight = ParallelConfig(degree=8, cfg_degree=1, ulysses_degree=8)
    assert check_splittable(eight, 832, 480, 41) is None and check_splittable(eight, 832, 480, 81) is None
    # 3 x 5 x 1 = 15 tokens: odd, so not over 2 ranks; CFG-only needs no split at all.
    assert "15 tokens" in check_splittable(ParallelConfig(degree=2, ulysses_degree=2), 80, 48, 1)
    assert check_splittable(ParallelConfig(degree=2), 80, 48, 1) is None
