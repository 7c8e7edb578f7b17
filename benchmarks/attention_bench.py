"""Attention kernels and block GEMMs at Wan 2.1 I2V 480P's shapes, side by side on one card.

    python benchmarks/attention_bench.py --out $OUT           # on the GPU machine (needs torch only)
    python benchmarks/attention_bench.py --cpu-smoke --out /tmp/attn   # shake-out on CPU, tiny shapes

Sections (each in ``attention_bench.json`` as soon as it finishes):

1. attention  self-attention of one transformer pass, bf16, 40 heads of 128, at 17,160 tokens
              (832x480x41) and 32,760 (81 frames): every candidate installed here (torch SDPA on cuDNN,
              FlashAttention-2 and memory-efficient; FlashAttention-4 through the product's own op,
              ``deployments.speed.attention.flash4_attention``; SageAttention's 8-bit QK kernel if installed),
              seconds, TFLOP/s, and the relative L2 error against cuDNN (exact mode's fallback) and
              against a float32 computation of the same attention;
2. gemm       the block's linears (q/k/v/o 5120x5120, FFN 5120->13824->5120 at the video's tokens):
              cuBLAS through ``torch.mm`` against inductor's ``max-autotune`` choice, TFLOP/s of each:
              how much "tune the linears" can still give.

Inputs are random (unit normal q, k, v): the kernels' speed does not depend on the values, and their
error on such inputs is a bound, not a measure of the video.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_bench import rel_l2, sync, time_call  # noqa: E402


def log(msg: str) -> None:
    print(f"[attention_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def candidates(device) -> dict:
    """name -> (callable on (B, S, H, D) q, k, v, or the reason it cannot run here)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deployments.speed import attention

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return run

    out: dict = {}
    if device.type == "cuda":
        out["cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        out["flash2"] = sdpa(SDPBackend.FLASH_ATTENTION)
        out["efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
    else:
        out["math"] = sdpa(SDPBackend.MATH)
    why = attention.flash4_unavailable(device)
    out["flash4"] = why or (lambda q, k, v: attention.flash4_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1])))
    try:
        from sageattention import sageattn  # 1.0.x: Triton, INT8 Q.K^T per block, fp16 P.V

        out["sage_int8"] = (lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)) \
            if device.type == "cuda" else "needs CUDA (Triton)"
    except Exception as e:  # noqa: BLE001
        out["sage_int8"] = f"not installed ({type(e).__name__})"
    out["fp8_attention"] = ("not measured: FlashAttention-4's FP8 forward is sm100-only (its interface asserts "
                            "it), and cuDNN's FP8 SDPA needs the cudnn-frontend graph API, not installed here")
    return out


def attention_section(a, device, dtype) -> dict:
    res: dict = {"heads": a.heads, "head_dim": a.head_dim, "dtype": str(dtype), "shapes": {}}
    kernels = candidates(device)
    for tokens in a.tokens:
        gen = torch.Generator(device=device).manual_seed(tokens)
        q, k, v = (torch.randn(1, tokens, a.heads, a.head_dim, generator=gen, device=device, dtype=dtype)
                   for _ in range(3))
        flops = 4 * tokens * tokens * a.heads * a.head_dim
        # float32 truth, head by head so it fits any card (memory-efficient SDPA takes fp32)
        truth = torch.empty(q.shape, device=device, dtype=torch.float32)
        with torch.no_grad():
            for h in range(a.heads):
                sl = (slice(None), slice(None), slice(h, h + 1))
                truth[sl] = torch.nn.functional.scaled_dot_product_attention(
                    q[sl].float().transpose(1, 2), k[sl].float().transpose(1, 2),
                    v[sl].float().transpose(1, 2)).transpose(1, 2)
        row: dict = {}
        outs: dict = {}
        for name, fn in kernels.items():
            if isinstance(fn, str):
                row[name] = {"unavailable": fn}
                continue
            try:
                with torch.no_grad():
                    t_first = time.perf_counter()
                    fn(q, k, v)
                    sync(device)
                    first = time.perf_counter() - t_first
                    med, times, out = time_call(lambda: fn(q, k, v), device, a.warm, a.reps)
                outs[name] = out
                row[name] = {"s": round(med, 5), "times": [round(t, 5) for t in times],
                             "tflops": round(flops / med / 1e12, 1), "first_call_s": round(first, 3),
                             "rel_err_vs_fp32": round(rel_l2(out, truth), 6)}
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
        base = "cudnn" if "cudnn" in outs else next(iter(outs), None)
        for name, out in outs.items():
            row[name][f"rel_err_vs_{base}"] = round(rel_l2(out, outs[base]), 6)
            if base in row and "s" in row[base]:
                row[name][f"time_vs_{base}"] = round(row[name]["s"] / row[base]["s"], 3)
        res["shapes"][str(tokens)] = row
        del q, k, v, truth, outs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"attention {tokens} tokens: " + json.dumps({n: r.get("tflops", r.get("unavailable", r.get("error")))
                                                         for n, r in row.items()}))
    return res


