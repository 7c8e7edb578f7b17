"""Faults under load: replica and ingress deaths, the LoRA cache dying mid-download, generations that
raise, cancellation, idempotent client retries and back-pressure.

Each test runs against an app variant at its own route prefix (own job DB, outputs and replicas), so
the shared ``app`` is never disturbed. ``faults`` has two GPU replicas so that a death leaves one
serving; tests that kill something wait until Serve has replaced it before they return.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from tests.conftest import BACKENDS, FAIL_PROMPT, SLOW_PROMPT, job_updates, small_request, wait_for
from tests.http_server import LocalServer, Route
from tests.test_metrics import _log_lines

QUEUE_LIMIT = 8  # faults app: jobs queued or running before submissions get 429


# ---------------------------------------------------------------------------------------------
# helpers


def _replicas(app_name: str, deployment: str = "WanI2V") -> list[dict]:
    """Alive replica actors of one deployment: pid, node_id, actor name.

    From the GCS actor table: ``ray.util.state`` needs the dashboard, which the test cluster leaves out.
    """
    import ray._private.state

    cls = f"ServeReplica:{app_name}:{deployment}"
    return [
        {"pid": a["Pid"], "node_id": a["Address"]["NodeID"], "name": a["Name"]}
        for a in ray._private.state.actors().values()
        if a["ActorClassName"] == cls and a["State"] == "ALIVE"
    ]


def _wait_replicas_running(app, n: int, deployment: str = "WanI2V", exclude_pids: set[int] = frozenset(),
                  timeout: float = 240) -> list[dict]:
    """Wait until Serve reports ``n`` RUNNING replicas (none of them ``exclude_pids``) and the app answers."""
    from ray import serve

    deadline = time.time() + timeout
    while True:
        states = serve.status().applications[app.name].deployments[deployment].replica_states
        alive = _replicas(app.name, deployment)
        pids = {r["pid"] for r in alive}
        if states == {"RUNNING": n} and len(alive) == n and not pids & set(exclude_pids):
            try:
                if app.http.get("/health", timeout=5).status_code == 200:
                    return alive
            except Exception:
                pass
        if time.time() > deadline:
            raise AssertionError(f"{app.name}/{deployment}: {states}, alive {alive} after {timeout}s")
        time.sleep(0.25)


def _status(app, rid: str) -> dict:
    return app.http.get(f"/v1/requests/{rid}/status").json()


def _result(app, rid: str) -> dict:
    return app.http.get(f"/v1/requests/{rid}/result").json()


def _slow(steps: int, tag: str = "", **kw) -> dict:
    return small_request(prompt=f"{SLOW_PROMPT} {tag or uuid.uuid4().hex[:6]}", sample_steps=steps, **kw)


def _db_rows(app, where: str, params: tuple = ()) -> list[dict]:
    return app.db_rows(where, params)


def _stats_by_replica(app, n: int) -> dict[int, dict]:
    """``stats()`` of each of the ``n`` GPU replicas, by pid (a call goes to any free one: ask until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("WanI2V", app.name)
    seen: dict[int, dict] = {}

    def all_answered() -> bool:
        for response in [handle.stats.remote() for _ in range(2 * n)]:
            stats = response.result()
            seen[stats["pid"]] = stats
        return len(seen) >= n

    wait_for(all_answered, 60, f"stats from {n} replicas of {app.name}")
    assert len(seen) == n, seen
    return seen


def _cache_actor(cache_dir: str):
    """(name, handle) of this node's LoRA cache actor, preferring one whose config uses ``cache_dir``."""
    import ray

    from deployments.lora.actor import ACTOR_NAMESPACE, cache_actor_name

    prefix = cache_actor_name(ray.get_runtime_context().get_node_id())
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == ACTOR_NAMESPACE and entry["name"].startswith(prefix):
            actor = ray.get_actor(entry["name"], namespace=ACTOR_NAMESPACE)
            try:
                uses = ray.get(actor.config.remote(), timeout=10)["lora"]["cache_dir"]
            except Exception:  # a dead one whose name is not yet freed
                continue
            found.append((uses != cache_dir, entry["name"], actor))
    assert found, f"no LoRA cache actor named {prefix}*"
    return min(found, key=lambda f: f[:2])[1:]


# ---------------------------------------------------------------------------------------------
# the app variant


@pytest.fixture(scope="module", params=BACKENDS)
def fapp(request, serve_env):
    """Two GPU replicas, a small queue, short leases (3 s) so recoveries are quick; once per state backend.

    Serve notices a killed replica at its next health check (every ``health_check_period_s``, 10 s by
    default): at 1 s the kill tests wait for a replacement about 5 s less each time.
    """
    from ray import serve

    name = f"faults-{request.param}"
    args = serve_env.args_for(name, request.param,
                              gpu={"replica": {"min_replicas": 2, "max_replicas": 2, "health_check_period_s": 1}},
                              limits={"max_queue_total": QUEUE_LIMIT, "retry_after_s": 7},
                              # A delivery's lease, 3 x 3 + 5 = 14 s, is what the webhook-kill test waits
                              # out; an attempt's 3 s outlast the moment between its arrival and the kill.
                              webhooks={"timeout_s": 3.0})
    app = serve_env.deploy(name, f"/{name}", args)
    _wait_replicas_running(app, 2)
    yield app
    serve.delete(name)


# ---------------------------------------------------------------------------------------------
# client retries and back-pressure


def test_idempotency_key_returns_the_first_job_even_when_submits_race(fapp):
    key = f"idem-{uuid.uuid4().hex}"
    first = fapp.submit(small_request(), {"Idempotency-Key": key})
    again = fapp.submit(small_request(), {"Idempotency-Key": key})  # a client retry after a lost answer
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.json()["request_id"] == again.json()["request_id"]

    # Eight threads send the same logical job at once: one job, one id.
    racing = f"idem-race-{uuid.uuid4().hex}"
    barrier = threading.Barrier(8)

    def send(_):
        barrier.wait()
        return fapp.submit(small_request(seed=3), {"Idempotency-Key": racing})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    ids = {r.json()["request_id"] for r in answers}
    assert len(ids) == 1
    assert len(_db_rows(fapp, "idempotency_key=?", (racing,))) == 1

    other = fapp.submit(small_request(), {"Idempotency-Key": f"idem-{uuid.uuid4().hex}"}).json()["request_id"]
    assert other not in ids | {first.json()["request_id"]}
    for rid in (first.json()["request_id"], *ids, other):
        assert fapp.wait(rid, timeout=60)["status"] == "succeeded"
    # after it finished, a retry still returns the finished job (and its result), not a new one
    retried = fapp.submit(small_request(seed=3), {"Idempotency-Key": racing}).json()
    assert retried["request_id"] in ids and _status(fapp, retried["request_id"])["status"] == "succeeded"


def test_burst_beyond_the_queue_gets_429_and_every_accepted_job_finishes(fapp):
    n = 30
    tag = f"burst-{uuid.uuid4().hex[:8]}"
    request = _slow(3, tag)  # ~1 s a job on two replicas: the burst outruns the queue

    def send(i):
        return fapp.submit(request, {"Idempotency-Key": f"{tag}-{i}"})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(n)))
    codes = [r.status_code for r in answers]
    accepted = [r.json()["request_id"] for r in answers if r.status_code == 200]
    rejected = [r for r in answers if r.status_code == 429]
    assert len(accepted) + len(rejected) == n, codes  # never a 5xx, never a silent drop
    assert QUEUE_LIMIT <= len(accepted) < n and rejected
    for r in rejected:
        assert r.headers["Retry-After"] == "7"
        error = r.json()["detail"]["error"]
        assert error["code"] == "QUEUE_FULL" and error["details"] == {"scope": "total", "limit": QUEUE_LIMIT}
    # what was accepted is exactly what the server holds, and all of it runs to success
    stored = _db_rows(fapp, "idempotency_key LIKE ?", (f"{tag}-%",))
    assert sorted(row["id"] for row in stored) == sorted(accepted)
    for rid in accepted:
        assert fapp.wait(rid, timeout=120)["status"] == "succeeded"
    # the queue drained: submissions are accepted again
    assert fapp.submit(small_request()).status_code == 200


