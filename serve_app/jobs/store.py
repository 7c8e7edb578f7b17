"""The job store interface, shared by both backends, and the async face the event loop uses.

Backends (one module each) are plain blocking classes: ``SqliteJobStore`` (the embedded default,
one node) and ``PostgresJobStore`` (clusters). Every method is one short transaction. The ingress
and the job runner never call them directly: they hold an ``AsyncJobStore``, which runs each call
in a worker thread with a deadline, so no database call ever runs on the event loop and a lost
database answers ``STORE_UNAVAILABLE`` within ``timeout_s`` instead of hanging. A database that is
down when a replica starts does not stop the replica: it answers ``STORE_UNAVAILABLE`` at once and
opens the store in the background (an ingress that could not start would leave requests waiting in
Serve's proxy with no answer); one that refuses us for good (a wrong password, no such database, a
newer schema) stops the start with its message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from ..state_errors import StoreUnavailable
from .records import Job, JobEvent, StoredSpec

log = logging.getLogger("ray.serve")


class QueueFull(Exception):
    def __init__(self, scope: str, limit: int):
        super().__init__(f"{scope} queue is full ({limit} jobs)")
        self.scope = scope
        self.limit = limit


class StoreRefused(RuntimeError):
    """The database answered and refused us (wrong credentials, no such database, a newer schema): waiting
    will not help, so a replica refuses to start."""


class SchemaTooNew(StoreRefused):
    """The database was migrated by a newer release than this one: refuse to run against it."""


@dataclass(frozen=True)
class Lease:
    """What a lease renewal found: whether we still hold the job, and whether a cancel was asked."""

    held: bool
    cancel_requested: bool = False


class JobStore(ABC):
    """Durable job records with leases. Thread-safe; every method is one short transaction.

    A job is run by whoever holds its lease; a lease not renewed within ``lease_s`` is free again,
    so a dead runner's jobs are taken over. Transitions that change a running job name the holder
    and do nothing (return False) for anyone else, so a runner that lost its lease can never write
    over the new holder's work.
    """

    backend: str = ""
    schema_version: int = 0

    # -- creation -------------------------------------------------------------------------------

    @abstractmethod
    def create(self, job_id: str, specs: list[StoredSpec], model: str, owner: str = "",
               idempotency_key: str | None = None, max_total: int | None = None,
               max_per_owner: int | None = None, metadata: dict[str, Any] | None = None,
               webhook_url: str | None = None) -> tuple[Job, bool]:
        """Insert a job in ``in_queue``; returns (job, created). An idempotency key repeats the first job.

        With ``webhook_url`` the job's delivery is ``pending`` from now on, so it is due the moment the
        job becomes final, whichever process makes it final and whatever happens to that process.

        Raises:
            QueueFull: too many active jobs overall or for this owner.
        """

    # -- reads ----------------------------------------------------------------------------------

    @abstractmethod
    def get(self, job_id: str, specs: bool = False) -> Job | None:
        """One job; ``specs=True`` also reads its specs (the runner), status polls do not."""

    @abstractmethod
    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        """The job an owner already submitted with this Idempotency-Key, if any."""

    @abstractmethod
    def recent(self, owner: str, limit: int, before: tuple[float, str] | None = None) -> list[Job]:
        """An owner's jobs, newest first (by ``created_at``, then id): at most ``limit``.

        Args:
            before: ``(created_at, id)`` of the last job of the previous page: only jobs after it in
                this order (keyset paging, so jobs submitted meanwhile never shift a page).
        """

    @abstractmethod
    def events(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        """The job's events numbered above ``after``, oldest first, at most ``limit``.

        Each write of a job's status or progress (create, ``set_progress``, ``finish``, a cancel that
        ends it) appends one event in its own transaction, numbered per job in commit order: asking
        again with the last number seen never skips one.
        """

    @abstractmethod
    def count(self, statuses: tuple[str, ...] | None = None) -> int:
        ...

    @abstractmethod
    def active_counts(self) -> dict[str, int]:
        """Active jobs by where they are: ``waiting`` (no runner holds it: queued, or its runner's lease
        expired), ``dispatched`` (held by a runner, not yet started on a GPU replica), ``running``."""

    # -- leases ---------------------------------------------------------------------------------

    @abstractmethod
    def claim_next(self, holder: str, lease_s: float) -> Job | None:
        """Lease the oldest active job whose lease is free or expired (with its specs); None if none.

        Concurrent callers (other ingress replicas) never get the same job.
        """

    @abstractmethod
    def renew(self, job_id: str, holder: str, lease_s: float) -> Lease:
        """Extend our lease; ``held`` is False once the job is no longer ours (or no longer active)."""

    @abstractmethod
    def release(self, job_id: str, holder: str) -> None:
        """Give the lease back at once (shutting down): another runner may take the job now."""

    # -- transitions ----------------------------------------------------------------------------

    @abstractmethod
    def start_attempt(self, job_id: str, holder: str) -> int:
        """Count one more attempt; returns the attempt number."""

    @abstractmethod
    def set_progress(self, job_id: str, holder: str, progress: dict[str, Any]) -> bool:
        """Record progress (the job becomes in_progress); False if it is no longer ours or was canceled."""

    @abstractmethod
    def add_output(self, job_id: str, holder: str, output: dict[str, Any], timings: dict[str, float]) -> bool:
        """Append one finished output (and its timings) while we hold the lease."""

    @abstractmethod
    def merge_metadata(self, job_id: str, holder: str, updates: dict[str, Any]) -> bool:
        """Merge keys into the job's metadata while we hold its lease."""

    @abstractmethod
    def finish(self, job_id: str, status: str, error: dict[str, Any] | None = None,
               holder: str | None = None, metadata: dict[str, Any] | None = None) -> bool:
        """Move an active job to a final state, once: a final job never changes again."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Flag a job for cancellation; a queued job nobody holds is canceled at once.

        Returns:
            (the job after the call, None if there is none; whether this call made it canceled).
        """

    # -- webhook deliveries ---------------------------------------------------------------------

    @abstractmethod
    def claim_webhook(self, holder: str, lease_s: float) -> Job | None:
        """Lease the due delivery (pending, job final, next attempt time reached) of the job that ended
        first; None if none. Concurrent callers never get the same delivery while its lease lasts."""

    @abstractmethod
    def record_webhook_attempt(self, job_id: str, holder: str, attempt: dict[str, Any], state: str,
                               retry_in_s: float = 0.0) -> bool:
        """Append one attempt, move the delivery to ``state`` (``pending``: due again in ``retry_in_s``)
        and free its lease; False (nothing written) unless ``holder`` still holds the lease."""

    @abstractmethod
    def server_secret(self, name: str) -> str:
        """A random secret kept in the database under ``name``: made by whichever replica asks first,
        the same for every replica afterwards."""

    # -- retention ------------------------------------------------------------------------------

    @abstractmethod
    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Ids of final jobs that finished before ``cutoff`` (epoch seconds), oldest first; never a
        job whose webhook is still pending."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        ...

    def close(self) -> None:
        """Release connections (a no-op where there are none to release)."""


