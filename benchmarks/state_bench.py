"""The load benchmark on both state backends, side by side in one run (CPU, tiny model).

1. SQLite + a local directory, one ingress replica (the embedded default);
2. PostgreSQL + S3 (moto), two ingress replicas (a cluster's layout).

Everything else is the same: one tiny-model GPU replica on the CPU, the same limits, the same
``load_bench.py`` load (N jobs, C concurrent clients, idempotent resubmits, 429s retried after
Retry-After). Reported per backend: lost and duplicated jobs (both must be 0; rows counted in the
database itself), submit / status-poll / end-to-end latency; and the ratio of the submit p99s
(target: PostgreSQL within 1.5x of SQLite).

    python benchmarks/state_bench.py -n 500 -c 16 --out benchmarks/results-state.json
    python benchmarks/state_bench.py --smoke          # a few jobs, as the test suite runs it

It starts PostgreSQL (Debian's postgresql-15) and moto's S3 server itself, and its own local Ray
cluster unless one is already initialised in the process (the test suite's); then ``--serve-port``
names the running Serve proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import load_bench  # noqa: E402

TARGET_P99_RATIO = 1.5


def app_args(backend: str, work: Path, model_cache: str, pg, s3, bucket: str) -> dict:
    if backend == "sqlite":
        storage = {"outputs_dir": str(work / "sqlite" / "videos"), "jobs_db": str(work / "sqlite" / "jobs.sqlite3")}
        ingress = {"num_replicas": 1, "num_cpus": 0.1}
    else:
        storage = {"outputs_dir": f"s3://{bucket}/state-bench-{int(time.time())}", "outputs_options": s3.options(),
                   "jobs_db": pg.create_db()}
        ingress = {"num_replicas": 2, "num_cpus": 0.1}
    return {
        "gpu": {"model": {"source": "tiny", "device": "cpu", "cache_dir": model_cache},
                "replica": {"num_gpus": 0, "num_cpus": 0.5},
                "lora": {"root": str(work / "loras"), "cache_dir": str(work / backend / "lora-cache")}},
        "storage": storage,
        "ingress": ingress,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--poll-interval-s", type=float, default=1.0)
    ap.add_argument("--smoke", action="store_true", help="12 jobs from 4 clients: the suite's shake-out")
    ap.add_argument("--model-cache", default=None, help="default: a temp dir (the tiny model is built there)")
    ap.add_argument("--serve-port", type=int, default=None, help="use this process's running Ray + Serve")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    opts = ap.parse_args(argv)
    if opts.smoke:
        opts.n, opts.concurrency, opts.poll_interval_s = 12, 4, 0.3

    import ray
    from ray import serve

    from serve_app.app import build_app
    from tests.services import PgServer, S3Server, free_port

    work = Path(tempfile.mkdtemp(prefix="state-bench-"))
    (work / "loras").mkdir()
    model_cache = opts.model_cache or str(work / "models")
    own_cluster = not ray.is_initialized()
    port = opts.serve_port or free_port()
    if own_cluster:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    pg, s3 = PgServer().start(), S3Server().start()
    bucket = s3.create_bucket()
    report: dict = {"n": opts.n, "concurrency": opts.concurrency, "backends": {}}
    try:
        for backend in ("sqlite", "postgres"):
            name = f"state-bench-{backend}"
            args = app_args(backend, work, model_cache, pg, s3, bucket)
            t0 = time.time()
            serve.run(build_app(args), name=name, route_prefix=f"/{name}")
            deploy_s = round(time.time() - t0, 1)
            bench = load_bench.parse(["--url", f"http://127.0.0.1:{port}/{name}", "-n", str(opts.n),
                                      "-c", str(opts.concurrency), "--poll-interval-s", str(opts.poll_interval_s),
                                      "--jobs-db", args["storage"]["jobs_db"]])
            result = asyncio.run(load_bench.run(bench))
            result.update(deploy_s=deploy_s, ingress_replicas=args["ingress"]["num_replicas"])
            report["backends"][backend] = result
            serve.delete(name)
            print(f"\n== {backend} ({args['ingress']['num_replicas']} ingress) ==\n{load_bench.table(result)}",
                  file=sys.stderr, flush=True)
    finally:
        s3.stop()
        pg.close()
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
    sq, pq = report["backends"]["sqlite"], report["backends"]["postgres"]
    ratio = pq["latency_ms"]["submit"]["p99"] / max(sq["latency_ms"]["submit"]["p99"], 1e-9)
    report["submit_p99_ratio_pg_over_sqlite"] = round(ratio, 2)
    report["pass"] = sq["pass"] and pq["pass"]
    report["p99_target_met"] = ratio <= TARGET_P99_RATIO
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "backends"}))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
