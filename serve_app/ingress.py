"""The HTTP ingress: routes, job submission and dispatch, status, results, files, cancel.

Path of a request: HTTP -> ``InferenceRequest`` -> ``normalize.to_specs`` -> a durable job ->
``Dispatcher`` streams each spec through a GPU replica -> video files + job "succeeded".
"""


import asyncio
import hashlib
import logging
import os
import socket
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

from fastapi import Body, FastAPI, Header, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from ray import serve

from deployments.errors import ServiceError
from deployments.spec import MAX_LORAS, OUTPUT_FORMATS, SAMPLERS, GenerationResult

from . import errors
from .config import AppConfig, AuthConfig
from .jobs import Job, JobStore, QueueFull
from .normalize import to_specs
from .schemas import (
    ErrorBody,
    InferenceRequest,
    ModelPublic,
    ModelsResponse,
    Outputs,
    ProgressPublic,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    VideoPublic,
)

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="Wan 2.1 I2V 14B (480P) LoRA inference",
    description="ai-toolkit-inference compatible API: submit a first frame, a prompt and LoRAs; get a video.",
    version="0.1.0",
)
errors.install(api)


class BodyLimit:
    """ASGI middleware: refuse bodies over the configured size while they stream in."""

    max_bytes = 32 * 1024**2

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BodyLimit.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _BodyTooLarge(limit).response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body, or one longer than it said
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge as e:  # raised where no exception handler turned it into the response
            await e.response()(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reader re-raises it as is (it turns other errors into 400)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(413, errors.body("REQUEST_TOO_LARGE", f"request body is larger than {limit} bytes",
                                          {"limit": limit})["detail"])

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": self.detail})


def _route_path(scope) -> str:
    """The path inside the app: Serve's route prefix (``root_path``) removed."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def bearer_key(authorization: str | None, keys: list[str]) -> str | None:
    """The configured key an ``Authorization: Bearer <key>`` header carries, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return AuthConfig.matches(token, keys)


def unauthorized() -> errors.ApiError:
    return errors.ApiError(401, "UNAUTHORIZED", "missing or invalid API key (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})


class ApiKeyAuth:
    """ASGI middleware: with API keys configured, every path but /health needs a valid key.

    A gate in front of everything (the docs, the OpenAPI schema, unknown paths included), so an
    unauthenticated caller learns nothing and never gets its body read; the routes still derive the
    caller's identity through ``Ingress._owner``.
    """

    keys: list[str] = []
    open_paths = ("/health",)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not ApiKeyAuth.keys or _route_path(scope) in ApiKeyAuth.open_paths:
            return await self.app(scope, receive, send)
        authorization = None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if bearer_key(authorization, ApiKeyAuth.keys) is None:
            return await errors.error_response(unauthorized())(scope, receive, send)
        return await self.app(scope, receive, send)


api.add_middleware(BodyLimit)
api.add_middleware(ApiKeyAuth)  # added last: outermost, so it runs before any body is read


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z") if ts else None


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
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:500]


def _current_actor():
    """This process's actor handle, or None outside an actor."""
    import ray

    try:
        return ray.get_runtime_context().current_actor
    except Exception:
        return None


class Dispatcher:
    """Runs jobs through GPU replicas; recovers jobs whose runner died (lease expiry)."""

    def __init__(self, cfg: AppConfig, store: JobStore, replica):
        self.cfg = cfg
        self.store = store
        self.replica = replica
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.running: dict[str, asyncio.Task] = {}
        self.responses: dict[str, object] = {}
        self.outputs_dir = Path(cfg.storage.outputs_dir)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        # Jobs in flight to the GPU replicas at once (two per replica at most scale: one running,
        # one waiting so a freed replica starts the next at once; enough for the autoscaler to see
        # demand up to max_replicas). The rest wait in the database, unleased, oldest first: any
        # ingress replica may take them, a cancel ends them at once, and only these leases renew.
        r = cfg.gpu.replica
        self.max_in_flight = 2 * max(r.min_replicas, r.max_replicas)
        self.slots = asyncio.Semaphore(self.max_in_flight)
        # Passed with each generation: if this process dies, the GPU replica notices and stops.
        self.me = _current_actor()

    def spawn(self, job_id: str) -> None:
        if job_id not in self.running:
            self.running[job_id] = asyncio.get_running_loop().create_task(self.run(job_id))

    async def sweep_forever(self) -> None:
        while True:
            try:
                for job_id in await asyncio.to_thread(self.store.orphans):
                    self.spawn(job_id)
            except Exception:  # the sweeper must outlive a bad moment of the database
                log.exception("job sweep failed")
            await asyncio.sleep(self.cfg.jobs.sweep_interval_s)

    async def run(self, job_id: str) -> None:
        lease = self.cfg.jobs.lease_s
        try:
            async with self.slots:
                job = await asyncio.to_thread(self.store.claim, job_id, self.holder, lease)
                if job is None:  # finished, canceled while waiting, or taken by another ingress replica
                    return
                keeper = asyncio.get_running_loop().create_task(self._keep_lease(job_id))
                try:
                    await self._attempts(job)
                finally:
                    keeper.cancel()
        except asyncio.CancelledError:
            # The ingress is shutting down: hand the job back for another runner.
            await asyncio.to_thread(self.store.release, job_id, self.holder)
            raise
        except Exception as e:
            log.exception("job %s failed in dispatch", job_id)
            await asyncio.to_thread(self.store.finish, job_id, "failed",
                                    {"code": "INTERNAL_ERROR", "message": _short(e), "details": {}}, self.holder)
        finally:
            self.running.pop(job_id, None)
            self.responses.pop(job_id, None)

    async def _keep_lease(self, job_id: str) -> None:
        """Renew the lease and notice cancel requests made through any ingress replica."""
        interval = min(1.0, self.cfg.jobs.lease_s / 3)
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.store.renew, job_id, self.holder, self.cfg.jobs.lease_s)
            if await asyncio.to_thread(self.store.cancel_requested, job_id):
                self.cancel_local(job_id)

    def cancel_local(self, job_id: str) -> None:
        response = self.responses.get(job_id)
        if response is not None:
            response.cancel()

    async def _attempts(self, job: Job) -> None:
        while True:
            attempt = await asyncio.to_thread(self.store.start_attempt, job.id, self.holder)
            try:
                await self._execute(job)
                return
            except Exception as e:
                if not _replica_died(e):
                    raise
                if attempt >= self.cfg.jobs.max_attempts:
                    await asyncio.to_thread(self.store.finish, job.id, "failed", {
                        "code": "REPLICA_DIED",
                        "message": f"the GPU replica running this job died {attempt} times: {type(e).__name__}",
                        "details": {"attempts": attempt}}, self.holder)
                    return
                log.warning("job %s: replica died (%s); retrying on another replica", job.id, type(e).__name__)
                job = await asyncio.to_thread(self.store.get, job.id)

    async def _execute(self, job: Job) -> None:
        from ray.serve.exceptions import RequestCancelledError

        specs = job.specs
        started = time.time()
        for index, spec in enumerate(specs):
            if index < len(job.outputs):  # finished before a restart
                continue
            response = self.replica.options(stream=True, multiplexed_model_id=spec.lora_key).generate.remote(
                spec, caller=self.me)
            self.responses[job.id] = response
            if await asyncio.to_thread(self.store.cancel_requested, job.id):
                response.cancel()
            result: GenerationResult | None = None
            try:
                async for event in response:
                    if "progress" in event:
                        progress = {**event["progress"], "prompt_index": index, "num_prompts": len(specs)}
                        ok = await asyncio.to_thread(self.store.set_progress, job.id, self.holder, progress)
                        if not ok:
                            response.cancel()
                    elif "started" in event:
                        await asyncio.to_thread(self.store.merge_metadata, job.id, self.holder,
                                                {"running_on": event["started"]["replica"]})
                    else:
                        result = event["result"]
            except (RequestCancelledError, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not await asyncio.to_thread(
                        self.store.cancel_requested, job.id):
                    raise
                await self._finish_canceled(job.id)
                return
            except Exception as e:
                typed = _replica_error(e)
                if typed is None:
                    raise
                if typed.code == "CANCELED":
                    await self._finish_canceled(job.id)
                    return
                await asyncio.to_thread(self.store.finish, job.id, "failed", {**typed.to_dict(),
                                        "details": {**errors._jsonable(typed.details), "prompt_index": index}},
                                        self.holder)
                return
            if result is None:
                if await asyncio.to_thread(self.store.cancel_requested, job.id):
                    await self._finish_canceled(job.id)
                    return
                raise RuntimeError("replica stream ended without a result")
            await asyncio.to_thread(self._store_output, job, index, result)
        timings = (await asyncio.to_thread(self.store.get, job.id)).metadata.get("timings", [])
        await asyncio.to_thread(self.store.finish, job.id, "succeeded", None, self.holder, {
            "inference_time": round(sum(t.get("total", 0) + t.get("encode_video", 0) for t in timings), 4),
            "wall_time": round(time.time() - started, 4)})

    async def _finish_canceled(self, job_id: str) -> None:
        await asyncio.to_thread(self.store.finish, job_id, "canceled",
                                {"code": "CANCELED", "message": "canceled by request", "details": {}}, self.holder)

    def _store_output(self, job: Job, index: int, result: GenerationResult) -> None:
        video = result.video
        folder = self.outputs_dir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index}.{video.format}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(video.data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file is a normal output
        os.replace(tmp, path)  # atomic: a download never sees half a file
        output = {"format": video.format, "width": video.width, "height": video.height,
                  "num_frames": video.num_frames, "fps": video.fps, "seed": video.seed,
                  "file_path": str(path.resolve()), "content_type": video.content_type, "bytes": len(video.data),
                  "replica": result.replica}
        self.store.add_output(job.id, self.holder, output, result.timings)


@serve.deployment(name="Ingress", max_ongoing_requests=200)
@serve.ingress(api)
class Ingress:
    """FastAPI routes over the job store; never touches torch."""

    async def __init__(self, cfg: dict | AppConfig, replica):
        self.cfg = cfg if isinstance(cfg, AppConfig) else AppConfig.model_validate(cfg)
        # Per process (each Serve replica is one): the middlewares read these for every request.
        BodyLimit.max_bytes = self.cfg.limits.max_body_bytes
        self.keys = self.cfg.auth.load_keys()
        ApiKeyAuth.keys = self.keys
        self.store = JobStore(self.cfg.storage.jobs_db)
        self.dispatcher = Dispatcher(self.cfg, self.store, replica)
        self._sweeper = asyncio.get_running_loop().create_task(self.dispatcher.sweep_forever())

    # -- helpers --------------------------------------------------------------------------------

    def _owner(self, authorization: str | None) -> str:
        """The caller's identity (a hash of its key); '' when no keys are configured."""
        if not self.keys:
            return ""
        key = bearer_key(authorization, self.keys)
        if key is None:
            raise unauthorized()
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def _job(self, request_id: str, owner: str) -> Job:
        job = self.store.get(request_id)
        if job is None or job.owner != owner:  # another key's job does not exist for you
            raise errors.not_found(request_id)
        return job

    def _url(self, path: str) -> str:
        base = (self.cfg.public_base_url or "").rstrip("/")
        return f"{base}{path}"

    # -- routes ---------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "healthy"}

    @api.post("/v1/inference", response_model=SubmitResponse)
    async def submit(
        self,
        req: Annotated[InferenceRequest, Body()],
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> SubmitResponse:
        """Queue a job and answer at once with its id and URLs."""
        owner = self._owner(authorization)
        job = None
        if idempotency_key is not None:
            job = await asyncio.to_thread(self.store.by_idempotency_key, owner, idempotency_key)
        if job is None:
            specs = await asyncio.to_thread(to_specs, req, self.cfg)
            try:
                job, created = await asyncio.to_thread(
                    self.store.create, specs, req.model, owner, idempotency_key,
                    self.cfg.limits.max_queue_total, self.cfg.limits.max_queue_per_key)
            except QueueFull as e:
                raise errors.ApiError(429, "QUEUE_FULL", str(e) + "; retry later",
                                      {"scope": e.scope, "limit": e.limit},
                                      headers={"Retry-After": str(self.cfg.limits.retry_after_s)})
            if created:
                self.dispatcher.spawn(job.id)
        return SubmitResponse(
            request_id=job.id,
            status="queued",
            status_url=self._url(f"/v1/requests/{job.id}/status"),
            result_url=self._url(f"/v1/requests/{job.id}/result"),
            cancel_url=self._url(f"/v1/requests/{job.id}/cancel"),
            created_at=iso(job.created_at),
        )

    @api.get("/v1/requests/{request_id}/status", response_model=StatusResponse)
    async def status(self, request_id: str, authorization: Annotated[str | None, Header()] = None):
        job = self._job(request_id, self._owner(authorization))
        return StatusResponse(
            request_id=job.id, status=job.status, progress=ProgressPublic(**job.progress), attempts=job.attempts,
            error=ErrorBody(**job.error) if job.error else None, created_at=iso(job.created_at),
            started_at=iso(job.started_at), finished_at=iso(job.finished_at))

    @api.get("/v1/requests/{request_id}/result", response_model=ResultResponse)
    async def result(self, request_id: str, authorization: Annotated[str | None, Header()] = None):
        job = self._job(request_id, self._owner(authorization))
        videos = [
            VideoPublic(**{k: v for k, v in o.items() if k in VideoPublic.model_fields},
                        url=self._url(f"/v1/requests/{job.id}/outputs/{n}"))
            for n, o in enumerate(job.outputs)
        ]
        return ResultResponse(
            request_id=job.id, status=job.status, outputs=Outputs(videos=videos),
            error=ErrorBody(**job.error) if job.error else None, created_at=iso(job.created_at),
            finished_at=iso(job.finished_at),
            metadata={"model": job.model, "attempts": job.attempts, **job.metadata})

    @api.get("/v1/requests/{request_id}/outputs/{n}")
    async def output(self, request_id: str, n: int, authorization: Annotated[str | None, Header()] = None):
        job = self._job(request_id, self._owner(authorization))
        if not 0 <= n < len(job.outputs):
            raise errors.ApiError(404, "OUTPUT_NOT_FOUND", f"request {request_id} has no output {n} (yet)",
                                  {"request_id": request_id, "index": n, "available": len(job.outputs)})
        out = job.outputs[n]
        path = Path(out["file_path"])
        if not path.is_file():
            raise errors.ApiError(410, "OUTPUT_GONE", f"output {n} of {request_id} is no longer stored")
        return FileResponse(path, media_type=out["content_type"], filename=f"{request_id}-{n}.{out['format']}")

    @api.post("/v1/requests/{request_id}/cancel", response_model=StatusResponse)
    async def cancel(self, request_id: str, authorization: Annotated[str | None, Header()] = None):
        job = self._job(request_id, self._owner(authorization))
        if not job.final:
            await asyncio.to_thread(self.store.request_cancel, request_id)
            self.dispatcher.cancel_local(request_id)
        return await self.status(request_id, authorization)

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self, authorization: Annotated[str | None, Header()] = None):
        self._owner(authorization)
        d, m = self.cfg.defaults, self.cfg.gpu.model
        return ModelsResponse(models=[ModelPublic(
            id=m.model_id, base_model=m.source if m.source not in ("tiny", "random-full") else
            f"{m.source} (stands in for Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)",
            default_steps=d.sample_steps, default_guidance_scale=d.guidance_scale,
            default_num_frames=d.num_frames, default_fps=d.fps, default_width=d.width, default_height=d.height,
            samplers=list(SAMPLERS), output_formats=list(OUTPUT_FORMATS), max_loras=min(MAX_LORAS,
                                                                                       self.cfg.limits.max_loras))])
