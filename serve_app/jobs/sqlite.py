"""The embedded job store: one SQLite file on one node (WAL mode, so readers never wait for writers).

Several ingress replicas *on one node* may share the file. SQLite's own documentation says WAL and
its file locking do not work on a network filesystem: for ingress replicas on several nodes use the
PostgreSQL backend (``serve_app/jobs/postgres.py``).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..state_errors import StoreUnavailable
from .records import (
    CANCELED,
    FINAL,
    SUMMARY_COLUMNS,
    WEBHOOK_STATES,
    Job,
    JobEvent,
    final_progress,
    initial_progress,
    row_to_event,
    row_to_job,
    specs_to_json,
)
from .store import JobStore, Lease, QueueFull, migration_statements

_ACTIVE_SQL = "('in_queue','in_progress')"
_FINAL_SQL = "('succeeded','failed','canceled')"

# Migration n takes the schema from version n-1 to n. Version 1 is the schema of the first release
# (which had no version table), so its statements are idempotent.
MIGRATIONS: list[str] = [
    """
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
    """,
    """
    CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS jobs_queue_order ON jobs(created_at) WHERE status IN ('in_queue','in_progress');
    CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    """,
    """
    ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
    ALTER TABLE jobs ADD COLUMN webhook_state TEXT;
    ALTER TABLE jobs ADD COLUMN webhook_attempts TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN webhook_next_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN webhook_lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN webhook_lease_until REAL NOT NULL DEFAULT 0;
    CREATE INDEX jobs_webhooks_pending ON jobs(webhook_next_at) WHERE webhook_state = 'pending';
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    CREATE INDEX IF NOT EXISTS jobs_owner_recent ON jobs(owner, created_at, id);
    """,
    # The per-job event log (see JobEvent); jobs already there get one event of their present state,
    # and a final job's stage becomes "done".
    """
    ALTER TABLE jobs ADD COLUMN event_seq INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE job_events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        status TEXT NOT NULL,
        progress TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        started_at REAL,
        at REAL NOT NULL,
        PRIMARY KEY (job_id, seq)
    ) WITHOUT ROWID;
    UPDATE jobs SET progress = json_set(progress, '$.stage', 'done') WHERE status IN ('succeeded','failed','canceled');
    INSERT INTO job_events (job_id, seq, status, progress, attempts, started_at, at)
        SELECT id, 1, status, progress, attempts, started_at, COALESCE(finished_at, started_at, created_at) FROM jobs;
    UPDATE jobs SET event_seq = 1;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _unavailable(method):
    """SQLite's operational errors (locked past the timeout, disk I/O, unopenable) -> STORE_UNAVAILABLE."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"the job database is unavailable: {e}", {"store": "jobs", "backend": "sqlite"}) from e

    return wrapper


class SqliteJobStore(JobStore):
    """The job table in one SQLite file."""

    backend = "sqlite"

    def __init__(self, path: str | os.PathLike, timeout_s: float = 5.0):
        self.path = Path(os.path.expanduser(str(path)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self.schema_version = self._migrate()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
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

    @staticmethod
    def _append_event(db: sqlite3.Connection, job_id: str, now: float) -> None:
        """Log the job's status and progress as this transaction leaves them (see ``JobEvent``)."""
        row = db.execute("UPDATE jobs SET event_seq=event_seq+1 WHERE id=? "
                         "RETURNING event_seq, status, progress, attempts, started_at", (job_id,)).fetchone()
        db.execute("INSERT INTO job_events (job_id, seq, status, progress, attempts, started_at, at) "
                   "VALUES (?,?,?,?,?,?,?)", (job_id, *tuple(row), now))

    @_unavailable
    def _migrate(self) -> int:
        with self._tx() as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "schema_version" in tables:
                current = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            else:
                current = 1 if "jobs" in tables else 0
            for statement in migration_statements(MIGRATIONS, current, str(self.path)):
                db.execute(statement)
            if current < SCHEMA_VERSION:
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        return SCHEMA_VERSION

    # -- creation -------------------------------------------------------------------------------

    @_unavailable
    def create(self, job_id, specs, model, owner="", idempotency_key=None, max_total=None, max_per_owner=None,
               metadata=None, webhook_url=None):
        now = time.time()
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE owner=? AND idempotency_key=?",
                                 (owner, idempotency_key)).fetchone()
                if row is not None:
                    return row_to_job(row), False
            if max_total is not None:
                (n,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN {_ACTIVE_SQL}").fetchone()
                if n >= max_total:
                    raise QueueFull("total", max_total)
            if max_per_owner is not None:
                (n,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE owner=? AND status IN {_ACTIVE_SQL}",
                                  (owner,)).fetchone()
                if n >= max_per_owner:
                    raise QueueFull("per-key", max_per_owner)
            db.execute(
                "INSERT INTO jobs (id, owner, idempotency_key, status, model, specs, num_prompts, progress, metadata,"
                " created_at, webhook_url, webhook_state) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, owner, idempotency_key, "in_queue", model, specs_to_json(specs), len(specs),
                 json.dumps(initial_progress(specs)), json.dumps(metadata or {}), now, webhook_url,
                 "pending" if webhook_url else None),
            )
            self._append_event(db, job_id, now)
            row = db.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row_to_job(row), True

    # -- reads ----------------------------------------------------------------------------------

    @_unavailable
    def get(self, job_id: str, specs: bool = False) -> Job | None:
        columns = "*" if specs else SUMMARY_COLUMNS
        row = self._conn().execute(f"SELECT {columns} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row_to_job(row) if row else None

    @_unavailable
    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        row = self._conn().execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE owner=? AND idempotency_key=?",
                                   (owner, key)).fetchone()
        return row_to_job(row) if row else None

    @_unavailable
    def recent(self, owner: str, limit: int, before: tuple[float, str] | None = None) -> list[Job]:
        after = "AND (created_at, id) < (?, ?) " if before is not None else ""
        rows = self._conn().execute(
            f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE owner=? {after}ORDER BY created_at DESC, id DESC LIMIT ?",
            (owner, *(before or ()), limit)).fetchall()
        return [row_to_job(r) for r in rows]

    @_unavailable
    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        rows = self._conn().execute("SELECT seq, status, progress, attempts, started_at, at FROM job_events "
                                    "WHERE job_id=? AND seq>? "
                                    "ORDER BY seq LIMIT ?", (job_id, after, limit)).fetchall()
        return [row_to_event(r) for r in rows]

    @_unavailable
    def count(self, statuses: tuple[str, ...] | None = None) -> int:
        if statuses is None:
            return self._conn().execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        marks = ",".join("?" * len(statuses))
        return self._conn().execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    @_unavailable
    def active_counts(self) -> dict[str, int]:
        now = time.time()
        row = self._conn().execute(
            "SELECT COALESCE(SUM(lease_until < ?), 0) AS waiting,"
            " COALESCE(SUM(lease_until >= ? AND status='in_queue'), 0) AS dispatched,"
            " COALESCE(SUM(lease_until >= ? AND status='in_progress'), 0) AS running"
            f" FROM jobs WHERE status IN {_ACTIVE_SQL}", (now, now, now)).fetchone()
        return {k: int(row[k]) for k in ("waiting", "dispatched", "running")}

    # -- leases ---------------------------------------------------------------------------------

    @_unavailable
    def claim_next(self, holder: str, lease_s: float) -> Job | None:
        now = time.time()
        with self._tx() as db:  # BEGIN IMMEDIATE: one claimer at a time, so no job is claimed twice
            row = db.execute(f"SELECT id FROM jobs WHERE status IN {_ACTIVE_SQL} AND lease_until < ? "
                             "ORDER BY created_at, rowid LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET lease_owner=?, lease_until=? WHERE id=?", (holder, now + lease_s, row["id"]))
            claimed = db.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return row_to_job(claimed)

    @_unavailable
    def renew(self, job_id: str, holder: str, lease_s: float) -> Lease:
        with self._tx() as db:
            cur = db.execute(f"UPDATE jobs SET lease_until=? WHERE id=? AND lease_owner=? AND status IN {_ACTIVE_SQL}",
                             (time.time() + lease_s, job_id, holder))
            if cur.rowcount != 1:
                return Lease(held=False)
            (cancel,) = db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Lease(held=True, cancel_requested=bool(cancel))

    @_unavailable
    def release(self, job_id: str, holder: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET lease_until=0 WHERE id=? AND lease_owner=?", (job_id, holder))

    # -- transitions ----------------------------------------------------------------------------

    @_unavailable
    def start_attempt(self, job_id: str, holder: str) -> int:
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts=attempts+1 WHERE id=? AND lease_owner=?", (job_id, holder))
            return db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()[0]

    @_unavailable
    def set_progress(self, job_id: str, holder: str, progress: dict[str, Any]) -> bool:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status='in_progress', progress=?, started_at=COALESCE(started_at, ?) "
                f"WHERE id=? AND lease_owner=? AND status IN {_ACTIVE_SQL} AND cancel_requested=0",
                (json.dumps(progress), now, job_id, holder))
            if cur.rowcount != 1:
                return False
            self._append_event(db, job_id, now)
            return True

    @_unavailable
    def add_output(self, job_id: str, holder: str, output: dict[str, Any], timings: dict[str, float]) -> bool:
        with self._tx() as db:
            row = db.execute(f"SELECT outputs, metadata FROM jobs WHERE id=? AND lease_owner=? AND status IN "
                             f"{_ACTIVE_SQL}", (job_id, holder)).fetchone()
            if row is None:
                return False
            outputs = json.loads(row["outputs"]) + [output]
            metadata = json.loads(row["metadata"])
            metadata.setdefault("timings", []).append(timings)
            # Which replica made each output (host:pid): where a LoRA set is resident, for operators.
            metadata.setdefault("replicas", []).append(output.get("replica"))
            db.execute("UPDATE jobs SET outputs=?, metadata=? WHERE id=?",
                       (json.dumps(outputs), json.dumps(metadata), job_id))
            return True

    @_unavailable
    def merge_metadata(self, job_id: str, holder: str, updates: dict[str, Any]) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT metadata FROM jobs WHERE id=? AND lease_owner=?", (job_id, holder)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET metadata=? WHERE id=?",
                       (json.dumps({**json.loads(row["metadata"]), **updates}), job_id))
            return True

    @_unavailable
    def finish(self, job_id, status, error=None, holder=None, metadata=None) -> bool:
        assert status in FINAL
        now = time.time()
        with self._tx() as db:
            query = ("UPDATE jobs SET status=?, error=?, finished_at=?, lease_owner=NULL, lease_until=0 "
                     f"WHERE id=? AND status IN {_ACTIVE_SQL}")
            params: list[Any] = [status, json.dumps(error) if error else None, now, job_id]
            if holder is not None:
                query += " AND lease_owner=?"
                params.append(holder)
            cur = db.execute(query, params)
            if cur.rowcount != 1:
                return False
            self._settle(db, job_id, status, now, metadata)
            return True

    def _settle(self, db: sqlite3.Connection, job_id: str, status: str, now: float,
                metadata: dict[str, Any] | None = None) -> None:
        """The rest of a job's move to a final state, in the same transaction: stage "done", its event."""
        row = db.execute("SELECT progress, metadata, num_prompts FROM jobs WHERE id=?", (job_id,)).fetchone()
        db.execute("UPDATE jobs SET progress=?, metadata=? WHERE id=?",
                   (json.dumps(final_progress(json.loads(row["progress"]), status, row["num_prompts"])),
                    json.dumps({**json.loads(row["metadata"]), **(metadata or {})}), job_id))
        self._append_event(db, job_id, now)

    @_unavailable
    def request_cancel(self, job_id: str) -> tuple[Job | None, bool]:
        now = time.time()
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET cancel_requested=1 WHERE id=? AND status IN {_ACTIVE_SQL}", (job_id,))
            cur = db.execute("UPDATE jobs SET status='canceled', finished_at=?, error=?, lease_owner=NULL, "
                             "lease_until=0 WHERE id=? AND status='in_queue' AND lease_until < ?",
                             (now, json.dumps(CANCELED), job_id, now))
            if cur.rowcount == 1:
                self._settle(db, job_id, "canceled", now)
            row = db.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return (row_to_job(row) if row else None), cur.rowcount == 1

    # -- webhook deliveries ---------------------------------------------------------------------

    @_unavailable
    def claim_webhook(self, holder: str, lease_s: float) -> Job | None:
        now = time.time()
        with self._tx() as db:  # BEGIN IMMEDIATE: one claimer at a time
            row = db.execute(f"SELECT id FROM jobs WHERE webhook_state='pending' AND status IN {_FINAL_SQL} "
                             "AND webhook_next_at <= ? AND webhook_lease_until < ? ORDER BY finished_at LIMIT 1",
                             (now, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET webhook_lease_owner=?, webhook_lease_until=? WHERE id=?",
                       (holder, now + lease_s, row["id"]))
            claimed = db.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return row_to_job(claimed)

    @_unavailable
    def record_webhook_attempt(self, job_id, holder, attempt, state, retry_in_s=0.0) -> bool:
        assert state in WEBHOOK_STATES
        with self._tx() as db:
            row = db.execute("SELECT webhook_attempts FROM jobs WHERE id=? AND webhook_lease_owner=? AND "
                             "webhook_state='pending'", (job_id, holder)).fetchone()
            if row is None:
                return False
            db.execute("UPDATE jobs SET webhook_attempts=?, webhook_state=?, webhook_next_at=?, "
                       "webhook_lease_owner=NULL, webhook_lease_until=0 WHERE id=?",
                       (json.dumps(json.loads(row["webhook_attempts"]) + [attempt]), state,
                        time.time() + retry_in_s, job_id))
            return True

    @_unavailable
    def server_secret(self, name: str) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                       (name, secrets.token_hex(32)))
            return db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()[0]

    # -- retention ------------------------------------------------------------------------------

    @_unavailable
    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        rows = self._conn().execute(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ? "
            "AND (webhook_state IS NULL OR webhook_state <> 'pending') ORDER BY finished_at LIMIT ?",
            (cutoff, limit)).fetchall()
        return [r["id"] for r in rows]

    @_unavailable
    def delete(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            db.execute("DELETE FROM job_events WHERE job_id=?", (job_id,))

