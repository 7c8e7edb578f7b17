"""The job store, both backends through one interface: leases, claims, cancel, limits, schema, retention,
and what happens when the database is slow or gone. Real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.errors import http_headers, http_status
from serve_app.jobs import AsyncJobStore, QueueFull, SchemaTooNew, StoredSpec, StoreRefused, open_job_store
from serve_app.jobs.postgres import MIGRATIONS as pg_migrations
from serve_app.jobs.sqlite import MIGRATIONS as sqlite_migrations
from serve_app.state_errors import StoreUnavailable
from tests.conftest import tiny_spec, wait_for


def specs(n: int = 1, steps: int = 2) -> list[StoredSpec]:
    spec = tiny_spec(steps=steps).model_copy(update={"image_png": b""})
    return [StoredSpec(spec, f"job/ctrl-{i}.png") for i in range(n)]


def new(store, **kw):
    job, created = store.create(str(uuid.uuid4()), specs(), "m", **kw)
    assert created
    return job


def test_created_job_reads_back_without_its_specs_and_claims_with_them(store):
    job = new(store, owner="o1")
    assert job.status == "in_queue" and job.num_prompts == 1 and job.progress["stage"] == "queued"
    polled = store.get(job.id)
    assert polled.specs_json is None  # a status poll never reads the specs
    claimed = store.claim_next("h", 5)
    assert claimed.id == job.id and claimed.lease_owner == "h"
    (item,) = claimed.specs
    assert item.image_key == "job/ctrl-0.png" and item.spec.image_png == b"" and item.spec.steps == 2


def test_claims_take_the_oldest_first_and_never_the_same_job_twice(store_url):
    stores = [open_job_store(store_url) for _ in range(3)]  # three ingress replicas, maybe on three nodes
    try:
        ids = [new(stores[0]).id for _ in range(12)]
        assert stores[1].claim_next("first", 30).id == ids[0]
        barrier = threading.Barrier(6)

        def claim_all(i):
            barrier.wait()
            got = []
            while (job := stores[i % 3].claim_next(f"h{i}", 30)) is not None:
                got.append(job.id)
            return got

        with ThreadPoolExecutor(6) as pool:
            claimed = [jid for got in pool.map(claim_all, range(6)) for jid in got]
        assert sorted(claimed) == sorted(ids[1:]) and len(claimed) == len(set(claimed))
    finally:
        for s in stores:
            s.close()


def test_expired_lease_is_taken_over_and_the_old_holder_can_write_nothing(store):
    job = new(store)
    assert store.claim_next("old", 2).id == job.id  # 2 s: long enough to hold over the next call
    assert store.claim_next("new", 30) is None  # still leased
    deadline = time.time() + 10
    while (taken := store.claim_next("new", 30)) is None:
        assert time.time() < deadline, "expired lease never claimable"
        time.sleep(0.05)
    assert taken.id == job.id
    assert store.renew(job.id, "old", 30).held is False
    assert store.set_progress(job.id, "old", {"stage": "denoising", "step": 9}) is False
    assert store.add_output(job.id, "old", {"format": "mp4"}, {}) is False
    assert store.merge_metadata(job.id, "old", {"x": 1}) is False
    assert store.finish(job.id, "succeeded", holder="old") is False
    assert store.renew(job.id, "new", 30).held is True
    assert store.set_progress(job.id, "new", {"stage": "denoising", "step": 1}) is True
    assert store.add_output(job.id, "new", {"format": "mp4", "replica": "r"}, {"total": 1.0}) is True
    assert store.finish(job.id, "succeeded", holder="new", metadata={"wall_time": 1}) is True
    done = store.get(job.id)
    assert (done.status, done.outputs, done.metadata["replicas"], done.metadata["timings"]) == (
        "succeeded", [{"format": "mp4", "replica": "r"}], ["r"], [{"total": 1.0}])
    assert done.finished_at and done.started_at and done.lease_owner is None
    assert store.finish(job.id, "failed") is False  # a final job never changes again


def test_cancel_ends_an_unleased_job_at_once_and_flags_a_running_one(store):
    queued, running = new(store), new(store)
    assert store.claim_next("h", 30).id == queued.id  # claims oldest first: lease it, then free it
    store.release(queued.id, "h")
    assert store.claim_next("h", 30).id == queued.id
    store.release(queued.id, "h")
    canceled, now = store.request_cancel(queued.id)
    assert canceled.status == "canceled" and now is True
    assert store.request_cancel(queued.id) == (store.get(queued.id), False)  # final already: nothing changed
    assert store.claim_next("h", 30).id == running.id
    assert store.renew(running.id, "h", 30).cancel_requested is False
    after, now = store.request_cancel(running.id)
    assert after.status == "in_queue" and after.cancel_requested and now is False  # its runner ends it
    assert store.renew(running.id, "h", 30).cancel_requested is True
    assert store.set_progress(running.id, "h", {"stage": "denoising"}) is False
    assert store.request_cancel("nope") == (None, False)


def test_concurrent_cancels_of_a_queued_job_report_one_cancel(store_url):
    # The ingress counts a cancel that ended the job itself: two replicas canceling at once count one.
    stores = [open_job_store(store_url) for _ in range(2)]
    try:
        jobs = [new(stores[0]) for _ in range(4)]
        barrier = threading.Barrier(8)

        def cancel(i):
            barrier.wait()
            return stores[i % 2].request_cancel(jobs[i // 2].id)[1]

        with ThreadPoolExecutor(8) as pool:
            canceled_now = list(pool.map(cancel, range(8)))
        assert [canceled_now[2 * j] + canceled_now[2 * j + 1] for j in range(4)] == [1, 1, 1, 1]
        assert all(stores[1].get(job.id).status == "canceled" for job in jobs)
    finally:
        for s in stores:
            s.close()


def test_active_counts_tell_waiting_dispatched_and_running_jobs_apart(store):
    assert store.active_counts() == {"waiting": 0, "dispatched": 0, "running": 0}
    dispatched, running, expired, done, queued = (new(store) for _ in range(5))  # claimed oldest first
    assert store.claim_next("h", 30).id == dispatched.id  # held by a runner, not started on a replica
    assert store.claim_next("h", 30).id == running.id
    assert store.set_progress(running.id, "h", {"stage": "denoising"})
    assert store.claim_next("dead", 2).id == expired.id  # started, then its runner died (2 s: not before `done`)
    assert store.set_progress(expired.id, "dead", {"stage": "denoising"})
    assert store.claim_next("h", 30).id == done.id
    assert store.finish(done.id, "succeeded", holder="h")  # final: not active
    assert store.active_counts()["dispatched"] == 1
    deadline = time.time() + 10
    # `queued` was never claimed; `expired` waits for a runner again once its lease runs out.
    while (counts := store.active_counts()) != {"waiting": 2, "dispatched": 1, "running": 1}:
        assert time.time() < deadline, counts
        time.sleep(0.05)
    store.request_cancel(queued.id)
    assert store.active_counts() == {"waiting": 1, "dispatched": 1, "running": 1}


def test_idempotency_key_yields_one_job_when_submits_race_across_replicas(store_url):
    stores = [open_job_store(store_url) for _ in range(2)]
    try:
        barrier = threading.Barrier(8)

        def submit(i):
            barrier.wait()
            return stores[i % 2].create(str(uuid.uuid4()), specs(), "m", "owner", "key-1")

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(submit, range(8)))
        assert len({job.id for job, _ in answers}) == 1 and sum(created for _, created in answers) == 1
        assert stores[0].by_idempotency_key("owner", "key-1").id == answers[0][0].id
        assert stores[0].by_idempotency_key("other", "key-1") is None
    finally:
        for s in stores:
            s.close()


def test_queue_limits_are_exact_under_concurrent_submits(store_url):
    stores = [open_job_store(store_url) for _ in range(2)]
    try:
        def submit(i):
            try:
                stores[i % 2].create(str(uuid.uuid4()), specs(), "m", f"o{i % 3}", max_total=10, max_per_owner=4)
                return "ok"
            except QueueFull as e:
                return e.scope

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(submit, range(30)))
        assert outcomes.count("ok") == 10 and stores[0].count(("in_queue", "in_progress")) == 10
        assert stores[0].count() == 10
    finally:
        for s in stores:
            s.close()


def test_retention_lists_only_final_jobs_finished_before_the_cutoff(store):
    old, recent, active = new(store), new(store), new(store)
    for job in (old, recent):
        store.request_cancel(job.id)
    cutoff = store.get(recent.id).finished_at  # finished_at of `recent` itself is not before it
    assert store.finished_before(cutoff) == [old.id]
    assert set(store.finished_before(time.time() + 3600)) == {old.id, recent.id}  # never the active one
    store.delete(old.id)
    assert store.get(old.id) is None and store.get(active.id) is not None


# -- webhook deliveries ------------------------------------------------------------------------

HOOK = "https://hooks.example/wan"


def _wait_claim(store, holder: str, lease_s: float = 30, timeout: float = 10):
    deadline = time.time() + timeout
    while (job := store.claim_webhook(holder, lease_s)) is None:
        assert time.time() < deadline, "the delivery never became due"
        time.sleep(0.05)
    return job


def test_webhook_is_due_once_the_job_is_final_and_leased_to_one_holder(store):
    job = new(store, webhook_url=HOOK)
    plain = new(store)
    assert (job.webhook_url, job.webhook_state, job.webhook_attempts) == (HOOK, "pending", [])
    assert plain.webhook_state is None
    assert store.claim_webhook("a", 30) is None  # not final yet: nothing to deliver
    assert store.claim_next("r", 30).id == job.id
    assert store.finish(job.id, "succeeded", holder="r") and store.finish(plain.id, "failed")
    claimed = store.claim_webhook("a", 30)
    assert claimed.id == job.id and claimed.status == "succeeded" and claimed.webhook_url == HOOK
    assert store.claim_webhook("b", 30) is None  # leased; the job without a webhook is never due
    assert store.record_webhook_attempt(job.id, "b", {"at": "t0", "error": "x"}, "failed") is False
    assert store.record_webhook_attempt(job.id, "a", {"at": "t1", "status_code": 500}, "pending", 2)
    assert store.claim_webhook("b", 30) is None  # the next attempt is not due yet
    again = _wait_claim(store, "b")
    assert again.id == job.id and again.webhook_attempts == [{"at": "t1", "status_code": 500}]
    assert store.record_webhook_attempt(job.id, "a", {"at": "t2"}, "delivered") is False  # no longer a's
    assert store.record_webhook_attempt(job.id, "b", {"at": "t2", "status_code": 204}, "delivered")
    done = store.get(job.id)
    assert done.webhook_state == "delivered" and [a["at"] for a in done.webhook_attempts] == ["t1", "t2"]
    assert store.claim_webhook("c", 30) is None  # delivered: never again
    assert store.record_webhook_attempt(job.id, "b", {"at": "t3"}, "failed") is False


def test_an_expired_delivery_lease_is_taken_over(store):
    job = new(store, webhook_url=HOOK)
    store.request_cancel(job.id)  # a queued job canceled at once is final: its webhook is due
    assert store.claim_webhook("dead", 0.3).id == job.id
    taken = _wait_claim(store, "alive")
    assert taken.id == job.id and taken.status == "canceled"
    assert store.record_webhook_attempt(job.id, "dead", {"at": "late"}, "delivered") is False
    assert store.record_webhook_attempt(job.id, "alive", {"at": "t", "status_code": 200}, "delivered")


def test_concurrent_senders_never_claim_the_same_delivery(store_url):
    stores = [open_job_store(store_url) for _ in range(3)]
    try:
        ids = []
        for _ in range(12):
            job = new(stores[0], webhook_url=HOOK)
            stores[0].request_cancel(job.id)
            ids.append(job.id)
        barrier = threading.Barrier(6)

        def claim_all(i):
            barrier.wait()
            got = []
            while (job := stores[i % 3].claim_webhook(f"s{i}", 30)) is not None:
                got.append(job.id)
            return got

        with ThreadPoolExecutor(6) as pool:
            claimed = [jid for got in pool.map(claim_all, range(6)) for jid in got]
        assert sorted(claimed) == sorted(ids) and len(claimed) == len(set(claimed))
    finally:
        for s in stores:
            s.close()


def test_retention_keeps_a_job_whose_webhook_is_pending(store):
    pending, delivered = new(store, webhook_url=HOOK), new(store, webhook_url=HOOK)
    for job in (pending, delivered):
        store.request_cancel(job.id)
    job = store.claim_webhook("s", 30)
    while job.id != delivered.id:  # deliver only the second one
        store.record_webhook_attempt(job.id, "s", {"at": "t", "status_code": 500}, "pending", 3600)
        job = store.claim_webhook("s", 30)
    store.record_webhook_attempt(delivered.id, "s", {"at": "t", "status_code": 200}, "delivered")
    assert store.finished_before(time.time() + 3600) == [delivered.id]


def test_the_server_secret_is_made_once_and_shared(store_url):
    first, second = open_job_store(store_url), open_job_store(store_url)
    try:
        secret = first.server_secret("webhook_signing_secret")
        assert len(secret) == 64 and int(secret, 16) >= 0
        assert second.server_secret("webhook_signing_secret") == secret
        assert first.server_secret("another") != secret
    finally:
        first.close()
        second.close()


def execute(store_url: str, sql: str, params: tuple = ()) -> None:
    """One statement straight on the database (``?`` placeholders), outside the store."""
    if store_url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), params)
    else:
        db = sqlite3.connect(store_url)
        db.execute(sql, params)
        db.commit()
        db.close()


def test_recent_lists_an_owners_jobs_newest_first_in_pages_that_miss_none(store, store_url):
    mine = [new(store, owner="me").id for _ in range(7)]
    theirs = new(store, owner="them").id
    # Three of mine share one created_at: the id orders them, and no page boundary loses or repeats one.
    execute(store_url, "UPDATE jobs SET created_at=(SELECT created_at FROM jobs WHERE id=?) WHERE id IN (?,?)",
            (mine[2], mine[3], mine[4]))
    tied = sorted(mine[2:5], reverse=True)
    expected = [mine[6], mine[5], *tied, mine[1], mine[0]]
    assert [j.id for j in store.recent("me", 100)] == expected
    assert [j.id for j in store.recent("them", 100)] == [theirs] and store.recent("nobody", 100) == []
    for size in (1, 2, 3):
        seen, cursor = [], None
        while page := store.recent("me", size, cursor):
            assert len(page) <= size
            seen += [j.id for j in page]
            cursor = (page[-1].created_at, page[-1].id)
        assert seen == expected, size
    job = store.recent("me", 1)[0]
    assert job.specs_json is None and job.status == "in_queue"  # a listing never reads the specs


def test_recent_is_served_by_the_owner_index_after_migrating_an_older_database(store_url):
    """A database of the previous schema version gains the (owner, created_at) index on the next start."""
    old = open_job_store(store_url)
    job = new(old, owner="me")
    version = old.schema_version
    old.close()
    execute(store_url, "DROP INDEX jobs_owner_recent")
    # Back to the version before the index: what later migrations added goes too.
    execute(store_url, "DROP TABLE job_events")
    execute(store_url, "ALTER TABLE jobs DROP COLUMN event_seq")
    migrations = (pg_migrations if store_url.startswith("postgresql://") else sqlite_migrations)
    execute(store_url, "UPDATE schema_version SET version = ?",
            (next(n for n, script in enumerate(migrations) if "jobs_owner_recent" in script),))
    store = open_job_store(store_url)
    try:
        assert store.schema_version == version and [j.id for j in store.recent("me", 5)] == [job.id]
        query = "SELECT id FROM jobs WHERE owner='me' ORDER BY created_at DESC, id DESC LIMIT 5"
        if store_url.startswith("postgresql://"):
            import psycopg

            with psycopg.connect(store_url) as conn:
                conn.execute("SET enable_seqscan = off")  # a tiny table: make the planner show its best index
                plan = " ".join(r[0] for r in conn.execute(f"EXPLAIN {query}").fetchall())
        else:
            db = sqlite3.connect(store_url)
            plan = " ".join(r[-1] for r in db.execute(f"EXPLAIN QUERY PLAN {query}").fetchall())
            db.close()
        assert "jobs_owner_recent" in plan and "TEMP B-TREE" not in plan.upper(), plan
    finally:
        store.close()


# -- schema ------------------------------------------------------------------------------------

FIRST_RELEASE_SCHEMA = """
CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL DEFAULT '', idempotency_key TEXT, status TEXT NOT NULL,
  model TEXT NOT NULL, specs TEXT NOT NULL, num_prompts INTEGER NOT NULL, progress TEXT NOT NULL DEFAULT '{}',
  outputs TEXT NOT NULL DEFAULT '[]', error TEXT, metadata TEXT NOT NULL DEFAULT '{}',
  attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, lease_owner TEXT,
  lease_until REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, finished_at REAL);
