"""GPU benchmark of exact mode against the reference path, in one process on one card.

    python benchmarks/gpu_bench.py --out $OUT            # on the GPU machine (random-full, defaults)
    python benchmarks/gpu_bench.py --cpu-smoke --out /tmp/bench   # shake-out on CPU with the tiny model

Sections (each recorded in ``gpu_bench.json`` as soon as it finishes; one failing section does not
stop the others):

1. build      the full-size architecture with random weights (``random-full``) on the card;
2. ref_*      the plain ``WanImageToVideoPipeline`` in bf16, default attention, no compile, called
              exactly as the reference server calls it: one warm-up request (1 step), one whole
              default request (per-stage split, peak memory, final latents), then seconds per
              transformer forward on the inputs that request fed the transformer;
3. noise_*    the same forward with other attention backends (FlashAttention-4 too where installed),
              eager: the backend-to-backend noise
              floor for the error columns; truth_forward: the same forward in float32 (block by
              block, so it fits any card), the truth every error is also measured against;
4. ours_*     ``WanGenerator`` with the default ``SpeedConfig`` (attention ``auto``: FlashAttention-4
              where installed, else cuDNN; ``--attention`` picks another; compiled blocks,
              LoRA slot, warm-up at replica start): compile/warm-up seconds, per forward, one whole
              default request through ``generate`` (the product path), relative L2 errors;
5. lora       a rank-32 ai-toolkit LoRA on every block linear (random, ~360 MB) written to /tmp and
              loaded from disk, a switch between two resident adapters, a multiplier change, two
              adapters at once, one product-path generation, all with
              ``torch._dynamo.config.error_on_recompile = True``;
6. mode_*     the speed modes (``--modes``, default exact, fast, turbo), all installed in the one
              generator of section 4 and warmed up there: one whole request per mode with a rank-32
              user LoRA applied, same seed, in the order exact, fast, turbo: per-stage split, speed-up
              vs the reference request and vs exact mode, peak memory, transformer forwards computed
              and skipped, relative L2 error of the final latents and PSNR of the decoded frames
              against exact mode, graphs compiled (0: the warm-up covered the mode). Fast mode's skip
              schedule comes from MagCache's calibrated Wan 2.1 I2V 480P ratios (the config default),
              never from this run's random-weight activations; mode_fast also times one FP8 forward.
              Turbo runs its 4 distilled steps without CFG on a random distillation LoRA of the real
              one's shape (rank 64, LightX2V layout). On random weights these errors show that a mode
              computes what it should, not what its video looks like;
7. noise_request  (if time is left) the whole default request again on eager flash attention, for
              the noise floor of the final latents;
8. alt_casts  (if time is left) recompile with the other ``emulate_precision_casts`` setting and
              measure one forward's speed and errors.

``--only`` runs a subset (build always runs, ours_init whenever a later section needs it), e.g. the
modes in one ~9-minute device call at 41 frames:
    --only ref_warm,ref_request,mode_exact,mode_fast,mode_turbo
``--long`` is 81 frames and 40 steps (turbo: still its 4). ``--no-fp8`` runs fast/turbo without FP8
(no torchao on the machine). A compact table is printed last.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before transformers is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deployments.config import ModelConfig, SpeedConfig  # noqa: E402
from deployments.engine import pipeline as pipeline_mod  # noqa: E402
from deployments.engine.models import load_pipeline  # noqa: E402
from deployments.engine.pipeline import StageClock  # noqa: E402
from deployments.lora.files import linear_shapes  # noqa: E402
from deployments.spec import GenerationSpec, LoraRef  # noqa: E402
from deployments.speed import attention as attention_mod  # noqa: E402
from deployments.speed import exact as speed_mod  # noqa: E402

FLOP_ANCHOR = 665.5e12  # per forward at 832x480x41 (performance-anchors.md)



# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.results: dict = {"sections_failed": []}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self):
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=2, default=str))

    def section(self, name, fn, *args, **kwargs):
        log(f"== {name} (t={self.elapsed():.0f}s)")
        t = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except Exception as e:  # record and go on: one broken section must not lose the others
            traceback.print_exc()
            self.results["sections_failed"].append(name)
            self.results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            value = None
        else:
            if isinstance(value, dict):
                self.results[name] = {k: v for k, v in value.items() if not k.startswith("_")}
        if isinstance(self.results.get(name), dict):
            self.results[name]["section_s"] = round(time.perf_counter() - t, 2)
        self.save()
        log(f"   {name}: {json.dumps(self.results.get(name), default=str)[:600]}")
        return value


def log(msg: str):
    print(msg, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    return x


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "frames")}


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class StepCapture:
    """Keeps the last ``scheduler.step`` output: the final latents of a request."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.last = None
        self.steps = 0

    def __enter__(self):
        orig = type(self.scheduler).step.__get__(self.scheduler)

        def step(*args, **kwargs):
            out = orig(*args, **kwargs)
            latents = out[0] if isinstance(out, tuple) else out.prev_sample
            self.last = latents.detach().clone()
            self.steps += 1
            return out

        self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        del self.scheduler.step


