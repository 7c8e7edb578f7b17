"""The seconds outside generation: one request's path through the served app, stage by stage.

    python benchmarks/gpu_serve_stages.py --out $OUT                   # GPU: random-full, 41 and 81 frames
    python benchmarks/gpu_serve_stages.py --cpu-smoke --out /tmp/ss    # CPU, tiny model (own Ray)
    python benchmarks/gpu_serve_stages.py --cpu-smoke --url URL ...    # against a running app (the suite)

One app (``build_app``), one GPU replica warmed up for every size measured. For each size (832x480,
41 and 81 frames; 2 denoising steps, CFG on: the overhead does not depend on the step count) and
each format (mp4, webp), one request: POST, status polled every ``--poll-s``, result read, video
downloaded. Recorded per request:

- client side: the submit's round trip, when the status first showed ``succeeded``, the download;
- server side, from the job's metadata: ``submit_s`` (validation, control image stored, the row) and
  ``timings[0].path`` (queued, dispatch, replica_wait, to_first_step, from_first_step, store) next to
  the replica's own stages (encoders, denoise, VAE decode, and ``encode_video``: what was left of the
  video encoding after the decode).

Overhead = end to end (POST sent .. video downloaded) - the replica's generation (``timings.total``:
the pipeline call, encoders through VAE decode). Targets (issue): <= 0.5 s at 41 frames (mp4),
<= 0.8 s at 81; video encoding of 81 frames <= 0.3 s or fully overlapped with the decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_serve_overhead import app_args, make_request  # noqa: E402


def one_request(http, request: dict, poll_s: float, timeout_s: float) -> dict:
    t0 = time.perf_counter()
    rid = http.post("/v1/inference", json=request).raise_for_status().json()["request_id"]
    t_submitted = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while (status := http.get(f"/v1/requests/{rid}/status").json())["status"] not in ("succeeded", "failed",
                                                                                      "canceled"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"request {rid} not final after {timeout_s} s")
        time.sleep(poll_s)
    t_final = time.perf_counter()
    if status["status"] != "succeeded":
        raise RuntimeError(f"request {rid}: {status}")
    result = http.get(f"/v1/requests/{rid}/result").json()
    t_result = time.perf_counter()
    video = http.get(f"/v1/requests/{rid}/outputs/0").content
    t_done = time.perf_counter()
    timings = result["metadata"]["timings"][0]
    generation = timings["total"]
    e2e = t_done - t0
    return {
        "client": {"submit_rtt_s": round(t_submitted - t0, 4), "until_succeeded_seen_s": round(t_final - t0, 4),
                   "result_read_s": round(t_result - t_final, 4), "download_s": round(t_done - t_result, 4),
                   "e2e_s": round(e2e, 4)},
        "server": {"submit_s": result["metadata"].get("submit_s"), "path": timings.get("path"),
                   "replica": {k: v for k, v in timings.items() if k != "path"}},
        "generation_s": generation,
        "overhead_s": round(e2e - generation, 4),
        "bytes": len(video),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, small sizes")
    p.add_argument("--url", default=None, help="an app already running (base URL): no Ray Serve started here")
    p.add_argument("--work", type=Path, default=Path("/tmp/serve-stages"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--frames", type=int, nargs="+", default=None, help="default: 41 81 (smoke: 5 9)")
    p.add_argument("--formats", nargs="+", default=["mp4", "webp"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="requests per size and format (the first warms caches)")
    p.add_argument("--poll-s", type=float, default=0.02)
    p.add_argument("--request-timeout-s", type=float, default=600)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.cache_dir or a.work / "models"
    source, device, width, height = ("tiny", "cpu", 64, 48) if a.cpu_smoke else ("random-full", "cuda", 832, 480)
    frames = a.frames or ([5, 9] if a.cpu_smoke else [41, 81])

    import httpx

    started_here = a.url is None
    if started_here:
        import ray
        from ray import serve

        from serve_app.app import build_app

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        args = app_args(source, device, cache, a.work, 1 if device == "cuda" else 0)
        speed = args["gpu"]["model"].setdefault("speed", {})
        speed.update(warmup_width=width, warmup_height=height, warmup_frames=frames[0],
                     extra_warmup_sizes=[[width, height, n] for n in frames[1:]])
        t0 = time.perf_counter()
        serve.run(build_app(args), name="wan-i2v", route_prefix="/")
        deploy_s = round(time.perf_counter() - t0, 2)
    http = httpx.Client(base_url=a.url or "http://127.0.0.1:8000", timeout=120)
    report: dict = {"source": source, "device": device, "steps": a.steps, "poll_s": a.poll_s, "rows": []}
    if started_here:
        report["deploy_s_incl_warmup"] = deploy_s
    try:
        for n in frames:
            for fmt in a.formats:
                for rep in range(a.repeats):
                    request = make_request(width, height, n, a.steps)
                    request["prompts"][0]["output_format"] = fmt
                    row = {"frames": n, "format": fmt, "repeat": rep,
                           **one_request(http, request, a.poll_s, a.request_timeout_s)}
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    (a.out / "serve_stages.json").write_text(json.dumps(report, indent=1))
    finally:
        if started_here:
            serve.shutdown()
            ray.shutdown()
    print(f"{'frames':>6} {'fmt':>5} {'gen s':>8} {'e2e s':>8} {'overhead s':>11} {'encode tail':>12}  path")
    for r in report["rows"]:
        if r["repeat"] == a.repeats - 1:
            path = " ".join(f"{k}={v:.3f}" for k, v in r["server"]["path"])
            print(f"{r['frames']:>6} {r['format']:>5} {r['generation_s']:>8.3f} {r['client']['e2e_s']:>8.3f} "
                  f"{r['overhead_s']:>11.3f} {r['server']['replica'].get('encode_video', 0):>12.3f}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