CREATE UNIQUE INDEX jobs_idem ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_active ON jobs(status, lease_until);
"""


def test_sqlite_database_of_the_first_release_is_migrated_and_its_jobs_still_run(tmp_path):
    import json

    from serve_app.jobs.sqlite import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    spec = tiny_spec()  # the first release kept the control image inline, base64 in the row
    db = sqlite3.connect(path)
    db.executescript(FIRST_RELEASE_SCHEMA)
    db.execute("INSERT INTO jobs (id, status, model, specs, num_prompts, created_at) VALUES (?,?,?,?,?,?)",
               ("old-job", "in_queue", "m", json.dumps([spec.model_dump_json()]), 1, time.time()))
    db.commit()
    db.close()
    store = open_job_store(str(path))
    assert store.schema_version == SCHEMA_VERSION >= 2
    job = store.claim_next("h", 30)
    (item,) = job.specs
    assert job.id == "old-job" and item.image_key is None and item.spec.image_png == spec.image_png
    reopened = open_job_store(str(path))  # idempotent: a second start migrates nothing
    assert reopened.get("old-job").lease_owner == "h"


def _database_of_the_previous_release(url: str):
    """A database of the release before webhooks, with a finished and a queued job."""
    import json

    if url.startswith("postgresql://"):
        import psycopg

        from serve_app.jobs.postgres import MIGRATIONS

        version = 1  # the release before webhooks
        with psycopg.connect(url, autocommit=True) as conn:
            for script in MIGRATIONS[:version]:
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
            conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
            for job_id, status, finished in (("done", "succeeded", time.time()), ("queued", "in_queue", None)):
                conn.execute("INSERT INTO jobs (id, status, model, specs, num_prompts, created_at, finished_at) "
                             "VALUES (%s,%s,'m',%s,1,%s,%s)",
                             (job_id, status, json.dumps([s.to_json() for s in specs()]), time.time(), finished))
        return version
    from serve_app.jobs.sqlite import MIGRATIONS

    version = 2  # the release before webhooks
    db = sqlite3.connect(url)
    for script in MIGRATIONS[:version]:
        db.executescript(script)
    db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    for job_id, status, finished in (("done", "succeeded", time.time()), ("queued", "in_queue", None)):
        db.execute("INSERT INTO jobs (id, status, model, specs, num_prompts, created_at, finished_at) "
                   "VALUES (?,?,'m',?,1,?,?)",
                   (job_id, status, json.dumps([s.to_json() for s in specs()]), time.time(), finished))
    db.commit()
    db.close()
    return version


def test_a_database_of_the_previous_release_gains_webhooks_and_keeps_its_jobs(store_url):
    """SQLite 2 -> 3, PostgreSQL 1 -> 2 (and on, to the current version): the webhook columns and the
    settings table are added."""
    old = _database_of_the_previous_release(store_url)
    store = open_job_store(store_url)
    current = store.schema_version
    try:
        assert current > old
        done = store.get("done")
        assert done.status == "succeeded" and (done.webhook_url, done.webhook_state, done.webhook_attempts) == (
            None, None, [])
        assert store.claim_webhook("s", 30) is None  # old jobs have nothing to deliver
        assert store.claim_next("r", 30).id == "queued"  # and the queued one still runs
        assert store.finish("queued", "succeeded", holder="r")
        hooked = new(store, webhook_url=HOOK)
        store.request_cancel(hooked.id)
        assert store.claim_webhook("s", 30).id == hooked.id
        assert store.server_secret("webhook_signing_secret")
        assert sorted(store.finished_before(time.time() + 60)) == ["done", "queued"]
    finally:
        store.close()
    reopened = open_job_store(store_url)  # a second start migrates nothing
    assert reopened.schema_version == current and reopened.get(hooked.id).webhook_state == "pending"
    reopened.close()


def test_a_database_from_a_newer_release_is_refused(store_url):
    open_job_store(store_url).close()
    if store_url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("UPDATE schema_version SET version = version + 1")
    else:
        db = sqlite3.connect(store_url)
        db.execute("UPDATE schema_version SET version = version + 1")
        db.commit()
        db.close()
    with pytest.raises(SchemaTooNew, match="upgrade"):
        open_job_store(store_url)


@pytest.mark.postgres
def test_postgres_credentials_can_come_from_the_environment(pg_server, monkeypatch):
    no_password = pg_server.url(pg_server.create_db().rsplit("/", 1)[1], password=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(StoreRefused, match="no password"):
        open_job_store(no_password, timeout_s=2)
    monkeypatch.setenv("PGPASSWORD", "wan-test-password")
    s = open_job_store(no_password)
    assert s.count() == 0
    s.close()


# -- unavailability ----------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.full  # stops its server for tens of seconds
@pytest.mark.kills
def test_postgres_lost_and_back_calls_fail_fast_then_work_again():
    from tests.services import PgServer

    server = PgServer().start()
    try:
        store = open_job_store(server.create_db())  # the default timeouts
        job = new(store)
        server.stop()
        for call in (lambda: store.get(job.id), lambda: new(store), lambda: store.claim_next("r", 5.0)) * 2:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as e:
                call()
            assert time.monotonic() - t0 < 4.5  # a bound on the answer: db_timeout_s (3 s) at most
            assert e.value.code == "STORE_UNAVAILABLE" and not hasattr(e.value, "headers")  # no HTTP down here
            assert http_status(e.value) == 503 and int(http_headers(e.value)["Retry-After"]) > 0
        server.start()
        back = time.monotonic()
        while True:  # the pool reconnects on its own, within seconds (not psycopg_pool's backoff of up to 16 s)
            try:
                assert store.get(job.id).status == "in_queue"
                break
            except StoreUnavailable:
                assert time.monotonic() - back < 10, "the store did not come back within 10 s"
                time.sleep(0.2)
        new(store)
        assert store.count() == 2  # nothing written twice, nothing lost
        store.close()
    finally:
        server.close()


@pytest.mark.full
@pytest.mark.kills
@pytest.mark.postgres
def test_postgres_back_after_a_long_outage_works_again_within_seconds():  # full tier: a 16 s outage
    """Down longer than the pool's reconnection attempts last: the next call starts a fresh one."""
    from tests.services import PgServer

    server = PgServer().start()
    try:
        store = open_job_store(server.create_db())
        job = new(store)
        server.stop()
        down = time.monotonic()
        # 16 s: past psycopg_pool's first reconnection tries, which it spaces out more and more
        while time.monotonic() - down < 16:  # calls keep failing fast meanwhile, as the runner's would
            with pytest.raises(StoreUnavailable):
                store.get(job.id)
            time.sleep(0.5)
        server.start()
        back = time.monotonic()
        wait_for(lambda: _answers(store, job.id), 10, "the store answering again")
        assert time.monotonic() - back < 10
        store.close()
    finally:
        server.close()


