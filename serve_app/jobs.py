"""Durable job records: states, progress, outputs and leases, in SQLite.

Several ingress replicas (processes) can share one database file: a job is run by whoever holds
its lease, and a lease that is not renewed (its holder died) is taken over by another. Each call
opens its own short transaction, so nothing is held only in a process's memory.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deployments.spec import GenerationSpec

ACTIVE = ("in_queue", "in_progress")
FINAL = ("succeeded", "failed", "canceled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    specs TEXT NOT NULL,
    num_prompts INTEGER NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_active ON jobs(status, lease_until);
"""


@dataclass
class Job:
    id: str
    owner: str
    idempotency_key: str | None
    status: str
    model: str
    specs_json: str
    num_prompts: int
    progress: dict[str, Any]
    outputs: list[dict[str, Any]]
    error: dict[str, Any] | None
    metadata: dict[str, Any]
    attempts: int
    cancel_requested: bool
    lease_owner: str | None
    lease_until: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    _specs: list[GenerationSpec] | None = field(default=None, repr=False)

    @property
    def specs(self) -> list[GenerationSpec]:
        if self._specs is None:
            self._specs = [GenerationSpec.model_validate_json(s) for s in json.loads(self.specs_json)]
        return self._specs

    @property
    def final(self) -> bool:
        return self.status in FINAL


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        owner=row["owner"],
        idempotency_key=row["idempotency_key"],
        status=row["status"],
        model=row["model"],
        specs_json=row["specs"],
        num_prompts=row["num_prompts"],
        progress=json.loads(row["progress"]),
        outputs=json.loads(row["outputs"]),
        error=json.loads(row["error"]) if row["error"] else None,
        metadata=json.loads(row["metadata"]),
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class QueueFull(Exception):
    def __init__(self, scope: str, limit: int):
        super().__init__(f"{scope} queue is full ({limit} jobs)")
        self.scope = scope
        self.limit = limit


