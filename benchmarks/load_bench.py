"""Load benchmark: many small jobs from concurrent clients against a running server; nothing lost, nothing doubled.

Against ``wan-serve run configs/local.yaml`` (or any deployment of this API)::

    python benchmarks/load_bench.py --url http://127.0.0.1:8000 -n 500 -c 16 --json-out load.json
    python benchmarks/load_bench.py --url http://127.0.0.1:8000 --smoke   # a few jobs: checks the harness

What it does:
  * ``-c`` submitter tasks send ``-n`` logical jobs (tiny sizes by default: 64x48, 5 frames, 2 steps),
    each with its own ``Idempotency-Key``. A 429 (QUEUE_FULL) is counted and the same job is sent
    again after ``Retry-After`` (capped by ``--max-retry-wait-s``), like a well-behaved client.
  * ``--dup-fraction`` of the accepted jobs are sent a second time with the same key (a client that
    lost the answer and retried): the server must answer with the same request id.
  * pollers walk every outstanding job's ``/status`` each ``--poll-interval-s`` until it is final,
    then read ``/result`` (and download a sample of files).

Reported: submitted, accepted, rejected (429 answers, and jobs given up), succeeded, failed, lost
(accepted but never final by the deadline, or unknown to the server: must be 0), duplicated (a
retried key answered with a new id, or ``--jobs-db`` holding more rows than accepted jobs: must be
0), and p50/p99 of submit, status-poll and end-to-end latency (end-to-end resolution is the poll
interval). JSON (``--json-out``, or stdout with ``--json``) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import sqlite3
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field

import httpx

FINAL = ("succeeded", "failed", "canceled")


@dataclass
class Job:
    index: int
    key: str
    first_submit: float = 0.0
    request_id: str | None = None
    gave_up: bool = False
    status: str | None = None
    error_code: str | None = None
    finished_seen: float | None = None
    missing: bool = False
    outputs: int | None = None


@dataclass
class Stats:
    submit_requests: int = 0
    answers_429: int = 0
    answers_other: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    dup_checks: int = 0
    dup_mismatches: int = 0
    submit_lat: list[float] = field(default_factory=list)
    poll_lat: list[float] = field(default_factory=list)
    polls: int = 0
    downloads_ok: int = 0
    downloads_bad: int = 0


def png_b64(width: int, height: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_request(opts, image: str, i: int) -> dict:
    return {
        "model": opts.model,
        "prompts": [{"prompt": f"load bench job {i}", "width": opts.width, "height": opts.height,
                     "num_frames": opts.frames, "sample_steps": opts.steps, "seed": i, "ctrl_img": image}],
        "loras": [],
    }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[max(0, math.ceil(q / 100 * len(s)) - 1)] * 1000, 1)  # ms, nearest rank


async def submitter(opts, client: httpx.AsyncClient, queue: asyncio.Queue, jobs: list[Job], stats: Stats,
                    headers: dict, image: str, deadline: float, rng: random.Random) -> None:
    while True:
        try:
            job = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        job.first_submit = time.time()
        body = build_request(opts, image, job.index)
        hdrs = {**headers, "Idempotency-Key": job.key}
        while True:
            if time.time() > deadline:
                job.gave_up = True
                break
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/inference", json=body, headers=hdrs)
            except httpx.HTTPError:
                stats.transport_errors += 1  # the same key makes the resend safe
                await asyncio.sleep(0.5)
                continue
            stats.submit_requests += 1
            stats.submit_lat.append(time.perf_counter() - t0)
            if r.status_code == 200:
                job.request_id = r.json()["request_id"]
                break
            if r.status_code == 429:
                stats.answers_429 += 1
                wait = min(float(r.headers.get("Retry-After", "1")), opts.max_retry_wait_s)
                await asyncio.sleep(wait * (0.5 + rng.random()))  # jitter: do not come back in step
                continue
            stats.answers_other[r.status_code] = stats.answers_other.get(r.status_code, 0) + 1
            job.gave_up = True
            break
        if job.request_id and rng.random() < opts.dup_fraction:
            # The retry of a client that never saw the answer: must name the same job.
            try:
                r = await client.post("/v1/inference", json=body, headers=hdrs)
                stats.submit_requests += 1
                stats.dup_checks += 1
                if r.status_code != 200 or r.json()["request_id"] != job.request_id:
                    stats.dup_mismatches += 1
            except httpx.HTTPError:
                stats.transport_errors += 1


async def poller(opts, client: httpx.AsyncClient, jobs: list[Job], stats: Stats, headers: dict,
                 submitting_done: asyncio.Event, deadline: float) -> None:
    sem = asyncio.Semaphore(opts.concurrency)

    async def poll(job: Job) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.get(f"/v1/requests/{job.request_id}/status", headers=headers)
            except httpx.HTTPError:
                stats.transport_errors += 1
                return
            stats.polls += 1
            stats.poll_lat.append(time.perf_counter() - t0)
            if r.status_code == 404:
                job.missing = True
                return
            if r.status_code != 200:
                return
            s = r.json()
            if s["status"] in FINAL:
                job.status = s["status"]
                job.finished_seen = time.time()
                job.error_code = (s.get("error") or {}).get("code")

    while time.time() < deadline:
        outstanding = [j for j in jobs if j.request_id and j.status is None and not j.missing]
        if not outstanding and submitting_done.is_set():
            return
        t_round = time.time()
        await asyncio.gather(*(poll(j) for j in outstanding))
        await asyncio.sleep(max(0.0, opts.poll_interval_s - (time.time() - t_round)))


async def check_results(opts, client: httpx.AsyncClient, jobs: list[Job], stats: Stats, headers: dict,
                        rng: random.Random) -> None:
    """Every succeeded job has its output listed; a sample of files downloads."""
    sem = asyncio.Semaphore(opts.concurrency)
    done = [j for j in jobs if j.status == "succeeded"]
    sample = set(id(j) for j in rng.sample(done, min(len(done), opts.download_sample)))

    async def check(job: Job) -> None:
        async with sem:
            try:
                r = await client.get(f"/v1/requests/{job.request_id}/result", headers=headers)
                job.outputs = len(r.json()["outputs"]["videos"]) if r.status_code == 200 else None
                if id(job) in sample:
                    f = await client.get(f"/v1/requests/{job.request_id}/outputs/0", headers=headers)
                    if f.status_code == 200 and f.content:
                        stats.downloads_ok += 1
                    else:
                        stats.downloads_bad += 1
            except httpx.HTTPError:
                stats.transport_errors += 1

    await asyncio.gather(*(check(j) for j in done))


def db_rows(path: str, prefix: str) -> int:
    """Rows whose Idempotency-Key belongs to this run, in the server's job DB (SQLite path or PostgreSQL URL)."""
    if path.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(path) as conn:
            return conn.execute("SELECT COUNT(*) FROM jobs WHERE idempotency_key LIKE %s", (f"{prefix}-%",)).fetchone()[0]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE idempotency_key LIKE ?", (f"{prefix}-%",)).fetchone()[0]
    finally:
        db.close()


