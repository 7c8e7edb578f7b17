"""Retention: finished jobs older than ``storage.retention_s`` are deleted with their videos and control images.

Every ingress replica sweeps; deletes are idempotent, so two sweeping at once is harmless. The files
go first and the row last, so a sweep that dies half-way leaves a row the next sweep finds again
(never files that nothing points to).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .jobs import AsyncJobStore
from .storage import OutputStore

log = logging.getLogger("ray.serve")


async def sweep_expired(jobs: AsyncJobStore, outputs: OutputStore, retention_s: float, batch: int = 100) -> int:
    """Delete every job that finished more than ``retention_s`` ago; returns how many."""
    deleted = 0
    while True:
        ids = await jobs.finished_before(time.time() - retention_s, batch)
        for job_id in ids:
            await asyncio.to_thread(outputs.delete_job, job_id)
            await jobs.delete(job_id)
        deleted += len(ids)
        if len(ids) < batch:
            return deleted


async def sweep_forever(jobs: AsyncJobStore, outputs: OutputStore, retention_s: float, every_s: float) -> None:
    """The periodic sweep (``retention_s`` 0 keeps everything: nothing runs)."""
    if retention_s <= 0:
        return
    while True:
        try:
            n = await sweep_expired(jobs, outputs, retention_s)
            if n:
                log.info("retention: deleted %d finished jobs older than %.0f s", n, retention_s)
        except Exception as e:  # the next sweep tries again
            log.warning("retention sweep failed: %s: %s", type(e).__name__, e)
        await asyncio.sleep(every_s)
