"""Metrics and logs of the running app: scraped from Ray's Prometheus endpoint after real jobs.

Ray's processes push their metrics to the node's metrics agent every second here
(``METRICS_PUSH_MS``), so a reading is up to a push late: baselines are taken once the readings
stopped moving, and expected values are waited for with a deadline.
"""

from __future__ import annotations

import glob
import os
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.replica.metrics import STAGE_NAMES, gpu_memory
from tests.conftest import FAIL_PROMPT, METRICS_PUSH_MS, SLOW_PROMPT, small_request, wait_for
from tests.http_server import LocalServer


def scrape(url: str) -> list:
    text = httpx.get(url, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list, name: str, **labels: str) -> float:
    """Sum of a metric's series (over processes and replicas) whose labels match."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def cache_key(app) -> str:
    from deployments.lora.actor import config_key
    from serve_app.config import AppConfig

    gpu = AppConfig.model_validate(app.args).gpu
    return config_key(gpu.lora, gpu.fetch)


def readings(serve_env, app) -> dict[str, float]:
    """This app's counters and histogram counts, as the endpoint shows them now."""
    s = scrape(serve_env.metrics_url)
    a = {"application": app.name}
    cache = {"cache": cache_key(app)}
    out = {
        "submitted": total(s, "ray_wan_jobs_submitted_total", **a),
        "succeeded": total(s, "ray_wan_jobs_succeeded_total", **a),
        "failed": total(s, "ray_wan_jobs_failed_total", **a),
        "failed_oom": total(s, "ray_wan_jobs_failed_total", error_code="OUT_OF_MEMORY", **a),
        "canceled": total(s, "ray_wan_jobs_canceled_total", **a),
        "queue_time_count": total(s, "ray_wan_job_queue_seconds_count", **a),
        "adapter_loads": total(s, "ray_wan_replica_adapter_loads_total", **a),
        "lora_hits": total(s, "ray_wan_lora_cache_hits_total", **cache),
        "lora_misses": total(s, "ray_wan_lora_cache_misses_total", **cache),
        "lora_fetched_bytes": total(s, "ray_wan_lora_cache_fetched_bytes_total", **cache),
    }
    for stage in STAGE_NAMES:
        out[f"stage_{stage}"] = total(s, "ray_wan_generation_stage_seconds_count", stage=stage, speed_mode="exact", **a)
    return out


def settled(read, timeout: float = 60) -> dict[str, float]:
    """A reading that held for three pushes: nothing still on its way to the endpoint."""
    deadline = time.time() + timeout
    last, since = read(), time.time()
    while time.time() - since < 3 * METRICS_PUSH_MS / 1000:
        assert time.time() < deadline, "metrics never stopped moving"
        time.sleep(0.2)
        now = read()
        if now != last:
            last, since = now, time.time()
    return last


def active_series(serve_env, app, state: str) -> set[float]:
    """The values of the active-jobs gauge for ``state`` (one series per ingress replica)."""
    return {s.value for s in scrape(serve_env.metrics_url)
            if s.name == "ray_wan_jobs_active" and s.labels.get("application") == app.name
            and s.labels.get("state") == state}


