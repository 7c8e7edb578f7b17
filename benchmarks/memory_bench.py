"""Memory modes (``gpu.memory``) on one card: seconds, peak memory and error of one request per mode.

    python benchmarks/memory_bench.py --out $OUT                  # on the GPU machine (random-full)
    python benchmarks/memory_bench.py --cpu-smoke --out /tmp/mem  # the same code on CPU, tiny model

Each mode runs in a process of its own (a memory cap is per process, and each mode loads the model its
own way), in the order full, fp8, offload:

1. load     ``random-full`` (the 14B architecture, random weights, seeded: the same weights in every
            process) through ``load_pipeline(..., memory=mode)``; then, on CUDA, the process is capped
            with ``torch.cuda.set_per_process_memory_fraction`` (fp8: 46 GiB, offload: 22 GiB; full: no
            cap), standing in for a 48 GB and a 24 GB card;
2. start    ``WanGenerator`` as a replica makes it (compiled blocks and the LoRA slot in full and fp8;
            offload runs eagerly), warm-up included: seconds and peak memory;
3. request  one default request (832x480, 41 frames, 25 steps, CFG 4) with a rank-32 LoRA (ai-toolkit
            layout, random, the same file in every mode): seconds, per-stage split, peak allocated and
            reserved memory; the final latents and frames are kept for the comparison;
4. switch   another LoRA, one step, with ``error_on_recompile`` where compiled: graphs compiled (0) and
            pipeline loads (0) during the switch.

The parent then compares each mode's final latents (relative L2) and frames (PSNR) with full mode's on
the same inputs, and writes ``memory_bench.json``. On random weights the errors show each mode computes
what full mode computes, not how a video looks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_bench import (  # noqa: E402
    StepCapture,
    make_random_lora,
    peak_gib,
    peak_reset,
    png_image,
    psnr_db,
    rel_l2,
    sync,
    unique_graphs,
)

CAPS_GIB = {"full": None, "fp8": 46.0, "offload": 22.0}
MODES = ("full", "fp8", "offload")


def log(msg: str):
    print(msg, flush=True)


def architecture_shapes(source: str) -> tuple[dict, int]:
    """Linear shapes and block count of a source's transformer, built on the meta device (no memory)."""
    from diffusers import WanTransformer3DModel

    from deployments.engine.models import FULL_TRANSFORMER_CONFIG, TINY_TRANSFORMER_CONFIG
    from deployments.lora.files import linear_shapes

    config = TINY_TRANSFORMER_CONFIG if source == "tiny" else FULL_TRANSFORMER_CONFIG
    with torch.device("meta"):
        t = WanTransformer3DModel(**config)
    return linear_shapes(t), config["num_layers"]


def make_spec(a, loras=()):
    from deployments.spec import GenerationSpec

    return GenerationSpec(
        prompt="a runner on a beach at sunset, handheld camera, slow motion",
        negative_prompt="blurry, low quality, static frame",
        width=a.width, height=a.height, num_frames=a.frames, fps=16, steps=a.steps, guidance_scale=a.guidance,
        seed=a.seed, image_png=png_image(a.width, a.height), loras=loras,
    )


# ---------------------------------------------------------------------------------------------
# one mode, in its own process
# ---------------------------------------------------------------------------------------------


