"""Security over HTTP against the real app (tiny model): API keys, outbound fetches, limits, hostile input.

Three apps: the session's open ``app`` (fetches allowed to 127.0.0.1 over http), ``secure`` (API
keys, the DEFAULT fetch rules: https only, no private addresses, a tiny queue) and ``tight`` (open,
127.0.0.1 allowed, short fetch timeouts, small body/image/LoRA limits). Every rejected request is
checked to leave no job in the app's database; only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import SLOW_PROMPT, make_image, png_bytes, small_request
from tests.http_server import LocalServer

KEYS = ["alpha-key-0123456789abcdef", "beta-key-0123456789abcdef"]
FILE_KEY = "gamma-key-from-file-0123456789"
SECURE_RETRY_AFTER = 7


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def code(r: httpx.Response) -> str:
    return r.json()["detail"]["error"]["code"]


def job_count(app) -> int:
    return app.count_jobs()


def rejected(app, request=None, status: int = 400, expected: str | None = None, *, headers=None,
             content: bytes | None = None) -> httpx.Response:
    """Submit, assert the status (and code), and that no job was stored."""
    before = job_count(app)
    if content is not None:
        r = app.http.post("/v1/inference", content=content,
                          headers={"Content-Type": "application/json", **(headers or {})})
    else:
        r = app.submit(request, headers)
    assert r.status_code == status, r.text
    if expected is not None:
        assert code(r) == expected, r.text
    assert job_count(app) == before
    return r


def healthy(app) -> None:
    assert app.http.get("/health").json() == {"status": "healthy"}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# App variants
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(serve_env):
    """API keys (two inline, one from a file), default fetch rules, a queue of 3 (2 per key)."""
    from ray import serve

    key_file = serve_env.root / "secure-keys.txt"
    key_file.write_text(f"# one key per line\n\n  {FILE_KEY}  \n")
    args = serve_env.args_for(
        "secure",
        auth={"api_keys": KEYS, "api_keys_file": str(key_file)},
        gpu={"fetch": {"allow_http": False, "allowed_hosts": []}},  # = FetchConfig() defaults
        limits={"max_queue_total": 3, "max_queue_per_key": 2, "retry_after_s": SECURE_RETRY_AFTER},
    )
    app = serve_env.deploy("secure", "/secure", args)
    yield app
    serve.delete("secure")


@pytest.fixture(scope="module")
def tight(serve_env):
    """Open; 127.0.0.1 allowed; 1 s fetch timeouts; small body, image and LoRA limits."""
    from ray import serve

    args = serve_env.args_for(
        "tight",
        gpu={"fetch": {"connect_timeout_s": 1.0, "read_timeout_s": 1.0},
             "lora": {"max_file_bytes": 50_000, "max_header_bytes": 4096}},
        limits={"max_body_bytes": 200_000, "max_image_bytes": 60_000, "max_image_pixels": 200 * 200,
                "image_fetch_timeout_s": 2.0},
    )
    app = serve_env.deploy("tight", "/tight", args)
    yield app
    serve.delete("tight")


@pytest.fixture(scope="module")
def lora_dir(serve_env):
    """This module's files in the shared LoRA root (a subfolder: other modules use the root too)."""
    d = serve_env.lora_root / "security"
    d.mkdir(exist_ok=True)
    return d


def tiny_shapes(*, bad_in: int = 0) -> dict:
    """Linear shapes of the tiny transformer's first q projection (optionally wrong on purpose)."""
    from deployments.engine.models import TINY_TRANSFORMER_CONFIG as T

    dim = T["num_attention_heads"] * T["attention_head_dim"]
    return {"blocks.0.attn1.to_q": (dim + bad_in, dim)}


def write_lora(path, *, bad_in: int = 0):
    from tests.lora_factory import make_lora

    return make_lora(path, "ai-toolkit", tiny_shapes(bad_in=bad_in), blocks=[0], targets=["self_attn.q"]).path


# ---------------------------------------------------------------------------------------------
# 1. Authentication
# ---------------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/requests"),
    ("POST", "/v1/inference"),
    ("GET", "/v1/requests/x/status"),
    ("GET", "/v1/requests/x/result"),
    ("GET", "/v1/requests/x/events"),
    ("GET", "/v1/requests/x/outputs/0"),
    ("POST", "/v1/requests/x/cancel"),
    ("GET", "/v1/webhook-secret"),
    ("GET", "/docs"),
    ("GET", "/docs/assets/swagger-ui-bundle.js"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/route"),
    ("GET", "/healthz"),
    ("GET", "/static/nope.js"),  # only the playground's own files are open, by exact path
    ("GET", "/static/playground.html"),
    ("GET", "/static/"),
    ("GET", "/index.html"),
]

BAD_AUTH = [
    None,
    "",
    "Bearer",
    "Bearer  ,",
    f"Basic {KEYS[0]}",
    f"{KEYS[0]}",
    f"Bearer {KEYS[0]}x",
    f"Bearer {KEYS[0][:-1]}",
    f"Bearer x{KEYS[0]}",
    f"Bearer {KEYS[0].upper()}",
    "Bearer wrong",
    f"Bearer {KEYS[0]},{KEYS[1]}",
]


