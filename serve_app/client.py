"""A small synchronous Python client for the Wan I2V service (create -> follow -> download).

Needs only httpx, so it can be used from a machine without torch or Ray::

    from serve_app.client import WanClient, build_request

    with WanClient("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit(build_request("first_frame.png", "a runner on a beach",
                                          loras=[("my_job/my_job.safetensors", 1.0)], seed=7))
        result = client.wait(job["request_id"], on_progress=print)  # every status change, as it happens
        client.download(job["request_id"], 0, "out.mp4")

A webhook receiver checks each delivery with ``verify_webhook`` before trusting it::

    payload = verify_webhook(raw_body, headers["Wan-Signature"], secret)   # secret: client.webhook_secret()
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import httpx

DEFAULT_MODEL = "wan21_i2v_14b480p"
FINAL_STATUSES = ("succeeded", "failed", "canceled")

# The optional per-prompt fields of the reference request (serve_app.schemas.PromptIn); the server
# silently ignores unknown fields, so build_request refuses them instead of letting a typo pass.
PROMPT_FIELDS = (
    "neg",
    "trigger_word",
    "width",
    "height",
    "num_frames",
    "fps",
    "sample_steps",
    "guidance_scale",
    "seed",
    "sampler",
    "output_format",
    "speed",
)

# Polling survives this many consecutive transient failures (connection errors, 502/503/504).
_TRANSIENT_STATUSES = (502, 503, 504)
_MAX_TRANSIENT = 10


WEBHOOK_SIGNATURE_HEADER = "Wan-Signature"
WEBHOOK_ID_HEADER = "Wan-Webhook-Id"  # the same on every attempt of one delivery: dedupe on it
WEBHOOK_TOLERANCE_S = 300


class WebhookSignatureError(Exception):
    """A webhook delivery that must not be trusted: no or a wrong signature, or a timestamp too far off."""


def sign_webhook(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Wan-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds).

    ``t=<timestamp>,v1=<hex HMAC-SHA256 keyed with the UTF-8 secret over b"<timestamp>." + body>``, as
    Stripe signs: the timestamp is inside the MAC, so an old delivery cannot be replayed as new. The
    server signs with this very function.
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_webhook(body: bytes, signature: str | None, secret: str, tolerance_s: float = WEBHOOK_TOLERANCE_S,
                   now: float | None = None) -> dict[str, Any]:
    """Check a delivery's ``Wan-Signature`` header and return its JSON payload.

    Args:
        body: the raw request body, exactly as received (verify before parsing or re-encoding it).
        signature: the ``Wan-Signature`` header.
        secret: your API key's webhook secret (``WanClient.webhook_secret()``).
        tolerance_s: refuse a timestamp further than this from ``now`` (replays of old deliveries).
        now: the current unix time (default: the clock).
    Returns:
        The payload: ``{"event": "job.succeeded" | "job.failed" | "job.canceled", ...the result body}``.
    Raises:
        WebhookSignatureError: missing or malformed header, no matching ``v1`` value, stale timestamp.
    """
    fields: dict[str, list[str]] = {}
    for part in (signature or "").split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    try:
        (timestamp,) = fields.get("t", [])
        sent = int(timestamp)
    except ValueError:
        raise WebhookSignatureError("malformed signature header: need exactly one t=<unix seconds>") from None
    if abs((time.time() if now is None else now) - sent) > tolerance_s:
        raise WebhookSignatureError(f"signature timestamp {sent} is more than {tolerance_s:g} s off")
    expected = sign_webhook(secret, body, sent).rpartition("v1=")[2]
    # Every v1 value is compared (a sender rotating secrets may send several), in constant time.
    if not any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", [])):
        raise WebhookSignatureError("no v1 signature matches this body and secret")
    return json.loads(body)


class WanApiError(Exception):
    """An error answered by the server: HTTP status plus the body's stable code, message and details."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after  # seconds, from Retry-After (sent with 429)


