"""One request across two ranks, through Serve over HTTP: a 2-rank CPU replica (gloo, tiny model) in the
session's cluster.

The replica is one Serve replica whose placement group holds two rank processes; it reports ready
after both loaded. Its output must equal the one-rank generation core's, with LoRAs, and every rank
must hold the same adapter state; a cancel and a failure stop every rank at once and leave the group
able to serve the next request.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import FAIL_PROMPT, SLOW_PROMPT, small_request
from tests.test_app import _core_bytes, _download


@pytest.fixture(scope="module")
def papp(serve_env):
    from ray import serve

    args = serve_env.args_for("parallel", gpu={
        "parallel": {"degree": 2, "rank_cpus": 0.5, "timeout_s": 60, "error_grace_s": 5},
        "replica": {"health_check_period_s": 2, "health_check_timeout_s": 30},
    })
    app = serve_env.deploy("parallel", "/parallel", args)
    yield app
    serve.delete("parallel")


@pytest.fixture(scope="module")
def lora(serve_env, tiny_shapes):
    """A LightX2V-style LoRA: block layers with bias deltas and the output head (``proj_out``)."""
    from tests.lora_factory import make_lora

    path = serve_env.lora_root / "parallel-lightx2v.safetensors"
    made = make_lora(path, "lightx2v", tiny_shapes, seed=5)
    return {path.name: made.path}


def test_two_ranks_with_a_lora_give_the_one_rank_result(papp, generator, lora):
    stats = papp.replica_stats()
    assert stats["parallel"] == {"degree": 2, "cfg_degree": 2, "ulysses_degree": 1, "ring_degree": 1}
    assert len(stats["ranks"]) == 2 and len({r["pid"] for r in stats["ranks"]} | {stats["pid"]}) == 3

    papp.run(small_request(seed=1))  # a request before: what each rank reports is per request
    request = {**small_request(output_format="webp", seed=11, sample_steps=3),
               "loras": [{"path": next(iter(lora)), "network_multiplier": 0.8}]}
    result = papp.run(request)
    assert result["status"] == "succeeded", result
    # CFG-parallel on CPU is bit-exact: each pass is the same computation as on one rank.
    assert _download(papp, result).content == _core_bytes(papp, generator, request, lora_paths=lora)

    stats = papp.replica_stats()
    ranks = stats["ranks"]
    assert [r["pipeline_loads"] for r in ranks] == [1, 1] and stats["pipeline_loads"] == 1
    # Every rank holds the same adapters with the same weights, scales and active set.
    states = [r["adapters"] for r in ranks]
    assert states[0]["adapters"] == [next(iter(lora))] and states[0]["lora_tensors"] > 0
    assert states[0]["digest"] == states[1]["digest"]
    last = stats["last_request_ranks"]
    assert [s["passes"] for s in last] == [3, 3]  # one pass per step on each rank, not two
    assert last[0]["frames_digest"] == last[1]["frames_digest"]


def test_a_cancel_and_a_failure_stop_every_rank_and_the_next_request_runs(papp):
    slow = papp.submit(small_request(prompt=f"{SLOW_PROMPT} beach", sample_steps=8))
    assert slow.status_code == 200, slow.text
    rid = slow.json()["request_id"]
    papp.wait(rid, timeout=120, until=("in_progress",))
    import time

    deadline = time.time() + 60  # cancel once it is denoising, so the ranks must stop mid-run together
    while (papp.http.get(f"/v1/requests/{rid}/status").json().get("progress") or {}).get("step", 0) < 1:
        assert time.time() < deadline, "the slow job never reached a denoising step"
        time.sleep(0.05)
    assert papp.http.post(f"/v1/requests/{rid}/cancel").status_code == 200
    assert papp.wait(rid, timeout=120)["status"] == "canceled"

    failed = papp.run(small_request(prompt=f"{FAIL_PROMPT} on every rank"))
    assert failed["status"] == "failed" and failed["error"]["code"] == "OUT_OF_MEMORY", failed

    after = papp.run(small_request(seed=3))
    assert after["status"] == "succeeded", after
    assert papp.replica_stats()["pipeline_loads"] == 1  # the same ranks, not a replaced replica


def _until_denoising(papp, rid: str) -> None:
    papp.wait(rid, timeout=120, until=("in_progress",))
    deadline = time.time() + 60
    while (papp.http.get(f"/v1/requests/{rid}/status").json().get("progress") or {}).get("step", 0) < 1:
        assert time.time() < deadline, "the slow job never reached a denoising step"
        time.sleep(0.05)


@pytest.mark.full
@pytest.mark.kills
def test_a_lost_rank_takes_its_replica_down_and_the_job_is_retried_on_a_new_one(papp):
    before = papp.replica_stats()
    slow = papp.submit(small_request(prompt=f"{SLOW_PROMPT} beach", sample_steps=8)).json()["request_id"]
    _until_denoising(papp, slow)
    os.kill(before["ranks"][1]["pid"], signal.SIGKILL)
    # The replica exits; Serve starts a new one with two new ranks, and the job runs again there.
    status = papp.wait(slow, timeout=300)
    assert status["status"] == "succeeded" and status["attempts"] == 2, status
    after = papp.replica_stats()
    assert after["pid"] != before["pid"] and len(after["ranks"]) == 2
    assert not {r["pid"] for r in after["ranks"]} & {r["pid"] for r in before["ranks"]}


def test_the_memory_gauge_of_a_multi_gpu_replica_shows_its_fullest_rank():
    from deployments.parallel.rank_group import largest_memory

    ranks = [{"allocated": 5, "reserved": 9, "peak_allocated": 7}, None,
             {"allocated": 6, "reserved": 8, "peak_allocated": 7}]
    assert largest_memory(ranks) == {"allocated": 6, "reserved": 9, "peak_allocated": 7}
    assert largest_memory([None, None]) is None  # CPU ranks: no gauge, as for a CPU replica