# ---------------------------------------------------------------------------------------------
# generations that raise


def test_injected_oom_fails_the_job_with_its_code_and_the_replicas_keep_serving(fapp):
    pids = {r["pid"] for r in _replicas(fapp.name)}
    failed = fapp.run(small_request(prompt=f"{FAIL_PROMPT} oom"))
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "OUT_OF_MEMORY" and "out of GPU memory" in failed["error"]["message"]
    assert failed["error"]["details"]["prompt_index"] == 0 and failed["metadata"]["attempts"] == 1
    # Both replicas serve the next jobs, and neither was restarted.
    rids = [fapp.submit(_slow(2, f"after-oom-{i}")).json()["request_id"] for i in range(4)]
    for rid in rids:
        assert fapp.wait(rid, timeout=60)["status"] == "succeeded"
    served_by = {int(_result(fapp, rid)["metadata"]["replicas"][0].rsplit(":", 1)[1]) for rid in rids}
    assert served_by == pids
    assert {r["pid"] for r in _replicas(fapp.name)} == pids


def test_bad_weights_fail_with_generation_failed_and_the_replica_serves_the_next_job(serve_env):
    from ray import serve

    args = serve_env.args_for("badweights", gpu={"replica": {"generator_options": {"fail_kind": "bad_weights"}}})
    app = serve_env.deploy("badweights", "/badweights", args)
    try:
        (replica,) = _wait_replicas_running(app, 1)
        failed = app.run(small_request(prompt=f"{FAIL_PROMPT} nan"))
        assert failed["status"] == "failed" and failed["error"]["code"] == "GENERATION_FAILED", failed
        assert "NaN" in failed["error"]["message"]
        ok = app.run(small_request())
        assert ok["status"] == "succeeded"
        assert ok["metadata"]["replicas"] == [f"{ok['metadata']['replicas'][0].rsplit(':', 1)[0]}:{replica['pid']}"]
        assert app.replica_stats()["pid"] == replica["pid"]
    finally:
        serve.delete("badweights")


