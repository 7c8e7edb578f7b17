"""A job's events: the store's per-job event log (both backends), and ``GET /v1/requests/{id}/events``
(Server-Sent Events) over HTTP through the real Serve app, read from any ingress replica."""

from __future__ import annotations

import sqlite3
import threading
import uuid

import httpx
import pytest

from serve_app.jobs import StoredSpec, open_job_store
from tests.conftest import SLOW_PROMPT, small_request, tiny_spec, wait_for

# Every stage a one-prompt job with a LoRA shows, in order, on the tiny model with 2 steps.
STAGES = ["queued", "loading_loras", "encoding_text", "encoding_image", "vae_encoding", "denoising",
          "vae_decoding", "encoding_video", "done"]


# -- the store's event log ------------------------------------------------------------------------

def _new(store, steps: int = 2) -> str:
    spec = tiny_spec(steps=steps).model_copy(update={"image_png": b""})
    job, created = store.create(str(uuid.uuid4()), [StoredSpec(spec, "j/ctrl.png")], "m")
    assert created
    return job.id


def _seen(events) -> list[tuple]:
    return [(e.seq, e.status, e.progress["stage"], e.progress["step"]) for e in events]


def test_every_status_and_progress_write_is_one_numbered_event(store):
    job_id = _new(store)
    assert store.claim_next("h", 30).id == job_id
    for stage, step in [("encoding_text", 0), ("denoising", 0), ("denoising", 1), ("denoising", 2),
                        ("vae_decoding", 2)]:
        assert store.set_progress(job_id, "h", {"stage": stage, "step": step, "total_steps": 2})
    assert not store.set_progress(job_id, "someone-else", {"stage": "denoising", "step": 9})  # not theirs: no event
    assert store.finish(job_id, "succeeded", holder="h")
    assert not store.finish(job_id, "failed")  # final already: no event
    assert _seen(store.events(job_id)) == [
        (1, "in_queue", "queued", 0), (2, "in_progress", "encoding_text", 0), (3, "in_progress", "denoising", 0),
        (4, "in_progress", "denoising", 1), (5, "in_progress", "denoising", 2), (6, "in_progress", "vae_decoding", 2),
        (7, "succeeded", "done", 2)]
    assert [e.seq for e in store.events(job_id, after=5)] == [6, 7]
    assert [e.seq for e in store.events(job_id, after=2, limit=2)] == [3, 4]
    job = store.get(job_id)
    assert job.event_seq == 7 and job.progress["stage"] == "done" and store.events(job_id)[-1].final


@pytest.mark.parametrize("end", ["failed", "canceled-running", "canceled-queued"])
def test_a_failed_or_canceled_job_ends_with_stage_done(store, end):
    job_id = _new(store)
    if end == "canceled-queued":
        assert store.request_cancel(job_id)[1]
    else:
        store.claim_next("h", 30)
        store.set_progress(job_id, "h", {"stage": "denoising", "step": 1, "total_steps": 2})
        store.finish(job_id, end.split("-")[0], holder="h")
    last = store.events(job_id)[-1]
    assert last.status == end.split("-")[0] and last.progress["stage"] == "done"
    assert store.get(job_id).progress == last.progress


def test_a_reader_polling_after_its_last_event_misses_none_while_writes_race(store_url):
    """A stream polls ``events(after=last)`` while the runner writes from another connection."""
    writer, reader = open_job_store(store_url), open_job_store(store_url)
    job_id = _new(writer, steps=150)
    writer.claim_next("h", 60)
    seen, done = [], threading.Event()

    def read():
        last = 0
        while not done.is_set() or reader.events(job_id, last):
            for event in reader.events(job_id, last, limit=7):
                seen.append(event.seq)
                last = event.seq

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for step in range(151):
            writer.set_progress(job_id, "h", {"stage": "denoising", "step": step, "total_steps": 150})
        writer.finish(job_id, "succeeded", holder="h")
    finally:
        done.set()
        thread.join(60)
        writer.close()
        reader.close()
    assert seen == list(range(1, 154))


