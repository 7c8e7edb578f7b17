"""The Wan VAE alone: seconds of the encode and the decode a request runs, per variant, and their error.

    python benchmarks/vae_bench.py --out $OUT                       # GPU: the full-size VAE, random weights
    python benchmarks/vae_bench.py --cpu-smoke --out /tmp/vae       # the same code on CPU, the tiny VAE

Turbo's 4 forwards leave the VAE a third of the request (encode 0.65 s + decode 1.05 s of 6.07 s at 41
frames on an H100). Sections, for each size (832x480 at 41 and 81 frames):

- ``decode``: ``vae.decode`` of random latents under each variant: ``default`` (what diffusers does),
  ``cudnn_benchmark`` (cuDNN times its algorithms once per shape and keeps the fastest),
  ``channels_last`` (the product's ``speed.vae_channels_last``: weights NDHWC), and with
  ``--compile`` the decoder under ``torch.compile`` (last: it cannot be undone). Each: median seconds of
  ``--reps`` after a warm-up call, and the relative L2 of the frames against ``default``'s.
  Each variant's error is also taken against ``float32`` (a float32 copy of the VAE on float32 inputs):
  ``default``'s is the bf16 floor, a variant within it is within bf16 noise.
- ``encode``: the first frame plus black frames through ``vae.encode`` (the pipeline's input) under the
  same variants, then the product's ``EncodeCache``: seconds of a miss, of a hit (the key: a device
  reduction and a hash of the first frame on the host), and whether the hit is bit-equal.

Writes ``vae_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_bench import rel_l2, time_call  # noqa: E402
from deployments.speed.vae import EncodeCache, channels_last  # noqa: E402


def log(msg: str):
    print(msg, flush=True)


def load_vae(a, device: torch.device):
    """The full-size architecture with seeded random weights (GPU), or the tiny checkpoint's VAE (CPU)."""
    from diffusers import AutoencoderKLWan

    if a.source == "tiny":
        from deployments.engine.models import ensure_tiny

        return AutoencoderKLWan.from_pretrained(ensure_tiny(a.cache_dir) / "vae").to(device).eval()
    torch.manual_seed(0)
    with torch.device(device):
        return AutoencoderKLWan().to(torch.bfloat16).eval()



class Variant:
    """A way to run the VAE; ``enter`` sets it up, ``leave`` undoes it (where it can be undone)."""

    def __init__(self, name: str, benchmark: bool, channels_last: bool = False, compiled: bool = False):
        self.name, self.benchmark, self.channels_last, self.compiled = name, benchmark, channels_last, compiled

    def enter(self, vae):
        torch.backends.cudnn.benchmark = self.benchmark
        if self.channels_last:
            channels_last(vae)
        if self.compiled:
            vae.decoder.compile()
            vae.encoder.compile()

    def leave(self, vae):
        torch.backends.cudnn.benchmark = False
        if self.channels_last:
            channels_last(vae, on=False)


def variants(a) -> list[Variant]:
    out = [Variant("default", False), Variant("cudnn_benchmark", True), Variant("channels_last", False, True)]
    if a.compile:
        out.append(Variant("compiled", True, compiled=True))
    return out


def size_section(a, vae, device, frames: int) -> dict:
    t_lat = (frames - 1) // 4 + 1
    dtype = next(vae.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    z = torch.randn(1, vae.config.z_dim, t_lat, a.height // 8, a.width // 8, generator=g).to(device, dtype)
    image = (torch.rand(1, 3, 1, a.height, a.width, generator=g) * 2 - 1).to(device, dtype)
    video = torch.cat([image, image.new_zeros(1, 3, frames - 1, a.height, a.width)], dim=2)
    res: dict = {"frames": frames, "latent_shape": list(z.shape), "decode": {}, "encode": {}}
    base: dict = {}
    with torch.inference_mode():
        truth = truth_outputs(vae, z, video)
        for v in variants(a):
            try:
                v.enter(vae)
                for stage, fn in (("decode", lambda: vae.decode(z, return_dict=False)[0]),
                                  ("encode", lambda: vae.encode(video).latent_dist.mode())):
                    # one untimed call first: cuDNN's benchmark and compile happen in it
                    med, times, out = time_call(fn, device, 1, a.reps)
                    out = out.float()
                    rec = {"seconds": round(med, 4), "times": [round(x, 4) for x in times], "rel_l2_vs_float32": rel_l2(out, truth[stage])}
                    if v.name == "default":
                        base[stage] = out
                    else:
                        rec["rel_l2_vs_default"] = rel_l2(out, base[stage])
                        rec["x_default"] = round(med / res[stage]["default"]["seconds"], 3)
                    res[stage][v.name] = rec
                    log(f"{frames} frames {stage:6s} {v.name:16s} {med:.4f} s {rec.get('rel_l2_vs_default', '')}")
            except Exception as e:  # one variant failing (e.g. compile) leaves the others' numbers
                res.setdefault("errors", {})[v.name] = f"{type(e).__name__}: {str(e)[:400]}"
                log(f"{v.name} failed: {e}")
            finally:
                v.leave(vae)
        res["encode"]["cache"] = cache_section(a, vae, device, video, base.get("encode"))
    return res


def truth_outputs(vae, z, video) -> dict:
    """The decode and the encode of a float32 copy of the VAE (float32 inputs): the error floor's reference."""
    import copy

    ref = copy.deepcopy(vae).float()
    try:
        return {"decode": ref.decode(z.float(), return_dict=False)[0].float(),
                "encode": ref.encode(video.float()).latent_dist.mode().float()}
    finally:
        del ref


def cache_section(a, vae, device, video, expected) -> dict:
    """The product's EncodeCache around this VAE: a miss, then hits on the same input."""
    cache = EncodeCache(vae, size=4)
    try:
        encode = lambda: vae.encode(video).latent_dist.mode()  # noqa: E731
        miss_s, _, miss = time_call(encode, device, 0, 1)
        hit_s, _, hit = time_call(encode, device, 0, max(a.reps, 1))
        return {"miss_s": round(miss_s, 4), "hit_s": round(hit_s, 4),
                "hits": cache.hits, "misses": cache.misses, "hit_bit_equal_to_miss": bool(torch.equal(hit, miss)),
                "miss_rel_l2_vs_default": rel_l2(miss.float(), expected) if expected is not None else None}
    finally:
        cache.detach()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/vae-bench"))
    ap.add_argument("--source", default="random-full", choices=["random-full", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cache-dir", default="/tmp/models")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", default="41,81", help="comma-separated frame counts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--compile", action="store_true", help="also the torch.compile'd VAE (last; cannot be undone)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny VAE on CPU, 64x48, 5 frames, 1 rep")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.source, a.device, a.width, a.height, a.frames, a.reps = "tiny", "cpu", 64, 48, "5", 1
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    import diffusers

    R: dict = {"env": {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                       "torch": torch.__version__, "diffusers": diffusers.__version__,
                       "cudnn": torch.backends.cudnn.version(), "args": vars(a)}, "sizes": []}
    vae = load_vae(a, device)
    failed = 0
    for frames in [int(f) for f in a.frames.split(",")]:
        rec = size_section(a, vae, device, frames)
        R["sizes"].append(rec)
        failed += len([v for v in rec.get("errors", {}) if v != "compiled"])  # compile may fail: recorded
        (out / "vae_bench.json").write_text(json.dumps(R, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
