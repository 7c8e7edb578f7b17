"""Serving overhead: one request through the HTTP endpoint of the app vs a direct call of the core.

    python benchmarks/gpu_serve_overhead.py --out $OUT                 # GPU machine: random-full, defaults
    python benchmarks/gpu_serve_overhead.py --cpu-smoke --out /tmp/so   # shake-out on CPU, tiny model

Two phases in two processes, one after the other on the same card (the full-size model does not
fit twice on one GPU):
1. ``core``:  ``WanGenerator`` (default speed modes, warmed up) runs the request's spec, then the
   video is encoded: the time a user would wait without any serving around it.
2. ``serve``: Ray Serve with the real app (``build_app``), one GPU replica of the same source; the
   same request is POSTed, the status polled every 0.1 s, the result and the file downloaded.
Overhead = (serve end-to-end - core) / core. Results go to ``serve_overhead.json``.

``--url`` points the serve phase at an app that is already running (``serve run``, or the test
suite's session app) instead of starting Ray Serve here. That app must serve the model the core
phase loads (``tiny`` with ``--cpu-smoke``, else ``random-full``), and must not hold the card the
core phase needs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_request(width: int, height: int, frames: int, steps: int) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {
        "model": "wan21_i2v_14b480p",
        "prompts": [{
            "prompt": "a cinematic shot of a runner on a beach, handheld camera", "seed": 42,
            "width": width, "height": height, "num_frames": frames, "sample_steps": steps,
            "guidance_scale": 4.0, "ctrl_img": base64.b64encode(buf.getvalue()).decode(),
            # WebP: the GPU image has no imageio-ffmpeg, and its 30 MB wheel does not fit the
            # 64 MiB the tree may carry there; the same encoder runs in both phases.
            "output_format": "webp",
        }],
    }


def app_args(source: str, device: str, cache: Path, work: Path, num_gpus: float) -> dict:
    return {
        "gpu": {
            # Exact mode's serving overhead: the fast mode (FP8 copies, its warm-up) is gpu_bench.py's.
            "model": {"source": source, "device": device, "cache_dir": str(cache), "speed": {"fast": {"enabled": False}}},
            "replica": {"num_gpus": num_gpus, "num_cpus": 1, "health_check_timeout_s": 600},
            "lora": {"root": str(work / "loras"), "cache_dir": str(work / "lora-cache")},
        },
        "storage": {"outputs_dir": str(work / "videos"), "jobs_db": str(work / "jobs.sqlite3")},
        "limits": {"max_work": 10**12},
    }


def run_core(args) -> dict:
    import torch

    from deployments.engine.media_out import encode
    from deployments.engine.models import load_pipeline
    from deployments.engine.pipeline import WanGenerator
    from serve_app.config import AppConfig
    from serve_app.normalize import to_specs
    from serve_app.schemas import InferenceRequest

    cfg = AppConfig.model_validate(app_args(args.source, args.device, args.cache, args.work, 0))
    t0 = time.perf_counter()
    gen = WanGenerator(load_pipeline(cfg.gpu.model), cfg.gpu.model.speed)
    start_s = time.perf_counter() - t0
    request = make_request(args.width, args.height, args.frames, args.steps)
    spec = to_specs(InferenceRequest.model_validate(request), cfg)[0]
    if args.device == "cuda":
        torch.cuda.synchronize()
    if args.device != "cuda":
        gen.generate(spec)  # CPU: no warm-up at start, so pay the first call's one-time costs here
    t0 = time.perf_counter()
    frames = gen.generate(spec)
    data = encode(frames.frames, spec.fps, spec.output_format)
    seconds = time.perf_counter() - t0
    return {"replica_start_s": round(start_s, 2), "core_s": round(seconds, 3), "bytes": len(data),
            "timings": frames.timings}


def run_serve(args) -> dict:
    import httpx

    deploy_s = None
    if args.url is None:
        import ray
        from ray import serve

        from serve_app.app import build_app

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        t0 = time.perf_counter()
        gpus = 1 if args.device == "cuda" else 0
        serve.run(build_app(app_args(args.source, args.device, args.cache, args.work, gpus)), name="wan-i2v",
                  route_prefix="/")
        deploy_s = round(time.perf_counter() - t0, 2)
    request = make_request(args.width, args.height, args.frames, args.steps)
    http = httpx.Client(base_url=args.url or "http://127.0.0.1:8000", timeout=60)
    try:
        t0 = time.perf_counter()
        rid = http.post("/v1/inference", json=request).raise_for_status().json()["request_id"]
        submit_s = time.perf_counter() - t0
        deadline = time.monotonic() + args.request_timeout_s
        while http.get(f"/v1/requests/{rid}/status").json()["status"] not in ("succeeded", "failed", "canceled"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {rid} not final after {args.request_timeout_s} s")
            time.sleep(0.1)
        result = http.get(f"/v1/requests/{rid}/result").json()
        video = http.get(f"/v1/requests/{rid}/outputs/0").content
        e2e = time.perf_counter() - t0
    finally:
        if args.url is None:
            serve.shutdown()
            ray.shutdown()
    if result["status"] != "succeeded":
        raise RuntimeError(f"serve request failed: {result}")
    replica_s = sum(t.get("total", 0) + t.get("encode_video", 0) for t in result["metadata"]["timings"])
    return {"deploy_s": deploy_s, "submit_s": round(submit_s, 4), "serve_e2e_s": round(e2e, 3),
            "replica_inside_s": round(replica_s, 3), "bytes": len(video), "timings": result["metadata"]["timings"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, small sizes")
    p.add_argument("--url", default=None, help="an app already running (base URL): no Ray Serve started here")
    p.add_argument("--work", type=Path, default=Path("/tmp/serve-overhead"), help="LoRA/video/job dirs")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: WORK/models)")
    p.add_argument("--request-timeout-s", type=float, default=600)
    p.add_argument("--phase", choices=["core", "serve"], help="internal: run one phase in this process")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.cache = a.cache_dir or a.work / "models"
    if a.cpu_smoke:
        a.source, a.device, a.width, a.height, a.frames, a.steps = "tiny", "cpu", 64, 48, 5, 4
    else:
        a.source, a.device, a.width, a.height, a.frames, a.steps = "random-full", "cuda", 832, 480, 41, 25
    if a.phase:
        result = run_core(a) if a.phase == "core" else run_serve(a)
        (a.out / f"phase_{a.phase}.json").write_text(json.dumps(result, indent=1))
        return 0
    # Each phase in a process of its own: the full-size model does not fit twice on one card.
    base = [sys.executable, __file__, "--out", str(a.out), "--work", str(a.work), "--cache-dir", str(a.cache),
            "--request-timeout-s", str(a.request_timeout_s)]
    base += (["--cpu-smoke"] if a.cpu_smoke else []) + (["--url", a.url] if a.url else [])
    for phase in ("core", "serve"):
        subprocess.run(base + ["--phase", phase], check=True)
    core = json.loads((a.out / "phase_core.json").read_text())
    srv = json.loads((a.out / "phase_serve.json").read_text())
    summary = {
        "request": f"{a.width}x{a.height}, {a.frames} frames, {a.steps} steps, CFG 4.0, source {a.source}",
        "core_s": core["core_s"], "serve_e2e_s": srv["serve_e2e_s"], "replica_inside_s": srv["replica_inside_s"],
        "overhead_s": round(srv["serve_e2e_s"] - core["core_s"], 3),
        "overhead_ratio": round((srv["serve_e2e_s"] - core["core_s"]) / core["core_s"], 4),
        "core": core, "serve": srv,
    }
    (a.out / "serve_overhead.json").write_text(json.dumps(summary, indent=1))
    print(f"{'core (direct)':<24}{core['core_s']:>10.3f} s")
    print(f"{'through HTTP (e2e)':<24}{srv['serve_e2e_s']:>10.3f} s")
    print(f"{'overhead':<24}{summary['overhead_s']:>10.3f} s  ({100 * summary['overhead_ratio']:.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
