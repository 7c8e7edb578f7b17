"""The cluster job store: PostgreSQL, shared by every ingress replica on every node.

- Claims take the oldest claimable job (or due webhook delivery) with ``SELECT ... FOR UPDATE SKIP
  LOCKED``: concurrent runners on several nodes never get the same one and never wait for each
  other's rows.
- Every time (created, leased, started, finished) comes from the database's clock, so leases mean
  the same on every node whatever their clocks say.
- The schema is versioned (``schema_version``) and created or migrated at start under an advisory
  lock, so replicas starting together migrate once.
- Connections come from a pool; credentials from the URL or libpq's environment (``PGPASSWORD``,
  ``PGUSER``, ``PGPASSFILE``, ...). Any connection-level failure is ``STORE_UNAVAILABLE``.
- Outages answer fast and heal on their own: every connection has a connect timeout and a server-side
  statement timeout; a pooled connection is checked before use; once a call found the database down,
  later calls wait only ``connect_timeout_s`` for a connection (not the full ``timeout_s``) until one
  succeeds; and the pool gives up a reconnection attempt after a few seconds, so the next call starts a
  fresh one instead of waiting out psycopg_pool's backoff (which doubles up to 16 s between tries).
"""

from __future__ import annotations

import functools
import secrets
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from deployments.contract import first_line

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
from .store import JobStore, Lease, QueueFull, StoreRefused, migration_statements

NOW = "extract(epoch from clock_timestamp())::double precision"
ACTIVE_SQL = "status IN ('in_queue','in_progress')"
FINAL_SQL = "status IN ('succeeded','failed','canceled')"
# Advisory lock keys (any constant bigint): migrations, and submits (so queue limits are exact).
LOCK_MIGRATE = 7_301_000_001
LOCK_SUBMIT = 7_301_000_002


def _logged(update: str) -> str:
    """``update`` (an ``UPDATE jobs ... RETURNING id`` of one row) that also appends the job's event.

    One statement: the event is numbered from the row's ``event_seq``, which the update bumps while
    it holds the row's lock, so a job's events commit in the order of their numbers.
    """
    head, sep, _ = update.rpartition(" RETURNING id")
    assert sep and head.startswith("UPDATE jobs SET "), update
    head = head.replace("UPDATE jobs SET ", "UPDATE jobs SET event_seq = event_seq + 1, ", 1)
    return (f"WITH u AS ({head} RETURNING id, event_seq, status, progress, attempts, started_at), "
            "e AS (INSERT INTO job_events (job_id, seq, status, progress, attempts, started_at, at) "
            f"SELECT id, event_seq, status, progress, attempts, started_at, {NOW} FROM u) SELECT id FROM u")