def test_every_route_but_health_and_ready_needs_a_key(secure):
    assert secure.http.get("/health").json() == {"status": "healthy"}
    assert secure.http.get("/ready").json()["status"] == "ready"
    before = job_count(secure)
    for value in BAD_AUTH:
        headers = {} if value is None else {"Authorization": value}
        for method, path in PROTECTED:
            r = secure.http.request(method, path, headers=headers, json=small_request() if method == "POST" else None)
            assert r.status_code == 401, (method, path, value, r.text)
            assert code(r) == "UNAUTHORIZED" and r.headers["www-authenticate"] == "Bearer"
    # Non-ASCII bytes in the header are just a wrong key.
    r = secure.http.get("/v1/models", headers={"Authorization": "Bearer ключ".encode()})
    assert r.status_code == 401
    assert job_count(secure) == before
    # Every configured key works, inline or from the file, with any case of "Bearer" and extra spaces.
    for header in (f"Bearer {KEYS[0]}", f"bearer {KEYS[1]}", f"BEARER   {FILE_KEY}"):
        assert secure.http.get("/v1/models", headers={"Authorization": header}).status_code == 200
    assert secure.http.get("/docs", headers=auth(KEYS[0])).status_code == 200
    assert secure.http.get("/openapi.json", headers=auth(KEYS[0])).status_code == 200
    assert secure.http.get("/no/such/route", headers=auth(KEYS[0])).status_code == 404


def test_the_playground_loads_without_a_key_and_serves_no_data(secure):
    """Its page and files are open paths: a browser needs them before it has a key; they are constant."""
    from serve_app import playground

    page = secure.http.get("/")
    assert page.status_code == 200 and page.text == playground.page("/secure")
    for name in playground.ASSETS:
        r = secure.http.get(f"/static/{name}")
        assert r.status_code == 200 and r.content == (playground.STATIC_DIR / name).read_bytes()
    assert secure.http.post("/", json=small_request()).status_code == 401  # only GET is a page
    assert secure.http.get("/", params={"x": "1"}).text == page.text


def test_recent_requests_list_only_the_callers_jobs(secure):
    mine, other = auth(KEYS[0]), auth(KEYS[1])
    rid = secure.submit(small_request(), mine).json()["request_id"]
    secure.wait(rid, headers=mine)
    listed = secure.http.get("/v1/requests", headers=mine).json()["requests"]
    assert rid in [s["request_id"] for s in listed]
    theirs = secure.http.get("/v1/requests", params={"limit": 100}, headers=other).json()["requests"]
    assert rid not in [s["request_id"] for s in theirs]
    # Another key's job is no cursor either: it does not exist for this key.
    r = secure.http.get("/v1/requests", params={"before": rid}, headers=other)
    assert r.status_code == 404 and code(r) == "REQUEST_NOT_FOUND"


def test_auth_is_checked_before_the_body_is_read(secure):
    """An unauthenticated caller gets 401, not 413/422: it never makes the server read or parse its body."""
    huge = b"{" + b" " * (40 * 1024**2)  # over the default 32 MiB limit, and not JSON
    r = secure.http.post("/v1/inference", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and code(r) == "UNAUTHORIZED"


def test_a_job_and_its_files_are_visible_only_to_its_key(secure):
    mine, other = auth(KEYS[0]), auth(KEYS[1])
    r = secure.submit(small_request(), mine)
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    assert secure.wait(rid, headers=mine)["status"] == "succeeded"
    for key in (other, auth(FILE_KEY)):
        for method, path in (("GET", "status"), ("GET", "result"), ("GET", "outputs/0"), ("POST", "cancel")):
            r = secure.http.request(method, f"/v1/requests/{rid}/{path}", headers=key)
            assert r.status_code == 404 and code(r) == "REQUEST_NOT_FOUND", (path, r.text)
    # Unknown ids and other keys' ids look exactly alike.
    assert secure.http.get("/v1/requests/nope/status", headers=other).json() == {
        "detail": {"error": {"code": "REQUEST_NOT_FOUND", "message": "Request not found: nope",
                             "details": {"request_id": "nope"}}}}
    assert secure.http.get(f"/v1/requests/{rid}/result", headers=mine).json()["status"] == "succeeded"
    video = secure.http.get(f"/v1/requests/{rid}/outputs/0", headers=mine)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and video.content

    # A running job cannot be canceled by another key.
    slow = secure.submit(small_request(prompt=f"{SLOW_PROMPT} mine", sample_steps=6), mine).json()["request_id"]
    assert secure.http.post(f"/v1/requests/{slow}/cancel", headers=other).status_code == 404
    assert secure.wait(slow, headers=mine)["status"] == "succeeded"

    # Idempotency keys are per API key: the same header value never returns another key's job.
    first = secure.submit(small_request(), {**mine, "Idempotency-Key": "same"}).json()["request_id"]
    again = secure.submit(small_request(), {**mine, "Idempotency-Key": "same"}).json()["request_id"]
    theirs = secure.submit(small_request(), {**other, "Idempotency-Key": "same"}).json()["request_id"]
    assert first == again != theirs
    for rid, key in ((first, mine), (theirs, other)):
        assert secure.wait(rid, headers=key)["status"] == "succeeded"


def test_without_keys_the_local_default_is_open(app):
    assert app.http.get("/v1/models").status_code == 200
    assert app.http.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
    assert app.http.get("/docs").status_code == 200


def test_production_config_refuses_to_start_without_keys(tmp_path, monkeypatch):
    import yaml
    from pydantic import ValidationError

    from serve_app.app import build_app
    from serve_app.config import AppConfig, AuthConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    prod = yaml.safe_load((configs / "wan21-i2v-480p.yaml").read_text())["applications"][0]["args"]
    # The production config reads its keys from a variable each node's environment sets: unset or
    # empty, it refuses to start.
    variable = prod["auth"]["api_keys_env"]
    assert prod["auth"]["require_keys"] and variable and "api_keys_file" not in prod["auth"]
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValidationError, match="no key|no API key"):
        build_app(prod)
    monkeypatch.setenv(variable, " , ")
    with pytest.raises(ValidationError, match="no key|no API key"):
        build_app(prod)
    monkeypatch.setenv(variable, "k1, k2")
    assert build_app(prod) is not None and AppConfig.model_validate(prod).auth.load_keys() == ["k1", "k2"]
    monkeypatch.delenv(variable)
    # A key file is still an option: absent or empty, it refuses to start too.
    def with_file(path):
        return {**prod, "auth": {**prod["auth"], "api_keys_file": str(path)}}

    with pytest.raises(ValidationError, match="cannot be read"):
        build_app(with_file(tmp_path / "absent"))
    (tmp_path / "blank").write_text("\n \n")
    with pytest.raises(ValidationError, match="no key|no API key"):
        build_app(with_file(tmp_path / "blank"))
    (tmp_path / "keys").write_text("k1\nk2\n")
    assert build_app(with_file(tmp_path / "keys")) is not None
    public = {**prod, "auth": {**prod["auth"], "public_by_choice": True}}
    assert build_app(public) is not None

    with pytest.raises(ValidationError, match="no API key"):
        build_app({"auth": {"require_keys": True}})
    assert build_app({"auth": {"require_keys": True, "api_keys": ["k"]}}) is not None
    # A configured key source that yields nothing never means "open".
    with pytest.raises(ValidationError, match="cannot be read"):
        AppConfig.model_validate({"auth": {"api_keys_file": str(tmp_path / "missing.txt")}})
    (tmp_path / "empty.txt").write_text("\n# no keys\n")
    with pytest.raises(ValidationError, match="yields no key"):
        AppConfig.model_validate({"auth": {"api_keys_file": str(tmp_path / "empty.txt")}})
    with pytest.raises(ValidationError, match="yields no key"):
        AppConfig.model_validate({"auth": {"api_keys_env": "WAN_API_KEYS"}})
    # The embedded local default needs no key.
    local = yaml.safe_load((configs / "local.yaml").read_text())["applications"][0]["args"]
    assert AppConfig.model_validate(local).auth.load_keys() == []


