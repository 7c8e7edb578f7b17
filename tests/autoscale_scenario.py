"""Autoscaling across nodes, simulated on one machine: run as a script, prints a JSON verdict last.

A ``ray.cluster_utils.Cluster`` with a CPU head and ``--workers`` nodes that each declare one GPU
and no CPU (the GPU is a Ray resource only: the tiny model runs on CPU, ``model.device: cpu``; with
no CPU there, the ingress stays on the head, as it would on a CPU head node). The app is deployed with
``num_gpus: 1`` per replica, so each replica needs a node of its own, and autoscaling from
``min_replicas: 1`` to ``max_replicas: --workers`` with ``target_ongoing_requests: 1``. Then:

1. a burst of slow jobs over HTTP: replicas go 1 -> >=2, on different nodes, and every job succeeds;
2. while still scaled out: one LoRA set, asked for again and again, is served by the replica that
   holds it (same ``replica`` in each result's metadata) and is loaded there only once;
3. idle: replicas go back down to ``min_replicas``;
4. the last replica's node is drained (``ray drain-node``) while it runs a job: Serve moves the
   replica to another node and the job still succeeds.

It builds its own Ray cluster, so it must not run inside a process that already has one (pytest
runs it as a subprocess: ``tests/test_autoscale.py``). Ray's temp dir is private (``RAY_TMPDIR``),
so the cluster's address file never leads another ``ray.init``/``serve run`` on this machine here.

    python tests/autoscale_scenario.py --model-cache DIR --workdir DIR [--workers 3] [--jobs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scenarios import alive_replicas, log  # noqa: E402 (first: sets Ray's environment)

from tests.services import free_port  # noqa: E402

# Before Ray is imported: Serve's defaults push request metrics every 10 s, fine for minute-long
# jobs, slow for a test.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

SLOW = "SLOWLY"
APP = "autoscale"


def replicas() -> list[dict]:
    """Alive WanI2V replica actors (pid, node)."""
    return alive_replicas(APP, "WanI2V")


def running_count() -> int:
    from ray import serve

    try:
        states = serve.status().applications[APP].deployments["WanI2V"].replica_states
    except KeyError:
        return 0
    return states.get("RUNNING", 0)


class Watcher(threading.Thread):
    """Samples the replica count and their nodes every 0.25 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, frozenset[str]]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                alive = replicas()
                self.samples.append((time.time(), running_count(), frozenset(r["node_id"] for r in alive)))
            except Exception as e:  # a sample lost while the controller is busy is fine
                log("watch:", type(e).__name__, e)
            time.sleep(0.25)

    def first_time(self, pred, after: float = 0.0) -> float | None:
        for t, n, _ in self.samples:
            if t >= after and pred(n):
                return t
        return None