def child(a) -> int:
    from deployments.config import ModelConfig, SpeedConfig
    from deployments.engine.models import load_pipeline, pipeline_loads
    from deployments.engine.pipeline import WanGenerator
    from deployments.spec import LoraRef

    mode, work = a.child, Path(a.work)
    device = torch.device(a.device)
    res: dict = {"mode": mode}
    out = work / f"{mode}.json"

    def save():
        out.write_text(json.dumps(res, indent=2, default=str))

    try:
        t = time.perf_counter()
        loaded = load_pipeline(ModelConfig(source=a.source, device=a.device, cache_dir=a.cache_dir), memory=mode)
        sync(device)
        res["load"] = {"seconds": round(time.perf_counter() - t, 1), "memory": loaded.memory.describe()}
        cap = CAPS_GIB[mode] if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(device)
            res["load"]["allocated_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
            res["card_total_gib"] = round(total / 2**30, 2)
            if cap is not None:
                torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total, device.index or 0)
        res["cap_gib"] = cap
        save()

        speed = SpeedConfig(
            attention_backend=a.attention if device.type == "cuda" else None,
            compile_blocks=mode != "offload" and device.type == "cuda",
            warmup_width=a.width, warmup_height=a.height, warmup_frames=a.frames, lora_hotswap_rank=64,
            fast={"enabled": False}, turbo={"enabled": False},
        )
        peak_reset(device)
        t = time.perf_counter()
        gen = WanGenerator(loaded, speed)
        sync(device)
        res["start"] = {"seconds": round(time.perf_counter() - t, 1), "peak_gib": peak_gib(device),
                        "compiled": bool(gen.speed_report.get("compiled")),
                        "attention_backend": gen.speed_report.get("attention_backend")}
        save()

        refs = []
        for i in range(2):
            ref = f"bench/mem-lora{i}.safetensors"
            t = time.perf_counter()
            gen.load_adapter(ref, str(work / f"lora{i}.safetensors"))
            sync(device)
            res[f"lora{i}_load_s"] = round(time.perf_counter() - t, 2)
            refs.append(ref)

        res["adapter_dtype"] = str(next(p.dtype for n, p in gen.pipe.transformer.named_parameters() if "lora_A" in n))
        spec = make_spec(a, (LoraRef(ref=refs[0]),))
        peak_reset(device)
        with StepCapture(gen.scheduler_for_spec(spec)) as capture:
            t = time.perf_counter()
            frames = gen.generate(spec)
            wall = time.perf_counter() - t
        res["request"] = {
            "seconds": frames.timings.get("total", round(wall, 2)),
            "timings": frames.timings,
            "peak_allocated_gib": peak_gib(device),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            if device.type == "cuda" else None,
            "memory": frames.speed.get("memory"),
            "lora_rank": a.lora_rank,
        }
        torch.save(capture.last.cpu(), work / f"{mode}_latents.pt")
        np.save(work / f"{mode}_frames.npy", frames.frames)
        save()

        # A switch to the other LoRA: no graph compiled, no base model loaded again.
        loads, g0 = pipeline_loads(), unique_graphs()
        compiled = res["start"]["compiled"]
        torch._dynamo.config.error_on_recompile = compiled
        try:
            t = time.perf_counter()
            gen.generate(make_spec(a, (LoraRef(ref=refs[1], multiplier=0.8),)).model_copy(update={"steps": 1}))
            res["switch"] = {"generate_1step_s": round(time.perf_counter() - t, 2),
                             "graphs_compiled": unique_graphs() - g0, "pipeline_loads": pipeline_loads() - loads,
                             "error_on_recompile": compiled}
        finally:
            torch._dynamo.config.error_on_recompile = False
        res["memory_after"] = gen.memory.describe()
        save()
        return 0
    except Exception as e:
        traceback.print_exc()
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        if device.type == "cuda":
            res["peak_allocated_gib_at_error"] = peak_gib(device)
        save()
        return 1