def gemm_section(a, device, dtype) -> dict:
    import torch._inductor.config as inductor_config

    dim, ffn = a.dim, a.ffn_dim
    res: dict = {"tokens": a.tokens[0], "autotune": device.type == "cuda", "shapes": {}}
    tokens = a.tokens[0]
    for name, (k_in, n_out) in {"qkvo": (dim, dim), "ffn_up": (dim, ffn), "ffn_down": (ffn, dim)}.items():
        x = torch.randn(tokens, k_in, device=device, dtype=dtype)
        w = torch.randn(n_out, k_in, device=device, dtype=dtype) / math.sqrt(k_in)
        flops = 2 * tokens * k_in * n_out
        row: dict = {}
        with torch.no_grad():
            med, _, ref = time_call(lambda: torch.nn.functional.linear(x, w), device, a.warm, a.reps)
            row["cublas"] = {"s": round(med, 5), "tflops": round(flops / med / 1e12, 1)}
            try:
                torch._dynamo.reset()
                mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else None
                with inductor_config.patch({"max_autotune_gemm_backends": "ATEN,TRITON"} if mode else {}):
                    fn = torch.compile(lambda x, w: torch.nn.functional.linear(x, w), mode=mode, fullgraph=True)
                    t = time.perf_counter()
                    fn(x, w)
                    compile_s = time.perf_counter() - t
                med, _, out = time_call(lambda: fn(x, w), device, a.warm, a.reps)
                row["inductor"] = {"mode": mode or "default", "s": round(med, 5),
                                   "tflops": round(flops / med / 1e12, 1), "compile_s": round(compile_s, 1),
                                   "rel_err_vs_cublas": round(rel_l2(out, ref), 6),
                                   "time_vs_cublas": round(med / row["cublas"]["s"], 3)}
            except Exception as e:  # noqa: BLE001
                row["inductor"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        res["shapes"][f"{name} {tokens}x{k_in}x{n_out}"] = row
        log(f"gemm {name}: {json.dumps(row)}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: runs every section's code")
    ap.add_argument("--tokens", default="17160,32760", help="sequence lengths (832x480 at 41 and 81 frames)")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--ffn-dim", type=int, default=13824)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sections", default="attention,gemm")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.tokens, a.heads, a.head_dim, a.dim, a.ffn_dim, a.warm, a.reps = "64", 2, 16, 32, 64, 1, 2
    a.tokens = [int(t) for t in str(a.tokens).split(",")]
    device = torch.device("cpu" if a.cpu_smoke else "cuda")
    dtype = torch.bfloat16
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"sections_failed": [], "env": {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}}
    path = a.out / "attention_bench.json"
    for name, fn in (("attention", attention_section), ("gemm", gemm_section)):
        if name not in a.sections.split(","):
            continue
        t = time.perf_counter()
        try:
            results[name] = {**fn(a, device, dtype), "section_s": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001  one failing section does not stop the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            results["sections_failed"].append(name)
        path.write_text(json.dumps(results, indent=1))
    log(f"done; failed: {results['sections_failed']}")
    return 1 if results["sections_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