# ---------------------------------------------------------------------------------------------
# cancellation


def test_cancel_frees_the_replica_within_a_step(fapp):
    steps, step_s = 40, 0.25
    # Twice as long as the others: the survivor must still run at the end, however slow the machine.
    running = [fapp.submit(_slow(2 * steps, f"cancel-run-{i}")).json()["request_id"] for i in range(2)]
    for rid in running:  # both replicas busy before the others are sent: none of those can start first
        fapp.wait_running(rid, 1)
    queued = [fapp.submit(_slow(steps, f"cancel-queued-{i}")).json()["request_id"] for i in range(3)]
    # Two replicas, four jobs in flight at most: two wait at the replicas, one more in the database.
    wait_for(lambda: len(_db_rows(fapp, "id IN (?,?,?) AND lease_until > 0", tuple(queued))) == 2, 30,
             "two of the queued jobs sent to the busy replicas")
    assert all(_status(fapp, rid)["status"] == "in_queue" for rid in queued)  # both replicas are busy
    assert len(_db_rows(fapp, "id IN (?,?,?) AND lease_until > 0", tuple(queued))) == 2

    for rid in reversed(queued):  # the unleased one first, then those waiting at the replicas
        t0 = time.time()
        fapp.http.post(f"/v1/requests/{rid}/cancel")
        final = fapp.wait(rid, timeout=10)
        assert final["status"] == "canceled" and final["started_at"] is None and final["progress"]["step"] == 0
        assert time.time() - t0 < 3

    victim, survivor = running
    at_cancel = _status(fapp, victim)["progress"]["step"]
    t0 = time.time()
    fapp.http.post(f"/v1/requests/{victim}/cancel")
    final = fapp.wait(victim, timeout=10)
    took = time.time() - t0
    assert final["status"] == "canceled" and final["error"]["code"] == "CANCELED"
    # stopped at the next step boundary: at most a step or two after the step seen when canceling
    assert final["progress"]["step"] <= at_cancel + 2, (at_cancel, final["progress"])
    assert took < 2 + 4 * step_s, took
    # The freed replica takes the next job while the other is still busy with its long one.
    quick = fapp.run(small_request(seed=11), timeout=30)
    assert quick["status"] == "succeeded"
    assert _status(fapp, survivor)["status"] == "in_progress"
    fapp.http.post(f"/v1/requests/{survivor}/cancel")
    assert fapp.wait(survivor, timeout=10)["status"] == "canceled"