def test_key_matching():
    from serve_app.config import AuthConfig

    keys = ["abc", "longer-key", "ключ"]
    assert AuthConfig.matches("abc", keys) == "abc"
    assert AuthConfig.matches("ключ", keys) == "ключ"
    for wrong in ("", "ab", "abcd", "ABC", "longer", "longer-key ", "\ud800"):
        assert AuthConfig.matches(wrong, keys) is None


# ---------------------------------------------------------------------------------------------
# 2. Outbound fetches
# ---------------------------------------------------------------------------------------------


def test_default_fetch_rules_refuse_private_urls_at_submit(secure):
    key = auth(KEYS[0])
    with LocalServer() as srv:
        url = srv.add("/img.png", png_bytes(make_image(64, 48)))
        https_local = url.replace("http://", "https://")
        for ctrl_img in (url, https_local, "https://169.254.169.254/latest/meta-data/", "https://10.0.0.1/x.png",
                         "https://localhost/x.png", "https://[::ffff:127.0.0.1]/x.png", "https://2130706433/x.png",
                         "https://user:pw@example.com/x.png", "http://127.0.0.1:9/x.png"):
            r = rejected(secure, small_request(ctrl_img=ctrl_img), 400, "URL_NOT_ALLOWED", headers=key)
            assert r.json()["detail"]["error"]["details"]["prompt_index"] == 0
        # Not a URL we fetch at all: taken as (bad) base64.
        rejected(secure, small_request(ctrl_img="ftp://127.0.0.1/x.png"), 400, "INVALID_BASE64", headers=key)
        lora = srv.add("/l.safetensors", b"x")
        for ref in (lora, lora.replace("http://", "https://"), "https://169.254.169.254/x.safetensors",
                    "https://[::1]/x.safetensors", "https://0x7f.0.0.1/x.safetensors"):
            rejected(secure, {**small_request(), "loras": [{"path": ref}]}, 400, "URL_NOT_ALLOWED", headers=key)
        assert srv.count("/img.png") == 0 and srv.count("/l.safetensors") == 0  # never connected
        hook = srv.add("/hook")
        for webhook_url in (hook, hook.replace("http://", "https://"), "https://169.254.169.254/hook",
                            "https://[::1]/hook", "https://0x7f.0.0.1/hook", "https://10.1.2.3/hook"):
            rejected(secure, {**small_request(), "webhook_url": webhook_url}, 400, "URL_NOT_ALLOWED", headers=key)
        assert srv.count("/hook") == 0