def test_retention_deletes_a_jobs_events_with_it(store):
    job_id = _new(store)
    store.request_cancel(job_id)
    store.delete(job_id)
    assert store.events(job_id) == []


def test_a_database_of_the_previous_release_gains_one_event_per_job(store_url):
    """Jobs from before the event log: each gets one event of its state; a finished one's stage is done."""
    store = open_job_store(store_url)
    finished, queued = _new(store), _new(store)
    store.request_cancel(finished)
    version = store.schema_version
    store.close()
    sql = ["DROP TABLE job_events", "ALTER TABLE jobs DROP COLUMN event_seq",
           "UPDATE jobs SET progress = '{\"stage\": \"encoding_video\", \"step\": 2}' WHERE status = 'canceled'",
           f"UPDATE schema_version SET version = {version - 1}"]
    if store_url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store_url, autocommit=True) as conn:
            for statement in sql:
                conn.execute(statement)
    else:
        db = sqlite3.connect(store_url, isolation_level=None)
        for statement in sql:
            db.execute(statement)
        db.close()
    store = open_job_store(store_url)
    try:
        assert store.schema_version == version
        assert _seen(store.events(finished)) == [(1, "canceled", "done", 2)]
        assert _seen(store.events(queued)) == [(1, "in_queue", "queued", 0)]
        store.claim_next("h", 30)
        store.set_progress(queued, "h", {"stage": "denoising", "step": 1, "total_steps": 2})
        assert [e.seq for e in store.events(queued)] == [1, 2]
    finally:
        store.close()


# -- GET /v1/requests/{id}/events over HTTP -------------------------------------------------------

def _stream(http: httpx.Client, request_id: str, headers: dict | None = None, raw: list | None = None):
    """(response headers, [(id, status body)]) of one connection, read to its end."""
    from serve_app.client import _sse_events

    with http.stream("GET", f"/v1/requests/{request_id}/events", headers=headers or {}) as r:
        if r.status_code != 200:
            r.read()
            return r, []

        def lines():
            for line in r.iter_lines():
                if raw is not None:
                    raw.append(line)
                yield line

        return r, list(_sse_events(lines()))


def _stages(events) -> list[str]:
    """The stages in the order shown, each once (denoising shows once per step)."""
    stages = [body["progress"]["stage"] for _, body in events]
    return [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]


def _check_whole(events, steps: int, end: str = "succeeded", stages: list[str] = STAGES) -> None:
    """Every event once, numbered from 1 without a gap; every stage in order; every step; the end."""
    assert [i for i, _ in events] == list(range(1, len(events) + 1)), [i for i, _ in events]
    assert _stages(events) == stages, _stages(events)
    steps_seen = [b["progress"]["step"] for _, b in events if b["progress"]["stage"] == "denoising"]
    assert steps_seen == list(range(steps + 1)), steps_seen
    assert [b["status"] for _, b in events][-1] == end
    assert all(b["status"] not in ("succeeded", "failed", "canceled") for _, b in events[:-1])


def test_the_stream_of_a_small_job_carries_every_stage_in_order_and_ends_succeeded(app, loras):
    request = {**small_request(), "loras": [{"path": "my_wan_job/my_wan_job.safetensors"}]}
    rid = app.submit(request).json()["request_id"]
    r, events = _stream(app.http, rid)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    _check_whole(events, steps=2)
    # Each event is the /status body as that event left the job; the last one is /status now.
    last = events[-1][1]
    assert last == app.http.get(f"/v1/requests/{rid}/status").json()
    assert last["progress"] == {"prompt_index": 0, "num_prompts": 1, "stage": "done", "step": 2, "total_steps": 2}
    assert all(b["error"] is None and b["finished_at"] is None for _, b in events[:-1])
    # Opened after the end, the stream replays the whole job; past its last event it is over (204).
    assert _stream(app.http, rid)[1] == events
    assert _stream(app.http, rid, {"Last-Event-ID": str(len(events))})[0].status_code == 204
    assert _stream(app.http, rid, {"Last-Event-ID": "3"})[1] == events[3:]


