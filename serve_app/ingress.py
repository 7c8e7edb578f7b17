"""The HTTP ingress: routes only (submit, status, result, files, cancel, the caller's jobs, models,
webhook secret, playground, health and readiness, the offline API docs).

Path of a request: HTTP -> ``InferenceRequest`` -> ``normalize.to_specs`` -> control images into the
output store -> a durable job row -> ``dispatch.JobRunner`` runs it on a GPU replica -> video in the
output store + job "succeeded" -> status/result/file routes read them back, and
``webhooks.WebhookSender`` posts the result to the request's ``webhook_url``, if any.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at import time.
import asyncio
import hashlib
import logging
import os
import socket
import time
import uuid
from typing import Annotated

from fastapi import Body, Header, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from ray import serve

from deployments.contract import MAX_LORAS, OUTPUT_FORMATS, SAMPLERS, GenerationSpec

from . import errors, events, playground, retention, views, webhooks
from .config import AppConfig
from .dispatch import JobRunner
from .jobs import AsyncJobStore, Job, QueueFull, StoredSpec, StoreRefused
from .metrics import JobMetrics
from .middleware import ApiKeyAuth, BodyLimit, ReplicaHeader, bearer_key, unauthorized
from .normalize import to_specs
from .readiness import ReadinessProbe
from .schemas import (
    InferenceRequest,
    ModelPublic,
    ModelsResponse,
    Outputs,
    ProgressPublic,
    RequestList,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    WebhookSecretResponse,
)
from .state_errors import StoreUnavailable
from .storage import OutputStore, parse_range

log = logging.getLogger("ray.serve")

DOCS_ASSETS = "/docs/assets"

# /docs and /redoc with their scripts and styles served from here (fastapi-offline ships them): the
# stock pages load them from a CDN and are blank on a machine without internet access.
api = FastAPIOffline(
    title="Wan 2.1 I2V 14B (480P) LoRA inference",
    description="ai-toolkit-inference compatible API: submit a first frame, a prompt and LoRAs; get a video.",
    version="0.1.0",
    static_url=DOCS_ASSETS,
    swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
)
errors.install(api)
api.add_middleware(ReplicaHeader)
api.add_middleware(BodyLimit)
api.add_middleware(ApiKeyAuth)  # added last: outermost, so it runs before any body is read


def _is_job_id(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


@serve.deployment(name="Ingress", max_ongoing_requests=200)
@serve.ingress(api)
class Ingress:
    """FastAPI routes over the job store and the output store; never touches torch."""

    async def __init__(self, cfg: dict | AppConfig, replica):
        self.cfg = cfg if isinstance(cfg, AppConfig) else AppConfig.model_validate(cfg)
        # Per process (each Serve replica is one): the middlewares read these for every request.
        BodyLimit.max_bytes = self.cfg.limits.max_body_bytes
        self.keys = self.cfg.auth.load_keys()
        ApiKeyAuth.keys = self.keys
        if self.cfg.ingress.replica_header:
            ReplicaHeader.value = f"{socket.gethostname()}:{os.getpid()}".encode()
        storage = self.cfg.storage
        self.outputs = OutputStore(storage)
        try:
            # A database that is down now does not stop the start (routes answer 503 STORE_UNAVAILABLE
            # until it is back): a replica that could not start would leave requests unanswered.
            self.jobs = await AsyncJobStore.open(storage.jobs_db_url(), storage.db_pool_size, storage.db_timeout_s,
                                                 storage.db_connect_timeout_s)
        except StoreRefused as e:
            # One that refuses us (credentials, schema) never will: Serve reports this message.
            raise RuntimeError(f"refusing to start: {e}") from e
        self.webhook_secret: bytes | None = None  # may be kept in the job database: read once it answers
        self.webhooks: webhooks.WebhookSender | None = None
        self.metrics = JobMetrics()
        self.runner = JobRunner(self.cfg, self.jobs, self.outputs, replica, self.metrics, on_final=self._wake_webhooks)
        self.readiness = ReadinessProbe(replica.app_name, replica.deployment_name)
        self.streams = events.StreamSlots(self.cfg.limits.max_streams_per_key, self.cfg.limits.retry_after_s)
        self.runner.start()
        starting = asyncio.get_running_loop().create_task(self._start_webhooks())
        if self.jobs.ready:
            await asyncio.wait({starting}, timeout=storage.db_timeout_s)
        self._retention = asyncio.get_running_loop().create_task(retention.sweep_forever(
            self.jobs, self.outputs, storage.retention_s, storage.retention_sweep_s))

    def __del__(self):
        # Serve's graceful shutdown: running jobs go back to the pool for another ingress replica.
        for part in (getattr(self, "runner", None), getattr(self, "webhooks", None)):
            if part is not None:
                part.stop()

    async def _start_webhooks(self) -> None:
        while True:
            await self.jobs.opened.wait()
            try:
                self.webhook_secret = await asyncio.to_thread(webhooks.server_secret, self.cfg.webhooks,
                                                              self.jobs.store)
                break
            except StoreUnavailable:
                await asyncio.sleep(1.0)
        self.webhooks = webhooks.WebhookSender(self.cfg, self.jobs, self.webhook_secret)
        self.webhooks.start()

    def _wake_webhooks(self) -> None:
        if self.webhooks is not None:
            self.webhooks.wake()

    # -- helpers --------------------------------------------------------------------------------

    def _owner(self, authorization: str | None) -> str:
        """The caller's identity (a hash of its key); '' when no keys are configured."""
        if not self.keys:
            return ""
        key = bearer_key(authorization, self.keys)
        if key is None:
            raise unauthorized()
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def _job(self, request_id: str, authorization: str | None) -> Job:
        owner = self._owner(authorization)
        if not _is_job_id(request_id):  # ids are UUIDs: anything else names no job (and never reaches SQL)
            raise errors.not_found(request_id)
        job = await self.jobs.get(request_id)
        if job is None or job.owner != owner:  # another key's job does not exist for you
            raise errors.not_found(request_id)
        return job

    def _url(self, path: str) -> str:
        base = (self.cfg.public_base_url or "").rstrip("/")
        return f"{base}{path}"

    def _check_webhook_url(self, url: str | None) -> None:
        if url is not None:
            webhooks.check_webhook_url(url, self.cfg.gpu.fetch)

    def _store_images(self, job_id: str, specs: list[GenerationSpec]) -> list[StoredSpec]:
        """Each distinct control image once in the output store; the specs keep only its key."""
        stored, written = [], set()
        for spec in specs:
            key = self.outputs.image_key(job_id, spec.image_png)
            if key not in written:
                self.outputs.put_for_submit(key, spec.image_png)
                written.add(key)
            stored.append(StoredSpec(spec.model_copy(update={"image_png": b""}), key))
        return stored

    # -- routes ---------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> dict:
        """This ingress replica answers (says nothing of the model: see /ready)."""
        return {"status": "healthy"}

    @api.get("/ready", responses={503: {"description": "no model replica is loaded and warmed up yet"}})
    async def ready(self) -> dict:
        """200 once a GPU replica has loaded and warmed up the model (a job would start now), else 503."""
        readiness = await self.readiness.check()
        if not readiness.ready:
            raise errors.ApiError(503, "NOT_READY", "no model replica has loaded and warmed up the model yet",
                                  readiness.details(), headers={"Retry-After": "5"})
        return {"status": "ready", **readiness.details()}

    @api.post("/v1/inference", response_model=SubmitResponse)
    async def submit(
        self,
        req: Annotated[InferenceRequest, Body()],
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
    ) -> SubmitResponse:
        """Queue a job and answer at once with its id and URLs."""
        t0 = time.perf_counter()
        owner = self._owner(authorization)
        job = await self.jobs.by_idempotency_key(owner, idempotency_key) if idempotency_key is not None else None
        if job is None:
            await asyncio.to_thread(self._check_webhook_url, req.webhook_url)
            specs = await asyncio.to_thread(to_specs, req, self.cfg)
            job_id = str(uuid.uuid4())
            stored = await asyncio.to_thread(self._store_images, job_id, specs)
            try:
                # submit_s: validation, control images decoded and stored, up to the row (the stage account)
                limits = self.cfg.limits
                job, created = await self.jobs.create(
                    job_id, stored, req.model, owner, idempotency_key, limits.max_queue_total, limits.max_queue_per_key,
                    metadata={"submit_s": round(time.perf_counter() - t0, 4)}, webhook_url=req.webhook_url)
            except QueueFull as e:
                await asyncio.to_thread(self.outputs.delete_job, job_id)
                raise errors.ApiError(429, "QUEUE_FULL", str(e) + "; retry later",
                                      {"scope": e.scope, "limit": e.limit},
                                      headers={"Retry-After": str(self.cfg.limits.retry_after_s)})
            except StoreUnavailable:
                try:
                    await asyncio.to_thread(self.outputs.delete_job, job_id)
                except Exception as e:  # the output store may be down too: the 503 still answers
                    log.warning("job %s: control images not removed: %s", job_id, e)
                raise
            if created:
                self.metrics.submitted.inc()
                log.info("job %s: queued (%d prompts, %d LoRAs)", job.id, len(specs), len(req.loras))
                self.runner.wake()
            else:  # a racing retry with the same Idempotency-Key won: its job has its own images
                await asyncio.to_thread(self.outputs.delete_job, job_id)
        return SubmitResponse(
            request_id=job.id,
            status="queued",
            status_url=self._url(f"/v1/requests/{job.id}/status"),
            result_url=self._url(f"/v1/requests/{job.id}/result"),
            cancel_url=self._url(f"/v1/requests/{job.id}/cancel"),
            created_at=views.iso(job.created_at),
        )

    @api.get("/v1/requests", response_model=RequestList)
    async def requests(
        self,
        authorization: Annotated[str | None, Header()] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        before: Annotated[str | None, Query(max_length=64, description="next_before of the previous page")] = None,
    ) -> RequestList:
        """The caller's own jobs, newest first, one page of ``limit``."""
        owner = self._owner(authorization)
        cursor = None
        if before is not None:
            last = await self._job(before, authorization)
            cursor = (last.created_at, last.id)
        jobs = await self.jobs.recent(owner, limit + 1, cursor)  # one more: is there a next page?
        return RequestList(requests=[views.status(job) for job in jobs[:limit]],
                           next_before=jobs[limit - 1].id if len(jobs) > limit else None)

    @api.get("/v1/requests/{request_id}/status", response_model=StatusResponse)
    async def status(self, request_id: str, authorization: Annotated[str | None, Header()] = None):
        return views.status(await self._job(request_id, authorization))

    @api.get("/v1/requests/{request_id}/events", response_class=events.EventStream, status_code=200, responses={
        200: {"content": {events.MEDIA_TYPE: {}},
              "description": "Server-Sent Events: one per status or progress change, each the /status body"},
        204: {"description": "Last-Event-ID is the job's final event: nothing more will come"},
        429: {"description": "TOO_MANY_STREAMS: this key has limits.max_streams_per_key streams open"}})
    async def events_route(self, request_id: str, authorization: Annotated[str | None, Header()] = None,
                           last_event_id: Annotated[str | None, Header(max_length=64)] = None):
        """The job's status as it changes (``text/event-stream``); resume with ``Last-Event-ID``."""
        job = await self._job(request_id, authorization)
        after = events.last_event_id(last_event_id)
        if after > job.event_seq:  # no stream sent it: waiting for it would wait for nothing
            raise events.unknown_event(after, job.event_seq)
        if job.final and after == job.event_seq:
            return Response(status_code=204)
        owner = job.owner
        self.streams.take(owner)
        body = events.follow(self.jobs, job.id, after, self.cfg.events,
                             lambda j, event: views.event_status(j, event).model_dump_json())
        return events.EventStream(body, release=lambda: self.streams.give_back(owner))

    @api.get("/v1/requests/{request_id}/result", response_model=ResultResponse)
    async def result(self, request_id: str, authorization: Annotated[str | None, Header()] = None):
        return views.result(await self._job(request_id, authorization), self.cfg.public_base_url or "")

    @api.head("/v1/requests/{request_id}/outputs/{n}")
    async def output_head(self, request_id: str, n: int, request: Request,
                          authorization: Annotated[str | None, Header()] = None):
        """What ``GET`` answers (status, length, ranges, the redirect), without the body."""
        return await self.output(request_id, n, request, authorization)

    @api.get("/v1/requests/{request_id}/outputs/{n}")
    async def output(self, request_id: str, n: int, request: Request,
                     authorization: Annotated[str | None, Header()] = None):
        """The video, streamed from the output store (``Range`` honoured), or a redirect to a presigned URL."""
        job = await self._job(request_id, authorization)
        if not 0 <= n < len(job.outputs):
            raise errors.ApiError(404, "OUTPUT_NOT_FOUND", f"request {request_id} has no output {n} (yet)",
                                  {"request_id": request_id, "index": n, "available": len(job.outputs)})
        out = job.outputs[n]
        key = self.outputs.key_of(out)
        size = await asyncio.to_thread(self.outputs.size, key) if key else None
        if size is None:
            raise errors.ApiError(410, "OUTPUT_GONE", f"output {n} of {request_id} is no longer stored")
        if self.cfg.storage.presigned_redirect:
            url = await asyncio.to_thread(self.outputs.presign, key, self.cfg.storage.presign_expiry_s, request.method)
            return RedirectResponse(url, status_code=307)
        headers = {"Accept-Ranges": "bytes",
                   "Content-Disposition": f'attachment; filename="{request_id}-{n}.{out["format"]}"'}
        span = parse_range(request.headers.get("range"), size)
        first, last = span if span is not None else (0, size - 1)
        headers["Content-Length"] = str(last - first + 1)
        if span is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        if request.method == "HEAD":
            return Response(status_code=206 if span else 200, media_type=out["content_type"], headers=headers)
        return StreamingResponse(self.outputs.iter_range(key, first, last), status_code=206 if span else 200,
                                 media_type=out["content_type"], headers=headers)

    @api.post("/v1/requests/{request_id}/cancel", response_model=StatusResponse)
    async def cancel(self, request_id: str, authorization: Annotated[str | None, Header()] = None):
        job = await self._job(request_id, authorization)
        if not job.final:
            after, canceled_now = await self.jobs.request_cancel(request_id)
            job = after or job
            if canceled_now:  # nobody held it: it ends here, not in a runner
                self.metrics.finished("canceled", None)
            log.info("job %s: cancel requested (%s)", request_id, "canceled" if canceled_now else "flagged")
            self.runner.cancel(request_id)
            if job.final:  # a queued job ends at once: its webhook is due now
                self._wake_webhooks()
        return views.status(job)

    @api.get("/v1/webhook-secret", response_model=WebhookSecretResponse)
    async def webhook_secret_route(self, authorization: Annotated[str | None, Header()] = None):
        """The caller's webhook signing secret: verify deliveries with it (``client.verify_webhook``)."""
        owner = self._owner(authorization)
        if self.webhook_secret is None:
            raise StoreUnavailable("the webhook signing secret is kept in the job database, which is unavailable",
                                   {"store": "jobs"})
        return WebhookSecretResponse(secret=webhooks.key_secret(self.webhook_secret, owner))

    @api.get("/", include_in_schema=False)
    async def playground_page(self, request: Request) -> HTMLResponse:
        """The browser playground (open without a key: it holds no data, its script asks with the key)."""
        return HTMLResponse(playground.page(request.scope.get("root_path", "")), headers=playground.HEADERS)

    @api.get("/static/{name}", include_in_schema=False)
    async def playground_asset(self, name: str) -> FileResponse:
        found = playground.asset(name)
        if found is None:
            raise errors.ApiError(404, "NOT_FOUND", f"no static file {name!r}")
        path, media_type = found
        return FileResponse(path, media_type=media_type, headers=playground.HEADERS)

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self, authorization: Annotated[str | None, Header()] = None):
        self._owner(authorization)
        d, m = self.cfg.defaults, self.cfg.gpu.model
        speed = m.speed
        return ModelsResponse(models=[ModelPublic(
            id=m.model_id, base_model=m.source if m.source not in ("tiny", "random-full") else
            f"{m.source} (stands in for Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)",
            default_steps=d.sample_steps, default_guidance_scale=d.guidance_scale,
            default_num_frames=d.num_frames, default_fps=d.fps, default_width=d.width, default_height=d.height,
            samplers=list(SAMPLERS), output_formats=list(OUTPUT_FORMATS),
            max_loras=min(MAX_LORAS, self.cfg.limits.max_loras),
            speed_modes=list(speed.enabled_modes()), default_speed=d.speed,
            turbo_steps=speed.turbo.steps if speed.turbo.enabled else None)])