class ForwardCapture:
    """Clones the inputs of the transformer's first forward (the cond pass of step 1)."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.args = None
        self.kwargs = None

    def __enter__(self):
        def pre(module, args, kwargs):
            if self.kwargs is None:
                self.args, self.kwargs = clone_tree(args), clone_tree(kwargs)

        self.handle = self.transformer.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def forward_flops(shapes: dict, cfg, tokens: int, text_tokens: int, image_tokens: int) -> float:
    """Multiply-adds x 2 of one transformer forward, counted from the layer shapes."""
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    total = 0.0
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for name, n in (
            ("attn1.to_q", tokens), ("attn1.to_k", tokens), ("attn1.to_v", tokens), ("attn1.to_out.0", tokens),
            ("attn2.to_q", tokens), ("attn2.to_out.0", tokens),
            ("attn2.to_k", text_tokens), ("attn2.to_v", text_tokens),
            ("attn2.add_k_proj", image_tokens), ("attn2.add_v_proj", image_tokens),
            ("ffn.net.0.proj", tokens), ("ffn.net.2", tokens),
        ):
            if p + name in shapes:
                fi, fo = shapes[p + name]
                total += 2.0 * n * fi * fo
        total += 4.0 * tokens * tokens * dim  # self-attention: QK^T and PV
        total += 4.0 * tokens * (text_tokens + image_tokens) * dim  # cross-attention
    fi, fo = shapes["proj_out"]
    total += 2.0 * tokens * fi * fo
    return total


def make_random_lora(fmt: str, shapes: dict, num_layers: int, rank: int, seed: int, path: str, device,
                     std_b: float = 3e-3, drop_page_cache: bool = True) -> int:
    """A random LoRA on every block linear (bf16) in layout ``fmt``, saved as safetensors; its bytes.

    ``ai-toolkit``: a user's LoRA. ``lightx2v``: a distillation LoRA (lora_down/lora_up, ``.alpha`` = rank,
    ``diff_b``): the shape of LightX2V's rank-64 Wan 2.1 I2V 4-step LoRA, not its numbers. With
    ``drop_page_cache`` the file leaves the page cache, so that a timed load reads the disk.
    """
    from safetensors.torch import save_file

    from deployments.lora.files import WAN_TO_DIFFUSERS
    from deployments.lora.writer import bias_key, file_keys

    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for i in range(num_layers):
        for native, diff in WAN_TO_DIFFUSERS.items():
            name = f"blocks.{i}.{diff}"
            if name not in shapes:
                continue
            fi, fo = shapes[name]
            key_a, key_b, key_alpha = file_keys(fmt, i, native)
            sd[key_a] = (torch.randn(rank, fi, generator=g, device=device) / math.sqrt(fi)).to(torch.bfloat16).cpu()
            sd[key_b] = (torch.randn(fo, rank, generator=g, device=device) * std_b).to(torch.bfloat16).cpu()
            if key_alpha is not None:
                sd[key_alpha] = torch.tensor(float(rank), dtype=torch.bfloat16)
            if fmt == "lightx2v":
                sd[bias_key(fmt, i, native)] = (torch.randn(fo, generator=g, device=device) * std_b).to(
                    torch.bfloat16).cpu()
    save_file(sd, path)
    if drop_page_cache:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return sum(t.numel() * t.element_size() for t in sd.values())


def psnr_db(a: np.ndarray, b: np.ndarray):
    """PSNR of uint8 frames ``a`` against ``b``, in dB ("inf" when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return "inf" if mse == 0 else round(10 * math.log10(255.0**2 / mse), 2)


def png_image(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def reference_call(pipe, spec, steps: int | None = None):
    """The pipeline call exactly as the reference server (and ``WanGenerator.generate``) makes it."""
    from PIL import Image

    from deployments.engine.pipeline import MAX_SEQUENCE_LENGTH

    image = Image.open(io.BytesIO(spec.image_png)).convert("RGB")
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    with torch.inference_mode():
        return pipe(
            image=image,
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            height=spec.height,
            width=spec.width,
            num_frames=spec.num_frames,
            num_inference_steps=steps or spec.steps,
            guidance_scale=spec.guidance_scale,
            generator=generator,
            output_type="np",
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )


def time_call(fn, device, warm: int, reps: int) -> tuple[float, list[float], object]:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warm`` untimed ones, every time, the last output."""
    out = None
    for _ in range(warm):
        out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times, out


def time_forward(transformer, inputs, device, warm: int, reps: int):
    """Median seconds of one transformer forward on the captured inputs, and its output."""
    args, kwargs = inputs
    with torch.inference_mode():
        med, times, out = time_call(lambda: transformer(*args, **kwargs), device, warm, reps)
    sample = out[0] if isinstance(out, tuple) else out.sample
    return med, [round(x, 4) for x in times], sample.detach().clone()


class _Fp32Block(torch.nn.Module):
    """Runs a float32 copy of a block (made per call, freed after): the fp32 forward fits any card."""

    def __init__(self, block):
        super().__init__()
        self.inner = [block]  # a list: not a child, so .to() never touches the real block

    def forward(self, *args, **kwargs):
        import copy

        block = copy.deepcopy(self.inner[0]).float()
        up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        args = [tuple(up(x) for x in v) if isinstance(v, tuple) else up(v) for v in args]
        out = block(*args, **{k: up(v) for k, v in kwargs.items()})
        del block
        return out


def fp32_truth_forward(transformer, inputs, device, ref_out):
    """The same forward in float32 (no TF32, memory-efficient attention): the truth for errors.

    The bf16 model is converted back exactly afterwards (bf16 -> fp32 -> bf16 is lossless); the
    second return value says whether a bf16 forward afterwards is bit-equal to one just before.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, _, before = time_forward(transformer, inputs, device, warm=0, reps=1)

    args, kwargs = inputs
    blocks = list(transformer.blocks)
    dtype = next(transformer.parameters()).dtype
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        for name, child in transformer.named_children():
            if name != "blocks":
                child.float()
        for _, p in transformer.named_parameters(recurse=False):
            p.data = p.data.float()
        transformer.blocks = torch.nn.ModuleList([_Fp32Block(b) for b in blocks])
        up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        backends = [SDPBackend.EFFICIENT_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]
        with torch.inference_mode(), sdpa_kernel(backends):
            out = transformer(*[up(x) for x in args], **{k: up(v) for k, v in kwargs.items()})
        sample = (out[0] if isinstance(out, tuple) else out.sample).detach().clone()
    finally:
        transformer.blocks = torch.nn.ModuleList(blocks)
        transformer.to(dtype)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    _, _, again = time_forward(transformer, inputs, device, warm=0, reps=1)
    return sample, bool(torch.equal(again, before))


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What the sections share: the arguments, the record, the device, the request, and what earlier
    sections made (``S``: tensors and objects by name; ``pipe``, ``tcfg`` and ``gen`` once built)."""

    a: argparse.Namespace
    B: Bench
    device: torch.device
    spec: GenerationSpec
    S: dict = field(default_factory=dict)
    pipe: object = None  # the loaded WanImageToVideoPipeline (build)
    tcfg: object = None  # its transformer's config
    gen: pipeline_mod.WanGenerator | None = None  # ours (ours_init)

    @property
    def R(self) -> dict:
        return self.B.results

    def want(self, name: str) -> bool:
        return not self.a.only or name in self.a.only


# ---------------------------------------------------------------------------------------------
# sections: each takes the context, returns its record (``Bench.section`` saves it)
# ---------------------------------------------------------------------------------------------


def build(c: BenchContext):
    loaded = load_pipeline(ModelConfig(source=c.a.source, device=c.a.device, cache_dir=c.a.cache_dir))
    c.S["loaded"] = loaded
    c.S["shapes"] = linear_shapes(loaded.pipe.transformer)
    n = sum(p.numel() for p in loaded.pipe.transformer.parameters())
    return {"load_s": round(loaded.load_seconds, 1), "dtype": str(loaded.dtype), "transformer_params_b": round(n / 1e9, 2)}


def ref_warm(c: BenchContext):
    t = time.perf_counter()
    with ForwardCapture(c.pipe.transformer) as cap:
        reference_call(c.pipe, c.spec, steps=1)
    sync(c.device)
    c.S["inputs"] = (cap.args, cap.kwargs)
    hs = cap.kwargs["hidden_states"]
    ctx = cap.kwargs["encoder_hidden_states"]
    img = cap.kwargs.get("encoder_hidden_states_image")
    pt, ph, pw = c.tcfg.patch_size
    tokens = (hs.shape[2] // pt) * (hs.shape[3] // ph) * (hs.shape[4] // pw)
    c.S["flops"] = forward_flops(c.S["shapes"], c.tcfg, tokens, ctx.shape[1], img.shape[1] if img is not None else 0)
    return {
        "seconds": round(time.perf_counter() - t, 2),
        "tokens": tokens,
        "text_tokens": ctx.shape[1],
        "image_tokens": img.shape[1] if img is not None else 0,
        "tflop_per_forward": round(c.S["flops"] / 1e12, 2),
    }


def whole_request(c: BenchContext, run):
    clock = StageClock(c.device)  # the product's own stage clock, so both sides split time alike
    handles = clock.attach(c.pipe)
    peak_reset(c.device)
    try:
        with StepCapture(c.pipe.scheduler) as cap:
            sync(c.device)
            clock.start("total")
            run()
            clock.stop("total")
    finally:
        for h in handles:
            h.remove()
    return cap, clock.totals


def ref_request(c: BenchContext):
    cap, totals = whole_request(c, lambda: reference_call(c.pipe, c.spec))
    c.S["ref_latents"] = cap.last
    return {
        "steps": c.a.steps,
        "forwards": 2 * c.a.steps if c.a.guidance > 1 else c.a.steps,
        "timings": {k: round(v, 3) for k, v in totals.items()},
        "peak_gib": peak_gib(c.device),
        "latents_finite": bool(torch.isfinite(cap.last).all()),
    }


def ref_forward(c: BenchContext):
    med, times, out = time_forward(c.pipe.transformer, c.S["inputs"], c.device, warm=1, reps=c.a.reps)
    c.S["ref_out"] = out
    return {"s_per_forward": round(med, 4), "times": times, "tflops": round(c.S["flops"] / med / 1e12, 1)}


def noise_forward(c: BenchContext):
    res = {}
    backends = ["_native_cudnn", "_native_flash", "_native_efficient"] if c.device.type == "cuda" else ["_native_math"]
    if attention_mod.flash4_unavailable(c.device) is None:
        backends.append(attention_mod.FLASH4)
    for backend in backends:
        try:
            attention_mod.set_backend(c.pipe.transformer, backend)
            med, times, out = time_forward(c.pipe.transformer, c.S["inputs"], c.device, warm=1, reps=max(1, c.a.reps - 1))
            c.S.setdefault("noise_outs", {})[backend.lstrip("_")] = out
            res[backend.lstrip("_")] = {
                "s_per_forward": round(med, 4),
                "rel_err_vs_ref": rel_l2(out, c.S["ref_out"]),
                "bit_equal_ref": bool(torch.equal(out, c.S["ref_out"])),
            }
        except Exception as e:
            res[backend.lstrip("_")] = {"error": f"{type(e).__name__}: {e}"[:500]}
    # reset_attention_backend leaves diffusers' process-wide active backend at the last one set
    # (flash4 here, which takes no float32: the truth forward below failed on it): native first
    c.pipe.transformer.set_attention_backend("native")
    c.pipe.transformer.reset_attention_backend()
    return res


def truth_forward(c: BenchContext):
    out, restored = fp32_truth_forward(c.pipe.transformer, c.S["inputs"], c.device, c.S["ref_out"])
    c.S["truth_out"] = out
    res = {"ref_rel_err_vs_fp32": rel_l2(c.S["ref_out"], out), "restored_bit_equal": restored}
    for name, o in c.S.get("noise_outs", {}).items():
        res[f"{name}_rel_err_vs_fp32"] = rel_l2(o, out)
    return res


def ours_init(c: BenchContext):
    turbo = {"enabled": False}
    if "turbo" in c.a.modes:
        c.S["distill_dir"] = tempfile.TemporaryDirectory(prefix="bench-distill-")
        path = os.path.join(c.S["distill_dir"].name, "distill.safetensors")
        c.S["distill_bytes"] = make_random_lora("lightx2v", c.S["shapes"], c.tcfg.num_layers, c.a.distill_rank, 300, path,
                                              c.device, drop_page_cache=False)
        turbo = {"enabled": True, "lora": path, "fp8": c.a.fp8}
    speed = SpeedConfig(
        attention_backend=c.a.attention,
        warmup_width=c.a.width, warmup_height=c.a.height, warmup_frames=c.a.frames, lora_hotswap_rank=c.a.slot_rank,
        fast={"enabled": "fast" in c.a.modes, "fp8": c.a.fp8}, turbo=turbo,
    )
    if c.device.type != "cuda":  # CPU smoke: force the CUDA-only path, without the cuDNN backend
        speed = speed.model_copy(update={"attention_backend": None})
        pipeline_mod.apply_speed_modes = lambda p, s, d: speed_mod._apply(p, s)
    g0 = unique_graphs()
    peak_reset(c.device)
    t = time.perf_counter()
    c.gen = pipeline_mod.WanGenerator(c.S["loaded"], speed)
    sync(c.device)
    c.S["gen"] = c.gen
    return {
        "init_s": round(time.perf_counter() - t, 2),
        "speed_report": c.gen.speed_report,
        "graphs_compiled": unique_graphs() - g0,
        "peak_gib": peak_gib(c.device),
        "distill_lora_bytes": c.S.get("distill_bytes"),
    }


def ours_forward(c: BenchContext):
    g0 = unique_graphs()
    med, times, out = time_forward(c.gen.pipe.transformer, c.S["inputs"], c.device, warm=1, reps=c.a.reps)
    c.S["ours_out"] = out
    ref = c.R.get("ref_forward", {}).get("s_per_forward")
    return {
        "s_per_forward": round(med, 4),
        "times": times,
        "tflops": round(c.S["flops"] / med / 1e12, 1),
        "ratio_vs_ref": round(med / ref, 3) if ref else None,
        "rel_err_vs_ref": rel_l2(out, c.S["ref_out"]) if "ref_out" in c.S else None,
        "rel_err_vs_fp32": rel_l2(out, c.S["truth_out"]) if "truth_out" in c.S else None,
        "graphs_compiled": unique_graphs() - g0,
    }


def ours_request(c: BenchContext):
    g0 = unique_graphs()
    c.gen.encodings.clear()  # a new picture, as the reference's request: its VAE encode is paid
    peak_reset(c.device)
    with StepCapture(c.gen.scheduler_for_spec(c.spec)) as cap:
        t = time.perf_counter()
        frames = c.gen.generate(c.spec)
        wall = time.perf_counter() - t
    c.S["ours_latents"] = cap.last
    ref = c.R.get("ref_request", {}).get("timings", {}).get("total")
    total = frames.timings.get("total", wall)
    return {
        "timings": frames.timings,
        "ratio_vs_ref": round(total / ref, 3) if ref else None,
        "peak_gib": peak_gib(c.device),
        "latents_rel_err_vs_ref": rel_l2(cap.last, c.S["ref_latents"]) if "ref_latents" in c.S else None,
        "graphs_compiled": unique_graphs() - g0,
    }


def lora(c: BenchContext):
    res: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="bench-lora-")  # own dir: runs side by side never collide
    paths = [os.path.join(tmp.name, f"lora{i}.safetensors") for i in range(2)]
    t = time.perf_counter()
    for i, path in enumerate(paths):
        res["file_bytes"] = make_random_lora("ai-toolkit", c.S["shapes"], c.tcfg.num_layers, c.a.lora_rank, 100 + i,
                                             path, c.device)
    res["write_files_s"] = round(time.perf_counter() - t, 2)
    base_out = c.S.get("ours_out")
    g0 = unique_graphs()
    torch._dynamo.config.error_on_recompile = True
    try:
        for i, path in enumerate(paths):
            t = time.perf_counter()
            c.gen.load_adapter(f"bench/lora{i}.safetensors", path)
            sync(c.device)
            res[f"load_{i}_s"] = round(time.perf_counter() - t, 3)

        def activate(loras):
            s = c.spec.model_copy(update={"loras": tuple(LoraRef(ref=r, multiplier=m) for r, m in loras)})
            sync(c.device)
            t = time.perf_counter()
            c.gen._activate(s)
            sync(c.device)
            return round(time.perf_counter() - t, 4)

        def fwd(reps=1):
            med, times, out = time_forward(c.gen.pipe.transformer, c.S["inputs"], c.device, warm=0, reps=reps)
            return med, out

        L0, L1 = "bench/lora0.safetensors", "bench/lora1.safetensors"
        res["apply_0_s"] = activate([(L0, 1.0)])
        med, out0 = fwd(reps=c.a.reps)
        res["s_per_forward_lora_on"] = round(med, 4)
        ours = c.R.get("ours_forward", {}).get("s_per_forward")
        res["slot_overhead_ratio"] = round(med / ours, 3) if ours else None
        if base_out is not None:
            res["lora0_rel_change_vs_base"] = rel_l2(out0, base_out)
        res["switch_to_1_s"] = activate([(L1, 1.0)])
        _, out1 = fwd()
        res["lora1_rel_diff_vs_lora0"] = rel_l2(out1, out0)
        res["multiplier_change_s"] = activate([(L1, 0.5)])
        _, out1h = fwd()
        res["lora1_half_rel_diff_vs_lora1"] = rel_l2(out1h, out1)
        res["switch_back_to_0_s"] = activate([(L0, 1.0)])
        _, out0b = fwd()
        res["switch_back_bit_equal"] = bool(torch.equal(out0b, out0))
        res["two_adapters_apply_s"] = activate([(L0, 1.0), (L1, 0.5)])
        _, out01 = fwd()
        res["two_adapters_rel_diff_vs_lora0"] = rel_l2(out01, out0)
        res["off_s"] = activate([])
        _, outb = fwd()
        if base_out is not None:
            res["off_bit_equal_base"] = bool(torch.equal(outb, base_out))
            res["off_rel_err_vs_base"] = rel_l2(outb, base_out)
        # the product path, one step, with an adapter
        t = time.perf_counter()
        c.gen.generate(c.spec.model_copy(update={"steps": 1, "loras": (LoraRef(ref=L1, multiplier=0.8),)}))
        res["generate_1step_with_lora_s"] = round(time.perf_counter() - t, 2)
        res["recompile_error"] = None
    except Exception as e:
        res["recompile_error"] = f"{type(e).__name__}: {e}"[:1500]
        traceback.print_exc()
    finally:
        torch._dynamo.config.error_on_recompile = False
    res["graphs_compiled"] = unique_graphs() - g0
    res["zero_recompiles"] = res["graphs_compiled"] == 0 and res["recompile_error"] is None
    res["resident_bytes_each"] = [r.nbytes for r in c.gen._resident.values()]
    res["slot_bytes"] = c.gen._slots.nbytes if c.gen._slots else None
    tmp.cleanup()
    c.gen._activate(c.spec)  # back to no LoRA
    return res


def user_lora(c: BenchContext) -> str:
    from deployments.spec import adapter_name

    ref = "bench/lora0.safetensors"  # the lora section's first adapter, if it ran
    if adapter_name(ref) not in c.gen.adapters:
        ref = "bench/mode-user.safetensors"
        with tempfile.TemporaryDirectory(prefix="bench-user-") as tmp:
            path = os.path.join(tmp, "user.safetensors")
            make_random_lora("ai-toolkit", c.S["shapes"], c.tcfg.num_layers, c.a.lora_rank, 100, path, c.device)
            c.gen.load_adapter(ref, path)
    return ref


def mode_spec(c: BenchContext, mode: str):
    update = {"speed": mode, "loras": (LoraRef(ref=user_lora(c), multiplier=1.0),)}
    if mode == "turbo":  # what the ingress makes of a turbo request: the distillation's steps, no CFG
        update.update(steps=c.gen.speed.turbo.steps, guidance_scale=1.0)
    return c.spec.model_copy(update=update)


def mode_run(c: BenchContext, mode: str):
    s = mode_spec(c, mode)
    g0 = unique_graphs()
    c.gen.encodings.clear()  # a new picture, as the reference's request: its VAE encode is paid
    peak_reset(c.device)
    with StepCapture(c.gen.scheduler_for_spec(s)) as cap:
        frames = c.gen.generate(s)
    c.S[f"{mode}_latents"], c.S[f"{mode}_frames"] = cap.last, frames.frames
    total = frames.timings.get("total")
    ref_total = c.R.get("ref_request", {}).get("timings", {}).get("total")
    exact_total = c.R.get("mode_exact", {}).get("timings", {}).get("total")
    res = {
        "steps": s.steps,
        "guidance_scale": s.guidance_scale,
        "user_lora_rank": c.a.lora_rank,
        "timings": frames.timings,
        "speed": frames.speed,
        "speedup_vs_ref": round(ref_total / total, 3) if ref_total and total else None,
        "speedup_vs_exact": round(exact_total / total, 3) if exact_total and total and mode != "exact" else None,
        "peak_gib": peak_gib(c.device),
        "graphs_compiled": unique_graphs() - g0,
    }
    if mode == "turbo":  # the same picture again (another seed): its kept VAE encoding is reused
        again = c.gen.generate(s.model_copy(update={"seed": s.seed + 1}))
        res["same_picture_again"] = {"timings": again.timings, "vae_encode_reused": again.speed["vae_encode_reused"]}
    if mode != "exact" and "exact_latents" in c.S:
        res["latents_rel_err_vs_exact"] = rel_l2(cap.last, c.S["exact_latents"])
        res["psnr_db_vs_exact"] = psnr_db(frames.frames, c.S["exact_frames"])
        res["note"] = "random weights: errors show the mode computes what it should, not how its video looks"
    return res


def mode_fast(c: BenchContext):
    res = mode_run(c, "fast")
    if "inputs" in c.S:  # one forward on the FP8 kernels (no LoRA, slot off), against the reference's
        c.gen._activate(c.spec)
        kernels = c.gen.modes.kernels
        if kernels is not None:
            kernels.use(True)
        try:
            med, times, out = time_forward(c.gen.pipe.transformer, c.S["inputs"], c.device, warm=1, reps=c.a.reps)
        finally:
            c.gen.modes.plain()
        ref = c.R.get("ref_forward", {}).get("s_per_forward")
        res["forward"] = {
            "fp8": kernels is not None,
            "s_per_forward": round(med, 4),
            "times": times,
            "ratio_vs_ref": round(med / ref, 3) if ref else None,
            "rel_err_vs_ref": rel_l2(out, c.S["ref_out"]) if "ref_out" in c.S else None,
        }
    return res


def parse_magcache(name: str) -> dict:
    """MagCache's own names for its settings: ``E024K6R02`` is threshold 0.24, K 6, retention ratio 0.2."""
    import re

    m = re.fullmatch(r"E(\d+)K(\d+)R(\d+)", name)
    if not m:
        raise ValueError(f"not a MagCache setting name (E..K..R..): {name!r}")
    e, k, r = m.groups()
    return {"threshold": int(e) / 100, "max_skips": int(k), "retention_ratio": int(r) / 10}


def fast_alt(c: BenchContext):
    """Fast mode under MagCache's other published Wan 2.1 I2V 480P settings (the schedule changes, nothing
    recompiles: skipping happens around the compiled blocks), each against exact mode at the same seed."""
    modes = c.gen.modes
    saved = modes.speed
    out = {}
    try:
        for name in c.a.fast_alt:
            cache = saved.fast.step_cache.model_copy(update=parse_magcache(name))
            modes.speed = saved.model_copy(update={"fast": saved.fast.model_copy(update={"step_cache": cache})})
            out[name] = mode_run(c, "fast")
    finally:
        modes.speed = saved
    return out


KERNEL_KINDS = (  # the first pattern a kernel's name contains names its kind
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "matmul")),
    ("fused elementwise (triton)", ("triton",)),
    ("copies", ("memcpy", "memset", "copy")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p in low for p in patterns):
            return kind
    return "other"


def profile_exact(c: BenchContext):
    """Where one exact-mode forward's time goes (compiled, warmed up): device time per kernel kind, the
    launches, and how much of the wall time the device is idle (the part CUDA graphs could remove)."""
    from torch.profiler import ProfilerActivity, profile

    args, kwargs = c.S["inputs"]
    transformer = c.gen.pipe.transformer
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.device.type == "cuda" else [])
    with torch.inference_mode():
        transformer(*args, **kwargs)
        sync(c.device)
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            transformer(*args, **kwargs)
            sync(c.device)
            wall = time.perf_counter() - t
    kinds: dict = {}
    launches, busy = 0, 0.0
    top: dict = {}
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        if dt is None or "CUDA" not in str(dt):
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if not us:
            continue
        launches += 1
        busy += us / 1e6
        k = kernel_kind(e.name)
        kinds[k] = kinds.get(k, 0.0) + us / 1e6
        top[e.name[:90]] = top.get(e.name[:90], 0.0) + us / 1e6
    res = {
        "wall_s": round(wall, 4),
        "device_busy_s": round(busy, 4),
        "device_idle_s": round(max(wall - busy, 0.0), 4),
        "kernels": launches,
        "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels_s": {k: round(v, 4) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]},
    }
    if c.device.type != "cuda":  # CPU: no device events; the op table stands in so the section runs its code
        res["note"] = "CPU: no device kernels; the profile's code ran"
        res["cpu_ops"] = len(prof.key_averages())
    return res


