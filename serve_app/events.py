"""``GET /v1/requests/{id}/events``: a job's status as Server-Sent Events, read from the job store.

Any ingress replica answers for any job, and the runner of a job may be on another replica or node:
the job store is the one place every replica sees. Each write of a job's status or progress appends
a numbered event in the same transaction (``jobs.JobEvent``), so a stream that reads "the events
after the last one sent" every ``events.poll_s`` misses none, however short a stage was. An event's
number is its SSE ``id``: a client that reconnects with ``Last-Event-ID`` (``EventSource`` does so by
itself) continues right after it, nothing repeated, nothing skipped.

A stream sends ``retry:``, then one ``data:`` line per event (the ``/status`` body as that event left
the job) and a ``: keep-alive`` comment after ``events.heartbeat_s`` without one. It ends after the
final event (succeeded, failed, canceled), or after ``events.max_stream_s`` (the client resumes it; a
stream must end before Serve's request timeout cuts it). A reconnect after the final event is
answered 204, which tells ``EventSource`` to stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from .config import EventsConfig
from .errors import ApiError, StoreUnavailable
from .jobs import AsyncJobStore, Job, JobEvent

log = logging.getLogger("ray.serve")

MEDIA_TYPE = "text/event-stream"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx (and ingress-nginx) would otherwise buffer the stream
}
KEEP_ALIVE = b": keep-alive\n\n"


def last_event_id(value: str | None) -> int:
    """The event number a client has seen (``Last-Event-ID``); 0 for none.

    Raises:
        ApiError: 400 ``INVALID_LAST_EVENT_ID``: not an event number this server sent.
    """
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not text.isdigit() or len(text) > 12:
        raise ApiError(400, "INVALID_LAST_EVENT_ID", f"Last-Event-ID must be an event id this stream sent "
                       f"(a whole number), not {value[:40]!r}", {"last_event_id": value[:40]})
    return int(text)


def unknown_event(event_id: int, last: int) -> ApiError:
    return ApiError(400, "INVALID_LAST_EVENT_ID", f"Last-Event-ID {event_id} is past this job's last event ({last})",
                    {"last_event_id": event_id, "last": last})


def frame(event_id: int, data: str) -> bytes:
    """One SSE event (``data`` is one line of JSON)."""
    return f"id: {event_id}\ndata: {data}\n\n".encode()


class StreamSlots:
    """The open streams of each key on this replica, at most ``limit`` each (``TOO_MANY_STREAMS``)."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.open: Counter[str] = Counter()

    def take(self, owner: str) -> None:
        if self.open[owner] >= self.limit:
            raise ApiError(429, "TOO_MANY_STREAMS", f"this key already has {self.limit} event streams open; "
                           "close one, or poll /status", {"limit": self.limit},
                           headers={"Retry-After": str(self.retry_after_s)})
        self.open[owner] += 1

    def give_back(self, owner: str) -> None:
        self.open[owner] -= 1
        if self.open[owner] <= 0:
            del self.open[owner]


class EventStream(StreamingResponse):
    """A streaming response that gives its slot back however it ends (finished, client gone, error)."""

    def __init__(self, body: AsyncIterator[bytes], release: Callable[[], None]):
        super().__init__(body, media_type=MEDIA_TYPE, headers=HEADERS)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def follow(jobs: AsyncJobStore, job_id: str, after: int, cfg: EventsConfig,
                 render: Callable[[Job, JobEvent], str]) -> AsyncIterator[bytes]:
    """The SSE bytes of one job's events after number ``after`` (see the module doc).

    Args:
        render: the ``data`` of one event: the status body as the event left the job, as JSON.
    """
    loop = asyncio.get_running_loop()
    began = quiet_since = loop.time()
    yield f"retry: {cfg.retry_ms}\n\n".encode()
    while True:
        try:
            events = await jobs.events(job_id, after)
            job = await jobs.get(job_id) if events else None
        except StoreUnavailable as e:  # a moment without the database is a pause, not the end of the job
            log.warning("event stream of %s: %s", job_id, e.message)
            events, job = [], None
        if events:
            if job is None:  # deleted (retention) meanwhile
                return
            for event in events:
                yield frame(event.seq, render(job, event))
                after = event.seq
                if event.final:
                    return
            quiet_since = loop.time()
            continue  # more may be waiting past this batch
        now = loop.time()
        if now - began >= cfg.max_stream_s:
            return
        if now - quiet_since >= cfg.heartbeat_s:
            # A quiet while is also when to notice a job that is gone, or that ended without an event.
            try:
                job = await jobs.get(job_id)
            except StoreUnavailable:
                job = None
            else:
                if job is None or (job.final and job.event_seq <= after):
                    return
            yield KEEP_ALIVE
            quiet_since = now
        await asyncio.sleep(cfg.poll_s)

