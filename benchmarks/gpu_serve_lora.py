"""LoRAs through the served app on a GPU: multiplexed adapters on the compiled model, over HTTP.

    python benchmarks/gpu_serve_lora.py --out $OUT                  # GPU machine: random-full
    python benchmarks/gpu_serve_lora.py --cpu-smoke --out /tmp/sl    # shake-out on CPU, tiny model

One GPU replica of the real app (compiled and warmed up before ready). Two random rank-32
ai-toolkit LoRAs on every block linear are written to the LoRA root; then a sequence of requests at
the warm-up size (832x480, 41 frames, 2 steps): no LoRA, A, A at 0.5, B, A + B, A again, no LoRA.
After each, the replica's counters: pipeline loads, adapter loads and graphs compiled (dynamo). The
claim checked: adapters load once, switching and multipliers load nothing, nothing recompiles, the
base model is never reloaded. Results go to ``serve_lora.json``.
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
    """Two random ai-toolkit LoRAs for the configured architecture; returns their relative paths."""
    import torch
    from diffusers import WanTransformer3DModel

    from benchmarks.gpu_bench import make_aitoolkit_lora
    from deployments.lora_files import linear_shapes
    from deployments.models import FULL_TRANSFORMER_CONFIG, TINY_TRANSFORMER_CONFIG

    config = FULL_TRANSFORMER_CONFIG if source == "random-full" else TINY_TRANSFORMER_CONFIG
    with torch.device("meta"):
        shapes = linear_shapes(WanTransformer3DModel(**config))
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for seed, name in enumerate(("lora_a.safetensors", "lora_b.safetensors")):
        make_aitoolkit_lora(shapes, config["num_layers"], rank, seed, str(root / name), "cpu", std_b=0.02)
        names.append(name)
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--extra-size", default=None, help="WxHxF: also warm up (and request) this size")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/serve-lora")
    if a.cpu_smoke:
        source, device, size, rank, gpus = "tiny", "cpu", (64, 48, 5), 4, 0
    else:
        source, device, size, rank, gpus = "random-full", "cuda", (832, 480, 41), 32, 1

    t0 = time.perf_counter()
    lora_a, lora_b = write_loras(work / "loras", source, rank)
    write_s = time.perf_counter() - t0

    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    args = app_args(source, device, work / "models", work, gpus)
    extra = tuple(int(v) for v in a.extra_size.split("x")) if a.extra_size else None
    if extra:
        args["gpu"]["model"]["speed"] = {"extra_warmup_sizes": [list(extra)]}
    t0 = time.perf_counter()
    serve.run(build_app(args), name="wan-i2v", route_prefix="/")
    deploy_s = time.perf_counter() - t0
    handle = serve.get_deployment_handle("WanI2V", "wan-i2v")
    http = httpx.Client(base_url="http://127.0.0.1:8000", timeout=60)

    def run(label: str, loras: list[tuple[str, float]], at: tuple[int, int, int] = size) -> dict:
        request = make_request(*at, steps=2)
        request["loras"] = [{"path": ref, "network_multiplier": m} for ref, m in loras]
        t = time.perf_counter()
        rid = http.post("/v1/inference", json=request).raise_for_status().json()["request_id"]
        while http.get(f"/v1/requests/{rid}/status").json()["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.05)
        e2e = time.perf_counter() - t
        result = http.get(f"/v1/requests/{rid}/result").json()
        stats = handle.stats.remote().result()
        row = {"request": label, "status": result["status"], "e2e_s": round(e2e, 3),
               "replica_total_s": result["metadata"]["timings"][0]["total"] if result["status"] == "succeeded" else None,
               "error": result.get("error"), "pipeline_loads": stats["pipeline_loads"],
               "adapter_loads": stats["adapter_loads"], "compiled_graphs": stats["compiled_graphs"]}
        print(json.dumps(row), flush=True)
        return row

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
    serve.shutdown()
    ray.shutdown()
    summary = {
        "source": source, "size": size, "extra_size": extra, "steps": 2, "lora_rank": rank, "write_loras_s": round(write_s, 2),
        "deploy_s_incl_warmup": round(deploy_s, 2), "graphs_after_warmup": start["compiled_graphs"],
        "rows": rows,
        "all_succeeded": all(r["status"] == "succeeded" for r in rows),
        "pipeline_loads": rows[-1]["pipeline_loads"],
        "adapter_loads": rows[-1]["adapter_loads"],
        "graphs_compiled_after_warmup": rows[-1]["compiled_graphs"] - start["compiled_graphs"],
    }
    (a.out / "serve_lora.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0 if summary["all_succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