def alt_casts(c: BenchContext):
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "emulate_precision_casts"):
        return {"skipped": "torch._inductor.config.emulate_precision_casts not in this torch"}
    product = bool(inductor_config.emulate_precision_casts)
    c.gen._slots and c.gen._slots.apply([])
    torch.compiler.reset()
    inductor_config.emulate_precision_casts = not product
    try:
        t = time.perf_counter()
        with torch.inference_mode():
            c.gen.pipe.transformer(*c.S["inputs"][0], **c.S["inputs"][1])
        sync(c.device)
        compile_s = time.perf_counter() - t
        med, times, out = time_forward(c.gen.pipe.transformer, c.S["inputs"], c.device, warm=0, reps=c.a.reps)
    finally:
        inductor_config.emulate_precision_casts = product
    ref = c.R.get("ref_forward", {}).get("s_per_forward")
    return {
        "emulate_precision_casts": not product,
        "first_call_s": round(compile_s, 1),
        "s_per_forward": round(med, 4),
        "times": times,
        "ratio_vs_ref": round(med / ref, 3) if ref else None,
        "rel_err_vs_ref": rel_l2(out, c.S["ref_out"]) if "ref_out" in c.S else None,
        "rel_err_vs_fp32": rel_l2(out, c.S["truth_out"]) if "truth_out" in c.S else None,
    }