def parse_error(response: httpx.Response) -> WanApiError:
    """The WanApiError for an error response, whatever its body looks like.

    The service answers ``{"detail": {"error": {"code", "message", "details"}}}``; a proxy in front of
    it may answer plain text or FastAPI's ``{"detail": "..."}``, which get ``HTTP_<status>``.
    """
    status = response.status_code
    code, message, details = f"HTTP_{status}", response.reason_phrase or "error", {}
    try:
        body = response.json()
    except ValueError:
        body = None
        text = response.text.strip()
        if text:
            message = text[:500]
    detail = body.get("detail") if isinstance(body, dict) else None
    error = detail.get("error") if isinstance(detail, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        details = error.get("details") if isinstance(error.get("details"), dict) else {}
    elif detail is not None:
        message = detail if isinstance(detail, str) else str(detail)[:500]
    return WanApiError(status, code, message, details, _retry_after(response.headers.get("retry-after")))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def check(response: httpx.Response) -> httpx.Response:
    """Return ``response`` if it succeeded, else raise its WanApiError."""
    if response.is_success:
        return response
    response.read()  # a streamed response has no body yet; reading twice is a no-op
    raise parse_error(response)


def parse_lora(value: str) -> tuple[str, float]:
    """``REF[:SCALE]`` -> (ref, scale); splits on the last ':' only if what follows is a number.

    ``https://host/x.safetensors:0.8`` -> ("https://host/x.safetensors", 0.8);
    ``https://host/x.safetensors`` -> (..., 1.0); ``hf://org/repo/x.safetensors`` keeps its ':'.
    """
    ref, sep, tail = value.rpartition(":")
    scale = 1.0
    if sep:
        try:
            parsed = float(tail)
        except ValueError:
            parsed = None
        if parsed is not None and math.isfinite(parsed):  # "x:nan" is a name, never a scale
            value, scale = ref, parsed
    if not value.strip():
        raise ValueError("empty LoRA reference")
    return value, scale


def encode_image(image: str | os.PathLike) -> str:
    """A ctrl_img value: http(s) URLs and data: URIs pass through; a local file becomes base64."""
    text = str(image)
    if text.lower().startswith(("http://", "https://", "data:")):
        return text
    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {text!r} (give a local file or an http(s) URL)")
    return base64.b64encode(path.read_bytes()).decode("ascii")


def build_request(image: str | os.PathLike, prompt: str,
                  loras: Iterable[tuple[str, float] | str] = (), model: str = DEFAULT_MODEL,
                  webhook_url: str | None = None, **prompt_fields: Any) -> dict[str, Any]:
    """A one-prompt request in the reference shape.

    Args:
        image: the first frame: a local file (sent as base64), an http(s) URL or a data: URI.
        prompt: the text prompt.
        loras: ``(ref, scale)`` pairs (or bare refs, scale 1.0).
        model: the model id.
        webhook_url: receives the signed result when the job ends (see ``verify_webhook``).
        **prompt_fields: any of PROMPT_FIELDS (e.g. ``width=832, seed=7, sample_steps=25``);
            None values are left out so the server's defaults apply.
    Returns:
        ``{"model", "prompts": [{"prompt", "ctrl_img", ...}], "loras": [{"path", "network_multiplier"}]}``
    """
    unknown = sorted(set(prompt_fields) - set(PROMPT_FIELDS))
    if unknown:
        raise TypeError(f"unknown prompt field(s) {unknown}; expected some of {list(PROMPT_FIELDS)}")
    entry: dict[str, Any] = {"prompt": prompt, "ctrl_img": encode_image(image)}
    entry.update({k: v for k, v in prompt_fields.items() if v is not None})
    lora_list = []
    for lora in loras:
        ref, scale = (lora, 1.0) if isinstance(lora, str) else lora
        lora_list.append({"path": ref, "network_multiplier": float(scale)})
    request: dict[str, Any] = {"model": model, "prompts": [entry], "loras": lora_list}
    if webhook_url is not None:
        request["webhook_url"] = webhook_url
    return request


class WanClient:
    """The service's HTTP API, one method per route; every error answer raises WanApiError."""

    build_request = staticmethod(build_request)

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        """
        Args:
            base_url: e.g. ``http://127.0.0.1:8000`` (the Serve route prefix included, if any).
            api_key: sent as ``Authorization: Bearer <key>`` when given.
            timeout: seconds per HTTP call (a video download gets this per read, not in total).
            transport: an httpx transport, for callers that need their own (proxies, retries).
        """
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport, follow_redirects=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "WanClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        return check(self._http.request(method, path, **kwargs)).json()

    # -- routes ----------------------------------------------------------------------------------

    def submit(self, request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/inference -> ``{request_id, status, status_url, result_url, cancel_url, created_at}``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/inference", json=request, headers=headers)

    def status(self, request_id: str) -> dict[str, Any]:
        """GET /v1/requests/{id}/status -> ``{status, progress, error, ...}``."""
        return self._call("GET", f"/v1/requests/{request_id}/status")

    def result(self, request_id: str) -> dict[str, Any]:
        """GET /v1/requests/{id}/result -> ``{status, outputs: {videos: [...]}, error, metadata, ...}``."""
        return self._call("GET", f"/v1/requests/{request_id}/result")

    def cancel(self, request_id: str) -> dict[str, Any]:
        """POST /v1/requests/{id}/cancel -> the status after the cancel request."""
        return self._call("POST", f"/v1/requests/{request_id}/cancel")

    def models(self) -> dict[str, Any]:
        """GET /v1/models -> ``{models: [...]}``."""
        return self._call("GET", "/v1/models")

    def webhook_secret(self) -> str:
        """GET /v1/webhook-secret -> this key's secret for ``verify_webhook``."""
        return self._call("GET", "/v1/webhook-secret")["secret"]

    def health(self) -> dict[str, Any]:
        """GET /health."""
        return self._call("GET", "/health")

    def download(self, request_id: str, n: int, path: str | os.PathLike) -> Path:
        """Stream output ``n`` of a request to ``path`` (written whole or not at all); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._http.stream("GET", f"/v1/requests/{request_id}/outputs/{n}") as response:
            check(response)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.part-")
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; a downloaded video is an ordinary file
                os.replace(tmp, target)
            except BaseException:
                os.unlink(tmp)
                raise
        return target

    def events(self, request_id: str, last_event_id: int | None = None) -> Iterator[tuple[int | None, dict[str, Any]]]:
        """GET /v1/requests/{id}/events: ``(event id, status dict)`` for each event of one connection.

        The connection ends after the final status, or earlier (the server's stream length, a proxy):
        call again with the last id seen to go on from there. Nothing is yielded if ``last_event_id``
        was the final event already.
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        with self._http.stream("GET", f"/v1/requests/{request_id}/events", headers=headers) as response:
            check(response)
            if response.status_code == 204:  # the stream was over already
                return
            yield from _sse_events(response.iter_lines())

    def wait(self, request_id: str, poll_s: float = 1.0,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             timeout: float | None = None, stream: bool = True) -> dict[str, Any]:
        """Follow the job until it is final and return its result (which may be failed or canceled).

        Args:
            request_id: the job.
            poll_s: seconds between status polls, where the server has no event stream.
            on_progress: called with every status dict seen, the final one included: with the event
                stream, every stage and every denoising step.
            timeout: give up after this many seconds (TimeoutError); the job keeps running.
            stream: follow ``/events``; False (or a server without it, or one that refuses another
                stream) polls ``/status``.
        Returns:
            The result dict; check ``result["status"]`` and ``result["error"]``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if stream and self._follow(request_id, on_progress, deadline, timeout):
            return self.result(request_id)
        return self._poll(request_id, poll_s, on_progress, deadline, timeout)

    def _follow(self, request_id: str, on_progress, deadline: float | None, timeout: float | None) -> bool:
        """Follow the event stream, reconnecting where it stopped, until the final status: True; False
        where the server has no stream for us (an older server: 404 on the route; TOO_MANY_STREAMS)."""
        last: int | None = None
        transient = 0
        while True:
            heard = False
            try:
                for event_id, status in self.events(request_id, last):
                    last = event_id if event_id is not None else last
                    heard, transient = True, 0
                    if on_progress is not None:
                        on_progress(status)
                    if status.get("status") in FINAL_STATUSES:
                        return True
                    _check_deadline(deadline, request_id, timeout)
                if last is not None and self.status(request_id)["status"] in FINAL_STATUSES:
                    return True  # the final event was seen on an earlier connection (answered 204)
            except WanApiError as e:
                if e.code == "REQUEST_NOT_FOUND":
                    raise
                if e.status == 404 or e.code == "TOO_MANY_STREAMS":
                    return False
                if e.status not in _TRANSIENT_STATUSES:
                    raise
                transient += 1
            except (httpx.TransportError, ValueError):  # a connection cut mid-event is resumed, not fatal
                transient += 1
            if transient > _MAX_TRANSIENT:
                raise WanApiError(503, "STREAM_LOST", f"the event stream of {request_id} kept failing")
            _check_deadline(deadline, request_id, timeout)
            if transient or not heard:  # no reconnect storm against a server that keeps failing
                time.sleep(min(5.0, 0.2 * 2 ** transient))

    def _poll(self, request_id: str, poll_s: float, on_progress, deadline: float | None,
              timeout: float | None) -> dict[str, Any]:
        transient = 0
        while True:
            try:
                status = self.status(request_id)
                transient = 0
            except (httpx.TransportError, WanApiError) as e:
                # A restarting proxy or replica is not the job failing: keep polling a while.
                if isinstance(e, WanApiError) and e.status not in _TRANSIENT_STATUSES:
                    raise
                transient += 1
                if transient > _MAX_TRANSIENT:
                    raise
                status = None
            if status is not None:
                if on_progress is not None:
                    on_progress(status)
                if status["status"] in FINAL_STATUSES:
                    return self.result(request_id)
            _check_deadline(deadline, request_id, timeout)
            time.sleep(poll_s)


def _check_deadline(deadline: float | None, request_id: str, timeout: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"request {request_id} not finished after {timeout}s")


def _sse_events(lines: Iterable[str]) -> Iterator[tuple[int | None, dict[str, Any]]]:
    """``(id, JSON data)`` of each event in a ``text/event-stream`` (comments and ``retry:`` skipped)."""
    event_id: int | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield event_id, json.loads("\n".join(data))
            data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "id" and value.isdigit():
            event_id = int(value)