def test_the_stream_answers_like_status_for_unknown_ids_and_bad_last_event_ids(app):
    r, _ = _stream(app.http, str(uuid.uuid4()))
    assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
    r, _ = _stream(app.http, "not-a-job")
    assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
    rid = app.submit(small_request()).json()["request_id"]
    for bad in ("seven", "-1", "1000"):  # not a number, or past the job's last event
        r, _ = _stream(app.http, rid, {"Last-Event-ID": bad})
        assert r.status_code == 400 and r.json()["detail"]["error"]["code"] == "INVALID_LAST_EVENT_ID", bad
    app.wait(rid)


# A variant with two ingress replicas (each names itself in X-Wan-Ingress), API keys, a short stream
# length and heartbeat, and a small stream limit: PostgreSQL and S3, the cluster's backends.
KEY_A, KEY_B = "key-a-events", "key-b-events"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
STREAM_LIMIT = 3


@pytest.fixture(scope="module")
def eapp(serve_env):
    from ray import serve

    # SQLite: both ingress replicas read the one store file, as on one machine; the store-level tests
    # above check the event log on PostgreSQL too.
    args = serve_env.args_for("events", "sqlite", ingress={"num_replicas": 2, "replica_header": True},
                              auth={"api_keys": [KEY_A, KEY_B]}, limits={"max_streams_per_key": STREAM_LIMIT},
                              events={"heartbeat_s": 0.3, "max_stream_s": 3.0, "poll_s": 0.1})
    app = serve_env.deploy("events", "/events", args)
    yield app
    serve.delete("events")


def _slow(steps: int, seed: int = 0) -> dict:
    return small_request(prompt=f"{SLOW_PROMPT} a runner", sample_steps=steps, seed=seed)


def _follow(http, rid: str, headers: dict, events: list | None = None) -> tuple[list, int]:
    """Every event of a job over as many connections as it takes (each resumes with Last-Event-ID),
    appended to ``events`` as each connection ends."""
    events, connections = ([] if events is None else events), 0
    while not events or events[-1][1]["status"] not in ("succeeded", "failed", "canceled"):
        resume = {"Last-Event-ID": str(events[-1][0])} if events else {}
        r, more = _stream(http, rid, {**headers, **resume})
        assert r.status_code == 200, r.text
        events += more
        connections += 1
        assert connections < 100
    return events, connections


def test_streams_on_every_ingress_replica_see_every_stage_of_a_job_run_by_one(eapp):
    """The job runs through one ingress replica's runner; a stream on the other sees what it wrote."""
    rid = eapp.submit(_slow(12), A).json()["request_id"]
    seen: dict[str, list] = {}
    threads, replicas = [], set()

    def watch(r: httpx.Response, events: list) -> None:
        from serve_app.client import _sse_events

        try:
            events += list(_sse_events(r.iter_lines()))
        finally:
            r.close()

    http = httpx.Client(base_url=eapp.base_url, timeout=60)
    try:
        for n in range(8):  # Serve picks the replica: open streams until both have answered one
            r = http.send(http.build_request("GET", f"/v1/requests/{rid}/events", headers=A), stream=True)
            if r.status_code != 200:
                r.close()
                continue
            replicas.add(r.headers["x-wan-ingress"])
            seen[f"{n} {r.headers['x-wan-ingress']}"] = events = []
            threads.append(threading.Thread(target=watch, args=(r, events)))
            threads[-1].start()
            if len(replicas) == 2:
                break
        for thread in threads:
            thread.join(60)
    finally:
        http.close()
    assert len(replicas) == 2, replicas
    for events in seen.values():
        if events[-1][1]["status"] != "succeeded":  # the first connection ended at max_stream_s
            events = events + _follow(eapp.http, rid, {**A, "Last-Event-ID": str(events[-1][0])})[0]
        _check_whole(events, steps=12, stages=STAGES[:1] + STAGES[2:])