def noise_request(c: BenchContext):
    c.gen.encodings.clear()  # the pipeline's own VAE encode, timed by the stage hooks, as the reference's
    if c.gen._slots is not None:
        c.gen._slots.apply([])
    backend = "_native_flash" if c.device.type == "cuda" else "_native_math"
    c.pipe.transformer.set_attention_backend(backend)
    try:
        with torch.compiler.set_stance("force_eager"):
            cap, totals = whole_request(c, lambda: reference_call(c.pipe, c.spec))
    finally:
        if c.gen.speed_report.get("attention_backend"):
            attention_mod.set_backend(c.pipe.transformer, c.gen.speed_report["attention_backend"])
        else:
            c.pipe.transformer.reset_attention_backend()
    return {
        "backend": backend + " (eager)",
        "timings": {k: round(v, 3) for k, v in totals.items()},
        "latents_rel_err_vs_ref": rel_l2(cap.last, c.S["ref_latents"]),
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-bench"))
    ap.add_argument("--source", default="random-full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", default="/tmp/models")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=41)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--slot-rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed forwards per variant")
    ap.add_argument("--budget-s", type=float, default=540, help="skip optional sections past this")
    ap.add_argument("--noise-request", choices=["auto", "on", "off"], default="auto")
    ap.add_argument(
        "--alt-casts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="last: recompile with the other emulate_precision_casts setting; measure speed and error",
    )
    ap.add_argument("--modes", default="exact,fast,turbo", help="speed modes to install and measure (mode_* sections)")
    ap.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                    help="FP8 linears in fast/turbo (needs torchao on the card)")
    ap.add_argument("--distill-rank", type=int, default=64, help="rank of the random distillation LoRA (turbo)")
    ap.add_argument("--attention", default="auto", help="exact mode's speed.attention_backend (auto: FA4 if installed)")
    ap.add_argument("--fast-alt", default="E012K4R02,E024K6R02",
                    help="MagCache settings (its names) to run fast mode under too, after its default (fast_alt)")
    ap.add_argument("--long", action="store_true", help="81 frames and 40 steps (Wan's own defaults)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (build always; ours_init as needed)")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny model on CPU at tiny sizes, speed modes forced on (no attention backend): checks the harness",
    )
    a = ap.parse_args(argv)
    if a.long:
        a.frames, a.steps = 81, 40
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if "exact" not in a.modes:
        a.modes.insert(0, "exact")  # the baseline every mode is compared with
    a.only = sorted({x.strip() for x in a.only.split(",") if x.strip()})
    a.fast_alt = [x.strip() for x in a.fast_alt.split(",") if x.strip()]
    if a.cpu_smoke:
        a.source, a.device = "tiny", "cpu"
        a.width, a.height, a.frames, a.steps = 64, 48, 5, 3
        a.lora_rank, a.slot_rank, a.distill_rank = 4, 8, 4
        # Every section runs, whatever the budget: the smoke is there to run all the GPU run's code.
        a.noise_request, a.alt_casts = "on", True
        a.modes, a.only = ["exact", "fast", "turbo"], []
    return a


