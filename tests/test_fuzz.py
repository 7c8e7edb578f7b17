"""Property-based fuzzing of the whole request schema over HTTP, against the real app (tiny model).

Valid requests (small: 16..64 pixels, 1..5 frames, 1..2 steps) must be accepted; mutated and junk
ones may be refused, but never with a 5xx, never by hanging, and never leaving a job behind: at
the end the app's job table grew by exactly the number of 200 answers, and /health is fine.
Only 127.0.0.1 is ever contacted: generated text never holds "://", and the few URLs used are the
local test server's or private literals the app refuses before connecting.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_image, png_bytes
from tests.http_server import LocalServer

MODEL = "wan21_i2v_14b480p"
TIMEOUT_S = 30  # a hang fails as an httpx timeout
FUZZ = settings(max_examples=150, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
SMALL_PNG = base64.b64encode(png_bytes(make_image(16, 16, seed=5))).decode()


def job_count(app) -> int:
    return app.count_jobs()


@pytest.fixture(scope="module")
def srv():
    """ctrl_img and LoRA URLs on 127.0.0.1: a picture, a 404, a redirect to metadata, a junk LoRA."""
    with LocalServer() as server:
        server.add("/ok.png", png_bytes(make_image(24, 24, seed=6)), headers={"Content-Type": "image/png"})
        server.add("/junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
        server.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
        yield server


@pytest.fixture(scope="module")
def root_loras(serve_env):
    """Junk files under the app's LoRA root: valid references (the ingress sees the root and finds
    them) whose jobs fail on the replica with LORA_INVALID."""
    for ref in ROOT_LORAS:
        path = serve_env.lora_root / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

# Any text but URLs: a generated "https://..." could make the app reach out past 127.0.0.1.
safe_text = st.text(max_size=40).filter(lambda s: "://" not in s)

HUGE_INT = "__HUGE_INT__"  # replaced by a 5000-digit integer in the JSON text (hypothesis cannot repr one)
SPECIAL = [
    HUGE_INT, -(10**30), 2**63, -(2**63) - 1, 2**31, 1e308, -0.0, 0.5, float("nan"), float("inf"), float("-inf"),
    "", " ", "\x00", "\ud800", "NaN", "Infinity", "-1", "64", "[trigger]" * 50, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ \u202e", "A" * 5000,
    "../../etc/passwd", "/etc/passwd.safetensors", "%00", "data:image/png;base64,", "data:text/html;base64,PGh0bWw+",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.safetensors", "https://[::1]/x.png",
    "file:///etc/passwd", "hf://../x.safetensors", "s3://bucket/x.safetensors", "gs://b/x.safetensors",
]



def _junk(specials: list):
    return st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | safe_text | st.sampled_from(specials),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(safe_text, children, max_size=4),
        max_leaves=12,
    )


junk = _junk(SPECIAL)
# What the server's JSON parser accepts (10**5000 makes it refuse the whole body): for ignored fields.
parseable_junk = _junk([v for v in SPECIAL if v != HUGE_INT])


def ctrl_images(srv_url: str):
    return st.sampled_from([SMALL_PNG, f"data:image/png;base64,{SMALL_PNG}", srv_url + "/ok.png",
                            " " + SMALL_PNG + "\n"])


def prompts(srv_url: str):
    return st.fixed_dictionaries(
        {"prompt": safe_text, "ctrl_img": ctrl_images(srv_url)},
        optional={
            "width": st.integers(16, 64), "height": st.integers(16, 64), "num_frames": st.integers(1, 5),
            "sample_steps": st.integers(1, 2), "fps": st.integers(1, 120),
            "guidance_scale": st.floats(0, 20), "seed": st.integers(-1, 2**63 - 1), "neg": safe_text,
            "trigger_word": st.text(max_size=10).filter(lambda s: "://" not in s),
            "sampler": st.sampled_from(["unipc", "flowmatch_euler", "FlowMatch_Euler", None]),
            "output_format": st.sampled_from(["mp4", "webp", "WEBP", None]),
        },
    ).map(_small_defaults)


def _small_defaults(p: dict) -> dict:
    # Sizes left out would take the 832x480x41x25 defaults: far too slow for a fuzz run.
    return {"width": 32, "height": 32, "num_frames": 1, "sample_steps": 1, **p}


ROOT_LORAS = ("fuzz/junk.safetensors", "nested/dir/junk.safetensors")  # in the app's LoRA root (see root_loras)


def loras(srv_url: str):
    refs = st.sampled_from([*ROOT_LORAS, srv_url + "/junk.safetensors", srv_url + "/nothing.safetensors"])
    lora = st.fixed_dictionaries({"path": refs}, optional={
        "network_multiplier": st.floats(-2, 2), "transformer": st.none()})
    return st.lists(lora, max_size=3, unique_by=lambda item: item["path"])


def valid_requests(srv_url: str):
    return st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompts": st.lists(prompts(srv_url), min_size=1, max_size=2)},
        optional={"loras": loras(srv_url), "trigger_word": st.text(max_size=10).filter(lambda s: "://" not in s),
                  "hf_token": safe_text, "sampler": st.sampled_from(["unipc", "flowmatch_euler"]),
                  "output_format": st.sampled_from(["mp4", "webp"]), "unknown_extra": parseable_junk},
    )


PATHS = [("model",), ("prompts",), ("loras",), ("trigger_word",), ("hf_token",), ("sampler",), ("output_format",),
         ("prompts", 0), ("loras", 0)] + [("prompts", 0, f) for f in (
             "prompt", "neg", "width", "height", "num_frames", "fps", "sample_steps", "guidance_scale", "seed",
             "ctrl_img", "sampler", "output_format", "trigger_word")] + [
             ("loras", 0, f) for f in ("path", "network_multiplier", "transformer")]


# Per field: values the schema lets through but the app must refuse (400 with a code), or edge values.
BAD_FOR = {
    "model": ["wan22_t2v", "", "WAN21_I2V_14B480P"],
    "sampler": ["euler_a", "", "UNIPC "], "output_format": ["gif", "../mp4", "MP4"],
    "trigger_word": ["t" * 256], "prompt": ["x" * 4001, "[trigger]" * 300, ""], "neg": ["n" * 4001],
    "width": [16, 17, 1296, 4096, 15], "height": [16, 1296, 4096], "num_frames": [1, 2, 85, 1000],
    "sample_steps": [101, 150], "fps": [1, 120, 121], "guidance_scale": [0, 20, 1e-300], "seed": [-1, 0, 2**63 - 1],
    "ctrl_img": ["!!not base64!!", "data:text/plain;base64,aGk=", "data:image/png,xx", base64.b64encode(b"text").decode(),
                 SMALL_PNG[:40], "ftp://127.0.0.1/x.png", "http://10.0.0.1/x.png"],
    "path": ["../x.safetensors", "/etc/x.safetensors", "x.bin", "a\\b.safetensors", "ftp://h/x.safetensors",
             "http://169.254.169.254/x.safetensors", "fuzz/missing.safetensors"],
    "network_multiplier": [-2, 2, 0], "transformer": ["low", "high"],
    "loras": [[{"path": f"l{i}.safetensors"} for i in range(5)], [{"path": "a.safetensors"}] * 2],
    "prompts": [[], [{"prompt": "p", "ctrl_img": SMALL_PNG, "width": 32, "height": 32, "num_frames": 1,
                      "sample_steps": 1}] * 9],
}


def _set(request, path, value, delete: bool) -> None:
    target = request
    for key in path[:-1]:
        if isinstance(target, dict) and key in target:
            target = target[key]
        elif isinstance(target, list) and isinstance(key, int) and len(target) > key:
            target = target[key]
        else:
            return
    last = path[-1]
    if isinstance(target, dict):
        if delete:
            target.pop(last, None)
        else:
            target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and len(target) > last:
        if delete:
            del target[last]
        else:
            target[last] = value


@st.composite
def requests(draw, srv_url: str):
    """(kind, request): a valid request; one with one field set to a value the app must refuse
    ("semantic"); a mutated one (1-3 fields replaced by anything, or deleted); or pure junk."""
    kind = draw(st.sampled_from(["valid", "semantic", "semantic", "mutated", "mutated", "junk"]))
    if kind == "junk":
        return kind, draw(junk | st.fixed_dictionaries({"model": st.just(MODEL)}, optional={"prompts": junk}))
    request = draw(valid_requests(srv_url))
    if kind == "semantic":
        path = draw(st.sampled_from([p for p in PATHS if p[-1] in BAD_FOR]))
        _set(request, path, draw(st.sampled_from(BAD_FOR[path[-1]])), delete=False)
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(PATHS))
            field_bad = BAD_FOR.get(path[-1], []) + ([srv_url + "/to-metadata", srv_url + "/missing.png",
                                                      f"DATA:IMAGE/PNG;BASE64,{SMALL_PNG}"]
                                                     if path[-1] == "ctrl_img" else [])
            generic = junk | st.sampled_from(SPECIAL)
            hostile = draw(st.sampled_from(field_bad) | generic if field_bad else generic)
            _set(request, path, hostile, delete=draw(st.booleans()))
    return kind, request


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def _error_shape(r: httpx.Response) -> None:
    error = r.json()["detail"]["error"]
    assert isinstance(error["code"], str) and error["code"].isupper() and isinstance(error["message"], str)
    assert isinstance(error["details"], dict)


def _finish(app, http: httpx.Client, ids: list[str]) -> list[dict]:
    """Cancel what still runs and wait until every accepted job is final; returns the final statuses."""
    for rid in ids:
        http.post(f"/v1/requests/{rid}/cancel")
    deadline = time.time() + 90
    finals = []
    for rid in ids:
        while True:
            status = http.get(f"/v1/requests/{rid}/status").json()
            if status["status"] in ("succeeded", "failed", "canceled"):
                finals.append(status)
                break
            assert time.time() < deadline, f"job {rid} still {status['status']}"
            time.sleep(0.1)
    return finals


def test_fuzz_the_request_schema(app, srv, root_loras):
    http = httpx.Client(base_url=app.base_url, timeout=TIMEOUT_S)
    before = job_count(app)
    accepted: list[str] = []
    seen: dict[str, int] = {}

    @FUZZ
    @given(case=requests(srv.url("").rstrip("/")))
    def check(case):
        kind, request = case
        body = json.dumps(request, allow_nan=True)  # NaN/Infinity go out as the raw JSON literals
        body = body.replace(json.dumps(HUGE_INT), "9" * 5000)
        r = http.post("/v1/inference", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (r.status_code, r.text[:500], body[:500])
        label = str(r.status_code) if r.status_code == 200 else f"{r.status_code} {r.json()['detail']['error']['code']}"
        seen[label] = seen.get(label, 0) + 1
        if r.status_code == 200:
            accepted.append(r.json()["request_id"])
        else:
            assert r.status_code in (400, 413, 422, 429), r.text[:500]
            _error_shape(r)
            assert kind != "valid", (r.text[:500], body[:500])

    try:
        check()
        assert job_count(app) == before + len(accepted), (seen, len(accepted))
        # Both accepted and refused requests were exercised, with several of the app's own codes.
        assert seen.get("200") and len([k for k in seen if k.startswith("400 ")]) >= 3, seen
        print("fuzz outcomes:", dict(sorted(seen.items())))
        assert http.get("/health", timeout=5).json() == {"status": "healthy"}
    finally:
        finals = _finish(app, http, accepted)
    # Jobs that ran either worked or failed with a LoRA's own code; none hit an unexpected error.
    codes = {f["error"]["code"] for f in finals if f["status"] == "failed"}
    assert codes <= {"LORA_NOT_FOUND", "LORA_INVALID", "LORA_INCOMPATIBLE"}, codes
    assert job_count(app) == before + len(accepted)
    assert http.get("/health", timeout=5).json() == {"status": "healthy"}


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=utf-16", ""]),
       request_id=st.text(min_size=1, max_size=30).filter(lambda s: s.isprintable() and s not in (".", "..")
                                                          and not any(c in s for c in "/?#")),
       idempotency=st.text(max_size=300).filter(lambda s: s.isascii() and s.isprintable() and s == s.strip()))
def test_fuzz_raw_bodies_paths_and_headers(app, body, content_type, request_id, idempotency):
    http = app.http
    before = job_count(app)
    headers = {"Content-Type": content_type} if content_type else {}
    if idempotency:
        headers["Idempotency-Key"] = idempotency
    r = http.post("/v1/inference", content=body, headers=headers, timeout=TIMEOUT_S)
    assert 400 <= r.status_code < 500, r.text[:300]
    _error_shape(r)
    for method, path in (("GET", "status"), ("GET", "result"), ("GET", "outputs/0"), ("POST", "cancel")):
        r = http.request(method, f"/v1/requests/{request_id}/{path}", timeout=TIMEOUT_S)
        assert 400 <= r.status_code < 500, (request_id, path, r.status_code)
    assert job_count(app) == before
