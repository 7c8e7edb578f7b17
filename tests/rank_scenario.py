"""One rank of a parallel group on CPU (gloo), run as a script by tests/test_ranks.py.

Each rank loads the tiny checkpoint, joins the group, and for each layout given runs one generation
with the layout applied (a fresh pipeline each time), then writes what it made to
``OUT/rank<r>.pt``: per layout, the frames, the final latents, the tokens the last block saw, the
adapter fingerprint, and its place in the mesh.

Ring attention merges partial results with their log-sum-exp, which none of diffusers' CPU attention
backends returns; for a layout with ``ring_degree`` > 1 this script swaps in a CPU attention op that
does (``torch``'s CPU flash attention), so the ring's exchange and merge run here as on a GPU.

    python tests/rank_scenario.py --rank R --world 2 --init tcp://127.0.0.1:PORT --model-cache DIR \
        --out DIR --layouts '[{"degree": 2, "cfg_degree": 2}, ...]' [--lora FILE --multiplier M]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_attention_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' native forward op, on CPU, also returning the log-sum-exp (layout B, S, H)."""
    import torch

    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
    out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return (out, lse) if return_lse else out


def fast_mode():
    """Fast mode with a step cache that skips on the tiny model (what tests/test_ranks.py compares)."""
    from deployments.config import SpeedConfig

    return SpeedConfig(fast={"step_cache": {"threshold": 1.0, "max_skips": 1, "retention_ratio": 0.0}})


FAST_SPEC = {"speed": "fast", "steps": 4}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--model-cache", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layouts", required=True)
    p.add_argument("--lora", default=None)
    p.add_argument("--multiplier", type=float, default=0.7)
    p.add_argument("--fast", action="store_true", help="fast mode (its step cache) instead of exact mode")
    p.add_argument("--compile", action="store_true",
                   help="the GPU path on CPU: compiled blocks and the LoRA slot, warmed up after the split")
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    import diffusers.models.attention_dispatch as dispatch

    from deployments.engine.pipeline import WanGenerator
    from deployments.parallel.layout import ParallelConfig
    from deployments.parallel.ranks import Ranks, adapter_fingerprint, apply_parallel
    from deployments.spec import LoraRef
    from tests.conftest import load_tiny, tiny_spec

    global FAST
    FAST = fast_mode()
    native_op = dispatch._native_attention_forward_op
    results = []
    ranks = None
    for layout in json.loads(a.layouts):
        cfg = ParallelConfig(**layout)
        dispatch._native_attention_forward_op = cpu_attention_with_lse if cfg.ring_degree > 1 else native_op
        ranks = Ranks(cfg, a.rank, a.init, torch.device("cpu"))
        if a.compile:
            from deployments.config import SpeedConfig
            from deployments.engine import pipeline as pipeline_mod
            from deployments.speed import exact as speed_mod

            speed = SpeedConfig(attention_backend=None, warmup=False, warmup_width=64, warmup_height=48,
                                warmup_frames=5, lora_hotswap_rank=8)
            pipeline_mod.apply_speed_modes = lambda p, s, d: speed_mod._apply(p, s)
            gen = WanGenerator(load_tiny(a.model_cache), speed)
        elif a.fast:
            gen = WanGenerator(load_tiny(a.model_cache), FAST)
        else:
            gen = WanGenerator(load_tiny(a.model_cache))
        applied = apply_parallel(gen.pipe, ranks)
        graphs = {}
        if a.compile:
            from torch._dynamo.utils import counters

            gen.warmup()
            graphs["after_warmup"] = int(counters["stats"]["unique_graphs"])
            torch._dynamo.config.error_on_recompile = True
        loras = ()
        if a.lora:
            gen.load_adapter("scenario-lora", a.lora)
            loras = (LoraRef(ref="scenario-lora", multiplier=a.multiplier),)
        latents, tokens = [], []
        hooks = [gen.pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: latents.append(args[0].clone()))]
        if not a.compile:  # a hook inside a compiled block would be compiled into it
            hooks.append(gen.pipe.transformer.blocks[-1].register_forward_pre_hook(
                lambda m, args: tokens.append(args[0].shape[1])))
        frames = gen.generate(tiny_spec(loras=loras, **(FAST_SPEC if a.fast else {})))
        for h in hooks:
            h.remove()
        if a.compile:
            graphs["after_request"] = int(counters["stats"]["unique_graphs"])
        results.append({"graphs": graphs, "layout": cfg.model_dump(), "report": applied.report(), "coordinate": ranks.layout.coordinate,
                        "mesh_coordinate": list(ranks.mesh.get_coordinate()),
                        "frames": torch.from_numpy(frames.frames), "latents": latents[0], "block_tokens": tokens,
                        "fingerprint": adapter_fingerprint(gen)})
    # The same weights pass the startup check; one changed weight on one rank fails it on every rank.
    from deployments.parallel.ranks import check_same_weights

    check_same_weights(gen.pipe, ranks)
    if a.rank == 1:
        with torch.no_grad():
            next(gen.pipe.transformer.parameters()).view(-1)[0] += 1e-3
    try:
        check_same_weights(gen.pipe, ranks)
        weights_check = "passed"
    except RuntimeError as e:
        weights_check = f"raised: {e}"
    for r in results:
        r["changed_weights_check"] = weights_check
    ranks.barrier()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(results, a.out / f"rank{a.rank}.pt")
    ranks.close()


if __name__ == "__main__":
    main()
