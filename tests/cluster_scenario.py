"""Nodes that share no disk: a multi-node cluster whose only shared state is PostgreSQL and an S3 store.

Run as a script; prints a JSON verdict last. A ``ray.cluster_utils.Cluster`` with a head, two CPU
nodes and two nodes with one fake GPU each (the tiny model runs on CPU). Every node's processes get
a HOME of their own (``env_vars`` of its raylet): the app's node-local paths (``~/wan/...``: the
checkpoint cache, the LoRA root and cache) are therefore a different directory on every node, and
the config names no other path. Jobs are in PostgreSQL, videos and control images in S3 (both
started by the caller and passed in). Then:

1. two ingress replicas run, on the two different CPU nodes (``max_replicas_per_node: 1``);
2. 50 jobs are submitted through the HTTP proxy (answers name the ingress replica: ``X-Wan-Ingress``),
   each with an Idempotency-Key so a submit lost in the crash is safely sent again;
3. one ingress replica is SIGKILLed mid-run;
4. every job ends exactly once (one row each, succeeded, one output, made once), and its result and
   video download through *both* ingress replicas (the survivor and the restarted one) byte for byte
   equal to the object in S3;
5. nothing but caches was written to any node's scratch directory.

    python tests/cluster_scenario.py --pg-url URL --s3-endpoint URL --bucket NAME --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scenarios import alive_replicas, log  # noqa: E402 (first: sets Ray's environment)

APP = "nodisk"
SLOW = "SLOWLY"


def actors(deployment: str) -> list[dict]:
    return alive_replicas(APP, deployment)


def wait_running(deployment: str, n: int, timeout: float, exclude: set[int] = frozenset()) -> list[dict]:
    from ray import serve

    end = time.time() + timeout
    while True:
        try:
            states = serve.status().applications[APP].deployments[deployment].replica_states
        except KeyError:
            states = {}
        alive = actors(deployment)
        if states == {"RUNNING": n} and len(alive) == n and not {a["pid"] for a in alive} & set(exclude):
            return alive
        if time.time() > end:
            raise TimeoutError(f"{deployment}: {states} {alive}")
        time.sleep(0.25)


class Client:
    """HTTP through the head's proxy, retrying transport errors and 5xx (a replica may be dying)."""

    def __init__(self, base: str):
        import httpx

        self.http = httpx.Client(base_url=base, timeout=30)
        self.lock = threading.Lock()
        self.by_ingress: dict[str, int] = {}

    def call(self, method: str, path: str, tries: int = 60, **kw):
        import httpx

        for _ in range(tries):
            try:
                r = self.http.request(method, path, **kw)
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if r.status_code < 500:
                with self.lock:
                    who = r.headers.get("x-wan-ingress", "?")
                    self.by_ingress[who] = self.by_ingress.get(who, 0) + 1
                return r
            time.sleep(0.5)
        raise RuntimeError(f"{method} {path}: no answer after {tries} tries")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-url", required=True)
    ap.add_argument("--s3-endpoint", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="the nodes' scratch directories go here")
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--deadline-s", type=float, default=240.0)
    opts = ap.parse_args(argv)
    t_start = time.time()
    ray_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="wn", dir="/tmp")

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.app import build_app
    from serve_app.config import StorageConfig
    from serve_app.storage import OutputStore
    from tests.conftest import small_request

    scratch = {name: opts.workdir / name for name in ("head", "cpu-0", "cpu-1", "gpu-0", "gpu-1")}
    for d in scratch.values():
        d.mkdir(parents=True, exist_ok=True)

    def env(name: str) -> dict:
        return {"HOME": str(scratch[name])}

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False, "env_vars": env("head")})
    for i in range(2):
        cluster.add_node(num_cpus=1, num_gpus=0, env_vars=env(f"cpu-{i}"))
    for i in range(2):
        cluster.add_node(num_cpus=0, num_gpus=1, env_vars=env(f"gpu-{i}"))
    ray.init(address=cluster.address, namespace="wan-nodisk", log_to_driver=False)
    cluster.wait_for_nodes()
    verdict: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}

    from tests.services import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    s3_options = {"key": "test", "secret": "test",
                  "client_kwargs": {"endpoint_url": opts.s3_endpoint, "region_name": "us-east-1"}}
    outputs_url = f"s3://{opts.bucket}/nodisk-{uuid.uuid4().hex[:6]}"
    args = {
        "gpu": {
            "model": {"source": "tiny", "device": "cpu", "cache_dir": "~/wan/models"},
            "replica": {"num_gpus": 1, "num_cpus": 0, "min_replicas": 2, "max_replicas": 2,
                        "generator_factory": "tests.fakes:FaultyGenerator",
                        "generator_options": {"slow_prompt_substring": SLOW, "step_delay_s": 0.2}},
            "lora": {"root": "~/wan/loras", "cache_dir": "~/wan/lora-cache"},
        },
        "storage": {"outputs_dir": outputs_url, "outputs_options": s3_options, "jobs_db": opts.pg_url},
        "jobs": {"lease_s": 3.0, "sweep_interval_s": 0.5},
        "ingress": {"num_replicas": 2, "num_cpus": 1, "max_replicas_per_node": 1, "replica_header": True},
    }
    client = Client(f"http://127.0.0.1:{port}")
    try:
        t0 = time.time()
        serve.run(build_app(args), name=APP, route_prefix="/")
        ingress = wait_running("Ingress", 2, 120)
        gpu = wait_running("WanI2V", 2, 120)
        verdict["deploy_s"] = round(time.time() - t0, 1)
        verdict["ingress_nodes"] = len({a["node_id"] for a in ingress})
        verdict["gpu_nodes"] = len({a["node_id"] for a in gpu})
        log("deployed:", verdict)

        # 2. 50 jobs through the proxy, idempotent submits, from 8 clients at once.
        keys = [f"nodisk-{uuid.uuid4().hex[:8]}-{i}" for i in range(opts.jobs)]
        ids: dict[str, str] = {}

        def submit(i: int) -> None:
            body = small_request(prompt=f"{SLOW} job {i}", sample_steps=opts.steps, seed=i)
            r = client.call("POST", "/v1/inference", json=body, headers={"Idempotency-Key": keys[i]})
            assert r.status_code == 200, r.text
            ids[keys[i]] = r.json()["request_id"]

        victim = ingress[0]
        killer_done = threading.Event()

        def kill_mid_run() -> None:
            # once a few jobs have finished and many are queued or running: SIGKILL one ingress
            end = time.time() + 120
            while time.time() < end:
                done = [rid for rid in list(ids.values())
                        if client.call("GET", f"/v1/requests/{rid}/status").json()["status"] == "succeeded"]
                if len(done) >= 5:
                    break
                time.sleep(0.3)
            os.kill(victim["pid"], signal.SIGKILL)
            verdict["killed_at_s"] = round(time.time() - t0, 1)
            log("killed ingress", victim)
            killer_done.set()

        killer = threading.Thread(target=kill_mid_run, daemon=True)
        killer.start()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(opts.jobs)))
        killer_done.wait(120)
        verdict["submitted"] = len(ids)
        # Serve restarts the killed replica on its node (one per node): two ingress replicas again.
        ingress_after = wait_running("Ingress", 2, 120, exclude={victim["pid"]})
        verdict["ingress_after"] = sorted(a["pid"] for a in ingress_after)

        # 4. Every job ends exactly once.
        end = time.time() + opts.deadline_s
        finals = {}
        while len(finals) < len(ids):
            for rid in set(ids.values()) - set(finals):
                s = client.call("GET", f"/v1/requests/{rid}/status").json()
                if s["status"] in ("succeeded", "failed", "canceled"):
                    finals[rid] = s
            if time.time() > end:
                raise TimeoutError(f"{len(ids) - len(finals)} jobs not final")
            time.sleep(0.5)
        verdict["statuses"] = {st: sum(f["status"] == st for f in finals.values()) for st in
                               ("succeeded", "failed", "canceled")}
        verdict["attempts_max"] = max(f["attempts"] for f in finals.values())
        verdict["retried"] = sum(f["attempts"] > 1 for f in finals.values())
        import psycopg

        with psycopg.connect(opts.pg_url) as conn:
            rows = conn.execute("SELECT id, idempotency_key, status, jsonb_array_length(outputs), "
                                "jsonb_array_length(metadata->'replicas') FROM jobs").fetchall()
        verdict["db_rows"] = len(rows)
        verdict["one_row_per_job"] = sorted(r[1] for r in rows) == sorted(keys)
        verdict["made_once"] = all(r[3] == 1 and r[4] == 1 for r in rows)

        # ... and its result and video download through both ingress replicas.
        store = OutputStore(StorageConfig(outputs_dir=outputs_url, outputs_options=s3_options))
        pids = {f"{a['pid']}" for a in ingress_after}
        both, mismatched = 0, []
        for rid in ids.values():
            seen: set[str] = set()
            expected = store.read(f"{rid}/0.mp4")
            for _ in range(40):
                r = client.call("GET", f"/v1/requests/{rid}/outputs/0")
                res = client.call("GET", f"/v1/requests/{rid}/result")
                if r.content != expected or res.json()["status"] != "succeeded":
                    mismatched.append(rid)
                    break
                seen.add(r.headers.get("x-wan-ingress", "?").rsplit(":", 1)[-1])
                if pids <= seen:
                    both += 1
                    break
        verdict["downloaded_via_both"] = both
        verdict["download_mismatches"] = len(mismatched)
        verdict["answers_by_ingress"] = client.by_ingress

        # 5. Only caches on the nodes' disks: the checkpoint on GPU nodes, nothing else anywhere.
        written = {name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) for name, d in scratch.items()}
        verdict["state_files_on_nodes"] = [f"{n}/{p}" for n, ps in written.items() for p in ps
                                           if p.endswith((".mp4", ".webp", ".png", ".sqlite3", ".sqlite3-wal"))]
        verdict["gpu_nodes_built_their_own_checkpoint"] = all(
            any(p.startswith("wan/models/tiny/") for p in written[f"gpu-{i}"]) for i in range(2))
    except Exception as e:
        verdict["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    verdict["total_s"] = round(time.time() - t_start, 1)
    verdict["ok"] = bool(
        "error" not in verdict and verdict.get("ingress_nodes") == 2 and verdict.get("gpu_nodes") == 2
        and verdict.get("statuses", {}).get("succeeded") == opts.jobs == verdict.get("db_rows")
        and verdict.get("one_row_per_job") and verdict.get("made_once")
        and verdict.get("downloaded_via_both") == opts.jobs and verdict.get("download_mismatches") == 0
        and verdict.get("state_files_on_nodes") == [] and verdict.get("gpu_nodes_built_their_own_checkpoint"))
    if not verdict["ok"]:
        verdict["ray_logs"] = ray_tmp
    return verdict


if __name__ == "__main__":
    result = main()
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