# ---------------------------------------------------------------------------------------------
# process deaths


@pytest.mark.full
@pytest.mark.kills
def test_gpu_replica_killed_mid_job_is_retried_elsewhere_and_replaced(fapp):
    jobs = [fapp.submit(_slow(12, f"kill-{i}")).json()["request_id"] for i in range(2)]
    for rid in jobs:
        fapp.wait_running(rid, 1)
    where = {rid: _result(fapp, rid)["metadata"]["running_on"] for rid in jobs}
    victim_job = jobs[0]
    victim_pid = int(where[victim_job].rsplit(":", 1)[1])
    assert victim_pid in {r["pid"] for r in _replicas(fapp.name)}
    os.kill(victim_pid, signal.SIGKILL)

    finals = {rid: fapp.wait(rid, timeout=120) for rid in jobs}
    assert all(f["status"] == "succeeded" for f in finals.values()), finals
    assert finals[victim_job]["attempts"] == 2  # retried once, on another replica or the replacement
    assert finals[jobs[1]]["attempts"] == 1  # the other job never noticed
    (made_by,) = _result(fapp, victim_job)["metadata"]["replicas"]
    assert not made_by.endswith(f":{victim_pid}")
    assert _result(fapp, jobs[1])["metadata"]["replicas"] == [where[jobs[1]]]
    _wait_replicas_running(fapp, 2, exclude_pids={victim_pid})  # Serve replaced it


@pytest.mark.full
@pytest.mark.kills
def test_job_whose_replica_dies_every_time_fails_with_replica_died(fapp):
    rid = fapp.submit(_slow(40, "dies-twice")).json()["request_id"]
    killed: set[int] = set()

    def running_on() -> int | None:
        where = _result(fapp, rid)["metadata"].get("running_on")
        return int(where.rsplit(":", 1)[1]) if where else None

    for attempt in (1, 2):
        deadline = time.time() + 120
        while (pid := running_on()) is None or pid in killed:  # the retry has started on a live replica
            assert time.time() < deadline, f"attempt {attempt} never started: {_status(fapp, rid)}"
            time.sleep(0.05)
        assert _status(fapp, rid)["attempts"] == attempt
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    final = fapp.wait(rid, timeout=60)
    assert final["status"] == "failed" and final["attempts"] == 2, final
    assert final["error"]["code"] == "REPLICA_DIED" and final["error"]["details"] == {"attempts": 2}
    _wait_replicas_running(fapp, 2, exclude_pids=killed)
    assert fapp.run(small_request())["status"] == "succeeded"


# A retry's first progress writes: every stage before denoising, then the steps from the first.
RETRY_START = [("encoding_text", 0), ("encoding_image", 0), ("vae_encoding", 0),
               ("denoising", 0), ("denoising", 1), ("denoising", 2), ("denoising", 3)]


