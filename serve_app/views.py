"""Job records -> the public response bodies: the status and result routes and the webhook payload
answer with the same bodies, built here once."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from .jobs import Job, JobEvent
from .schemas import (
    ErrorBody,
    Outputs,
    ProgressPublic,
    ResultResponse,
    StatusResponse,
    VideoPublic,
    WebhookAttempt,
    WebhookPublic,
)


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z") if ts else None


def webhook(job: Job) -> WebhookPublic | None:
    if job.webhook_url is None:
        return None
    retrying = job.webhook_state == "pending" and bool(job.webhook_attempts)
    return WebhookPublic(url=job.webhook_url, state=job.webhook_state, delivery_id=job.webhook_id,
                         attempts=[WebhookAttempt(**a) for a in job.webhook_attempts],
                         next_attempt_at=iso(job.webhook_next_at) if retrying else None)


def status(job: Job) -> StatusResponse:
    return StatusResponse(
        request_id=job.id, status=job.status, progress=ProgressPublic(**job.progress), attempts=job.attempts,
        error=ErrorBody(**job.error) if job.error else None, created_at=iso(job.created_at),
        started_at=iso(job.started_at), finished_at=iso(job.finished_at), webhook=webhook(job))


def event_status(job: Job, event: JobEvent) -> StatusResponse:
    """The status body as ``event`` left the job (its end, error and finish time, only on a final event:
    a job ends once); the webhook's delivery is the one live part, as read now."""
    final = event.final
    return status(replace(job, status=event.status, progress=event.progress, attempts=event.attempts,
                          started_at=event.started_at, error=job.error if final else None,
                          finished_at=job.finished_at if final else None))


def result(job: Job, base_url: str = "") -> ResultResponse:
    """The result body; video URLs are ``base_url`` (``public_base_url``, or '' for relative) + the route."""
    base = base_url.rstrip("/")
    videos = [
        VideoPublic(**{k: v for k, v in o.items() if k in VideoPublic.model_fields},
                    url=f"{base}/v1/requests/{job.id}/outputs/{n}")
        for n, o in enumerate(job.outputs)
    ]
    return ResultResponse(
        request_id=job.id, status=job.status, outputs=Outputs(videos=videos),
        error=ErrorBody(**job.error) if job.error else None, created_at=iso(job.created_at),
        finished_at=iso(job.finished_at),
        metadata={"model": job.model, "attempts": job.attempts, **job.metadata})
