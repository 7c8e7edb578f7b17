"""Webhooks: signing and its verification, per-key secrets, the retry schedule, and deliveries over HTTP
from the real app (both state backends) to a loopback receiver (the test config allows 127.0.0.1).

A delivery whose ingress is SIGKILLed is in ``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from deployments.config import FetchConfig
from serve_app.client import WebhookSignatureError, sign_webhook, verify_webhook
from serve_app.config import AppConfig
from serve_app.jobs import AsyncJobStore, StoredSpec, open_job_store
from serve_app.webhooks import WebhookSender, key_secret, server_secret
from tests.conftest import FAIL_PROMPT, small_request, tiny_spec
from tests.http_server import LocalServer, Route, local_server  # noqa: F401  (fixture)

# -- signing -----------------------------------------------------------------------------------


def test_a_signed_body_verifies_and_any_change_is_refused():
    body, secret, now = b'{"event":"job.succeeded","request_id":"r"}', "whsec_abc", 1_700_000_000
    header = sign_webhook(secret, body, now)
    assert header.startswith(f"t={now},v1=") and len(header.rpartition("v1=")[2]) == 64
    assert verify_webhook(body, header, secret, now=now + 299) == json.loads(body)
    rotated = f"t={now},v1={'0' * 64},v1={header.rpartition('v1=')[2]}"  # any one v1 may match
    assert verify_webhook(body, rotated, secret, now=now)["request_id"] == "r"
    refused = [
        (body + b" ", header, secret, now),  # the body changed
        (body, header, "whsec_other", now),  # another key's secret
        (body, header.replace(f"t={now}", f"t={now + 1}"), secret, now),  # the timestamp changed
        (body, header, secret, now + 301),  # too old: a replay
        (body, header, secret, now - 301),  # from the future
        (body, None, secret, now),
        (body, f"v1={header.rpartition('v1=')[2]}", secret, now),  # no timestamp
        (body, f"t={now}", secret, now),  # no signature
        (body, f"t=abc,v1={'0' * 64}", secret, now),
    ]
    for args in refused:
        with pytest.raises(WebhookSignatureError):
            verify_webhook(*args[:3], now=args[3])


def test_each_owner_has_its_own_secret_from_the_server_secret(tmp_path, monkeypatch):
    store = open_job_store(str(tmp_path / "jobs.sqlite3"))
    cfg = AppConfig().webhooks
    monkeypatch.delenv(cfg.signing_secret_env, raising=False)
    kept = server_secret(cfg, store)
    other_replica = open_job_store(str(tmp_path / "jobs.sqlite3"))
    assert kept == server_secret(cfg, other_replica)
    other_replica.close()
    monkeypatch.setenv(cfg.signing_secret_env, "from-the-environment")
    assert server_secret(cfg, store) == b"from-the-environment"  # wins over the database's
    a, b, nobody = key_secret(kept, "owner-a"), key_secret(kept, "owner-b"), key_secret(kept, "")
    assert len({a, b, nobody}) == 3 and a.startswith("whsec_")
    assert a == key_secret(kept, "owner-a") and a != key_secret(b"another server", "owner-a")
    store.close()


def test_retries_wait_below_a_doubling_bound_and_stop_when_spent():
    cfg = AppConfig.model_validate({"webhooks": {"attempts": 5, "initial_backoff_s": 1, "max_backoff_s": 3,
                                                 "max_elapsed_s": 100}})
    sender = WebhookSender(cfg, jobs=None, secret=b"s")
    now = time.time()
    for made, bound in ((1, 1), (2, 2), (3, 3), (4, 3)):
        waits = [sender.retry_in(made, now) for _ in range(200)]
        assert all(0 <= w <= bound for w in waits) and max(waits) > bound / 2, (made, max(waits))
    assert sender.retry_in(5, now) is None  # five tries made: no sixth
    assert sender.retry_in(1, now - 100) is None  # the job ended max_elapsed_s ago
    sender.stop()


def test_every_delivery_checks_the_address_again(tmp_path, local_server):  # noqa: F811
    """A URL accepted at submit but refused when delivering (here: the rules no longer exempt
    127.0.0.1) fails at once, without a connection and without retries."""
    cfg = AppConfig.model_validate({"gpu": {"fetch": {"allow_http": True}}})
    store = open_job_store(str(tmp_path / "jobs.sqlite3"))
    url = local_server.add("/hook")
    spec = tiny_spec().model_copy(update={"image_png": b""})
    job, _ = store.create(str(uuid.uuid4()), [StoredSpec(spec, "k")], "m", webhook_url=url)
    store.request_cancel(job.id)

    async def one_attempt():
        jobs = AsyncJobStore(store)
        sender = WebhookSender(cfg, jobs, b"secret")
        try:
            return await sender.deliver(await jobs.claim_webhook(sender.holder, 30))
        finally:
            sender.stop()

    assert asyncio.run(one_attempt()) == "failed"
    (attempt,) = store.get(job.id).webhook_attempts
    assert attempt["error"].startswith("URL_NOT_ALLOWED") and "status_code" not in attempt
    assert local_server.count("/hook") == 0
    store.close()


# -- over HTTP, both backends --------------------------------------------------------------------


def _status(app, rid: str) -> dict:
    return app.http.get(f"/v1/requests/{rid}/status").json()


def _wait_webhook(app, rid: str, timeout: float = 60) -> dict:
    """The job's status once its delivery is delivered or failed."""
    deadline = time.time() + timeout
    while (status := _status(app, rid))["webhook"]["state"] == "pending":
        assert time.time() < deadline, f"webhook still pending: {status}"
        time.sleep(0.1)
    return status