@pytest.mark.full
@pytest.mark.kills
def test_ingress_killed_jobs_recover_through_their_leases_and_orphaned_runs_stop(fapp):
    lease_s = fapp.args["jobs"]["lease_s"]
    done = fapp.run(small_request(seed=21))
    stats_before = _stats_by_replica(fapp, 2)  # both idle now
    with job_updates(fapp) as updates:
        running = [fapp.submit(_slow(80, f"ingress-dies-{i}")).json()["request_id"] for i in range(2)]
        queued = fapp.submit(small_request(seed=22)).json()["request_id"]
        for rid in running:
            fapp.wait_running(rid, 3)
        # one long run on each GPU replica: both will be orphaned
        assert len({_result(fapp, rid)["metadata"]["running_on"] for rid in running}) == 2
        (ingress,) = _replicas(fapp.name, "Ingress")
        os.kill(ingress["pid"], signal.SIGKILL)
        _wait_replicas_running(fapp, 1, "Ingress", exclude_pids={ingress["pid"]})

        # finished results and their files survive
        again = _result(fapp, done["request_id"])
        assert again["status"] == "succeeded" and again["outputs"] == done["outputs"]
        assert fapp.http.get(f"/v1/requests/{done['request_id']}/outputs/0").content

        # The new ingress takes both running jobs over once their leases expire and runs them again
        # from the first step. Both GPU replicas were busy with the dead ingress's streams: the
        # retries can only start once each replica has stopped its orphaned run.
        def taken_over(rid: str) -> tuple[list[dict], list[dict]]:
            """(the job's writes before the new ingress took it, its writes since)."""
            log = updates(rid)
            # the first claim's holder: the rows before it are the queued job's (its event log's writes)
            first_holder = next(row["lease_owner"] for row in log if row["lease_owner"] is not None)
            i = next((i for i, row in enumerate(log) if row["lease_owner"] not in (first_holder, None)), len(log))
            return log[:i], log[i:]

        def retry_progress(rid: str) -> list[tuple[str, int]]:
            """(stage, step) of each progress the retry wrote (the takeover's first rows carry the old one)."""
            before, since = taken_over(rid)
            seen, last = [], before[-1]["progress"] if before else None
            for row in since:
                if row["attempts"] == 2 and row["progress"] != last:
                    seen.append((row["progress"]["stage"], row["progress"]["step"]))
                last = row["progress"]
            return seen

        wait_for(lambda: all(len(retry_progress(rid)) >= len(RETRY_START) for rid in running), 120,
                 lambda: f"both jobs retried, at step 3; last writes {[updates(rid)[-1:] for rid in running]}")
        for rid in running:
            before, since = taken_over(rid)
            assert max(row["progress"]["step"] for row in before) >= 3
            assert {row["lease_owner"] for row in since} == {since[0]["lease_owner"]}  # one new holder
            # claimed (lease_until = now + lease_s) only after the dead holder's last lease had run out
            assert since[0]["lease_until"] - lease_s > max(row["lease_until"] for row in before) - 1e-3
            assert {row["attempts"] for row in since} <= {1, 2} and since[-1]["attempts"] == 2
            assert retry_progress(rid)[:len(RETRY_START)] == RETRY_START, updates(rid)
            assert _status(fapp, rid)["attempts"] == 2

    for rid in running:
        fapp.http.post(f"/v1/requests/{rid}/cancel")
        assert fapp.wait(rid, timeout=30)["status"] == "canceled"
    # the queued job still runs
    final = fapp.wait(queued, timeout=60)
    assert final["status"] == "succeeded", final
    assert fapp.http.get(f"/v1/requests/{queued}/outputs/0").status_code == 200
    # Each replica stopped its orphaned run itself, on noticing that its caller had died (Ray does
    # not cancel the stream): counted while the run was still going, so it ended early.
    stats_after = _stats_by_replica(fapp, 2)
    assert set(stats_after) == set(stats_before)  # the same replicas: none was restarted
    for pid, stats in stats_after.items():
        assert stats["caller_died_stops"] == stats_before[pid]["caller_died_stops"] + 1, (pid, stats)


