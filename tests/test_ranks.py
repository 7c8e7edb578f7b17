"""A real 2-process gloo group on CPU (tiny model, fp32): the split paths give the one-rank result.

Both ranks run ``tests/rank_scenario.py`` (the product's ``Ranks`` + ``apply_parallel`` around an
ordinary ``WanGenerator``) with a LightX2V-style LoRA at multiplier 0.7 (block layers with bias
deltas, and the output head). CFG-parallel and Ulysses are compared bit for bit with the one-rank
generation: on CPU each rank computes the same per-token operations as one rank does (CFG: the same
pass; Ulysses: the same matrix rows and whole heads). Ring attention merges per-chunk softmaxes
through their log-sum-exp, a different order of floating-point sums, so it is compared within 1e-5
relative (fp32 rounding is ~1e-7 per operation).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_spec
from tests.services import free_port

SCENARIO = Path(__file__).with_name("rank_scenario.py")
LAYOUTS = [{"degree": 2, "cfg_degree": 2}, {"degree": 2, "ulysses_degree": 2}, {"degree": 2, "ring_degree": 2}]
MULTIPLIER = 0.7


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_shapes):
    from tests.lora_factory import make_lora

    path = tmp_path_factory.mktemp("rank-lora") / "lightx2v.safetensors"
    return make_lora(path, "lightx2v", tiny_shapes, seed=9).path


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory, model_cache, lora_file):
    """What each of the two ranks made, per layout."""
    return _run_ranks(tmp_path_factory.mktemp("ranks"), model_cache, lora_file, LAYOUTS)


def _run_ranks(out, model_cache, lora_file, layouts, *extra) -> list:
    import json

    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(SCENARIO), "--rank", str(r), "--world", "2", "--init", init, "--model-cache",
         str(model_cache), "--out", str(out), "--layouts", json.dumps(layouts), "--lora", str(lora_file),
         "--multiplier", str(MULTIPLIER), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_fast_mode_split_over_ranks_gives_the_one_rank_result(tmp_path, model_cache, lora_file):
    """Fast mode's step cache keeps and reuses the blocks' residual: under Ulysses on this rank's
    tokens only (a residual of the whole sequence failed with a size mismatch on 4 H100s), under CFG
    on this rank's branch."""
    from deployments.engine.pipeline import WanGenerator
    from deployments.spec import LoraRef
    from tests.conftest import load_tiny
    from tests.rank_scenario import FAST_SPEC, fast_mode

    layouts = [{"degree": 2, "cfg_degree": 2}, {"degree": 2, "ulysses_degree": 2}]
    got = _run_ranks(tmp_path, model_cache, lora_file, layouts, "--fast")
    gen = WanGenerator(load_tiny(model_cache), fast_mode())
    gen.load_adapter("scenario-lora", str(lora_file))
    one = gen.generate(tiny_spec(loras=(LoraRef(ref="scenario-lora", multiplier=MULTIPLIER),), **FAST_SPEC))
    assert one.speed["forwards_skipped"] > 0  # the cache really skipped
    for r in range(2):
        for layout in got[r]:
            assert torch.equal(layout["frames"], torch.from_numpy(one.frames)), (r, layout["layout"])


@pytest.fixture(scope="module")
def one_rank(generator, lora_file):
    """The one-rank generation of the same spec, with the same LoRA, and the tokens each block saw."""
    from deployments.spec import LoraRef

    latents, tokens = [], []
    pipe = generator.pipe
    hooks = [pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: latents.append(args[0].clone())),
             pipe.transformer.blocks[-1].register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape[1]))]
    generator.load_adapter("scenario-lora", str(lora_file))
    try:
        frames = generator.generate(tiny_spec(loras=(LoraRef(ref="scenario-lora", multiplier=MULTIPLIER),)))
    finally:
        generator.delete_adapter("scenario-lora")
        for h in hooks:
            h.remove()
    return {"frames": torch.from_numpy(frames.frames), "latents": latents[0], "block_tokens": tokens}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_ranks_sit_where_the_layout_says(ranks_out):
    for i, layout in enumerate(LAYOUTS):
        coords = [tuple(ranks_out[r][i]["mesh_coordinate"]) for r in range(2)]
        assert coords == [tuple(ranks_out[r][i]["coordinate"]) for r in range(2)], layout
    assert [tuple(ranks_out[r][0]["coordinate"]) for r in range(2)] == [(0, 0, 0), (1, 0, 0)]  # cfg
    assert [tuple(ranks_out[r][1]["coordinate"]) for r in range(2)] == [(0, 0, 0), (0, 0, 1)]  # ulysses
    assert [tuple(ranks_out[r][2]["coordinate"]) for r in range(2)] == [(0, 0, 0), (0, 1, 0)]  # ring