def make_lora(model_cache: Path, path: Path) -> None:
    from diffusers import WanTransformer3DModel

    from deployments.lora.files import linear_shapes
    from tests.lora_factory import make_lora as write

    transformer = WanTransformer3DModel.from_pretrained(str(model_cache / "tiny" / "transformer"))
    write(path, "ai-toolkit", linear_shapes(transformer), seed=5)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-cache", required=True, type=Path, help="directory holding (or to hold) tiny/")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=3, help="worker nodes, one fake GPU each")
    ap.add_argument("--jobs", type=int, default=10, help="slow jobs in the burst")
    ap.add_argument("--steps", type=int, default=12, help="denoising steps per burst job (0.25 s each)")
    ap.add_argument("--lora-repeats", type=int, default=4)
    ap.add_argument("--downscale-delay-s", type=float, default=8.0)
    ap.add_argument("--deadline-s", type=float, default=150.0)
    ap.add_argument("--no-drain", dest="drain", action="store_false", help="skip the node-drain phase")
    opts = ap.parse_args(argv)
    t_start = time.time()
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="wan-autoscale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    # Short (unix socket paths) and private: the cluster's address file and sessions live here.
    ray_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="wa", dir="/tmp")

    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.engine.models import ensure_tiny
    from serve_app.app import build_app
    from tests.conftest import small_request

    ensure_tiny(opts.model_cache)
    lora_root = workdir / "loras"
    lora_root.mkdir(exist_ok=True)
    make_lora(opts.model_cache, lora_root / "sticky.safetensors")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    # GPU nodes declare no CPU and the GPU replicas ask for none: the CPU-side actors (ingress,
    # controller, proxy) stay on the head, as in a cluster with a CPU head and GPU workers.
    for _ in range(opts.workers):
        cluster.add_node(num_cpus=0, num_gpus=1)
    ray.init(address=cluster.address, namespace="wan-autoscale", log_to_driver=False)
    cluster.wait_for_nodes()
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    log(f"cluster up: {len(nodes)} nodes, {len(gpu_nodes)} with a GPU")

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    args = {
        "gpu": {
            "model": {"source": "tiny", "device": "cpu", "cache_dir": str(opts.model_cache)},
            "replica": {
                "num_gpus": 1, "num_cpus": 0,
                "min_replicas": 1, "max_replicas": opts.workers, "target_ongoing_requests": 1,
                "upscale_delay_s": 1, "downscale_delay_s": opts.downscale_delay_s,
                "generator_factory": "tests.fakes:FaultyGenerator",
                "generator_options": {"slow_prompt_substring": SLOW, "step_delay_s": 0.25},
            },
            "lora": {"root": str(lora_root), "cache_dir": str(workdir / "lora-cache")},
        },
        "storage": {"outputs_dir": str(workdir / "videos"), "jobs_db": str(workdir / "jobs.sqlite3")},
        "jobs": {"lease_s": 5.0, "sweep_interval_s": 0.5},
    }
    verdict: dict = {"nodes": len(nodes), "gpu_nodes": len(gpu_nodes), "max_replicas_allowed": opts.workers}
    watcher = Watcher()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        t0 = time.time()
        serve.run(build_app(args), name=APP, route_prefix="/")
        verdict["deploy_s"] = round(time.time() - t0, 1)
        verdict["replicas_at_start"] = running_count()
        log("deployed in", verdict["deploy_s"], "s with", verdict["replicas_at_start"], "replica(s)")
        watcher.start()

        def wait(rid: str, timeout: float) -> dict:
            end = time.time() + timeout
            while True:
                s = http.get(f"/v1/requests/{rid}/status").json()
                if s["status"] in ("succeeded", "failed", "canceled"):
                    return s
                if time.time() > end:
                    raise TimeoutError(f"{rid}: {s}")
                time.sleep(0.2)

        # 1. The burst.
        t_burst = time.time()
        burst = [small_request(prompt=f"{SLOW} burst {i}", sample_steps=opts.steps, seed=i) for i in range(opts.jobs)]
        with ThreadPoolExecutor(8) as pool:
            rids = [r.json()["request_id"] for r in pool.map(lambda req: http.post("/v1/inference", json=req), burst)]
        finals = [wait(rid, opts.deadline_s) for rid in rids]
        t_burst_done = time.time()
        made_by = [http.get(f"/v1/requests/{rid}/result").json()["metadata"]["replicas"][0] for rid in rids]
        up = watcher.first_time(lambda n: n >= 2, t_burst)
        peak = max((n for t, n, _ in watcher.samples if t >= t_burst), default=0)
        peak_nodes = max((len(ns) for t, _, ns in watcher.samples if t >= t_burst), default=0)
        verdict["burst"] = {
            "jobs": len(rids), "succeeded": sum(f["status"] == "succeeded" for f in finals),
            "seconds": round(t_burst_done - t_burst, 1), "distinct_replicas_serving": len(set(made_by)),
            "peak_running_replicas": peak, "peak_nodes_with_replicas": peak_nodes,
            "scale_up_to_2_s": round(up - t_burst, 1) if up else None,
        }
        log("burst:", verdict["burst"])

        # 2. One LoRA set, repeatedly, while still scaled out (sequential: a free holder is there).
        lora_request = {**small_request(seed=99), "loras": [{"path": "sticky.safetensors", "network_multiplier": 0.8}]}
        served, alive_during = [], []
        for _ in range(1 + opts.lora_repeats):
            alive_during.append(running_count())
            r = http.post("/v1/inference", json=lora_request).json()
            assert wait(r["request_id"], 60)["status"] == "succeeded"
            served.append(http.get(f"/v1/requests/{r['request_id']}/result").json()["metadata"]["replicas"][0])
        # Each replica's counters: a stats call runs on whichever replica is free; ask often enough.
        handle = serve.get_deployment_handle("WanI2V", APP)
        per_replica: dict[str, dict] = {}
        for _ in range(4):
            for s in [handle.stats.remote() for _ in range(3 * opts.workers)]:
                st = s.result()
                per_replica[st["replica"]] = st
        holder = per_replica.get(served[0], {})
        verdict["lora"] = {
            "served_by": served, "same_replica": len(set(served)) == 1, "running_replicas_during": alive_during,
            "holder_adapter_loads": holder.get("adapter_loads"),
            "adapter_loads_by_replica": {k: v["adapter_loads"] for k, v in per_replica.items()},
        }
        log("lora:", verdict["lora"])

        # 3. Idle: back down to min_replicas.
        t_idle = time.time()
        end = t_idle + opts.deadline_s - (t_idle - t_start)
        while running_count() > 1 or len(replicas()) > 1:
            if time.time() > end:
                break
            time.sleep(0.5)
        down = running_count()
        verdict["scale_down"] = {"replicas_after_idle": down, "seconds_idle_to_min": round(time.time() - t_idle, 1)}
        log("down:", verdict["scale_down"])
        # ... and the one left still serves.
        r = http.post("/v1/inference", json=small_request(seed=7)).json()
        verdict["after_scale_down_job"] = wait(r["request_id"], 60)["status"]

        # 4. Drain the last replica's node while it runs a job, as an operator would before
        #    maintenance: Serve starts a replacement elsewhere, the old replica finishes its job
        #    (graceful_shutdown_timeout_s), then stops.
        if opts.drain:
            verdict["drain"] = drain_phase(cluster, http, wait, small_request)
            log("drain:", verdict["drain"])
    except Exception as e:
        verdict["error"] = f"{type(e).__name__}: {e}"
    finally:
        watcher.stop.set()
        http.close()
        verdict["timeline"] = _timeline(watcher.samples)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    verdict["total_s"] = round(time.time() - t_start, 1)
    b, lora, d = verdict.get("burst", {}), verdict.get("lora", {}), verdict.get("scale_down", {})
    dr = verdict.get("drain", {"job": "succeeded", "moved": True}) if opts.drain else {"job": "succeeded", "moved": True}
    verdict["ok"] = bool(
        "error" not in verdict
        and b.get("succeeded") == b.get("jobs")
        and b.get("peak_running_replicas", 0) >= 2 and b.get("peak_nodes_with_replicas", 0) >= 2
        and lora.get("same_replica") and lora.get("holder_adapter_loads") == 1
        and d.get("replicas_after_idle") == 1 and verdict.get("after_scale_down_job") == "succeeded"
        and dr.get("job") == "succeeded" and dr.get("moved")
    )
    if verdict["ok"]:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    else:
        verdict["ray_logs"] = ray_tmp  # kept for a look at what went wrong
    return verdict