@pytest.mark.full
@pytest.mark.kills
def test_webhook_of_a_finished_job_arrives_although_its_ingress_was_killed_while_delivering(fapp):
    """The receiver holds the first attempt open; the ingress sending it is SIGKILLed. The delivery
    is a row state, not a task: its lease expires and the restarted ingress delivers it."""
    from serve_app.client import verify_webhook

    hold = threading.Event()
    with LocalServer() as srv:
        url = srv.add_sequence("/hook", Route(hold=hold), Route(status=200))
        # Looked up first: the kill must follow the first attempt within its 3 s timeout.
        (ingress,) = _replicas(fapp.name, "Ingress")
        rid = fapp.submit({**small_request(seed=51), "webhook_url": url}).json()["request_id"]
        assert fapp.wait(rid, timeout=60)["status"] == "succeeded"
        deadline = time.time() + 60
        while srv.count("/hook") == 0:
            assert time.time() < deadline, f"no delivery attempt: {_status(fapp, rid)}"
            time.sleep(0.02)
        os.kill(ingress["pid"], signal.SIGKILL)  # mid-attempt: nothing about it was recorded
        hold.set()  # the held answer goes to a dead connection
        _wait_replicas_running(fapp, 1, "Ingress", exclude_pids={ingress["pid"]})
        status = wait_for(lambda: (s := _status(fapp, rid))["webhook"]["state"] != "pending" and s, 120,
                          lambda: f"the webhook of {rid} delivered: {_status(fapp, rid)}")
        assert status["webhook"]["state"] == "delivered", status
        assert [a["status_code"] for a in status["webhook"]["attempts"]] == [200]
        first, second = srv.requests
        assert first["wan-webhook-id"] == second["wan-webhook-id"] == status["webhook"]["delivery_id"]
        secret = fapp.http.get("/v1/webhook-secret").json()["secret"]
        assert verify_webhook(second["body"], second["wan-signature"], secret)["request_id"] == rid


@pytest.mark.full
@pytest.mark.kills
def test_lora_cache_killed_mid_download_refetches_and_never_loads_half_a_file(fapp, tiny_dir, tmp_path):
    import ray
    from diffusers import WanTransformer3DModel

    from deployments.lora.cache import TEMP_PREFIX
    from deployments.lora.files import linear_shapes
    from deployments.lora.refs import SUFFIX
    from tests.lora_factory import make_lora

    # A fresh transformer: the session's shared pipeline may carry adapter wrappers by now.
    shapes = linear_shapes(WanTransformer3DModel.from_pretrained(str(tiny_dir / "transformer")))
    body = make_lora(tmp_path / "slow.safetensors", "ai-toolkit", shapes, seed=9).path.read_bytes()
    # The detached per-node actor may have been made under another app's config (its cache_dir);
    # the one made after the kill is this app's. Watch both directories.
    dirs = {fapp.args["gpu"]["lora"]["cache_dir"]}

    def whole_names_only() -> None:
        for d in dirs:
            for p in os.listdir(d) if os.path.isdir(d) else ():
                if p.endswith(SUFFIX) and not p.startswith(TEMP_PREFIX):
                    try:
                        size = os.path.getsize(os.path.join(d, p))
                    except FileNotFoundError:
                        continue
                    assert size == len(body), f"{p} in {d} has {size} of {len(body)} bytes"

    with LocalServer() as srv:
        route = f"/slow-{uuid.uuid4().hex[:6]}.safetensors"
        url = srv.add(route, body, chunk_size=1024, chunk_delay_s=0.3)  # ~6 s: time to find and kill the actor
        request = {**small_request(), "loras": [{"path": url, "network_multiplier": 1.0}]}
        rid = fapp.submit(request).json()["request_id"]
        wait_for(lambda: srv.count(route), 60, "the LoRA download started")
        name, actor = _cache_actor(fapp.args["gpu"]["lora"]["cache_dir"])
        dirs.add(ray.get(actor.config.remote())["lora"]["cache_dir"])
        wait_for(lambda: any(p.startswith(TEMP_PREFIX) for d in dirs if os.path.isdir(d) for p in os.listdir(d)),
                 30, "a download under way (its temp file)")
        whole_names_only()
        ray.kill(actor)

        while _status(fapp, rid)["status"] not in ("succeeded", "failed", "canceled"):
            whole_names_only()
            time.sleep(0.05)
        final = fapp.wait(rid)
        # The replica asked a fresh cache actor once more, which fetched the file again.
        assert final["status"] == "succeeded", final
        assert srv.count(route) == 2
        whole_names_only()
        assert _cache_actor(fapp.args["gpu"]["lora"]["cache_dir"])[1]._actor_id != actor._actor_id
        # The next request for it needs no third fetch (resident on a replica, or cached on disk).
        assert fapp.run(request)["status"] == "succeeded"
        assert srv.count(route) == 2