def test_a_resumed_stream_neither_repeats_nor_loses_events(eapp):
    rid = eapp.submit(_slow(20, seed=1), A).json()["request_id"]
    events, connections = _follow(eapp.http, rid, A)
    assert connections >= 2  # 20 steps of 0.25 s outlast one 3 s connection
    _check_whole(events, steps=20, stages=STAGES[:1] + STAGES[2:])
    # Resumed from any event, the rest is the same events.
    for after in (1, 5, len(events) - 1):
        rest, _ = _follow(eapp.http, rid, {**A, "Last-Event-ID": str(after)})
        assert rest == events[after:]


def test_a_quiet_stream_sends_keep_alive_comments(eapp):
    """A job waiting behind another shows nothing for a while: the stream says it is alive."""
    first = eapp.submit(_slow(12, seed=2), A).json()["request_id"]
    # The second job is sent only once the first holds the one GPU replica: two ingress runners could
    # otherwise bring the small job there first, and its stream would never be quiet.
    eapp.wait_running(first, headers=A)
    rid = eapp.submit(small_request(seed=3), A).json()["request_id"]
    raw: list[str] = []
    r, events = _stream(eapp.http, rid, A, raw)
    assert ": keep-alive" in raw and raw[0].startswith("retry: ")
    eapp.wait(first, headers=A)
    eapp.wait(rid, headers=A)


def test_a_canceled_jobs_stream_ends_with_canceled(eapp):
    rid = eapp.submit(_slow(40, seed=4), A).json()["request_id"]
    followed: list = []
    watcher = threading.Thread(target=_follow, args=(eapp.http, rid, A, followed))
    watcher.start()
    wait_for(lambda: any(b["progress"]["stage"] == "denoising" for _, b in list(followed)), 60, "denoising")
    assert eapp.http.post(f"/v1/requests/{rid}/cancel", headers=A).status_code == 200
    watcher.join(60)
    assert [i for i, _ in followed] == list(range(1, len(followed) + 1))
    last = followed[-1][1]
    assert last["status"] == "canceled" and last["error"]["code"] == "CANCELED"
    assert last["progress"]["stage"] == "done" and last["progress"]["step"] < 40


def test_streams_need_the_jobs_key_and_past_the_limit_are_429(eapp):
    rid = eapp.submit(_slow(40, seed=5), A).json()["request_id"]
    assert _stream(eapp.http, rid)[0].status_code == 401
    r, _ = _stream(eapp.http, rid, B)  # another key's job does not exist for it, as with /status
    assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
    http = httpx.Client(base_url=eapp.base_url, timeout=60)
    opened, refused = [], []
    try:
        # The limit is per key on each ingress replica: by 2 replicas x 3 + 1 streams one is refused
        # (a few more tries in case the first streams already ended at max_stream_s on a slow machine).
        for _ in range(4 * STREAM_LIMIT):
            r = http.send(http.build_request("GET", f"/v1/requests/{rid}/events", headers=A), stream=True)
            (opened if r.status_code == 200 else refused).append(r)
            if refused:
                break
        assert refused, [r.status_code for r in opened]
        r = refused[0]
        r.read()
        assert r.status_code == 429 and r.json()["detail"]["error"]["code"] == "TOO_MANY_STREAMS"
        assert r.json()["detail"]["error"]["details"] == {"limit": STREAM_LIMIT} and r.headers["retry-after"]
        # Key B's streams are its own.
        rid_b = eapp.submit(small_request(seed=6), B).json()["request_id"]
        assert _stream(eapp.http, rid_b, B)[0].status_code == 200
    finally:
        for r in opened + refused:
            r.close()
        http.close()
    eapp.http.post(f"/v1/requests/{rid}/cancel", headers=A)
    # Closed streams give their slots back (the server notices the client went away).
    wait_for(lambda: all(_stream(eapp.http, rid, A)[0].status_code == 200 for _ in range(2 * STREAM_LIMIT)), 30,
             "streams open again once the others closed")
