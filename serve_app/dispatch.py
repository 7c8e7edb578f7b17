"""The job runner: claims queued jobs oldest first, keeps their leases, runs each prompt on a GPU replica.

Path of a job: ``claim_next`` (the oldest job with a free or expired lease, from any ingress replica)
-> one ``generate`` stream per prompt through a GPU replica -> the video into the output store ->
``add_output`` -> ``finish``. Every write that changes a running job names this runner as the lease
holder, so a runner that lost its lease can never overwrite the new holder's work.

Leases: renewed every ``min(1 s, lease_s / 3)``. A runner stops a job's work (cancels the replica's
stream) as soon as the database says the lease is no longer ours, or when it could not renew it
before it would expire (database unreachable): by then another runner may have taken the job, and
a job must never run twice.

Cancel has one path: the request is flagged in the database (any ingress replica); the holder learns
it at its next renewal, or at once when the cancel arrived at its own replica, and ``_cancel`` stops
the stream; the job then ends ``canceled``.

Order: jobs are claimed oldest first. Among the jobs a runner has in flight (at most
``jobs.max_in_flight``), Serve may start a younger one first when its LoRA set is resident on the
replica that frees up. Once an in-flight job has been overtaken ``jobs.max_overtakes`` times, the
runner takes no new job until that one has started, which bounds how often a job is overtaken.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from deployments.contract import (
    JOB_ID,
    GenerationResult,
    GenerationSpec,
    ServiceError,
    first_line,
    is_client_error,
    job_logger,
    jsonable,
)

from .config import AppConfig
from .jobs import AsyncJobStore, Job, StoredSpec
from .jobs.records import CANCELED
from .metrics import JobMetrics
from .state_errors import OutputWriteFailed, StoreUnavailable
from .storage import OutputStore

# Each job runs in a task of its own that sets JOB_ID: every line logged for it names the job.
log = job_logger("ray.serve")


class _StageStopwatch:
    """Seconds between the milestones of one prompt on the served path, each from the one before.

    Kept as [stage, seconds] pairs in the order they happened (a JSON object's key order does not
    survive PostgreSQL's jsonb).
    """

    def __init__(self, **known: float):
        self._pairs = [[k, round(v, 4)] for k, v in known.items()]
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        if all(name != stage for name, _ in self._pairs):  # the first time counts (a retry repeats marks)
            self._pairs.append([stage, round(now - self._last, 4)])
        self._last = now

    def seconds(self) -> list[list]:
        return [list(p) for p in self._pairs]


class LeaseLost(Exception):
    """This runner no longer holds the job's lease: stop, write nothing."""


@dataclass(eq=False)
class _Run:
    """One job this runner holds."""

    job_id: str
    order: int  # claim order: older jobs have smaller numbers
    valid_until: float  # loop time until which our lease is surely still ours
    task: asyncio.Task | None = None
    response: object | None = None
    started: bool = False
    overtaken: int = 0
    cancel_requested: bool = False
    abandoned: str | None = None  # why we stopped without writing (lease lost)
    attempt: int = 0  # this job's attempt number, counted when first dispatched by this run
    started_event: asyncio.Event = field(default_factory=asyncio.Event)


def _replica_error(exc: BaseException) -> ServiceError | None:
    """The typed error behind whatever Ray raised, if any."""
    for candidate in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(candidate, ServiceError):
            return candidate
    return None


def _replica_died(exc: BaseException) -> bool:
    """True if the replica process itself went away (worth a retry elsewhere), not its code raising.

    Seen with ray 2.60: a replica SIGKILLed mid-stream makes the streaming response raise a bare
    ``ActorDiedError``. A ``RayTaskError`` means the replica's own code raised (it is alive); Ray
    makes it an instance of its cause too, so a dead actor that the replica called (the LoRA cache)
    would otherwise look like the replica's own death.
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError

    if isinstance(exc, RayTaskError):
        return False
    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError))


def _short(exc: BaseException) -> str:
    """One line for a job record: the remote cause of a RayTaskError, not its whole traceback."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    return f"{type(cause).__name__}: {first_line(cause, 500) if str(cause).strip() else ''}"[:500]


def _current_actor():
    """This process's actor handle, or None outside an actor."""
    import ray

    try:
        return ray.get_runtime_context().current_actor
    except Exception:
        return None


class JobRunner:
    """Runs jobs from the shared store through the GPU replicas; one per ingress replica."""

    def __init__(self, cfg: AppConfig, jobs: AsyncJobStore, outputs: OutputStore, replica,
                 metrics: JobMetrics | None = None, on_final: Callable[[], None] = lambda: None):
        """
        Args:
            metrics: where jobs' ends and times are counted.
            on_final: called after this runner made a job final (the webhook sender looks for work).
        """
        self.cfg = cfg
        self.on_final = on_final
        self.jobs = jobs
        self.outputs = outputs
        self.replica = replica
        self.metrics = metrics or JobMetrics()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = cfg.jobs.lease_s
        self.renew_every = min(1.0, self.lease_s / 3)
        self.store_backoff_s = max(1.0, cfg.jobs.sweep_interval_s)
        # In flight to the GPU replicas at once: by default two per replica at most scale (one
        # running, one waiting so a freed replica starts the next at once; enough for the autoscaler
        # to see demand up to max_replicas). The rest wait in the database, unleased, oldest first:
        # any ingress replica may take them and a cancel ends them at once.
        r = cfg.gpu.replica
        self.window = cfg.jobs.max_in_flight or 2 * max(r.min_replicas, r.max_replicas)
        self.runs: dict[str, _Run] = {}
        self._slots = asyncio.Semaphore(self.window)
        self._wake = asyncio.Event()
        self._order = itertools.count()
        # Claim order of the runs whose first prompt has not been sent yet: they are sent in this
        # order, whatever their image reads or database calls before it took.
        self._unsent: list[int] = []
        self._turn = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        # Passed with each generation: if this process dies, the GPU replica notices and stops.
        self.own_handle = _current_actor()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._claim_forever()), loop.create_task(self._report_active_forever())]

    def stop(self) -> None:
        """Stop claiming and hand every held job back (its lease is released or expires)."""
        for task in self._tasks:
            task.cancel()
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()

    def wake(self) -> None:
        """A job was just submitted here: look for work now rather than at the next sweep."""
        self._wake.set()

    # -- claiming -------------------------------------------------------------------------------

    async def _claim_forever(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.cfg.jobs.sweep_interval_s
        while True:
            await self._slots.acquire()
            try:
                await self._wait_for_overtaken()
                self._wake.clear()
                job = await self.jobs.claim_next(self.holder, self.lease_s)
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as e:  # the runner must outlive a bad moment of the database
                self._slots.release()
                log.warning("claiming a job failed (%s); retrying in %.1f s", _short(e), backoff)
                await asyncio.sleep(backoff)
                continue
            if job is None:
                self._slots.release()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.cfg.jobs.sweep_interval_s)
                except asyncio.TimeoutError:
                    pass
                continue
            run = _Run(job.id, next(self._order), loop.time() + self.lease_s - self.renew_every)
            self.runs[job.id] = run
            self._unsent.append(run.order)
            run.task = loop.create_task(self._run(run, job))

    async def _report_active_forever(self) -> None:
        """Refresh the active-jobs gauge from the database (every replica reads the same, cluster-wide)."""
        every = wait = self.cfg.jobs.metrics_interval_s
        while True:
            try:
                self.metrics.active_counts(await self.jobs.active_counts())
                wait = every
            except Exception as e:
                # The gauge keeps its last value. A database that does not answer is asked less and less
                # often: the jobs' own calls need its connections (and the store's threads) first.
                if wait == every:
                    log.warning("could not read the active jobs for the metrics (%s)", _short(e))
                wait = min(2 * wait, max(every, 30.0))
            await asyncio.sleep(wait)

    async def _wait_for_overtaken(self) -> None:
        """Take no new job while one in flight has been overtaken too often (see the module doc)."""
        while True:
            starved = [r for r in self.runs.values() if not r.started and r.overtaken >= self.cfg.jobs.max_overtakes]
            if not starved:
                return
            waiters = {asyncio.ensure_future(r.started_event.wait()) for r in starved}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def _sent(self, run: _Run) -> None:
        async with self._turn:
            if run.order in self._unsent:
                self._unsent.remove(run.order)
                self._turn.notify_all()

    def _mark_started(self, run: _Run) -> None:
        if run.started:
            return
        run.started = True
        run.started_event.set()
        for other in self.runs.values():
            if not other.started and other.order < run.order:
                other.overtaken += 1

    # -- one job --------------------------------------------------------------------------------

    async def _run(self, run: _Run, job: Job) -> None:
        JOB_ID.set(run.job_id)  # this task's context (and the keeper's, made from it) only
        log.info("claimed (%d attempts so far)", job.attempts)
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(run))
        try:
            if job.cancel_requested:
                await self._finish(run, "canceled", dict(CANCELED))
            else:
                await self._attempts(run, job)
        except asyncio.CancelledError:
            if run.abandoned is None:  # shutting down: hand the job back for another runner
                try:
                    await asyncio.shield(self.jobs.release(run.job_id, self.holder))
                except Exception:
                    pass  # the lease expires on its own
                raise
            log.warning("stopped without writing (%s)", run.abandoned)
        except LeaseLost as e:
            log.warning("stopped without writing (%s)", e)
        except StoreUnavailable as e:
            # The database or the output store is down (e.g. the control image cannot be read): hand
            # the job back after a pause; it runs once the store answers again. Nothing is lost.
            log.warning("store unavailable (%s); handing it back", e.message)
            await asyncio.sleep(self.store_backoff_s)
            try:
                await self.jobs.release(run.job_id, self.holder)
            except Exception:
                pass  # the lease expires on its own
        except Exception as e:
            log.exception("failed in dispatch")
            try:
                await self._finish(run, "failed", {"code": "INTERNAL_ERROR", "message": _short(e), "details": {}})
            except LeaseLost:
                pass
        finally:
            keeper.cancel()
            run.started_event.set()  # nobody waits on a job that is gone
            self.runs.pop(run.job_id, None)
            self._slots.release()
            await self._sent(run)  # a job that ends before sending anything must not hold up younger ones

    async def _keep_lease(self, run: _Run) -> None:
        """Renew the lease; stop the job's work once it is not surely ours; notice cancel requests."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.renew_every)
            sent = loop.time()
            try:
                lease = await asyncio.wait_for(self.jobs.renew(run.job_id, self.holder, self.lease_s),
                                               max(0.05, run.valid_until - sent))
            except Exception as e:  # a timeout, or the database unreachable
                if loop.time() >= run.valid_until:
                    self._abandon(run, f"lease could not be renewed in time: {_short(e)}")
                    return
                continue
            if not lease.held:
                self._abandon(run, "lease lost")
                return
            # Counted from when the renewal was sent, less one renewal interval of margin.
            run.valid_until = sent + self.lease_s - self.renew_every
            if lease.cancel_requested:
                self._cancel(run)

    def _abandon(self, run: _Run, why: str) -> None:
        run.abandoned = why
        if run.response is not None:
            run.response.cancel()  # the replica stops at its next step
        if run.task is not None:
            run.task.cancel()

    def cancel(self, job_id: str) -> None:
        """A cancel for a job this runner holds arrived here: act now instead of at the next renewal."""
        run = self.runs.get(job_id)
        if run is not None:
            self._cancel(run)

    def _cancel(self, run: _Run) -> None:
        run.cancel_requested = True
        if run.response is not None:
            run.response.cancel()

    def _check_lease(self, run: _Run) -> None:
        if run.abandoned or asyncio.get_running_loop().time() >= run.valid_until:
            raise LeaseLost(run.abandoned or "lease expired")

    async def _attempts(self, run: _Run, job: Job) -> None:
        while True:
            try:
                await self._execute(run, job)
                return
            except Exception as e:
                if not _replica_died(e):
                    raise
                if run.attempt >= self.cfg.jobs.max_attempts:
                    await self._finish(run, "failed", {
                        "code": "REPLICA_DIED",
                        "message": f"the GPU replica running this job died {run.attempt} times: {type(e).__name__}",
                        "details": {"attempts": run.attempt}})
                    return
                log.warning("replica died (%s); retrying on another replica", type(e).__name__)
                job = await self.jobs.get(job.id, specs=True)

    async def _execute(self, run: _Run, job: Job) -> None:
        stored = job.specs
        began = time.time()
        counted = False
        timings = list(job.metadata.get("timings", []))  # of outputs finished before a restart
        # The stage account of the served path (metadata.timings[n]["path"], seconds): from the claim
        # (the first prompt's "queued" is creation -> claim, both on the database's clock) to the
        # output recorded; the replica's own stages are the other keys of timings[n].
        stopwatch = _StageStopwatch(queued=max(0.0, job.lease_until - self.lease_s - job.created_at))
        for index, item in enumerate(stored):
            if index < len(job.outputs):  # finished before a restart
                continue
            spec = await self._with_image(item)
            self._check_lease(run)
            if not counted:  # one attempt per try, counted only when work really reaches a replica
                run.attempt = await self.jobs.start_attempt(job.id, self.holder)
                counted = True
            response = await self._send(run, job, index, spec, stopwatch)
            result = await self._receive(run, job, index, response, stopwatch)
            if result is None:  # the job ended (canceled or failed) and is recorded so
                return
            try:
                await self._store_output(run, job, index, result, stopwatch)
            except OutputWriteFailed as e:
                await self._finish(run, "failed", {**e.to_dict(), "details": {**e.details, "prompt_index": index}})
                return
            timings.append(result.timings)
            stopwatch = _StageStopwatch()
        await self._finish(run, "succeeded", None, {
            "inference_time": round(sum(t.get("total", 0) + t.get("encode_video", 0) for t in timings), 4),
            "wall_time": round(time.time() - began, 4)})

    async def _send(self, run: _Run, job: Job, index: int, spec: GenerationSpec, stopwatch: "_StageStopwatch"):
        """Send one prompt to a GPU replica (in claim order); its response stream."""
        async with self._turn:  # older jobs' first prompts go to Serve's queue first
            await self._turn.wait_for(lambda: not self._unsent or self._unsent[0] >= run.order)
        response = self.replica.options(stream=True, multiplexed_model_id=spec.lora_key).generate.remote(
            spec, caller=self.own_handle, job_id=job.id)
        stopwatch.mark("dispatch")
        await self._sent(run)
        run.response = response
        # Serve's own log lines about this call (its access log in the replica) name its request id.
        log.info("prompt %d of %d sent to a GPU replica (attempt %d, serve request %s)", index + 1, len(job.specs),
                 run.attempt, response.request_id)
        if run.cancel_requested:
            response.cancel()
        return response

    async def _receive(self, run: _Run, job: Job, index: int, response,
                       stopwatch: "_StageStopwatch") -> GenerationResult | None:
        """Record one prompt's events as they come; its result, or None once the job ended (recorded).

        Raises:
            What is not the replica's typed answer (a dead replica: the caller retries).
        """
        from ray.serve.exceptions import RequestCancelledError

        result: GenerationResult | None = None
        try:
            async for event in response:
                if "result" in event:
                    stopwatch.mark("from_first_step")  # the rest of the generation, encoding, the transfer
                    result = event["result"]
                else:
                    await self._on_event(run, job, index, event, stopwatch)
        except RequestCancelledError:
            if not run.cancel_requested:
                raise
            await self._finish(run, "canceled", dict(CANCELED))
            return None
        except Exception as e:
            typed = _replica_error(e)
            if typed is None:
                raise
            if typed.code == "CANCELED":
                await self._finish(run, "canceled", dict(CANCELED))
                return None
            await self._finish(run, "failed", {**typed.to_dict(), "details": {
                **jsonable(typed.details), "prompt_index": index}}, client_error=is_client_error(typed))
            return None
        finally:
            run.response = None
        if result is None:
            if run.cancel_requested:
                await self._finish(run, "canceled", dict(CANCELED))
                return None
            raise RuntimeError("replica stream ended without a result")
        return result

    async def _on_event(self, run: _Run, job: Job, index: int, event: dict, stopwatch: "_StageStopwatch") -> None:
        """A replica's progress or "started" event: into the job's record (best effort)."""
        if "progress" in event:
            if event["progress"]["stage"] == "denoising" and event["progress"]["step"] == 1:
                stopwatch.mark("to_first_step")
            progress = {**event["progress"], "prompt_index": index, "num_prompts": len(job.specs)}
            await self._best_effort(self.jobs.set_progress(job.id, self.holder, progress))
        elif "started" in event:
            stopwatch.mark("replica_wait")
            if not run.started and job.started_at is None:  # the job's first start, ever
                self.metrics.time_in_queue.observe(max(0.0, time.time() - job.created_at))
            self._mark_started(run)
            await self._best_effort(self.jobs.merge_metadata(
                job.id, self.holder, {"running_on": event["started"]["replica"]}))

    async def _with_image(self, item: StoredSpec) -> GenerationSpec:
        """The spec the replica runs: its control image read back from the output store."""
        if item.image_key is None:  # a job recorded before images moved out of the row
            return item.spec
        png = await asyncio.to_thread(self.outputs.read, item.image_key)
        return item.spec.model_copy(update={"image_png": png})

    async def _store_output(self, run: _Run, job: Job, index: int, result: GenerationResult,
                            stopwatch: "_StageStopwatch") -> None:
        video = result.video
        key = self.outputs.video_key(job.id, index, video.format)
        await asyncio.to_thread(self.outputs.put, key, video.data)
        stopwatch.mark("store")
        self._check_lease(run)
        output = {"format": video.format, "width": video.width, "height": video.height,
                  "num_frames": video.num_frames, "fps": video.fps, "seed": video.seed, "key": key,
                  "file_path": self.outputs.url(key), "content_type": video.content_type, "bytes": len(video.data),
                  "replica": result.replica, "speed": result.speed or None}
        # "record" (the database write of the output itself) is the one stage not in its own account.
        result.timings = {**result.timings, "path": stopwatch.seconds()}
        if not await self._until_lease_ends(run, self.jobs.add_output, job.id, self.holder, output, result.timings):
            raise LeaseLost("lease lost before the output was recorded")

    async def _finish(self, run: _Run, status: str, error: dict | None, metadata: dict | None = None,
                      client_error: bool = False) -> None:
        if await self._until_lease_ends(run, self.jobs.finish, run.job_id, status, error, self.holder, metadata):
            self.metrics.finished(status, error)  # counted only when this runner's write ended the job
            if status == "failed":
                # one line: a request's own mistake (a missing LoRA) is no fault of ours; a fault's
                # traceback is in the log of the process where it happened
                log.log(logging.WARNING if client_error else logging.ERROR, "failed (%s: %s)",
                        error["code"], error["message"])
            else:
                log.info("%s", status)
            self.on_final()

    async def _until_lease_ends(self, run: _Run, call, *args):
        """A write that must land: retried while the database is unreachable, as long as our lease lasts.

        Past the lease another runner may hold the job; it will redo the work, so we give up.
        """
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            self._check_lease(run)
            try:
                return await call(*args)
            except StoreUnavailable as e:
                if loop.time() + delay >= run.valid_until:
                    raise LeaseLost(f"database unavailable until the lease ran out: {e.message}") from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    async def _best_effort(write) -> None:
        """Progress and bookkeeping: losing one to a database hiccup is fine, the job goes on."""
        try:
            await write
        except StoreUnavailable as e:
            log.warning("progress not recorded: %s", e.message)

