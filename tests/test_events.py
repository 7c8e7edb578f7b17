"""A job's events: the store's per-job event log (both backends), and ``GET /v1/requests/{id}/events``
(Server-Sent Events) over HTTP through the real Serve app, read from any ingress replica."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid

import httpx
import pytest

from serve_app.jobs import StoredSpec, open_job_store
from tests.conftest import BACKENDS, SLOW_PROMPT, small_request, tiny_spec, wait_for

# Every stage a one-prompt job with a LoRA shows, in order, on the tiny model with 2 steps.
STAGES = ["queued", "loading_loras", "encoding_text", "encoding_image", "vae_encoding", "denoising",
          "vae_decoding", "encoding_video", "done"]


# -- the store's event log ------------------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path, pg_server):
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return pg_server.create_db()


@pytest.fixture
def store(store_url):
    s = open_job_store(store_url)
    yield s
    s.close()


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