async def run(opts) -> dict:
    rng = random.Random(opts.seed)
    run_id = f"lb-{uuid.uuid4().hex[:10]}"
    jobs = [Job(i, f"{run_id}-{i}") for i in range(opts.n)]
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    stats = Stats()
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    image = png_b64(opts.width, opts.height)
    limits = httpx.Limits(max_connections=opts.concurrency * 2 + 4, max_keepalive_connections=opts.concurrency * 2)
    async with httpx.AsyncClient(base_url=opts.url.rstrip("/"), timeout=opts.http_timeout_s, limits=limits) as client:
        r = await client.get("/health")
        r.raise_for_status()
        t0 = time.time()
        deadline = t0 + opts.timeout_s
        submitting_done = asyncio.Event()
        poll_task = asyncio.create_task(poller(opts, client, jobs, stats, headers, submitting_done, deadline))
        await asyncio.gather(*(submitter(opts, client, queue, jobs, stats, headers, image, deadline, rng)
                               for _ in range(opts.concurrency)))
        t_submitted = time.time()
        submitting_done.set()
        await poll_task
        t_done = time.time()
        await check_results(opts, client, jobs, stats, headers, rng)

    accepted = [j for j in jobs if j.request_id]
    ids = [j.request_id for j in accepted]
    lost = [j for j in accepted if j.status is None or j.missing]
    duplicated = stats.dup_mismatches + (len(ids) - len(set(ids)))
    rows = None
    if opts.jobs_db:
        rows = db_rows(opts.jobs_db, run_id)
        duplicated += max(0, rows - len(accepted))
    e2e = [j.finished_seen - j.first_submit for j in accepted if j.finished_seen]
    succeeded = sum(j.status == "succeeded" for j in jobs)
    report = {
        "url": opts.url, "n": opts.n, "concurrency": opts.concurrency,
        "job": {"width": opts.width, "height": opts.height, "num_frames": opts.frames, "steps": opts.steps},
        "poll_interval_s": opts.poll_interval_s, "dup_fraction": opts.dup_fraction,
        "submitted": opts.n,
        "accepted": len(accepted),
        "rejected_429_answers": stats.answers_429,
        "rejected_final": sum(j.gave_up for j in jobs),
        "other_error_answers": stats.answers_other,
        "transport_errors": stats.transport_errors,
        "submit_requests": stats.submit_requests,
        "succeeded": succeeded,
        "failed": sum(j.status == "failed" for j in jobs),
        "canceled": sum(j.status == "canceled" for j in jobs),
        "failure_codes": _count(j.error_code for j in jobs if j.status == "failed"),
        "lost": len(lost),
        "duplicated": duplicated,
        "dup_checks": stats.dup_checks,
        "db_rows": rows,
        "succeeded_without_output": sum(1 for j in jobs if j.status == "succeeded" and not j.outputs),
        "downloads": {"ok": stats.downloads_ok, "bad": stats.downloads_bad},
        "accounting_ok": len(accepted) + sum(j.gave_up for j in jobs) == opts.n,
        "latency_ms": {
            "submit": {"p50": pct(stats.submit_lat, 50), "p99": pct(stats.submit_lat, 99), "count": len(stats.submit_lat)},
            "status_poll": {"p50": pct(stats.poll_lat, 50), "p99": pct(stats.poll_lat, 99), "count": len(stats.poll_lat)},
            "end_to_end": {"p50": pct(e2e, 50), "p99": pct(e2e, 99), "count": len(e2e)},
        },
        "wall_s": {"submitting": round(t_submitted - t0, 1), "until_all_final": round(t_done - t0, 1)},
        "throughput_jobs_per_s": round(succeeded / (t_done - t0), 2) if t_done > t0 else None,
        "mean_e2e_s": round(statistics.mean(e2e), 2) if e2e else None,
    }
    report["pass"] = report["lost"] == 0 and report["duplicated"] == 0 and report["accounting_ok"]
    return report


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def table(r: dict) -> str:
    lat = r["latency_ms"]
    rows = [
        ("submitted (logical jobs)", r["submitted"]),
        ("accepted", r["accepted"]),
        ("429 answers (retried after Retry-After)", r["rejected_429_answers"]),
        ("rejected for good (gave up)", r["rejected_final"]),
        ("other error answers", r["other_error_answers"] or 0),
        ("succeeded", r["succeeded"]),
        ("failed", r["failed"]),
        ("lost (must be 0)", r["lost"]),
        ("duplicated (must be 0)", r["duplicated"]),
        ("idempotent resubmits checked", r["dup_checks"]),
        ("submit latency p50 / p99 (ms)", f"{lat['submit']['p50']} / {lat['submit']['p99']}"),
        ("status poll latency p50 / p99 (ms)", f"{lat['status_poll']['p50']} / {lat['status_poll']['p99']}"),
        ("end-to-end p50 / p99 (s)", f"{_s(lat['end_to_end']['p50'])} / {_s(lat['end_to_end']['p99'])}"),
        ("throughput (jobs/s)", r["throughput_jobs_per_s"]),
        ("wall: submitting / until all final (s)", f"{r['wall_s']['submitting']} / {r['wall_s']['until_all_final']}"),
        ("verdict", "PASS" if r["pass"] else "FAIL"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _s(ms):
    return None if ms is None else round(ms / 1000, 2)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("-n", type=int, default=500, help="logical jobs")
    ap.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent clients")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default="wan21_i2v_14b480p")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--poll-interval-s", type=float, default=1.0)
    ap.add_argument("--dup-fraction", type=float, default=0.1, help="accepted jobs resubmitted with their key")
    ap.add_argument("--max-retry-wait-s", type=float, default=5.0, help="cap on Retry-After waits")
    ap.add_argument("--download-sample", type=int, default=20)
    ap.add_argument("--jobs-db", default=None,
                    help="the server's job DB (a SQLite path on this machine, or a postgresql:// URL), to count rows")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--http-timeout-s", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    ap.add_argument("--smoke", action="store_true",
                    help="check the harness: 6 jobs, 2 clients, every job resubmitted with its key, 0.2 s polls")
    opts = ap.parse_args(argv)
    if opts.smoke:
        opts.n, opts.concurrency, opts.dup_fraction, opts.poll_interval_s, opts.download_sample = 6, 2, 1.0, 0.2, 2
        opts.timeout_s = min(opts.timeout_s, 300)
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    report = asyncio.run(run(opts))
    if opts.json_out:
        with open(opts.json_out, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2) if opts.json else table(report))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