def _answers(store, job_id) -> bool:
    try:
        return store.get(job_id) is not None
    except StoreUnavailable:
        return False


def test_unreachable_postgres_at_start_is_a_clear_error_naming_the_server_not_the_password():
    from tests.services import free_port

    url = f"postgresql://wan:secret-pw@127.0.0.1:{free_port()}/wan"
    t0 = time.time()
    with pytest.raises(StoreUnavailable) as e:
        open_job_store(url, timeout_s=2)
    assert time.time() - t0 < 15
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in e.value.message
    assert "secret-pw" not in e.value.message


@pytest.mark.postgres
def test_postgres_refusing_us_is_not_an_outage_it_names_the_server_and_the_reason(pg_server):
    url = pg_server.url().replace("wan-test-password", "not-this-password")
    with pytest.raises(StoreRefused) as e:
        open_job_store(url)
    assert "password authentication failed" in str(e.value) and f"127.0.0.1:{pg_server.port}" in str(e.value)
    assert "not-this-password" not in str(e.value)
    with pytest.raises(StoreRefused, match="does not exist"):
        open_job_store(pg_server.url("no_such_db"))


@pytest.mark.postgres
def test_async_store_opened_while_the_database_is_down_answers_at_once_and_opens_when_it_is_back():
    from tests.services import PgServer

    server = PgServer().start()
    url = server.create_db()
    server.stop()

    async def scenario():
        jobs = await AsyncJobStore.open(url, retry_s=0.5)
        assert not jobs.ready
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cannot connect"):
            await jobs.count()
        assert time.monotonic() - t0 < 1  # nothing to wait for: the opener keeps trying on its own
        await asyncio.to_thread(server.start)
        back = time.monotonic()
        await asyncio.wait_for(jobs.opened.wait(), 10)
        assert time.monotonic() - back < 10
        assert await jobs.count() == 0
        jobs.close()

    try:
        asyncio.run(scenario())
    finally:
        server.close()


def test_a_blocked_database_answers_store_unavailable_and_never_blocks_the_event_loop(tmp_path):
    """A writer holding SQLite's lock stands in for a stalled database: the call gives up after the
    store's timeout, and meanwhile the event loop keeps running other work."""
    path = tmp_path / "jobs.sqlite3"
    jobs = AsyncJobStore(open_job_store(str(path), timeout_s=1.0), timeout_s=3.0)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.ensure_future(ticker())
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await jobs.create(str(uuid.uuid4()), specs(), "m")
        took = time.monotonic() - t0
        tick.cancel()
        return took, ticks

    try:
        took, ticks = asyncio.run(scenario())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert took < 5
    assert ticks > took / 0.01 / 4  # the loop ran while the call waited in its thread
    assert asyncio.run(jobs.count()) == 0
    jobs.close()