# ---------------------------------------------------------------------------------------------
# the parent: one process per mode, then the comparison
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/memory-bench"))
    ap.add_argument("--source", default="random-full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", default="/tmp/models")
    ap.add_argument("--modes", default=",".join(MODES), help="run in this order (full is the baseline)")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=41)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--mode-timeout-s", type=float, default=400)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU at tiny sizes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.source, a.device = "tiny", "cpu"
        a.width, a.height, a.frames, a.steps, a.lora_rank = 64, 48, 5, 3, 4
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        return child(a)

    import diffusers

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    R: dict = {"env": {"card": torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu",
                       "torch": torch.__version__, "diffusers": diffusers.__version__, "args": vars(a)},
               "sections_failed": []}

    def save():
        (out / "memory_bench.json").write_text(json.dumps(R, indent=2, default=str))

    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    shapes, layers = architecture_shapes(a.source)
    for i in range(2):  # the same LoRA files for every mode
        R["env"]["lora_bytes"] = make_random_lora("ai-toolkit", shapes, layers, a.lora_rank, 100 + i,
                                                  str(work / f"lora{i}.safetensors"), "cpu", drop_page_cache=False)
    save()
    base = [sys.executable, str(Path(__file__).resolve())] + [x for x in (argv if argv is not None else sys.argv[1:])
                                                              if x != "--cpu-smoke"]
    smoke = ["--source", a.source, "--device", a.device, "--width", str(a.width), "--height", str(a.height),
             "--frames", str(a.frames), "--steps", str(a.steps), "--lora-rank", str(a.lora_rank)]
    for mode in modes:
        log(f"== {mode}")
        t = time.perf_counter()
        try:
            proc = subprocess.run(base + smoke + ["--child", mode, "--work", str(work)], timeout=a.mode_timeout_s,
                                  cwd=ROOT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        path = work / f"{mode}.json"
        r = json.loads(path.read_text()) if path.exists() else {"error": f"no result (exit {rc})"}
        if rc != 0 and "error" not in r:
            r["error"] = f"process exit {rc}"
        r["process_s"] = round(time.perf_counter() - t, 1)
        if "error" in r:
            R["sections_failed"].append(mode)
        R[mode] = r
        save()
        log(f"   {mode}: {json.dumps(r, default=str)[:800]}")
    # Compared once all have run: full runs last on the card (the new modes' failures show first).
    for mode in modes:
        r, full = R[mode], R.get("full") or {}
        latents, frames = work / f"{mode}_latents.pt", work / f"{mode}_frames.npy"
        if mode != "full" and latents.exists() and (work / "full_latents.pt").exists():
            r["latents_rel_l2_vs_full"] = rel_l2(torch.load(latents), torch.load(work / "full_latents.pt"))
            r["psnr_db_vs_full"] = psnr_db(np.load(frames), np.load(work / "full_frames.npy"))
        full_s = full.get("request", {}).get("seconds")
        if mode != "full" and full_s and "request" in r:
            r["seconds_vs_full"] = round(r["request"]["seconds"] / full_s, 3)
    save()
    return summary(R, modes)


def summary(R: dict, modes) -> int:
    print(f"\ncard: {R['env']['card']}  torch {R['env']['torch']}")
    print(f"{'mode':8s} {'cap GiB':>8s} {'request s':>10s} {'x full':>7s} {'peak alloc':>11s} {'peak resv':>10s} "
          f"{'start s':>8s} {'rel L2':>8s} {'PSNR dB':>8s} {'switch graphs/loads':>20s}")
    for m in modes:
        r = R.get(m) or {}
        req, sw = r.get("request") or {}, r.get("switch") or {}
        cells = [r.get("cap_gib"), req.get("seconds"), r.get("seconds_vs_full"), req.get("peak_allocated_gib"),
                 req.get("peak_reserved_gib"), (r.get("start") or {}).get("seconds"), r.get("latents_rel_l2_vs_full"),
                 r.get("psnr_db_vs_full"), f"{sw.get('graphs_compiled')}/{sw.get('pipeline_loads')}"]
        fmt = [("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))) for v in cells]
        print(f"{m:8s} {fmt[0]:>8s} {fmt[1]:>10s} {fmt[2]:>7s} {fmt[3]:>11s} {fmt[4]:>10s} {fmt[5]:>8s} {fmt[6]:>8s} "
              f"{fmt[7]:>8s} {fmt[8]:>20s}")
        if r.get("error"):
            print(f"   error: {r['error'][:300]}")
    print(f"failed: {R['sections_failed']}", flush=True)
    return 1 if R["sections_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
