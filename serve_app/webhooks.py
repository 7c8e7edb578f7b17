"""Webhooks: when a job ends, its result is POSTed, signed, to the ``webhook_url`` its request named.

Path of a delivery: submit checks the URL (``check_url``: 400 ``URL_NOT_ALLOWED``) and stores it with the
job, delivery ``pending`` -> the job becomes final (any runner, any replica) -> any ingress replica's
``WebhookSender`` claims the due delivery with a lease (PostgreSQL: ``SKIP LOCKED``) -> one POST through
``deployments.fetch.post`` (the address re-checked and pinned on every attempt) -> the attempt recorded
and the lease freed: ``delivered`` on any 2xx; else ``pending`` again after a random wait below an
exponentially growing bound (tenacity's ``wait_random_exponential``), or ``failed`` once
``webhooks.attempts`` tries were made, no attempt could start within ``webhooks.max_elapsed_s`` of the
job's end, or the address was refused.

Nothing waits in a process's memory: a delivery is a row state, so a replica that dies between a
job's end and its delivery (or during an attempt: the lease expires) leaves it to another replica.
Delivery is therefore at least once: a receiver may see a delivery again (same ``Wan-Webhook-Id``).

Signing (as Stripe does): ``Wan-Signature: t=<unix>,v1=<hex HMAC-SHA256(key secret, "<t>.<body>")>``
(``client.sign_webhook``). Each API key's secret is derived from the server's signing secret and the
key's owner id, so a key holder can verify only its own deliveries, and the server stores no per-key
secret: ``whsec_`` + hex HMAC-SHA256(server secret, "wan-webhook-secret:" + owner). Without API keys
every job has the same owner, so there is one secret.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from typing import Callable

from tenacity import RetryCallState, wait_random_exponential

from deployments.contract import FetchConfig, FetchError, FetchFailed, UrlNotAllowed, fetch_post, vet_url

from .client import WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER, sign_webhook
from .config import AppConfig, WebhooksConfig
from .jobs import AsyncJobStore, Job, JobStore
from .views import iso, result

log = logging.getLogger("ray.serve")

EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}
SECRET_NAME = "webhook_signing_secret"  # the database's own secret, where no environment variable gives one
USER_AGENT = "wan-i2v-serve-webhooks/1"


# ---------------------------------------------------------------------------------------------
# Secrets


def server_secret(cfg: WebhooksConfig, store: JobStore) -> bytes:
    """The server signing secret: ``$<signing_secret_env>``, else the one kept in the job database."""
    value = os.environ.get(cfg.signing_secret_env, "")
    return (value or store.server_secret(SECRET_NAME)).encode()


def key_secret(server: bytes, owner: str) -> str:
    """The webhook secret of one API key's owner id ('' without API keys)."""
    return "whsec_" + hmac.new(server, f"wan-webhook-secret:{owner}".encode(), hashlib.sha256).hexdigest()


def check_webhook_url(url: str, cfg: FetchConfig) -> None:
    """At submit: the URL's syntax and address, resolving its host now (as a delivery will).

    A host that does not resolve yet is accepted: its deliveries fail and are retried like any.

    Raises:
        UrlNotAllowed: 400 ``URL_NOT_ALLOWED``.
    """
    try:
        vet_url(url, cfg)
    except UrlNotAllowed:
        raise
    except FetchFailed:
        pass


# ---------------------------------------------------------------------------------------------
# Delivery


def payload(job: Job, base_url: str = "") -> bytes:
    """The delivered body: the event name and the job's result body (as ``GET .../result`` answers it)."""
    body = {"event": EVENTS[job.status], **result(job, base_url).model_dump(mode="json")}
    return json.dumps(body, separators=(",", ":")).encode()


