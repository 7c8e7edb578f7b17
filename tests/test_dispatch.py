"""The job runner's order: oldest first, and a bound on how often LoRA affinity lets a younger job start first.

``docs/operations.md`` ("Order") states the policy: jobs are claimed oldest first; among the jobs one
runner has in flight (``jobs.max_in_flight``), Serve may start a younger one first when its LoRA set is
resident on the replica that frees up; once a job has been overtaken ``jobs.max_overtakes`` times the
runner takes no new job until it has started, so a job is overtaken at most
``max_overtakes + max_in_flight - 1`` times.
"""

from __future__ import annotations

import pytest

from tests.conftest import BACKENDS, SLOW_PROMPT, small_request

MAX_IN_FLIGHT, MAX_OVERTAKES = 3, 1
BOUND = MAX_OVERTAKES + MAX_IN_FLIGHT - 1


@pytest.fixture(scope="module", params=BACKENDS)
def order_app(request, serve_env, tiny_shapes):
    """One GPU replica, a small in-flight window, and two LoRA files in the LoRA root."""
    from ray import serve

    from tests.lora_factory import make_lora

    for name, seed in (("order_x", 51), ("order_y", 52)):
        path = serve_env.lora_root / f"{name}.safetensors"
        if not path.exists():
            make_lora(path, "ai-toolkit", tiny_shapes, seed=seed)
    name = f"order-{request.param}"
    args = serve_env.args_for(name, request.param, jobs={"max_in_flight": MAX_IN_FLIGHT,
                                                         "max_overtakes": MAX_OVERTAKES})
    app = serve_env.deploy(name, f"/{name}", args)
    yield app
    serve.delete(name)


def _start_order(app, ids: list[str]) -> list[str]:
    rows = {r["id"]: r for r in app.db_rows(f"id IN ({','.join('?' * len(ids))})", tuple(ids))}
    assert all(rows[i]["status"] == "succeeded" for i in ids), {i: rows[i]["status"] for i in ids}
    return sorted(ids, key=lambda i: rows[i]["started_at"])


def _running_blocker(app) -> str:
    """A slow job that holds the one replica before the test sends the others (sent at once, any of
    them could get there first)."""
    blocker = app.submit(small_request(prompt=f"{SLOW_PROMPT} blocker", sample_steps=12)).json()["request_id"]
    app.wait_running(blocker)
    return blocker


def test_jobs_without_loras_start_oldest_first(order_app):
    blocker = _running_blocker(order_app)
    ids = [order_app.submit(small_request(seed=60 + i)).json()["request_id"] for i in range(6)]
    for rid in [blocker, *ids]:
        assert order_app.wait(rid, timeout=120)["status"] == "succeeded"
    order = _start_order(order_app, [blocker, *ids])
    assert order[0] == blocker, order
    # Serve may route a turned-away request again behind younger ones, LoRA or not: only the bound holds.
    assert max(_overtaken(order, [blocker, *ids]).values()) <= BOUND, order


def _overtaken(order: list[str], ids: list[str]) -> dict[str, int]:
    """For each job, how many younger jobs (later in ``ids``) started before it."""
    return {rid: sum(order.index(y) < order.index(rid) for y in ids[ids.index(rid) + 1:]) for rid in ids}


def test_lora_affinity_overtakes_an_older_job_at_most_the_documented_bound(order_app):
    x = {"loras": [{"path": "order_x.safetensors"}]}
    assert order_app.run({**small_request(seed=70), **x})["status"] == "succeeded"  # X is resident now
    blocker = _running_blocker(order_app)
    older = order_app.submit({**small_request(seed=71), "loras": [{"path": "order_y.safetensors"}]}).json()
    younger = [order_app.submit({**small_request(seed=72 + i), **x}).json()["request_id"] for i in range(12)]
    ids = [blocker, older["request_id"], *younger]
    for rid in ids:
        assert order_app.wait(rid, timeout=180)["status"] == "succeeded"
    order = _start_order(order_app, ids)
    assert order[0] == blocker, order
    # No job, the older one with the other LoRA set or a younger one with the resident set (Serve's
    # retries can reorder those too), was overtaken by more younger jobs than the bound.
    overtaken = _overtaken(order, ids)
    assert max(overtaken.values()) <= BOUND, overtaken