def test_each_key_has_its_own_webhook_secret(secure):
    secrets = [secure.http.get("/v1/webhook-secret", headers=auth(k)).json()["secret"] for k in (*KEYS, FILE_KEY)]
    assert len(set(secrets)) == 3 and all(s.startswith("whsec_") and len(s) == 6 + 64 for s in secrets)
    assert secure.http.get("/v1/webhook-secret", headers=auth(KEYS[0])).json()["secret"] == secrets[0]


def test_redirects_to_private_addresses_are_refused(app):
    with LocalServer() as srv:
        for n, target in enumerate(("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png",
                                    f"http://localhost:{srv.port}/img.png", "file:///etc/passwd")):
            url = srv.redirect(f"/r{n}", target)
            r = rejected(app, small_request(ctrl_img=url), 400, "URL_NOT_ALLOWED")
            assert r.json()["detail"]["error"]["details"]["reason"] in ("address", "scheme")
        # The same for a LoRA URL: accepted at submit (the first hop is allowed), refused on the replica.
        lora = srv.redirect("/lora.safetensors", "http://169.254.169.254/x.safetensors")
        r = app.submit({**small_request(), "loras": [{"path": lora}]})
        assert r.status_code == 200
        status = app.wait(r.json()["request_id"])
        assert status["status"] == "failed" and status["error"]["code"] == "URL_NOT_ALLOWED", status
    healthy(app)


def test_fetch_failures_have_clear_codes(tight):
    big = png_bytes(make_image(150, 150, seed=1))  # > 60_000 bytes, random pixels do not compress
    assert len(big) > 60_000
    with LocalServer() as srv:
        cases = [
            (srv.add("/big.png", big), 400, "IMAGE_TOO_LARGE"),  # Content-Length says so
            (srv.add("/big-stream.png", big, content_length=None), 400, "IMAGE_TOO_LARGE"),  # counted
            (srv.add("/gone.png", b"", status=404), 400, "IMAGE_NOT_FOUND"),
            (srv.add("/private.png", b"", status=403), 400, "IMAGE_NOT_FOUND"),
            (srv.add("/broken.png", b"", status=500), 502, "FETCH_FAILED"),
            (srv.redirect("/loop", "/loop"), 502, "FETCH_FAILED"),
            (srv.add("/cut.png", big[:50_000], content_length=50_000, close_after=1000), 502, "FETCH_FAILED"),
            ("http://127.0.0.1:9/closed-port.png", 502, "FETCH_FAILED"),
            (srv.add("/text.png", b"<html>not a picture</html>"), 400, "INVALID_IMAGE"),
        ]
        for url, status, expected in cases:
            rejected(tight, small_request(ctrl_img=url), status, expected)

        t0 = time.time()
        slow = srv.add("/slow.png", png_bytes(make_image()), delay_s=3)  # read timeout 1 s
        r = rejected(tight, small_request(ctrl_img=slow), 504, "FETCH_FAILED")
        assert r.json()["detail"]["error"]["details"]["reason"] == "timeout"
        drip = srv.add("/drip.png", png_bytes(make_image(40, 40)), chunk_size=200, chunk_delay_s=0.3)
        r = rejected(tight, small_request(ctrl_img=drip), 504, "FETCH_FAILED")  # whole-download limit, 2 s
        assert r.json()["detail"]["error"]["details"]["reason"] == "timeout"
        assert time.time() - t0 < 10

        ok = srv.add("/ok.png", png_bytes(make_image(64, 48)), headers={"Content-Type": "image/png"})
        assert tight.run(small_request(ctrl_img=ok))["status"] == "succeeded"
    healthy(tight)


# ---------------------------------------------------------------------------------------------
# 3. Limits
# ---------------------------------------------------------------------------------------------