def migration_statements(migrations: list[str], current: int, where: str) -> list[str]:
    """The statements that take a database at schema version ``current`` to ``len(migrations)``.

    Raises:
        SchemaTooNew: the database was migrated by a newer release.
    """
    if current > len(migrations):
        raise SchemaTooNew(f"job database {where} has schema version {current}; this release knows up to "
                           f"{len(migrations)}: upgrade the application")
    return [statement for script in migrations[current:] for statement in filter(str.strip, script.split(";"))]


def open_job_store(url: str, pool_size: int = 8, timeout_s: float = 3.0, connect_timeout_s: int = 2) -> JobStore:
    """The backend ``storage.jobs_db`` names: a ``postgresql://`` URL, else a SQLite file path.

    Raises:
        StoreUnavailable: the database cannot be reached or set up now.
        StoreRefused: the database refuses us for good (``SchemaTooNew``: it belongs to a newer release).
    """
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresJobStore

        return PostgresJobStore(url, pool_size=pool_size, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    from .sqlite import SqliteJobStore

    return SqliteJobStore(url, timeout_s=timeout_s)


class AsyncJobStore:
    """The event loop's view of a ``JobStore``: every call runs in a worker thread, with a deadline.

    ``await jobs.get(job_id)`` calls ``store.get(job_id)`` in the pool. A call that outlives
    ``timeout_s`` (a database that stopped answering) raises ``StoreUnavailable``; its thread finishes
    or fails on its own later, bounded by the backend's own timeouts. Until the store is open (see
    ``open``), every call raises ``StoreUnavailable`` at once.
    """

    def __init__(self, store: JobStore | None, timeout_s: float = 3.0, max_workers: int = 8,
                 opener: Callable[[], JobStore] | None = None, retry_s: float = 1.0):
        self.store = store
        self.timeout_s = timeout_s
        self.opened = asyncio.Event()  # set once the store is open
        if store is not None:
            self.opened.set()
        self._opener = opener
        self._retry_s = retry_s
        self._why_closed = "not opened yet"
        self._opening: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="jobs-db")

    @classmethod
    async def open(cls, url: str, pool_size: int = 8, timeout_s: float = 3.0, connect_timeout_s: int = 2,
                   retry_s: float = 1.0) -> "AsyncJobStore":
        """Open the store now or, while the database is unreachable, in the background every ``retry_s``.

        Raises:
            StoreRefused: the database refuses us for good (nothing to wait for).
        """
        jobs = cls(None, timeout_s, pool_size, functools.partial(open_job_store, url, pool_size, timeout_s,
                                                                  connect_timeout_s), retry_s)
        if not await jobs._try_open():
            log.warning("job database unreachable at start (%s); serving 503 STORE_UNAVAILABLE and retrying every "
                        "%.0f s", jobs._why_closed, retry_s)
            jobs._opening = asyncio.get_running_loop().create_task(jobs._open_forever())
        return jobs

    @property
    def ready(self) -> bool:
        return self.store is not None

    async def _try_open(self) -> bool:
        try:
            store = await asyncio.get_running_loop().run_in_executor(self._pool, self._opener)
        except StoreUnavailable as e:
            self._why_closed = e.message
            return False
        self.store = store
        self.opened.set()
        return True

    async def _open_forever(self) -> None:
        while True:
            await asyncio.sleep(self._retry_s)
            try:
                if await self._try_open():
                    log.info("job database reachable: store open")
                    return
            except StoreRefused as e:  # e.g. reached at last, but migrated by a newer release
                self._why_closed = str(e)
                log.error("job database refuses this replica: %s", e)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("store", "opened"):
            raise AttributeError(name)
        if self.store is None:
            # Not opened yet: every call answers at once (the opener keeps trying in the background).
            async def closed(*args, **kwargs):
                raise StoreUnavailable(f"the job database is unavailable: {self._why_closed}", {"store": "jobs"})

            return closed
        method = getattr(self.store, name)
        if not callable(method):
            raise AttributeError(name)

        @functools.wraps(method)
        async def call(*args, **kwargs):
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool, functools.partial(method, *args, **kwargs))
            try:
                return await asyncio.wait_for(future, self.timeout_s)
            except asyncio.TimeoutError as e:
                raise StoreUnavailable(f"the job database did not answer within {self.timeout_s:g} s",
                                       {"store": "jobs", "backend": self.store.backend}) from e

        return call

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()