def test_counters_gauges_and_histograms_count_what_happened(app, serve_env, loras):
    wait_for(lambda: not app.db_rows("status IN ('in_queue','in_progress')"), 60, "the app going idle", 0.2)
    files = list(loras.values())
    with LocalServer() as srv:
        url_a = srv.add("/metrics/a.safetensors", files[0].read_bytes())
        url_b = srv.add("/metrics/b.safetensors", files[1].read_bytes())
        before = settled(lambda: readings(serve_env, app))

        # Four slow jobs: the runner holds two (max_in_flight 2 x 1 replica), one of which runs;
        # two wait in the database. Then all four are canceled: two at once by the ingress (nobody
        # held them), the dispatched one withdrawn from Serve's queue, the running one stopped.
        # The first runs before the others are sent, so the canceling order below is the queue's.
        def submit_slow(i: int) -> str:
            return app.submit(small_request(prompt=f"{SLOW_PROMPT} {i}", sample_steps=40)).json()["request_id"]

        slow = [submit_slow(0)]
        app.wait_running(slow[0])
        slow += [submit_slow(i) for i in range(1, 4)]
        wait_for(lambda: 2 in active_series(serve_env, app, "waiting")
                 and 1 in active_series(serve_env, app, "dispatched")
                 and 1 in active_series(serve_env, app, "running"),
                 60, "the gauge showing 2 waiting, 1 dispatched, 1 running", 0.2)
        for rid in reversed(slow):
            assert app.http.post(f"/v1/requests/{rid}/cancel").status_code == 200
        assert [app.wait(rid)["status"] for rid in slow] == ["canceled"] * 4

        # Two LoRA jobs (URL A: a miss; then A again, a hit, and B, a miss), and one that fails.
        for refs in ([url_a], [url_a, url_b]):
            result = app.run({**small_request(), "loras": [{"path": r} for r in refs]})
            assert result["status"] == "succeeded", result
        failed = app.run(small_request(prompt=f"{FAIL_PROMPT} now"))
        assert failed["error"]["code"] == "OUT_OF_MEMORY"

    expected = {
        "submitted": 7, "succeeded": 2, "failed": 1, "failed_oom": 1, "canceled": 4,
        "queue_time_count": 4,  # started on a replica: the running slow job, the LoRA jobs, the failed one
        "adapter_loads": 2,  # A, then B (A stays resident)
        "lora_hits": 1, "lora_misses": 2, "lora_fetched_bytes": sum(f.stat().st_size for f in files),
        **{f"stage_{stage}": 2 for stage in STAGE_NAMES},  # only generations that finished are timed
    }

    def delta():
        now = readings(serve_env, app)
        return {k: now[k] - before[k] for k in expected}

    deadline = time.time() + 60  # on time-out, the assert below shows what is missing
    while any(v < expected[k] for k, v in delta().items()) and time.time() < deadline:
        time.sleep(0.2)
    after = settled(lambda: readings(serve_env, app))
    assert {k: after[k] - before[k] for k in expected} == expected
    wait_for(lambda: active_series(serve_env, app, "waiting") == {0.0}, 60, "the gauge showing no job waiting", 0.2)


def _log_lines(logs_dir: str, pattern: str, needle: str) -> list[str]:
    lines = []
    for path in glob.glob(os.path.join(logs_dir, "serve", pattern)):
        with open(path, errors="replace") as f:
            lines += [line for line in f if needle in line]
    return lines


def test_logs_name_the_job_from_the_ingress_to_the_gpu_replica(app, serve_env):
    r = app.submit(small_request(prompt=f"{FAIL_PROMPT} for the logs"))
    rid = r.json()["request_id"]
    assert app.wait(rid)["status"] == "failed"
    tag = f"job {rid}:"
    ingress = wait_for(lambda: _log_lines(serve_env.logs_dir, f"replica_{app.name}_Ingress_*.log", tag),
                       60, "the ingress logging the job", 0.2)
    replica = wait_for(lambda: _log_lines(serve_env.logs_dir, f"replica_{app.name}_WanI2V_*.log", tag),
                       60, "the GPU replica logging the job", 0.2)
    text = "".join(ingress)
    assert "queued" in text and "claimed" in text and "sent to a GPU replica" in text and "OUT_OF_MEMORY" in text
    text = "".join(replica)
    assert "generating 64x48" in text and "failed while generating (OUT_OF_MEMORY:" in text


def test_gpu_memory_reads_nothing_off_cuda():
    import torch

    assert gpu_memory(torch.device("cpu")) is None


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
def test_gpu_memory_reads_torch_cuda_allocator():
    import torch

    device = torch.device("cuda", 0)
    before = gpu_memory(device)
    block = torch.empty(64 * 1024**2, dtype=torch.uint8, device=device)
    during = gpu_memory(device)
    assert during["allocated"] - before["allocated"] == block.numel()
    assert during["reserved"] >= during["allocated"] and during["peak_allocated"] >= during["allocated"]
