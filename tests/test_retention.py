"""Retention over HTTP, both backends: a finished job older than ``storage.retention_s`` is gone with its
videos and control images (404 REQUEST_NOT_FOUND); running and recent jobs are kept."""

from __future__ import annotations

import time

import pytest

from tests.conftest import BACKENDS, SLOW_PROMPT, small_request


@pytest.mark.parametrize("backend", BACKENDS)
def test_expired_jobs_lose_their_rows_videos_and_control_images(serve_env, backend):
    from ray import serve

    from serve_app.config import StorageConfig
    from serve_app.storage import OutputStore

    name = f"retention-{backend}"
    args = serve_env.args_for(name, backend, storage={"retention_s": 3, "retention_sweep_s": 0.5})
    app = serve_env.deploy(name, f"/{name}", args)
    store = OutputStore(StorageConfig.model_validate(args["storage"]))
    try:
        done = app.run(small_request(seed=3))
        rid = done["request_id"]
        assert done["status"] == "succeeded"
        video = f"{rid}/0.mp4"
        assert store.size(video) > 0 and len(store.fs.ls(store.path(rid))) == 2  # video + control image
        # a long job still running when the finished one expires is kept
        running = app.submit(small_request(prompt=f"{SLOW_PROMPT} kept", sample_steps=40)).json()["request_id"]
        deadline = time.time() + 60
        while (r := app.http.get(f"/v1/requests/{rid}/status")).status_code == 200:
            assert time.time() < deadline, "the finished job was never deleted"
            time.sleep(0.2)
        assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
        for route in ("result", "outputs/0"):
            gone = app.http.get(f"/v1/requests/{rid}/{route}")
            assert gone.status_code == 404 and gone.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
        assert store.size(video) is None
        assert not store.fs.exists(store.path(rid)) or not store.fs.ls(store.path(rid))
        assert app.db_rows("id=?", (rid,)) == []
        assert app.http.get(f"/v1/requests/{running}/status").json()["status"] in ("in_queue", "in_progress")
        app.http.post(f"/v1/requests/{running}/cancel")
        assert app.wait(running, timeout=30)["status"] == "canceled"
    finally:
        serve.delete(name)


def test_retention_zero_keeps_everything_and_a_sweep_deletes_only_what_expired(tmp_path):
    import asyncio
    import uuid

    from serve_app.config import StorageConfig
    from serve_app.jobs import AsyncJobStore, StoredSpec, open_job_store
    from serve_app.retention import sweep_expired, sweep_forever
    from serve_app.storage import OutputStore
    from tests.conftest import tiny_spec

    assert StorageConfig().retention_s == 7 * 86400  # the documented default
    jobs = AsyncJobStore(open_job_store(str(tmp_path / "jobs.sqlite3")))
    outputs = OutputStore(StorageConfig(outputs_dir=str(tmp_path / "videos")))
    spec = StoredSpec(tiny_spec().model_copy(update={"image_png": b""}), None)

    async def scenario():
        ids = []
        for _ in range(3):
            job, _ = await jobs.create(str(uuid.uuid4()), [spec], "m")
            outputs.put(f"{job.id}/0.mp4", b"video")
            ids.append(job.id)
        for job_id in ids[:2]:
            await jobs.request_cancel(job_id)  # finished now; the third stays queued
        await asyncio.wait_for(sweep_forever(jobs, outputs, 0, 0.01), 5)  # 0: returns, deletes nothing
        kept = [await jobs.get(i) for i in ids]
        await asyncio.sleep(0.05)
        deleted = await sweep_expired(jobs, outputs, 0.01)
        return ids, kept, deleted, [await jobs.get(i) for i in ids]

    ids, kept, deleted, after = asyncio.run(scenario())
    assert all(kept) and deleted == 2
    assert after[0] is None and after[1] is None and after[2].status == "in_queue"
    assert outputs.size(f"{ids[0]}/0.mp4") is None and outputs.size(f"{ids[2]}/0.mp4") == 5
    jobs.close()