def _hooked(url: str, **prompt) -> dict:
    return {**small_request(**prompt), "webhook_url": url}


def test_the_result_is_delivered_signed_with_the_keys_secret(app, local_server):  # noqa: F811
    url = local_server.add("/hook", b"thanks")
    rid = app.submit(_hooked(url)).json()["request_id"]
    assert _status(app, rid)["webhook"]["state"] == "pending"
    status = _wait_webhook(app, rid)
    assert status["status"] == "succeeded" and status["webhook"]["state"] == "delivered", status
    (attempt,) = status["webhook"]["attempts"]
    assert attempt["status_code"] == 200 and attempt["error"] is None and attempt["at"]
    (seen,) = local_server.requests
    secret = app.http.get("/v1/webhook-secret").json()["secret"]
    payload = verify_webhook(seen["body"], seen["wan-signature"], secret)
    result = app.http.get(f"/v1/requests/{rid}/result").json()
    assert payload == {"event": "job.succeeded", **result}  # the result body, plus its event
    assert seen["wan-webhook-id"] == status["webhook"]["delivery_id"] and seen["wan-webhook-event"] == "job.succeeded"
    assert seen["content-type"] == "application/json" and seen["wan-webhook-attempt"] == "1"
    with pytest.raises(WebhookSignatureError):
        verify_webhook(seen["body"], seen["wan-signature"], secret + "0")


def test_a_receiver_failing_twice_then_succeeding_gets_it_on_the_third_attempt(app, local_server):  # noqa: F811
    url = local_server.add_sequence("/flaky", Route(status=500), Route(status=503), Route(status=204))
    rid = app.submit(_hooked(url, seed=5)).json()["request_id"]
    status = _wait_webhook(app, rid)
    assert status["webhook"]["state"] == "delivered", status
    assert [a["status_code"] for a in status["webhook"]["attempts"]] == [500, 503, 204]
    assert [r["wan-webhook-attempt"] for r in local_server.requests] == ["1", "2", "3"]
    assert len({r["wan-webhook-id"] for r in local_server.requests}) == 1  # one delivery, retried
    secret = app.http.get("/v1/webhook-secret").json()["secret"]
    for seen in local_server.requests:  # each attempt signed afresh
        assert verify_webhook(seen["body"], seen["wan-signature"], secret)["event"] == "job.succeeded"


def test_a_receiver_that_never_succeeds_is_given_up_after_the_configured_attempts(app, local_server):  # noqa: F811
    url = local_server.add("/down", status=500)
    rid = app.submit(_hooked(url, prompt=f"{FAIL_PROMPT} webhook")).json()["request_id"]
    status = _wait_webhook(app, rid)
    assert status["status"] == "failed" and status["webhook"]["state"] == "failed", status
    attempts = app.args["webhooks"]["attempts"]
    assert [a["status_code"] for a in status["webhook"]["attempts"]] == [500] * attempts
    assert status["webhook"]["next_attempt_at"] is None
    assert local_server.count("/down") == attempts
    assert {json.loads(r["body"])["event"] for r in local_server.requests} == {"job.failed"}
    # A receiver nobody listens on: connection errors are recorded as such.
    with LocalServer() as gone:
        dead = gone.url("/hook")
    rid = app.submit(_hooked(dead, seed=6)).json()["request_id"]
    status = _wait_webhook(app, rid)
    assert status["webhook"]["state"] == "failed" and len(status["webhook"]["attempts"]) == attempts
    assert all(a["status_code"] is None and a["error"].startswith("FETCH_FAILED")
               for a in status["webhook"]["attempts"])


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/",
                                 "http://[::ffff:192.168.1.1]/hook", "http://localhost:8000/hook",
                                 "http://user:pw@127.0.0.1/hook", "ftp://127.0.0.1/hook", "not a url"])
def test_a_webhook_url_the_fetch_rules_refuse_is_a_400_at_submit(app, url):
    before = app.count_jobs()
    r = app.submit(_hooked(url))
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["error"]["code"] == "URL_NOT_ALLOWED"
    assert app.count_jobs() == before