# records.final_progress in SQL (one parameter: the final status).
_FINAL_PROGRESS = ("progress || jsonb_build_object('stage', 'done') || CASE WHEN %s::text = 'succeeded' THEN "
                   "jsonb_build_object('prompt_index', GREATEST(num_prompts - 1, 0), "
                   "'step', COALESCE(progress->'total_steps', '0'::jsonb)) ELSE '{}'::jsonb END")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        seq bigserial,
        owner text NOT NULL DEFAULT '',
        idempotency_key text,
        status text NOT NULL,
        model text NOT NULL,
        specs text NOT NULL,
        num_prompts integer NOT NULL,
        progress jsonb NOT NULL DEFAULT '{}',
        outputs jsonb NOT NULL DEFAULT '[]',
        error jsonb,
        metadata jsonb NOT NULL DEFAULT '{}',
        attempts integer NOT NULL DEFAULT 0,
        cancel_requested boolean NOT NULL DEFAULT false,
        lease_owner text,
        lease_until double precision NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        started_at double precision,
        finished_at double precision
    );
    CREATE UNIQUE INDEX jobs_idem ON jobs(owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_queue_order ON jobs(created_at, seq) WHERE status IN ('in_queue','in_progress');
    CREATE INDEX jobs_owner_active ON jobs(owner) WHERE status IN ('in_queue','in_progress');
    CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
    """,
    """
    ALTER TABLE jobs
        ADD COLUMN webhook_url text,
        ADD COLUMN webhook_state text,
        ADD COLUMN webhook_attempts jsonb NOT NULL DEFAULT '[]',
        ADD COLUMN webhook_next_at double precision NOT NULL DEFAULT 0,
        ADD COLUMN webhook_lease_owner text,
        ADD COLUMN webhook_lease_until double precision NOT NULL DEFAULT 0;
    CREATE INDEX jobs_webhooks_pending ON jobs(webhook_next_at) WHERE webhook_state = 'pending';
    CREATE TABLE settings (name text PRIMARY KEY, value text NOT NULL);
    """,
    # Plain CREATE INDEX (CONCURRENTLY cannot run in the migration's transaction): it blocks job
    # writes while it builds, moments on a jobs table that retention keeps small.
    """
    CREATE INDEX IF NOT EXISTS jobs_owner_recent ON jobs(owner, created_at, id);
    """,
    # The per-job event log (see JobEvent); jobs already there get one event of their present state,
    # and a final job's stage becomes "done".
    """
    ALTER TABLE jobs ADD COLUMN event_seq integer NOT NULL DEFAULT 0;
    CREATE TABLE job_events (
        job_id text NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        seq integer NOT NULL,
        status text NOT NULL,
        progress jsonb NOT NULL,
        attempts integer NOT NULL,
        started_at double precision,
        at double precision NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    UPDATE jobs SET progress = jsonb_set(progress, '{stage}', '"done"') WHERE status IN ('succeeded','failed','canceled');
    INSERT INTO job_events (job_id, seq, status, progress, attempts, started_at, at)
        SELECT id, 1, status, progress, attempts, started_at, COALESCE(finished_at, started_at, created_at) FROM jobs;
    UPDATE jobs SET event_seq = 1;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        p = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://<unparseable URL>"
    return f"postgresql://{p.get('user', '')}@{p.get('host', '')}:{p.get('port', 5432)}/{p.get('dbname', '')}"


_LOST = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)
# Errors the server sends while it cannot take connections for a moment: worth waiting for.
_TRANSIENT_REFUSALS = ("starting up", "shutting down", "in recovery", "too many clients", "not yet accepting")


def _unavailable(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            result = method(self, *args, **kwargs)
        except _LOST as e:
            self._down = True
            raise StoreUnavailable(f"the job database is unavailable: {first_line(e)}",
                                   {"store": "jobs", "backend": "postgresql"}) from e
        self._down = False
        return result

    return wrapper


class PostgresJobStore(JobStore):
    """The job table in PostgreSQL, through a connection pool."""

    backend = "postgresql"

    def __init__(self, url: str, pool_size: int = 8, timeout_s: float = 3.0, connect_timeout_s: int = 2):
        self.url = describe(url)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._down = False  # the last call found the database unreachable
        conninfo = make_conninfo(
            url,
            connect_timeout=max(2, int(connect_timeout_s)),  # per address tried; libpq's minimum is 2
            application_name="wan-i2v-serve",
            # A peer that vanished (node lost, network cut) is noticed in seconds, not hours.
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            options=f"-c statement_timeout={int(timeout_s * 1000)}",
        )
        self._probe(conninfo)
        self._pool = psycopg_pool.ConnectionPool(
            conninfo, min_size=1, max_size=pool_size, timeout=timeout_s, open=False, name="wan-jobs",
            kwargs={"row_factory": dict_row}, check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=max(5.0, 2.0 * connect_timeout_s),
        )
        try:
            self._pool.open(wait=True, timeout=timeout_s)
        except psycopg_pool.PoolTimeout as e:
            self._pool.close()
            raise StoreUnavailable(f"cannot connect to the job database {self.url} within {timeout_s:g} s",
                                   {"store": "jobs", "backend": "postgresql"}) from e
        self.schema_version = self._migrate()

    def _probe(self, conninfo: str) -> None:
        """One direct connection first: it tells a database that is down (wait for it) from one that refuses
        us (a wrong password, no such database: say so and stop), which the pool's timeout would hide.

        Raises:
            StoreUnavailable: no answer, or a refusal that passes.
            StoreRefused: the server refused us for good.
        """
        try:
            psycopg.connect(conninfo).close()
        except psycopg.OperationalError as e:
            text = str(e)
            message = text.split("FATAL:", 1)[-1].strip().splitlines()[0] if "FATAL:" in text else first_line(e)
            if ("FATAL:" in text or "no password supplied" in text) and not any(t in text for t in _TRANSIENT_REFUSALS):
                raise StoreRefused(f"the job database {self.url} refuses this replica: {message}") from e
            raise StoreUnavailable(f"cannot connect to the job database {self.url}: {message}",
                                   {"store": "jobs", "backend": "postgresql"}) from e

    def _connection(self):
        # While the database is known to be down, answer within the connect timeout: a connection the
        # pool is making right now is still taken, a pool without hope is not waited on.
        return self._pool.connection(timeout=self.connect_timeout_s if self._down else self.timeout_s)

    def close(self) -> None:
        self._pool.close()

    @_unavailable
    def _migrate(self) -> int:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_MIGRATE,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            current = conn.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version").fetchone()["v"]
            for statement in migration_statements(MIGRATIONS, current, self.url):
                conn.execute(statement)
            if current < SCHEMA_VERSION:
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        return SCHEMA_VERSION

    def _one(self, sql: str, params: Any = ()) -> dict | None:
        with self._connection() as conn:
            return conn.execute(sql, params).fetchone()

    # -- creation -------------------------------------------------------------------------------

    @_unavailable
    def create(self, job_id, specs, model, owner="", idempotency_key=None, max_total=None, max_per_owner=None,
               metadata=None, webhook_url=None):
        with self._connection() as conn, conn.transaction():
            # One submit at a time cluster-wide: the limits below are exact, and an idempotency key
            # raced from two nodes yields one row (the unique index would refuse the second anyway).
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_SUBMIT,))
            if idempotency_key is not None:
                row = conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE owner=%s AND idempotency_key=%s",
                                   (owner, idempotency_key)).fetchone()
                if row is not None:
                    return row_to_job(row), False
            if max_total is not None:
                n = conn.execute(f"SELECT COUNT(*) AS n FROM jobs WHERE {ACTIVE_SQL}").fetchone()["n"]
                if n >= max_total:
                    raise QueueFull("total", max_total)
            if max_per_owner is not None:
                n = conn.execute(f"SELECT COUNT(*) AS n FROM jobs WHERE owner=%s AND {ACTIVE_SQL}",
                                 (owner,)).fetchone()["n"]
                if n >= max_per_owner:
                    raise QueueFull("per-key", max_per_owner)
            row = conn.execute(
                "INSERT INTO jobs (id, owner, idempotency_key, status, model, specs, num_prompts, progress, metadata,"
                f" created_at, webhook_url, webhook_state, event_seq) VALUES (%s,%s,%s,'in_queue',%s,%s,%s,%s,%s,{NOW},"
                f"%s,%s,1) RETURNING {SUMMARY_COLUMNS}",
                (job_id, owner, idempotency_key, model, specs_to_json(specs), len(specs), Jsonb(initial_progress(specs)),
                 Jsonb(metadata or {}), webhook_url, "pending" if webhook_url else None)).fetchone()
            conn.execute("INSERT INTO job_events (job_id, seq, status, progress, attempts, at) "
                         "VALUES (%s, 1, %s, %s, 0, %s)", (job_id, row["status"], Jsonb(row["progress"]), row["created_at"]))
        return row_to_job(row), True

    # -- reads ----------------------------------------------------------------------------------

    @_unavailable
    def get(self, job_id: str, specs: bool = False) -> Job | None:
        columns = f"{SUMMARY_COLUMNS}, specs" if specs else SUMMARY_COLUMNS
        row = self._one(f"SELECT {columns} FROM jobs WHERE id=%s", (job_id,))
        return row_to_job(row) if row else None

    @_unavailable
    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        row = self._one(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE owner=%s AND idempotency_key=%s", (owner, key))
        return row_to_job(row) if row else None

    @_unavailable
    def recent(self, owner: str, limit: int, before: tuple[float, str] | None = None) -> list[Job]:
        after = "AND (created_at, id) < (%s, %s) " if before is not None else ""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE owner=%s {after}ORDER BY created_at DESC, id DESC LIMIT %s",
                (owner, *(before or ()), limit)).fetchall()
        return [row_to_job(r) for r in rows]

    @_unavailable
    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT seq, status, progress, attempts, started_at, at FROM job_events "
                                "WHERE job_id=%s AND seq>%s "
                                "ORDER BY seq LIMIT %s", (job_id, after, limit)).fetchall()
        return [row_to_event(r) for r in rows]

    @_unavailable
    def count(self, statuses: tuple[str, ...] | None = None) -> int:
        if statuses is None:
            return self._one("SELECT COUNT(*) AS n FROM jobs")["n"]
        return self._one("SELECT COUNT(*) AS n FROM jobs WHERE status = ANY(%s)", (list(statuses),))["n"]

    @_unavailable
    def active_counts(self) -> dict[str, int]:
        # One clock reading for every row (clock_timestamp() changes while a statement runs).
        row = self._one(
            "SELECT count(*) FILTER (WHERE lease_until < n.t) AS waiting,"
            " count(*) FILTER (WHERE lease_until >= n.t AND status='in_queue') AS dispatched,"
            " count(*) FILTER (WHERE lease_until >= n.t AND status='in_progress') AS running"
            f" FROM jobs, (SELECT {NOW} AS t) AS n WHERE {ACTIVE_SQL}")
        return {k: int(row[k]) for k in ("waiting", "dispatched", "running")}

    # -- leases ---------------------------------------------------------------------------------

    @_unavailable
    def claim_next(self, holder: str, lease_s: float) -> Job | None:
        with self._connection() as conn, conn.transaction():
            row = conn.execute(
                f"UPDATE jobs SET lease_owner=%s, lease_until={NOW} + %s WHERE id = ("
                f"  SELECT id FROM jobs WHERE {ACTIVE_SQL} AND lease_until < {NOW}"
                "   ORDER BY created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED"
                f") RETURNING {SUMMARY_COLUMNS}, specs", (holder, lease_s)).fetchone()
        return row_to_job(row) if row else None

    @_unavailable
    def renew(self, job_id: str, holder: str, lease_s: float) -> Lease:
        row = self._one(f"UPDATE jobs SET lease_until={NOW} + %s WHERE id=%s AND lease_owner=%s AND {ACTIVE_SQL} "
                        "RETURNING cancel_requested", (lease_s, job_id, holder))
        return Lease(held=row is not None, cancel_requested=bool(row and row["cancel_requested"]))

    @_unavailable
    def release(self, job_id: str, holder: str) -> None:
        self._one("UPDATE jobs SET lease_until=0 WHERE id=%s AND lease_owner=%s RETURNING id", (job_id, holder))

    # -- transitions ----------------------------------------------------------------------------

    @_unavailable
    def start_attempt(self, job_id: str, holder: str) -> int:
        row = self._one("UPDATE jobs SET attempts=attempts+1 WHERE id=%s AND lease_owner=%s RETURNING attempts",
                        (job_id, holder))
        if row is None:
            row = self._one("SELECT attempts FROM jobs WHERE id=%s", (job_id,))
        return row["attempts"]

    @_unavailable
    def set_progress(self, job_id: str, holder: str, progress: dict[str, Any]) -> bool:
        row = self._one(_logged(
            f"UPDATE jobs SET status='in_progress', progress=%s, started_at=COALESCE(started_at, {NOW}) "
            f"WHERE id=%s AND lease_owner=%s AND {ACTIVE_SQL} AND NOT cancel_requested RETURNING id"),
            (Jsonb(progress), job_id, holder))
        return row is not None

    @_unavailable
    def add_output(self, job_id: str, holder: str, output: dict[str, Any], timings: dict[str, float]) -> bool:
        row = self._one(
            "UPDATE jobs SET outputs = outputs || jsonb_build_array(%s::jsonb), metadata = metadata"
            " || jsonb_build_object('timings', COALESCE(metadata->'timings', '[]'::jsonb) || jsonb_build_array(%s::jsonb))"
            " || jsonb_build_object('replicas', COALESCE(metadata->'replicas', '[]'::jsonb)"
            "    || jsonb_build_array(%s::jsonb))"
            f" WHERE id=%s AND lease_owner=%s AND {ACTIVE_SQL} RETURNING id",
            (Jsonb(output), Jsonb(timings), Jsonb(output.get("replica")), job_id, holder))
        return row is not None

    @_unavailable
    def merge_metadata(self, job_id: str, holder: str, updates: dict[str, Any]) -> bool:
        row = self._one("UPDATE jobs SET metadata = metadata || %s WHERE id=%s AND lease_owner=%s RETURNING id",
                        (Jsonb(updates), job_id, holder))
        return row is not None

    @_unavailable
    def finish(self, job_id, status, error=None, holder=None, metadata=None) -> bool:
        assert status in FINAL
        query = (f"UPDATE jobs SET status=%s, error=%s, finished_at={NOW}, lease_owner=NULL, lease_until=0, "
                 f"metadata = metadata || %s, progress = {_FINAL_PROGRESS} WHERE id=%s AND {ACTIVE_SQL}")
        params: list[Any] = [status, Jsonb(error) if error else None, Jsonb(metadata or {}), status, job_id]
        if holder is not None:
            query += " AND lease_owner=%s"
            params.append(holder)
        return self._one(_logged(query + " RETURNING id"), params) is not None

    @_unavailable
    def request_cancel(self, job_id: str) -> tuple[Job | None, bool]:
        with self._connection() as conn, conn.transaction():
            conn.execute(f"UPDATE jobs SET cancel_requested=true WHERE id=%s AND {ACTIVE_SQL}", (job_id,))
            canceled = conn.execute(_logged(
                f"UPDATE jobs SET status='canceled', finished_at={NOW}, error=%s, lease_owner=NULL, lease_until=0, "
                f"progress = {_FINAL_PROGRESS} WHERE id=%s AND status='in_queue' AND lease_until < {NOW} RETURNING id"),
                (Jsonb(CANCELED), "canceled", job_id)).fetchone()
            row = conn.execute(f"SELECT {SUMMARY_COLUMNS} FROM jobs WHERE id=%s", (job_id,)).fetchone()
        return (row_to_job(row) if row else None), canceled is not None

    # -- webhook deliveries ---------------------------------------------------------------------

    @_unavailable
    def claim_webhook(self, holder: str, lease_s: float) -> Job | None:
        with self._connection() as conn, conn.transaction():
            row = conn.execute(
                f"UPDATE jobs SET webhook_lease_owner=%s, webhook_lease_until={NOW} + %s WHERE id = ("
                f"  SELECT id FROM jobs WHERE webhook_state='pending' AND {FINAL_SQL}"
                f"   AND webhook_next_at <= {NOW} AND webhook_lease_until < {NOW}"
                "   ORDER BY finished_at LIMIT 1 FOR UPDATE SKIP LOCKED"
                f") RETURNING {SUMMARY_COLUMNS}", (holder, lease_s)).fetchone()
        return row_to_job(row) if row else None

    @_unavailable
    def record_webhook_attempt(self, job_id, holder, attempt, state, retry_in_s=0.0) -> bool:
        assert state in WEBHOOK_STATES
        row = self._one(
            "UPDATE jobs SET webhook_attempts = webhook_attempts || jsonb_build_array(%s::jsonb), webhook_state=%s,"
            f" webhook_next_at={NOW} + %s, webhook_lease_owner=NULL, webhook_lease_until=0"
            " WHERE id=%s AND webhook_lease_owner=%s AND webhook_state='pending' RETURNING id",
            (Jsonb(attempt), state, retry_in_s, job_id, holder))
        return row is not None

    @_unavailable
    def server_secret(self, name: str) -> str:
        with self._connection() as conn, conn.transaction():
            conn.execute("INSERT INTO settings (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                         (name, secrets.token_hex(32)))
            return conn.execute("SELECT value FROM settings WHERE name=%s", (name,)).fetchone()["value"]

    # -- retention ------------------------------------------------------------------------------

    @_unavailable
    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        with self._connection() as conn:
            rows = conn.execute("SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < %s "
                                "AND (webhook_state IS NULL OR webhook_state <> 'pending') "
                                "ORDER BY finished_at LIMIT %s", (cutoff, limit)).fetchall()
        return [r["id"] for r in rows]

    @_unavailable
    def delete(self, job_id: str) -> None:
        self._one("DELETE FROM jobs WHERE id=%s RETURNING id", (job_id,))