# ---------------------------------------------------------------------------------------------
# the state backends failing: the job database and the object store


@pytest.mark.postgres
def test_database_refusing_us_at_start_refuses_to_start_with_a_clear_message(serve_env):
    from ray import serve

    args = serve_env.args_for("nodb", "sqlite", storage={
        "jobs_db": serve_env.pg.url().replace("wan-test-password", "not-this-password")})
    try:
        with pytest.raises(RuntimeError):
            serve_env.deploy("nodb", "/nodb", args)
        message = serve.status().applications["nodb"].deployments["Ingress"].message
        assert "refusing to start" in message and f"127.0.0.1:{serve_env.pg.port}" in message, message
        assert "password authentication failed" in message and "not-this-password" not in message
    finally:
        serve.delete("nodb")


def _timed(call):
    """(response, seconds it took): the bound a client waits, not a speed figure."""
    t0 = time.monotonic()
    r = call()
    return r, time.monotonic() - t0


def _unavailable(r, code: str = "STORE_UNAVAILABLE") -> bool:
    return (r.status_code == 503 and r.json()["detail"]["error"]["code"] == code
            and int(r.headers["Retry-After"]) > 0)


@pytest.mark.full
@pytest.mark.kills
@pytest.mark.postgres
def test_database_down_when_the_ingress_starts_answers_503_then_serves_once_it_is_back(serve_env):
    """A replica (re)started during an outage serves 503s at once instead of leaving requests unanswered."""
    from ray import serve

    from tests.services import PgServer

    server = PgServer().start()
    args = serve_env.args_for("dbstart", "sqlite", storage={"jobs_db": server.create_db()})
    server.stop()
    try:
        app = serve_env.deploy("dbstart", "/dbstart", args)  # returns: the ingress started without its database
        for call in (lambda: app.submit(small_request(seed=51)),
                     lambda: app.http.get(f"/v1/requests/{uuid.uuid4()}/status"),
                     lambda: app.http.get("/v1/webhook-secret")):
            r, took = _timed(call)
            assert _unavailable(r), r.text
            assert took < 5, took
        server.start()
        r = wait_for(lambda: (r := app.submit(small_request(seed=52))).status_code == 200 and r, 10,
                     "a submit accepted within 10 s of the database coming back")
        rid = r.json()["request_id"]
        assert app.wait(rid, timeout=60)["status"] == "succeeded"
        assert app.http.get("/v1/webhook-secret").status_code == 200
    finally:
        serve.delete("dbstart")
        server.close()


@pytest.mark.full
@pytest.mark.kills
@pytest.mark.postgres
def test_database_lost_while_running_answers_503_fast_and_runs_every_job_once(serve_env):
    from ray import serve

    from tests.services import PgServer

    server = PgServer().start()
    # The default database timeouts: what an operator gets.
    args = serve_env.args_for("dblost", "postgres", storage={"jobs_db": server.create_db()})
    app = serve_env.deploy("dblost", "/dblost", args)
    try:
        running = app.submit(_slow(16, "db-lost")).json()["request_id"]
        queued = [app.submit(small_request(seed=31 + i)).json()["request_id"] for i in range(3)]
        app.wait_running(running, 1)
        server.stop()
        for _ in range(2):  # the first calls find the pool's connections dead, the next know it is down
            for call in (lambda: app.submit(small_request(seed=39)),
                         lambda: app.http.get(f"/v1/requests/{running}/status"),
                         lambda: app.http.get(f"/v1/requests/{queued[0]}/result")):
                r, took = _timed(call)
                assert _unavailable(r), r.text
                assert took < 5, took
        server.start()
        wait_for(lambda: app.http.get(f"/v1/requests/{running}/status").status_code == 200, 10,
                 "status answering within 10 s of the database coming back")
        assert app.submit(small_request(seed=40)).status_code == 200
        # Everything accepted before the outage ends, once: the running one was stopped when its lease
        # could not be renewed and ran again (a second attempt); nothing was run twice to the end.
        for rid in (running, *queued):
            assert app.wait(rid, timeout=120)["status"] == "succeeded"
            result = app.http.get(f"/v1/requests/{rid}/result").json()
            assert len(result["outputs"]["videos"]) == 1 and len(result["metadata"]["replicas"]) == 1, result
        rows = app.db_rows("id IN (?,?,?,?)", (running, *queued))
        assert len(rows) == 4 and {r["status"] for r in rows} == {"succeeded"}
        assert app.count_jobs() == 5  # the four, and the one accepted after: none of the 503s left a row
    finally:
        serve.delete("dblost")
        server.close()