def test_request_body_size(tight):
    padded = {**small_request(), "padding": "x" * 250_000}  # an unknown field: ignored, but counted
    body = json.dumps(padded).encode()
    r = rejected(tight, status=413, expected="REQUEST_TOO_LARGE", content=body)
    assert r.json()["detail"]["error"]["details"]["limit"] == 200_000

    def chunks(data: bytes, size: int = 16_384):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    before = job_count(tight)
    r = tight.http.post("/v1/inference", content=chunks(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and code(r) == "REQUEST_TOO_LARGE", r.text
    assert job_count(tight) == before
    # Under the limit, chunked or not, with unknown fields: accepted.
    fine = json.dumps({**small_request(), "padding": "x" * 100_000, "extra": {"nested": [1, None]}}).encode()
    for content in (fine, chunks(fine)):
        r = tight.http.post("/v1/inference", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert tight.wait(r.json()["request_id"])["status"] == "succeeded"


def test_request_limits_each_have_a_code(app):
    from serve_app.config import LimitsConfig

    lim = LimitsConfig()
    cases = [
        ({"prompts": [dict(small_request()["prompts"][0]) for _ in range(lim.max_prompts + 1)]}, "TOO_MANY_PROMPTS"),
        ({"prompts": [{**small_request()["prompts"][0], "prompt": "x" * (lim.max_prompt_chars + 1)}]},
         "PROMPT_TOO_LONG"),
        ({"prompts": [{**small_request()["prompts"][0], "neg": "x" * (lim.max_prompt_chars + 1)}]}, "PROMPT_TOO_LONG"),
        # [trigger] expansion counts: 400 x 9 chars, each becoming 200 chars.
        ({"trigger_word": "w" * 200, "prompts": [{**small_request()["prompts"][0], "prompt": "[trigger]" * 400}]},
         "PROMPT_TOO_LONG"),
        ({"prompts": [{**small_request()["prompts"][0], "width": lim.max_long_side + 16}]}, "SIZE_OUT_OF_RANGE"),
        ({"prompts": [{**small_request()["prompts"][0], "height": lim.max_short_side + 16}]}, "SIZE_OUT_OF_RANGE"),
        ({"prompts": [{**small_request()["prompts"][0], "num_frames": lim.max_frames + 4}]}, "FRAMES_OUT_OF_RANGE"),
        ({"prompts": [{**small_request()["prompts"][0], "sample_steps": lim.max_steps + 1}]}, "STEPS_OUT_OF_RANGE"),
        ({"prompts": [{**small_request()["prompts"][0], "width": 1280, "height": 720, "num_frames": 81,
                       "sample_steps": 50}]}, "WORK_TOO_LARGE"),
        ({"loras": [{"path": f"l{i}.safetensors"} for i in range(lim.max_loras + 1)]}, "TOO_MANY_LORAS"),
        ({"prompts": [{**small_request()["prompts"][0], "ctrl_img": b64(png_header_only(7000, 7000))}]},
         "IMAGE_TOO_LARGE"),
        ({"prompts": [{**small_request()["prompts"][0], "ctrl_img": b64(png_header_only(100_000, 100_000))}]},
         "IMAGE_TOO_LARGE"),
    ]
    for overrides, expected in cases:
        r = rejected(app, {**small_request(), **overrides}, 400, expected)
        assert r.json()["detail"]["error"]["message"], r.text
    # The limit is after snapping: 16..1280 on both sides is fine, as are the limits themselves.
    edge = small_request(width=16, height=16, num_frames=1, sample_steps=1)
    assert app.run(edge)["status"] == "succeeded"


def test_image_bytes_and_pixels_limits(tight):
    big = png_bytes(make_image(150, 150, seed=2))
    assert len(big) > 60_000
    rejected(tight, small_request(ctrl_img=b64(big)), 400, "IMAGE_TOO_LARGE")
    rejected(tight, small_request(ctrl_img="data:image/png;base64," + b64(big)), 400, "IMAGE_TOO_LARGE")
    # 201 x 201 pixels is over 200 x 200 even if the file is small.
    flat = encoded(Image.new("RGB", (201, 201), "blue"), "PNG")
    assert len(flat) < 60_000
    r = rejected(tight, small_request(ctrl_img=b64(flat)), 400, "IMAGE_TOO_LARGE")
    assert r.json()["detail"]["error"]["details"]["width"] == 201
    ok = encoded(Image.new("RGB", (200, 200), "blue"), "PNG")
    assert tight.run(small_request(ctrl_img=b64(ok)))["status"] == "succeeded"


def test_queue_limits_per_key_and_overall(secure):
    k1, k2 = auth(KEYS[0]), auth(KEYS[1])
    slow = small_request(prompt=f"{SLOW_PROMPT} queue", sample_steps=40)
    before = job_count(secure)
    accepted = []
    for _ in range(2):
        r = secure.submit(slow, k1)
        assert r.status_code == 200, r.text
        accepted.append((r.json()["request_id"], k1))
    try:
        r = secure.submit(slow, k1)
        assert r.status_code == 429 and code(r) == "QUEUE_FULL", r.text
        assert r.headers["retry-after"] == str(SECURE_RETRY_AFTER)
        assert r.json()["detail"]["error"]["details"] == {"scope": "per-key", "limit": 2}
        r = secure.submit(slow, k2)
        assert r.status_code == 200, r.text
        accepted.append((r.json()["request_id"], k2))
        r = secure.submit(slow, auth(FILE_KEY))
        assert r.status_code == 429 and r.json()["detail"]["error"]["details"] == {"scope": "total", "limit": 3}
        assert r.headers["retry-after"] == str(SECURE_RETRY_AFTER)
        assert job_count(secure) == before + 3
    finally:
        for rid, key in accepted:
            secure.http.post(f"/v1/requests/{rid}/cancel", headers=key)
        for rid, key in accepted:
            assert secure.wait(rid, timeout=30, headers=key)["status"] == "canceled"
    # Room again once they are done.
    assert secure.run(small_request(), auth(FILE_KEY))["status"] == "succeeded"


def test_lora_file_size_and_download_time_limits(tight, serve_env, lora_dir):
    ok = write_lora(lora_dir / "small.safetensors")
    assert ok.stat().st_size < 50_000
    (lora_dir / "big.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}" + b"\0" * 60_000)
    with LocalServer() as srv:
        url = srv.add("/big.safetensors", (lora_dir / "big.safetensors").read_bytes(), content_length=None)
        # Small enough, but dripped: each read within the 1 s read timeout, the whole far over
        # the download limit (1 s + 50 kB at 2 MiB/s).
        drip = srv.add("/drip.safetensors", ok.read_bytes(), chunk_size=100, chunk_delay_s=0.3)
        ids = {ref: tight.submit({**small_request(), "loras": [{"path": ref}]}).json()["request_id"]
               for ref in ("security/big.safetensors", url, drip, "security/small.safetensors")}
        results = {ref: tight.wait(rid) for ref, rid in ids.items()}
    assert results["security/small.safetensors"]["status"] == "succeeded"
    for ref in ("security/big.safetensors", url):
        assert results[ref]["status"] == "failed" and results[ref]["error"]["code"] == "LORA_TOO_LARGE", results[ref]
    assert results[drip]["status"] == "failed" and results[drip]["error"]["code"] == "LORA_FETCH_FAILED", results[drip]
    assert results[drip]["error"]["details"]["reason"] == "timeout"
    # An oversized safetensors header (here: over this app's 4096 bytes) is refused before it is parsed.
    from tests.lora_factory import write_raw

    header = {"__metadata__": {"junk": "x" * 5000},
              "diffusion_model.blocks.0.self_attn.q.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    write_raw(lora_dir / "big_header.safetensors", header, b"\0" * 4)
    rid = tight.submit({**small_request(), "loras": [{"path": "security/big_header.safetensors"}]}).json()["request_id"]
    status = tight.wait(rid)
    assert status["status"] == "failed" and status["error"]["code"] == "LORA_INVALID"
    assert "4096" in status["error"]["message"]
    healthy(tight)


# ---------------------------------------------------------------------------------------------
# 4. Input checks
# ---------------------------------------------------------------------------------------------


def test_hostile_images_are_refused_with_stable_codes(app):
    png = png_bytes(make_image(64, 48))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    cases = [
        ("not base64 at all!", "INVALID_BASE64"),
        ("QUJD=QUJD", "INVALID_BASE64"),
        ("data:text/plain;base64," + b64(b"hello"), "INVALID_IMAGE_TYPE"),
        ("data:application/octet-stream;base64," + b64(png), "INVALID_IMAGE_TYPE"),
        ("data:image/png," + "abc", "INVALID_DATA_URI"),
        ("data:image/png;base64", "INVALID_DATA_URI"),
        ("data:image/png;base64,@@@", "INVALID_BASE64"),
        (b64(b"just some text, not a picture"), "INVALID_IMAGE"),
        (b64(eps), "INVALID_IMAGE"),  # PIL could read EPS (with Ghostscript): not among the formats we open
        (b64(b""), "CONTROL_IMAGE_REQUIRED"),
        ("", "CONTROL_IMAGE_REQUIRED"),
        (b64(png[: len(png) // 2]), "IMAGE_TRUNCATED"),
        (b64(png[:20]), "IMAGE_TRUNCATED"),
        (b64(encoded(make_image(64, 48), "JPEG")[:300]), "IMAGE_TRUNCATED"),
    ]
    for ctrl_img, expected in cases:
        r = rejected(app, small_request(ctrl_img=ctrl_img), 400, expected)
        assert r.json()["detail"]["error"]["details"].get("prompt_index", 0) == 0
    no_image = small_request()
    del no_image["prompts"][0]["ctrl_img"]
    rejected(app, no_image, 400, "CONTROL_IMAGE_REQUIRED")
    healthy(app)


def test_unusual_pictures_are_converted_to_rgb_and_run(app):
    rng = np.random.RandomState(0)
    rgba = Image.fromarray((rng.rand(48, 64, 4) * 255).astype("uint8"), "RGBA")
    frames = [make_image(64, 48, seed=s) for s in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    sixteen = Image.fromarray((rng.rand(48, 64) * 65535).astype("uint16"))
    palette = make_image(64, 48).convert("P", palette=Image.ADAPTIVE, colors=16)
    pictures = {
        "rgba_png": encoded(rgba, "PNG"),
        "animated_gif": animated.getvalue(),
        "cmyk_jpeg": encoded(make_image(64, 48).convert("CMYK"), "JPEG"),
        "16bit_png": encoded(sixteen, "PNG"),
        "palette_png_with_transparency": encoded(palette, "PNG", transparency=0),
        "la_png": encoded(make_image(64, 48, mode="L").convert("LA"), "PNG"),
        "1bit_tiff": encoded(make_image(64, 48).convert("1"), "TIFF"),
        "animated_webp": encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    }
    assert Image.open(io.BytesIO(pictures["16bit_png"])).mode.startswith("I")
    assert Image.open(io.BytesIO(pictures["animated_gif"])).n_frames == 3
    prompts = [dict(small_request(ctrl_img=b64(data), prompt=name)["prompts"][0]) for name, data in pictures.items()]
    request = {**small_request(), "prompts": prompts[:8]}
    result = app.run(request)
    assert result["status"] == "succeeded", result
    assert len(result["outputs"]["videos"]) == len(pictures)


NUMBERS = [
    ("width", "NaN"), ("height", "Infinity"), ("num_frames", "-Infinity"), ("guidance_scale", "NaN"),
    ("guidance_scale", "Infinity"), ("sample_steps", "1e400"), ("seed", "NaN"), ("fps", "NaN"),
    ("width", "0"), ("width", "-64"), ("width", "15"), ("width", "4097"), ("width", "64.5"), ("width", "1e30"),
    ("height", "99999999999999999999999999999"), ("num_frames", "0"), ("num_frames", "1001"),
    ("sample_steps", "0"), ("sample_steps", "151"), ("guidance_scale", "-0.5"), ("guidance_scale", "20.5"),
    ("fps", "0"), ("fps", "121"), ("seed", "-2"), ("seed", str(2**63)), ("seed", str(10**30)),
    ("width", '"wide"'), ("width", "[64]"), ("width", "{}"), ("prompt", "123"), ("prompt", "null"),
    ("ctrl_img", "42"), ("ctrl_img", '["a"]'), ("neg", "false"),
]


def _raw_request(field: str, raw_value: str, *, in_lora: bool = False) -> bytes:
    """The small request as JSON text with one value replaced by raw JSON (NaN literals included)."""
    marker = "__RAW__"
    request = small_request()
    if in_lora:
        request["loras"] = [{"path": "x.safetensors", field: marker}]
    else:
        request["prompts"][0][field] = marker
    return json.dumps(request).replace(f'"{marker}"', raw_value).encode()


def test_nan_inf_and_out_of_range_numbers_are_422(app):
    for field, raw in NUMBERS:
        r = rejected(app, status=422, expected="VALIDATION_ERROR", content=_raw_request(field, raw))
        locs = [e["loc"] for e in r.json()["detail"]["error"]["details"]["errors"]]
        assert any(field in loc for loc in locs), (field, raw, locs)
    for raw in ("NaN", "Infinity", "2.5", "-2.01", '"strong"'):
        rejected(app, status=422, expected="VALIDATION_ERROR", content=_raw_request("network_multiplier", raw, in_lora=True))
    # JSON's own literals in the wrong places.
    for body in (b'{"model": NaN, "prompts": []}', b'{"model": "wan21_i2v_14b480p", "prompts": NaN}',
                 b'{"model": "wan21_i2v_14b480p", "prompts": [NaN]}'):
        rejected(app, status=422, expected="VALIDATION_ERROR", content=body)
    healthy(app)


def test_bodies_that_are_not_a_request(app):
    for body in (b"", b"not json", b"{", b'{"model": "x",}', b"[]", b"null", b"42", b'"text"',
                 b'{"model": "wan21_i2v_14b480p"}', b'{"prompts": []}', b"{}" * 3,
                 # What json.loads gives up on other than by a syntax error: the same answer.
                 b"\xff\xfe\x00", b"\x80\x81{}", b"[" * 100_000 + b"]" * 100_000,
                 b'{"model": "x", "prompts": [{"seed": ' + b"9" * 5000 + b"}]}"):
        r = rejected(app, status=422, expected="VALIDATION_ERROR", content=body)
        assert r.json()["detail"]["error"]["message"]
    # Another content type: the body is not read as JSON.
    r = app.http.post("/v1/inference", content=json.dumps(small_request()), headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and code(r) == "VALIDATION_ERROR"
    healthy(app)


def test_unknown_choices_are_400(app):
    cases = [
        ({"model": "wan22_t2v"}, "MODEL_NOT_FOUND"),
        ({"model": ""}, "MODEL_NOT_FOUND"),
        ({"sampler": "euler_a"}, "SAMPLER_NOT_SUPPORTED"),
        ({"output_format": "gif"}, "OUTPUT_FORMAT_NOT_SUPPORTED"),
        ({"prompts": [{**small_request()["prompts"][0], "sampler": "ddim"}]}, "SAMPLER_NOT_SUPPORTED"),
        ({"prompts": [{**small_request()["prompts"][0], "output_format": "../../x"}]}, "OUTPUT_FORMAT_NOT_SUPPORTED"),
        ({"loras": [{"path": "a.safetensors", "transformer": "low"}]}, "MOE_FORMAT_NOT_SUPPORTED"),
        ({"loras": [{"path": "a.safetensors"}, {"path": "a.safetensors"}]}, "DUPLICATE_LORA"),
    ]
    for overrides, expected in cases:
        rejected(app, {**small_request(), **overrides}, 400, expected)
    rejected(app, {**small_request(), "loras": [{"path": "a.safetensors", "transformer": "mid"}]}, 422,
             "VALIDATION_ERROR")
    # Unknown extra fields anywhere are ignored.
    request = {**small_request(), "unknown": {"deep": [1, 2, {"x": None}]}, "hf_token": "hf_secret"}
    request["prompts"][0]["also_unknown"] = "x"
    result = app.run(request)
    assert result["status"] == "succeeded"
    assert "hf_secret" not in json.dumps(result)


def test_lora_refs_that_escape_the_root_are_refused(app, serve_env, lora_dir, tmp_path_factory):
    for ref, expected in [
        ("../x.safetensors", "LORA_REF_INVALID"),
        ("security/../../x.safetensors", "LORA_REF_INVALID"),
        ("/etc/x.safetensors", "LORA_REF_INVALID"),
        ("~/x.safetensors", "LORA_REF_INVALID"),
        ("..\\x.safetensors", "LORA_REF_INVALID"),
        ("security/x.bin", "LORA_REF_INVALID"),
        ("security/x.safetensors.txt", "LORA_REF_INVALID"),
        ("security/x", "LORA_REF_INVALID"),
        ("file:///etc/x.safetensors", "LORA_SCHEME_UNSUPPORTED"),
        ("ftp://127.0.0.1/x.safetensors", "LORA_SCHEME_UNSUPPORTED"),
        ("x" * 3000 + ".safetensors", "VALIDATION_ERROR"),
        ("", "VALIDATION_ERROR"),
    ]:
        status = 422 if expected == "VALIDATION_ERROR" else 400
        rejected(app, {**small_request(), "loras": [{"path": ref}]}, status, expected)
    # A symlink inside the root that leads out: this app's ingress sees the root, so it refuses it at
    # submit (the GPU node's LoRA cache checks the real path again: test_lora_cache.py).
    outside = tmp_path_factory.mktemp("outside") / "real.safetensors"
    write_lora(outside)
    tag = app.backend  # the test runs once per backend on the same LoRA root
    (lora_dir / f"escape-{tag}.safetensors").symlink_to(outside)
    (lora_dir / f"dir-link-{tag}").symlink_to(outside.parent, target_is_directory=True)
    for ref in (f"security/escape-{tag}.safetensors", f"security/dir-link-{tag}/real.safetensors"):
        rejected(app, {**small_request(), "loras": [{"path": ref}]}, 400, "LORA_REF_INVALID")
    healthy(app)


def test_bad_lora_files_fail_the_job_with_their_code(app, lora_dir):
    import torch

    from tests.lora_factory import save_state_dict, write_raw

    q = "diffusion_model.blocks.0.self_attn.q"
    (lora_dir / "garbage.safetensors").write_bytes(b"\x00\x01 this is not safetensors at all" * 10)
    (lora_dir / "short.safetensors").write_bytes(b"\x05\x00")
    write_raw(lora_dir / "huge_header_len.safetensors", {}, b"", header_len=2**40)
    write_raw(lora_dir / "lying_offsets.safetensors",
              {f"{q}.lora_A.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 10_000]}}, b"\0" * 16)
    (lora_dir / "not_json.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    write_raw(lora_dir / "header_list.safetensors", [1, 2, 3])
    save_state_dict(lora_dir / "ints.safetensors", {f"{q}.lora_A.weight": torch.zeros(4, 16, dtype=torch.int64),
                                                   f"{q}.lora_B.weight": torch.zeros(16, 4, dtype=torch.int64)})
    write_lora(lora_dir / "bad_shape.safetensors", bad_in=3)
    save_state_dict(lora_dir / "bad_names.safetensors", {"diffusion_model.blocks.0.nowhere.lora_A.weight": torch.zeros(4, 16),
                                                        "diffusion_model.blocks.0.nowhere.lora_B.weight": torch.zeros(16, 4)})
    save_state_dict(lora_dir / "foreign.safetensors", {"unet.down.lora_A.weight": torch.zeros(4, 16)})
    save_state_dict(lora_dir / "half_pair.safetensors", {f"{q}.lora_A.weight": torch.zeros(4, 16)})
    expected = {
        "garbage": "LORA_INVALID", "short": "LORA_INVALID", "huge_header_len": "LORA_INVALID",
        "lying_offsets": "LORA_INVALID", "not_json": "LORA_INVALID", "header_list": "LORA_INVALID",
        "ints": "LORA_INVALID", "bad_shape": "LORA_INCOMPATIBLE", "bad_names": "LORA_INCOMPATIBLE",
        "foreign": "LORA_INCOMPATIBLE", "half_pair": "LORA_INCOMPATIBLE",
    }
    ids = {name: app.submit({**small_request(), "loras": [{"path": f"security/{name}.safetensors"}]}).json()["request_id"]
           for name in expected}
    results = {name: app.wait(rid) for name, rid in ids.items()}
    for name, want in expected.items():
        assert results[name]["status"] == "failed" and results[name]["error"]["code"] == want, (name, results[name])
    details = {name: json.dumps(results[name]["error"]) for name in expected}
    assert "nowhere" in details["bad_names"]  # the unmatched keys are named
    assert "blocks.0.attn1.to_q" in details["bad_shape"] and "shape" in details["bad_shape"]
    assert "int64" in details["ints"].lower() or "I64" in details["ints"]
    # The replica is fine, and a good LoRA still loads.
    write_lora(lora_dir / "good.safetensors")
    good = app.run({**small_request(), "loras": [{"path": "security/good.safetensors"}]})
    assert good["status"] == "succeeded", good
    healthy(app)


# ---------------------------------------------------------------------------------------------
# 5. Nothing lost
# ---------------------------------------------------------------------------------------------


def test_bad_requests_never_disturb_an_accepted_job(app):
    before = job_count(app)
    rid = app.submit(small_request(prompt=f"{SLOW_PROMPT} keep me", sample_steps=8)).json()["request_id"]
    bad = [
        b"not json", b"[" * 10_000, _raw_request("width", "NaN"), _raw_request("ctrl_img", '"@@@"'),
        json.dumps({**small_request(), "model": "nope"}).encode(),
        json.dumps({**small_request(), "loras": [{"path": "../../etc/passwd.safetensors"}]}).encode(),
        json.dumps(small_request(ctrl_img=b64(png_header_only(100_000, 100_000)))).encode(),
        json.dumps(small_request(ctrl_img="http://169.254.169.254/")).encode(),
    ]
    for _ in range(3):
        for body in bad:
            r = app.http.post("/v1/inference", content=body, headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, r.text
        for path in ("/v1/requests/../../etc/passwd/status", f"/v1/requests/{rid}/outputs/99",
                     f"/v1/requests/{rid}/outputs/-1", f"/v1/requests/{rid}/outputs/x", "/v1/requests/%00/result"):
            assert 400 <= app.http.get(path).status_code < 500
    healthy(app)
    assert job_count(app) == before + 1
    final = app.wait(rid, timeout=60)
    assert final["status"] == "succeeded", final
    assert app.http.get(f"/v1/requests/{rid}/outputs/0").status_code == 200