def start(a: argparse.Namespace) -> BenchContext:
    """The bench's record, with the environment written first, and the request every section runs."""
    import diffusers
    import peft
    import transformers

    torch._logging.set_logs(recompiles=True)
    B = Bench(Path(a.out), a.budget_s)
    R = B.results
    device = torch.device(a.device)
    R["env"] = {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "args": vars(a),
    }
    B.save()
    log(json.dumps(R["env"]))
    spec = GenerationSpec(
        prompt="a runner on a beach at sunset, handheld camera, slow motion",
        negative_prompt="blurry, low quality, static frame",
        width=a.width,
        height=a.height,
        num_frames=a.frames,
        fps=16,
        steps=a.steps,
        guidance_scale=a.guidance,
        seed=a.seed,
        image_png=png_image(a.width, a.height),
    )
    return BenchContext(a=a, B=B, device=device, spec=spec)


def run_sections(c: BenchContext) -> int:
    """Every wanted section in order, each recorded as it ends; the exit status (``summary``)."""
    # 1. build --------------------------------------------------------------------------------
    c.B.section("build", build, c)
    if "loaded" not in c.S:
        return 1
    c.pipe = c.S["loaded"].pipe
    c.tcfg = c.pipe.transformer.config

    # 2. reference path -----------------------------------------------------------------------
    if c.want("ref_warm"):
        c.B.section("ref_warm", ref_warm, c)

    if c.want("ref_request"):
        c.B.section("ref_request", ref_request, c)

    if c.want("ref_forward") and "inputs" in c.S:
        c.B.section("ref_forward", ref_forward, c)

    # 3. noise floor: other attention backends, eager -----------------------------------------
    if c.want("noise_forward") and "ref_out" in c.S:
        c.B.section("noise_forward", noise_forward, c)

    if c.want("truth_forward") and "ref_out" in c.S and (c.a.cpu_smoke or c.B.left() > 120):
        c.B.section("truth_forward", truth_forward, c)

    # 4. ours -----------------------------------------------------------------------------------
    later = ["ours_forward", "ours_request", "profile_exact", "lora", "fast_alt", *(f"mode_{m}" for m in c.a.modes),
             "noise_request", "alt_casts"]
    if not any(c.want(x) for x in later):
        c.R["total_s"] = round(c.B.elapsed(), 1)
        c.B.save()
        return summary(c.R)
    c.B.section("ours_init", ours_init, c)
    if "gen" not in c.S:
        c.B.save()
        return summary(c.R)
    c.gen = c.S["gen"]

    if c.want("ours_forward") and "inputs" in c.S:
        c.B.section("ours_forward", ours_forward, c)

    if c.want("ours_request"):
        c.B.section("ours_request", ours_request, c)

    if c.want("profile_exact") and "inputs" in c.S:
        c.B.section("profile_exact", profile_exact, c)

    # 5. LoRA on the compiled model ---------------------------------------------------------------
    if c.want("lora") and "inputs" in c.S:
        c.B.section("lora", lora, c)

    # 6. speed modes, each with a rank-32 user LoRA, against exact mode at the same seed ------------
    for mode in c.a.modes:
        if c.want(f"mode_{mode}"):
            if mode == "fast":
                c.B.section("mode_fast", mode_fast, c)
                if c.want("fast_alt") and c.a.fast_alt and "exact_latents" in c.S:
                    c.B.section("fast_alt", fast_alt, c)
            else:
                c.B.section(f"mode_{mode}", mode_run, c, mode)
    # Back to exact mode's state for what follows (it calls the pipeline directly): no LoRA, the
    # model's own kernels and attention, the request's sampler.
    c.gen._activate(c.spec)
    c.gen.modes.plain()
    c.pipe.scheduler = c.gen.scheduler_for(c.spec.sampler)

    # 7. noise floor of the whole request: the eager path with another attention kernel ----------
    ref_total = c.R.get("ref_request", {}).get("timings", {}).get("total", 0) or 0
    run_noise = c.a.noise_request == "on" or (c.a.noise_request == "auto" and c.B.left() > 1.25 * ref_total + 20)
    if not c.want("noise_request"):
        pass
    elif run_noise and "ref_latents" in c.S:

        c.B.section("noise_request", noise_request, c)
    else:
        why = f"time left {c.B.left():.0f}s" if "ref_latents" in c.S else "no reference latents (ref_request failed)"
        c.R["noise_request"] = {"skipped": "--noise-request off" if c.a.noise_request == "off" else why}

    # 8. experiment: the other inductor precision setting (recompiles everything) -------------------
    if c.want("alt_casts") and "inputs" in c.S and c.a.alt_casts and (c.a.cpu_smoke or c.B.left() > 90):
        c.B.section("alt_casts", alt_casts, c)

    c.R["total_s"] = round(c.B.elapsed(), 1)
    c.B.save()
    return summary(c.R)