@contextmanager
def _app_with_own_s3(serve_env, name: str, **storage):
    """(app, its S3 endpoint): jobs on PostgreSQL, videos behind an endpoint of its own that the test takes down."""
    from ray import serve

    s3 = serve_env.s3.front()
    try:
        args = serve_env.args_for(name, "postgres", storage={
            "outputs_dir": f"s3://{s3.create_bucket()}/videos", "outputs_options": s3.options(), **storage})
        yield serve_env.deploy(name, f"/{name}", args), s3
    finally:
        serve.delete(name)
        s3.stop()


@pytest.mark.full
@pytest.mark.kills
@pytest.mark.postgres
def test_object_store_down_answers_503_on_download_and_a_write_waits_for_it(serve_env):
    with _app_with_own_s3(serve_env, "s3down") as (app, s3):  # the default retry window (60 s)
        done = app.run(small_request(seed=61))
        assert done["status"] == "succeeded"
        rid = app.submit(_slow(12, "s3-down")).json()["request_id"]
        app.wait_running(rid, 1)  # its control image was read: the replica has all it needs
        s3.down()
        r, took = _timed(lambda: app.http.get(f"/v1/requests/{done['request_id']}/outputs/0"))
        assert _unavailable(r, "OUTPUT_STORE_UNAVAILABLE"), r.text
        assert took < 5, took
        # The generation ends while the store is down: its write fails, again and again, and waits (five
        # failed tries: more than a store outage of a few seconds takes, fewer than the default ten).
        failed_tries = f"output write of {rid}/0.mp4 failed"
        wait_for(lambda: len(_log_lines(serve_env.logs_dir, "replica_s3down_Ingress_*.log", failed_tries)) >= 5, 90,
                 "five failed tries of the output write")
        assert s3.rejected > 0 and _status(app, rid)["status"] == "in_progress"
        s3.up()
        final = app.wait(rid, timeout=120)
        assert final["status"] == "succeeded" and final["attempts"] == 1, final
        assert len(_result(app, rid)["outputs"]["videos"]) == 1
        video = app.http.get(f"/v1/requests/{rid}/outputs/0")
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"


@pytest.mark.full
@pytest.mark.kills
@pytest.mark.postgres
def test_object_store_down_past_the_retries_fails_the_job_with_a_code_and_no_half_file(serve_env):
    with _app_with_own_s3(serve_env, "s3lost", write_attempts=3, write_retry_s=60) as (app, s3):
        rid = app.submit(_slow(10, "s3-lost")).json()["request_id"]
        app.wait_running(rid, 1)
        s3.down()
        final = app.wait(rid, timeout=120)
        assert final["status"] == "failed", final
        error = final["error"]
        assert error["code"] == "OUTPUT_WRITE_FAILED" and error["details"]["prompt_index"] == 0
        assert error["details"]["attempts"] == 3, error
        assert _result(app, rid)["outputs"]["videos"] == []
        r = app.http.get(f"/v1/requests/{rid}/outputs/0")
        assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "OUTPUT_NOT_FOUND"
        refused, took = _timed(lambda: app.submit(small_request(seed=41)))  # its control image cannot be stored
        assert _unavailable(refused), refused.text
        assert took < 5, took
        s3.up()
        assert app.run(small_request(seed=42))["status"] == "succeeded"