def test_every_rank_ends_with_the_same_latents_and_adapter_state(ranks_out):
    for i, layout in enumerate(LAYOUTS):
        r0, r1 = ranks_out[0][i], ranks_out[1][i]
        assert torch.equal(r0["latents"], r1["latents"]) and torch.equal(r0["frames"], r1["frames"]), layout
        assert r0["fingerprint"] == r1["fingerprint"], layout
        assert r0["fingerprint"]["adapters"] == ["scenario-lora"] and r0["fingerprint"]["lora_tensors"] > 0


def test_ranks_with_different_weights_are_refused_on_every_rank(ranks_out):
    for r in range(2):
        assert ranks_out[r][-1]["changed_weights_check"].startswith("raised: ranks loaded different weights")


def test_cfg_parallel_is_bit_exact_and_computes_one_pass_per_step(ranks_out, one_rank):
    steps = tiny_spec().steps
    for r in range(2):
        got = ranks_out[r][0]
        assert got["report"] == {"cfg_parallel": True, "context_parallel": None, "passes": steps}
        assert torch.equal(got["latents"], one_rank["latents"]) and torch.equal(got["frames"], one_rank["frames"])


def test_ulysses_is_bit_exact_and_each_rank_sees_half_the_tokens(ranks_out, one_rank):
    for r in range(2):
        got = ranks_out[r][1]
        assert got["report"]["context_parallel"] == {"ulysses": 2, "ring": 1}
        assert got["block_tokens"] == [n // 2 for n in one_rank["block_tokens"]]
        assert torch.equal(got["latents"], one_rank["latents"]) and torch.equal(got["frames"], one_rank["frames"])


def test_ring_is_within_fp32_rounding_and_each_rank_sees_half_the_tokens(ranks_out, one_rank):
    for r in range(2):
        got = ranks_out[r][2]
        assert got["report"]["context_parallel"] == {"ulysses": 1, "ring": 2}
        assert got["block_tokens"] == [n // 2 for n in one_rank["block_tokens"]]
        assert _rel(got["latents"], one_rank["latents"]) < 1e-5
        assert (got["frames"].int() - one_rank["frames"].int()).abs().max() <= 1


@pytest.mark.full
@pytest.mark.compile
def test_compiled_blocks_with_the_lora_slot_split_over_ranks(tmp_path, model_cache, lora_file, one_rank):
    """The GPU path (compiled blocks, fullgraph, the LoRA slot, warm-up after the split) over Ulysses:
    compiles, never recompiles for the LoRA request, and stays within compile noise of eager."""
    import json

    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(SCENARIO), "--rank", str(r), "--world", "2", "--init", init, "--model-cache",
         str(model_cache), "--out", str(tmp_path), "--layouts", json.dumps([LAYOUTS[1]]), "--lora", str(lora_file),
         "--multiplier", str(MULTIPLIER), "--compile"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)[0] for r in range(2)]
    for g in got:
        assert g["graphs"]["after_warmup"] > 0 and g["graphs"]["after_request"] == g["graphs"]["after_warmup"]
        assert _rel(g["latents"], one_rank["latents"]) < 1e-4, _rel(g["latents"], one_rank["latents"])
    assert torch.equal(got[0]["latents"], got[1]["latents"])