def main(argv=None):
    return run_sections(start(parse_args(argv)))


def summary(R: dict) -> int:
    g = lambda *path: _get(R, *path)  # noqa: E731
    rows = []

    def row(what, ref, ours, ratio=None, target=None):
        rows.append((what, ref, ours, ratio, target))

    rf, of = g("ref_forward", "s_per_forward"), g("ours_forward", "s_per_forward")
    row("s / transformer forward", rf, of, g("ours_forward", "ratio_vs_ref"), "<= 0.72x")
    row("effective TFLOP/s", g("ref_forward", "tflops"), g("ours_forward", "tflops"))
    rt, ot = g("ref_request", "timings"), g("ours_request", "timings")
    for stage in ("total", "text_encode", "image_encode", "vae_encode", "denoise", "vae_decode"):
        row(
            f"request {stage} s",
            (rt or {}).get(stage),
            (ot or {}).get(stage),
            g("ours_request", "ratio_vs_ref") if stage == "total" else None,
            "<= 0.75x" if stage == "total" else None,
        )
    row("peak GPU GiB (request)", g("ref_request", "peak_gib"), g("ours_request", "peak_gib"))
    row("compile + warm-up s", None, g("ours_init", "init_s"))
    nf = g("noise_forward") or {}
    noise = [v.get("rel_err_vs_ref") for v in nf.values() if isinstance(v, dict) and v.get("rel_err_vs_ref")]
    row("rel L2 err, 1 forward", f"noise {min(noise):.4f}-{max(noise):.4f}" if noise else None, g("ours_forward", "rel_err_vs_ref"))
    tf = g("truth_forward") or {}
    row("rel L2 err vs fp32, 1 forward", tf.get("ref_rel_err_vs_fp32"), g("ours_forward", "rel_err_vs_fp32"))
    row("  flash / efficient vs fp32", tf.get("native_flash_rel_err_vs_fp32"), tf.get("native_efficient_rel_err_vs_fp32"))
    alt = f"emulate_casts={g('alt_casts', 'emulate_precision_casts')}"
    row(f"{alt} s/fwd", None, g("alt_casts", "s_per_forward"), g("alt_casts", "ratio_vs_ref"))
    row(f"{alt} err vs ref / fp32", g("alt_casts", "rel_err_vs_ref"), g("alt_casts", "rel_err_vs_fp32"))
    row(
        "rel L2 err, final latents",
        g("noise_request", "latents_rel_err_vs_ref") and f"noise {g('noise_request', 'latents_rel_err_vs_ref'):.4f}",
        g("ours_request", "latents_rel_err_vs_ref"),
    )
    row("LoRA load from disk s", None, g("lora", "load_0_s"), None, "<= 2 s")
    row("LoRA switch s", None, g("lora", "switch_to_1_s"), None, "<= 0.1 s")
    row("LoRA multiplier change s", None, g("lora", "multiplier_change_s"), None, "<= 0.05 s")
    row("LoRA zero recompiles", None, g("lora", "zero_recompiles"), None, "True")
    row("s / forward, LoRA on", None, g("lora", "s_per_forward_lora_on"), g("lora", "slot_overhead_ratio"))
    row("s / forward, FP8 kernels", rf, g("mode_fast", "forward", "s_per_forward"), g("mode_fast", "forward", "ratio_vs_ref"))
    row("  FP8 forward rel err vs ref", None, g("mode_fast", "forward", "rel_err_vs_ref"))
    for mode in ("exact", "fast", "turbo"):
        m = g(f"mode_{mode}")
        if not isinstance(m, dict) or "timings" not in m:
            continue
        sp = m.get("speed") or {}
        row(f"{mode} + LoRA: request s", (rt or {}).get("total"), m["timings"].get("total"), None,
            f"x{m.get('speedup_vs_ref')}" if m.get("speedup_vs_ref") else None)
        row(f"  {mode}: denoise s / forwards", None, m["timings"].get("denoise"),
            None, f"{sp.get('forwards_computed')}+{sp.get('forwards_skipped')}")
        if mode != "exact":
            row(f"  {mode}: latents err / PSNR dB", None, m.get("latents_rel_err_vs_exact"), None,
                m.get("psnr_db_vs_exact"))
        row(f"  {mode}: peak GiB, fp8", None, m.get("peak_gib"), None, sp.get("fp8"))

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    print(f"\ncard: {g('env', 'card')}  torch {g('env', 'torch')}  diffusers {g('env', 'diffusers')}")
    print(f"{'':32s} {'reference':>22s} {'ours':>10s} {'ratio':>7s} {'target':>10s}")
    for what, ref, ours, ratio, target in rows:
        print(f"{what:32s} {fmt(ref):>22s} {fmt(ours):>10s} {fmt(ratio):>7s} {fmt(target):>10s}")
    print(f"failed sections: {R.get('sections_failed')}  total {R.get('total_s')} s", flush=True)
    return 1 if R.get("sections_failed") else 0


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


if __name__ == "__main__":
    sys.exit(main())