def drain_phase(cluster, http, wait, small_request) -> dict:
    """Drain the node of the only replica while it runs a slow job (``ray drain-node``)."""
    import subprocess

    (old,) = replicas()
    r = http.post("/v1/inference", json=small_request(prompt=f"{SLOW} drain", sample_steps=16, seed=8)).json()
    rid = r["request_id"]
    end = time.time() + 60
    while http.get(f"/v1/requests/{rid}/status").json()["progress"].get("step", 0) < 1:
        if time.time() > end:
            return {"error": "the job never started"}
        time.sleep(0.1)
    t0 = time.time()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_cli, "drain-node", "--address", cluster.address, "--node-id", old["node_id"],
           "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "maintenance (scenario)",
           "--deadline-remaining-seconds", "300"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return {"error": f"drain-node failed: {out.stderr[-500:]}"}
    status = wait(rid, 120)
    end = time.time() + 60
    while True:
        alive = replicas()
        if running_count() == 1 and len(alive) == 1 and alive[0]["node_id"] != old["node_id"]:
            break
        if time.time() > end:
            return {"error": f"no replacement off the drained node: {alive}"}
        time.sleep(0.25)
    result = http.get(f"/v1/requests/{rid}/result").json()
    after = http.post("/v1/inference", json=small_request(seed=9)).json()
    after_status = wait(after["request_id"], 60)["status"]
    return {
        "job": status["status"], "attempts": status["attempts"],
        "job_made_by_old_replica": result["metadata"]["replicas"][0].endswith(f":{old['pid']}"),
        "moved": alive[0]["node_id"] != old["node_id"], "seconds_until_moved": round(time.time() - t0, 1),
        "next_job": after_status,
    }


def _timeline(samples) -> list[list]:
    """(seconds from the first sample, running replicas) at each change."""
    out, last = [], None
    t0 = samples[0][0] if samples else 0
    for t, n, nodes in samples:
        if (n, len(nodes)) != last:
            out.append([round(t - t0, 1), n, len(nodes)])
            last = (n, len(nodes))
    return out


if __name__ == "__main__":
    result = main()
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