class JobStore:
    """The job table. Thread-safe; every method is one short transaction."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)  # executescript manages its own transaction

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- creation ------------------------------------------------------------------------------

    def create(self, specs: list[GenerationSpec], model: str, owner: str = "", idempotency_key: str | None = None,
               max_total: int | None = None, max_per_owner: int | None = None,
               metadata: dict | None = None) -> tuple[Job, bool]:
        """Insert a job in ``in_queue``; returns (job, created). An idempotency key repeats the first job.

        Raises:
            QueueFull: too many active jobs overall or for this owner.
        """
        now = time.time()
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE owner=? AND idempotency_key=?",
                                 (owner, idempotency_key)).fetchone()
                if row is not None:
                    return _row_to_job(row), False
            if max_total is not None:
                (n,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('in_queue','in_progress')").fetchone()
                if n >= max_total:
                    raise QueueFull("total", max_total)
            if max_per_owner is not None:
                (n,) = db.execute("SELECT COUNT(*) FROM jobs WHERE owner=? AND status IN ('in_queue','in_progress')",
                                  (owner,)).fetchone()
                if n >= max_per_owner:
                    raise QueueFull("per-key", max_per_owner)
            job_id = str(uuid.uuid4())
            specs_json = json.dumps([s.model_dump_json() for s in specs])
            progress = {"prompt_index": 0, "num_prompts": len(specs), "stage": "queued", "step": 0,
                        "total_steps": specs[0].steps if specs else 0}
            db.execute(
                "INSERT INTO jobs (id, owner, idempotency_key, status, model, specs, num_prompts, progress, metadata,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, owner, idempotency_key, "in_queue", model, specs_json, len(specs), json.dumps(progress),
                 json.dumps(metadata or {}), now),
            )
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row_to_job(row), True

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        """The job an owner already submitted with this Idempotency-Key, if any."""
        row = self._conn().execute("SELECT * FROM jobs WHERE owner=? AND idempotency_key=?", (owner, key)).fetchone()
        return _row_to_job(row) if row else None

    def count(self, statuses: tuple[str, ...] | None = None) -> int:
        if statuses is None:
            return self._conn().execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        marks = ",".join("?" * len(statuses))
        return self._conn().execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def orphans(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Active jobs whose lease is free or expired, oldest first."""
        now = time.time() if now is None else now
        rows = self._conn().execute(
            "SELECT id FROM jobs WHERE status IN ('in_queue','in_progress') AND lease_until < ? "
            "ORDER BY created_at LIMIT ?", (now, limit)).fetchall()
        return [r["id"] for r in rows]

    # -- leases --------------------------------------------------------------------------------

    def claim(self, job_id: str, holder: str, lease_s: float) -> Job | None:
        """Take the job's lease if it is free, expired or already ours; None if someone else holds it."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_owner=?, lease_until=? WHERE id=? AND status IN ('in_queue','in_progress') "
                "AND (lease_until < ? OR lease_owner=?)", (holder, now + lease_s, job_id, now, holder))
            if cur.rowcount == 0:
                return None
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row_to_job(row)

    def renew(self, job_id: str, holder: str, lease_s: float) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET lease_until=? WHERE id=? AND lease_owner=? AND status IN "
                             "('in_queue','in_progress')", (time.time() + lease_s, job_id, holder))
            return cur.rowcount == 1

    def release(self, job_id: str, holder: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET lease_until=0 WHERE id=? AND lease_owner=?", (job_id, holder))

    # -- transitions ---------------------------------------------------------------------------

    def start_attempt(self, job_id: str, holder: str) -> int:
        """Count one more attempt; returns the attempt number."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts=attempts+1 WHERE id=? AND lease_owner=?", (job_id, holder))
            return db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()[0]

    def set_progress(self, job_id: str, holder: str, progress: dict[str, Any]) -> bool:
        """Record progress (job becomes in_progress); False if the job is no longer ours or was canceled."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='in_progress', progress=?, started_at=COALESCE(started_at, ?) "
                "WHERE id=? AND lease_owner=? AND status IN ('in_queue','in_progress') AND cancel_requested=0",
                (json.dumps(progress), now, job_id, holder))
            return cur.rowcount == 1

    def add_output(self, job_id: str, holder: str, output: dict[str, Any], timings: dict[str, float]) -> None:
        with self._tx() as db:
            row = db.execute("SELECT outputs, metadata FROM jobs WHERE id=?", (job_id,)).fetchone()
            outputs = json.loads(row["outputs"]) + [output]
            metadata = json.loads(row["metadata"])
            metadata.setdefault("timings", []).append(timings)
            # Which replica made each output (host:pid): where a LoRA set is resident, for operators.
            metadata.setdefault("replicas", []).append(output.get("replica"))
            db.execute("UPDATE jobs SET outputs=?, metadata=? WHERE id=? AND lease_owner=?",
                       (json.dumps(outputs), json.dumps(metadata), job_id, holder))

    def merge_metadata(self, job_id: str, holder: str, updates: dict[str, Any]) -> bool:
        """Merge keys into the job's metadata while we hold its lease."""
        with self._tx() as db:
            row = db.execute("SELECT metadata FROM jobs WHERE id=? AND lease_owner=?", (job_id, holder)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET metadata=? WHERE id=?",
                       (json.dumps({**json.loads(row["metadata"]), **updates}), job_id))
            return True

    def finish(self, job_id: str, status: str, error: dict[str, Any] | None = None,
               holder: str | None = None, metadata: dict[str, Any] | None = None) -> bool:
        """Move an active job to a final state (once: a final job never changes again)."""
        assert status in FINAL
        now = time.time()
        with self._tx() as db:
            query = ("UPDATE jobs SET status=?, error=?, finished_at=?, lease_owner=NULL, lease_until=0 "
                     "WHERE id=? AND status IN ('in_queue','in_progress')")
            params: list[Any] = [status, json.dumps(error) if error else None, now, job_id]
            if holder is not None:
                query += " AND lease_owner=?"
                params.append(holder)
            cur = db.execute(query, params)
            if cur.rowcount and metadata:
                row = db.execute("SELECT metadata FROM jobs WHERE id=?", (job_id,)).fetchone()
                merged = {**json.loads(row["metadata"]), **metadata}
                db.execute("UPDATE jobs SET metadata=? WHERE id=?", (json.dumps(merged), job_id))
            return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> Job | None:
        """Flag a job for cancellation; a queued job nobody runs yet is canceled at once."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=? AND status IN ('in_queue','in_progress')",
                       (job_id,))
            db.execute("UPDATE jobs SET status='canceled', finished_at=?, error=?, lease_owner=NULL, lease_until=0 "
                       "WHERE id=? AND status='in_queue' AND lease_until < ?",
                       (now, json.dumps({"code": "CANCELED", "message": "canceled by request", "details": {}}),
                        job_id, now))
            row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def cancel_requested(self, job_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return bool(row and row[0])

    def expired_before(self, cutoff: float) -> list[Job]:
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE status IN ('succeeded','failed','canceled') AND finished_at < ?",
            (cutoff,)).fetchall()
        return [_row_to_job(r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
