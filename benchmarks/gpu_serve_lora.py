"""LoRAs through the served app on a GPU: multiplexed adapters on the compiled model, over HTTP.

    python benchmarks/gpu_serve_lora.py --out $OUT                  # GPU machine: random-full
    python benchmarks/gpu_serve_lora.py --cpu-smoke --out /tmp/sl    # shake-out on CPU, tiny model

One GPU replica of the real app (compiled and warmed up before ready). Two random rank-32
ai-toolkit LoRAs on every block linear are written to the LoRA root; then a sequence of requests at
the warm-up size (832x480, 41 frames, 2 steps): no LoRA, A, A at 0.5, B, A + B, A again, no LoRA.
After each, the replica's counters: pipeline loads (counted by ``load_pipeline`` itself), adapter
loads and graphs compiled (dynamo). The claim checked, and the exit status: every request succeeds,
each adapter loads once, switching and multipliers load nothing, nothing recompiles after warm-up,
the base model is never reloaded (same replica process, pipeline loads unchanged). Results go to
``serve_lora.json``.

``--url`` (with ``--app-name`` and ``--lora-root``) uses an app already running on this machine's
Ray cluster (``serve run``, or the test suite's session app) instead of starting Ray Serve here: the
LoRAs are written under its LoRA root and counters are read as differences from the start.
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


def write_loras(root: Path, source: str, rank: int) -> list[str]:
    """Two random ai-toolkit LoRAs for the configured architecture under ``root/bench``; returns their refs."""
    import torch
    from diffusers import WanTransformer3DModel

    from benchmarks.gpu_bench import make_random_lora
    from deployments.engine.models import FULL_TRANSFORMER_CONFIG, TINY_TRANSFORMER_CONFIG
    from deployments.lora.files import linear_shapes

    config = FULL_TRANSFORMER_CONFIG if source == "random-full" else TINY_TRANSFORMER_CONFIG
    with torch.device("meta"):
        shapes = linear_shapes(WanTransformer3DModel(**config))
    # A folder of its own: a shared LoRA root (a running app's) keeps its other files apart.
    (root / "bench").mkdir(parents=True, exist_ok=True)
    refs = []
    for seed, name in enumerate(("bench/lora_a.safetensors", "bench/lora_b.safetensors")):
        make_random_lora("ai-toolkit", shapes, config["num_layers"], rank, seed, str(root / name), "cpu", std_b=0.02)
        refs.append(name)
    return refs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--extra-size", default=None, help="WxHxF: also warm up (and request) this size")
    p.add_argument("--url", default=None, help="an app already running (base URL): no Ray Serve started here")
    p.add_argument("--app-name", default="wan-i2v", help="with --url: the Serve application's name")
    p.add_argument("--lora-root", type=Path, default=None, help="with --url: the app's LoRA root")
    p.add_argument("--work", type=Path, default=Path("/tmp/serve-lora"), help="LoRA/video/job dirs")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: WORK/models)")
    p.add_argument("--request-timeout-s", type=float, default=600)
    a = p.parse_args(argv)
    if a.url and a.lora_root is None:
        p.error("--url needs --lora-root (where that app reads its LoRAs)")
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work
    if a.cpu_smoke:
        source, device, size, rank, gpus = "tiny", "cpu", (64, 48, 5), 4, 0
    else:
        source, device, size, rank, gpus = "random-full", "cuda", (832, 480, 41), 32, 1

    t0 = time.perf_counter()
    lora_a, lora_b = write_loras(a.lora_root or work / "loras", source, rank)
    write_s = time.perf_counter() - t0

    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppConfig

    args = app_args(source, device, a.cache_dir or work / "models", work, gpus)
    extra = tuple(int(v) for v in a.extra_size.split("x")) if a.extra_size else None
    if extra:
        args["gpu"]["model"]["speed"]["extra_warmup_sizes"] = [list(extra)]
    deploy_s = None
    if a.url:
        AppConfig.model_validate(args)  # not deployed here, but what the GPU run deploys must stay valid
        if not ray.is_initialized():
            ray.init(address="auto", log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})
        t0 = time.perf_counter()
        serve.run(build_app(args), name=a.app_name, route_prefix="/")
        deploy_s = round(time.perf_counter() - t0, 2)
    handle = serve.get_deployment_handle("WanI2V", a.app_name)
    http = httpx.Client(base_url=a.url or "http://127.0.0.1:8000", timeout=60)

    def run(label: str, loras: list[tuple[str, float]], at: tuple[int, int, int] = size) -> dict:
        request = make_request(*at, steps=2)
        request["loras"] = [{"path": ref, "network_multiplier": m} for ref, m in loras]
        t = time.perf_counter()
        rid = http.post("/v1/inference", json=request).raise_for_status().json()["request_id"]
        deadline = time.monotonic() + a.request_timeout_s
        while http.get(f"/v1/requests/{rid}/status").json()["status"] not in ("succeeded", "failed", "canceled"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: request {rid} not final after {a.request_timeout_s} s")
            time.sleep(0.05)
        e2e = time.perf_counter() - t
        result = http.get(f"/v1/requests/{rid}/result").json()
        stats = handle.stats.remote().result()
        row = {"request": label, "status": result["status"], "e2e_s": round(e2e, 3),
               "replica_total_s": result["metadata"]["timings"][0]["total"] if result["status"] == "succeeded" else None,
               "error": result.get("error"), "pid": stats["pid"], "pipeline_loads": stats["pipeline_loads"],
               "adapter_loads": stats["adapter_loads"], "compiled_graphs": stats["compiled_graphs"]}
        print(json.dumps(row), flush=True)
        return row

    try:
        start = handle.stats.remote().result()
        rows = [
            run("no LoRA", []),
            run("A", [(lora_a, 1.0)]),
            run("A at 0.5", [(lora_a, 0.5)]),
            run("B", [(lora_b, 1.0)]),
            run("A + B", [(lora_a, 0.7), (lora_b, 0.7)]),
            run("A again", [(lora_a, 1.0)]),
            run("no LoRA again", []),
        ]
        if extra:
            rows += [run(f"{label} at {a.extra_size}", loras, extra)
                     for label, loras in (("no LoRA", []), ("A", [(lora_a, 1.0)]), ("B", [(lora_b, 0.8)]))]
    finally:
        if not a.url:
            serve.shutdown()
            ray.shutdown()
    last = rows[-1]
    summary = {
        "source": source, "size": size, "extra_size": extra, "steps": 2, "lora_rank": rank, "write_loras_s": round(write_s, 2),
        "deploy_s_incl_warmup": deploy_s, "graphs_after_warmup": start["compiled_graphs"],
        "rows": rows,
        "all_succeeded": all(r["status"] == "succeeded" for r in rows),
        "same_replica_process": all(r["pid"] == start["pid"] for r in rows),
        "pipeline_loads": last["pipeline_loads"],
        "pipeline_loads_during": last["pipeline_loads"] - start["pipeline_loads"],
        "adapter_loads": last["adapter_loads"],
        "adapter_loads_during": last["adapter_loads"] - start["adapter_loads"],
        "graphs_compiled_after_warmup": last["compiled_graphs"] - start["compiled_graphs"],
    }
    summary["pass"] = (summary["all_succeeded"] and summary["same_replica_process"] and summary["pipeline_loads"] == 1
                       and summary["pipeline_loads_during"] == 0 and summary["adapter_loads_during"] == 2
                       and summary["graphs_compiled_after_warmup"] == 0)
    (a.out / "serve_lora.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