class WebhookSender:
    """Delivers due webhooks from the shared store; one per ingress replica."""

    def __init__(self, cfg: AppConfig, jobs: AsyncJobStore, secret: bytes):
        self.cfg = cfg
        self.wcfg = cfg.webhooks
        self.jobs = jobs
        self.secret = secret
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:webhooks"
        self._wait = wait_random_exponential(multiplier=self.wcfg.initial_backoff_s, max=self.wcfg.max_backoff_s)
        # Threads of its own: receivers that hang up to the timeout never hold threads that submits need.
        self._pool = concurrent.futures.ThreadPoolExecutor(self.wcfg.max_in_flight, thread_name_prefix="webhooks")
        self._slots = asyncio.Semaphore(self.wcfg.max_in_flight)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._deliver_forever())

    def stop(self) -> None:
        """Stop at once; a delivery under way stays pending and its lease expires for another replica."""
        for task in list(self._tasks):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """A job just ended here: look for its delivery now rather than at the next sweep."""
        self._wake.set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_forever(self) -> None:
        every = self.cfg.jobs.sweep_interval_s
        while True:
            await self._slots.acquire()
            try:
                self._wake.clear()
                job = await self.jobs.claim_webhook(self.holder, self.wcfg.lease_s)
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as e:  # the sender must outlive a bad moment of the database
                self._slots.release()
                log.warning("claiming a webhook delivery failed (%s: %s); retrying in %.1f s",
                            type(e).__name__, e, every)
                await asyncio.sleep(every)
                continue
            if job is None:
                self._slots.release()
                try:
                    await asyncio.wait_for(self._wake.wait(), every)
                except asyncio.TimeoutError:
                    pass
                continue
            self._spawn(self._deliver_then_free(job))

    async def _deliver_then_free(self, job: Job) -> None:
        try:
            await self.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. the database lost: the lease expires and the delivery is tried again
            log.exception("webhook delivery for job %s could not be recorded", job.id)
        finally:
            self._slots.release()

    async def deliver(self, job: Job) -> str:
        """One attempt for a delivery this sender has claimed; records it and returns the new state."""
        body = payload(job, self.cfg.public_base_url or "")
        number = len(job.webhook_attempts) + 1
        sent = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            WEBHOOK_ID_HEADER: job.webhook_id,
            "Wan-Webhook-Event": EVENTS[job.status],
            "Wan-Webhook-Attempt": str(number),
            WEBHOOK_SIGNATURE_HEADER: sign_webhook(key_secret(self.secret, job.owner), body, sent),
        }
        attempt: dict = {"at": iso(time.time())}
        refused = False
        try:
            status = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: fetch_post(job.webhook_url, self.cfg.gpu.fetch, body, headers,
                                               timeout_s=self.wcfg.timeout_s))
            attempt["status_code"] = status
        except FetchError as e:  # messages name the URL without its query or userinfo
            attempt["error"] = f"{e.code}: {e.message}"
            refused = isinstance(e, UrlNotAllowed)
        retry_in = None
        if 200 <= attempt.get("status_code", 0) < 300:
            state = "delivered"
        elif refused or (retry_in := self.retry_in(number, job.finished_at)) is None:
            state = "failed"
        else:
            state = "pending"
        if not await self.jobs.record_webhook_attempt(job.id, self.holder, attempt, state, retry_in or 0.0):
            log.warning("webhook for job %s: lease lost before attempt %d was recorded", job.id, number)
        elif state != "delivered":
            log.warning("webhook for job %s: attempt %d %s; %s", job.id, number,
                        attempt.get("error") or f"answered HTTP {attempt['status_code']}",
                        f"next in {retry_in:.1f} s" if state == "pending" else "giving up")
        return state

    def retry_in(self, attempts_made: int, finished_at: float | None) -> float | None:
        """Seconds until the next attempt, or None when the retries are spent."""
        if attempts_made >= self.wcfg.attempts:
            return None
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempts_made
        wait = self._wait(state)
        if time.time() + wait - (finished_at or time.time()) > self.wcfg.max_elapsed_s:
            return None
        return wait
