"""The Python client and ``wan-serve``, without Ray: argument parsing, request building, error parsing,
and the tiny-model command writing a checkpoint that loads. The CLI against the running Serve app is
tested in test_app.py.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from serve_app.cli import _output_path, build_parser, main, request_from_args
from serve_app.client import (
    DEFAULT_MODEL,
    PROMPT_FIELDS,
    WanApiError,
    WanClient,
    build_request,
    check,
    parse_error,
    parse_lora,
)
from serve_app.schemas import InferenceRequest, PromptIn

from .conftest import make_image, png_bytes

# -- --lora REF[:SCALE] ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("job/job.safetensors", ("job/job.safetensors", 1.0)),
        ("job/job.safetensors:0.8", ("job/job.safetensors", 0.8)),
        ("job/job.safetensors:-1.5", ("job/job.safetensors", -1.5)),
        ("job/job.safetensors:2", ("job/job.safetensors", 2.0)),
        ("https://host/x.safetensors:0.8", ("https://host/x.safetensors", 0.8)),
        ("https://host/x.safetensors", ("https://host/x.safetensors", 1.0)),
        ("https://host:8443/a/x.safetensors", ("https://host:8443/a/x.safetensors", 1.0)),
        ("https://host:8443/a/x.safetensors:0.25", ("https://host:8443/a/x.safetensors", 0.25)),
        ("hf://org/repo/x.safetensors", ("hf://org/repo/x.safetensors", 1.0)),
        ("hf://org/repo/x.safetensors:1e-1", ("hf://org/repo/x.safetensors", 0.1)),
        ("weird:name.safetensors", ("weird:name.safetensors", 1.0)),
        ("x.safetensors:nan", ("x.safetensors:nan", 1.0)),  # never a scale
        ("x.safetensors:inf", ("x.safetensors:inf", 1.0)),
    ],
)
def test_parse_lora(value, expected):
    assert parse_lora(value) == expected


@pytest.mark.parametrize("value", ["", ":0.5", "  "])
def test_parse_lora_refuses_empty_refs(value):
    with pytest.raises(ValueError, match="empty LoRA"):
        parse_lora(value)


def test_lora_flag_repeats_and_bad_one_is_a_usage_error(capsys):
    args = build_parser().parse_args(
        ["submit", "--image", "a.png", "--prompt", "p", "--lora", "a.safetensors",
         "--lora", "https://h/b.safetensors:0.5"])
    assert args.lora == [("a.safetensors", 1.0), ("https://h/b.safetensors", 0.5)]
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--image", "a.png", "--prompt", "p", "--lora", ":0.5"])
    assert exc.value.code == 2
    assert "empty LoRA reference" in capsys.readouterr().err


# -- build_request ------------------------------------------------------------------------------


@pytest.fixture
def png_file(tmp_path):
    path = tmp_path / "first.png"
    path.write_bytes(png_bytes(make_image(64, 48, seed=3)))
    return path


def test_build_request_local_file_is_base64_in_reference_shape(png_file):
    request = build_request(png_file, "a runner [trigger]", loras=[("job/job.safetensors", 0.8), "other.safetensors"],
                            seed=7, width=64, height=48, sample_steps=2, neg=None)
    assert set(request) == {"model", "prompts", "loras"}
    assert request["model"] == DEFAULT_MODEL == "wan21_i2v_14b480p"
    (prompt,) = request["prompts"]
    assert base64.b64decode(prompt.pop("ctrl_img"), validate=True) == png_file.read_bytes()
    assert prompt == {"prompt": "a runner [trigger]", "seed": 7, "width": 64, "height": 48, "sample_steps": 2}
    assert request["loras"] == [{"path": "job/job.safetensors", "network_multiplier": 0.8},
                                {"path": "other.safetensors", "network_multiplier": 1.0}]
    # What the server parses it into: every field kept, none ignored.
    parsed = InferenceRequest.model_validate(request)
    assert parsed.prompts[0].seed == 7 and parsed.loras[0].network_multiplier == 0.8


@pytest.mark.parametrize("image", ["https://example.com/first.png", "HTTP://example.com/a.jpg",
                                   "data:image/png;base64,iVBORw0KGgo="])
def test_build_request_passes_urls_and_data_uris_through(image):
    request = build_request(image, "p")
    assert request["prompts"] == [{"prompt": "p", "ctrl_img": image}]
    assert request["loras"] == []


def test_build_request_refuses_unknown_fields_and_missing_files(png_file, tmp_path):
    with pytest.raises(TypeError, match="steps"):
        build_request(png_file, "p", steps=4)  # the field is sample_steps: the server would drop it silently
    with pytest.raises(FileNotFoundError, match="nope.png"):
        build_request(tmp_path / "nope.png", "p")


def test_prompt_fields_match_the_server_schema():
    assert set(PROMPT_FIELDS) == set(PromptIn.model_fields) - {"prompt", "ctrl_img"}


def test_submit_flags_map_to_request_fields(png_file):
    args = build_parser().parse_args([
        "submit", "--server", "http://x", "--image", str(png_file), "--prompt", "p", "--negative", "blurry",
        "--width", "64", "--height", "48", "--frames", "5", "--steps", "2", "--guidance", "3.5", "--seed", "9",
        "--fps", "8", "--sampler", "flowmatch_euler", "--format", "webp", "--trigger-word", "sks",
        "--speed", "fast", "--lora", "j/j.safetensors:0.5"])
    request = request_from_args(args)
    prompt = request["prompts"][0]
    prompt.pop("ctrl_img")
    assert prompt == {"prompt": "p", "neg": "blurry", "width": 64, "height": 48, "num_frames": 5, "sample_steps": 2,
                      "guidance_scale": 3.5, "seed": 9, "fps": 8, "sampler": "flowmatch_euler",
                      "output_format": "webp", "trigger_word": "sks", "speed": "fast"}
    assert request["loras"] == [{"path": "j/j.safetensors", "network_multiplier": 0.5}]
    InferenceRequest.model_validate(request)


def test_api_key_defaults_from_environment(monkeypatch):
    monkeypatch.setenv("WAN_API_KEY", "k-123")
    assert build_parser().parse_args(["models"]).api_key == "k-123"
    assert build_parser().parse_args(["models", "--api-key", "other"]).api_key == "other"


def test_output_paths(tmp_path):
    assert str(_output_path(None, "abc", "mp4", 0, 1)) == "abc.mp4"
    assert str(_output_path(None, "abc", "webp", 1, 2)) == "abc-1.webp"
    assert _output_path(tmp_path / "v.mp4", "abc", "mp4", 0, 1) == tmp_path / "v.mp4"
    assert _output_path(tmp_path / "v.mp4", "abc", "mp4", 1, 2) == tmp_path / "v-1.mp4"


# -- error parsing on real httpx responses -------------------------------------------------------


def _error_body(code, message, details=None):
    return {"detail": {"error": {"code": code, "message": message, "details": details or {}}}}


def test_parse_error_reads_the_service_shape():
    response = httpx.Response(404, json=_error_body("REQUEST_NOT_FOUND", "Request not found: x", {"request_id": "x"}))
    err = parse_error(response)
    assert (err.status, err.code, err.message, err.details, err.retry_after) == (
        404, "REQUEST_NOT_FOUND", "Request not found: x", {"request_id": "x"}, None)
    assert "REQUEST_NOT_FOUND" in str(err) and "404" in str(err)


def test_parse_error_429_exposes_retry_after():
    response = httpx.Response(429, json=_error_body("QUEUE_FULL", "queue is full; retry later", {"limit": 3}),
                              headers={"Retry-After": "30"})
    err = parse_error(response)
    assert err.code == "QUEUE_FULL" and err.retry_after == 30.0 and err.details == {"limit": 3}


def test_parse_error_retry_after_as_http_date():
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    err = parse_error(httpx.Response(429, json=_error_body("QUEUE_FULL", "full"),
                                     headers={"Retry-After": format_datetime(when, usegmt=True)}))
    assert 100 < err.retry_after <= 121
    assert parse_error(httpx.Response(429, headers={"Retry-After": "soon"})).retry_after is None


def test_parse_error_without_the_service_shape():
    plain = parse_error(httpx.Response(502, text="Bad Gateway from the proxy"))
    assert (plain.status, plain.code, plain.message) == (502, "HTTP_502", "Bad Gateway from the proxy")
    fastapi_default = parse_error(httpx.Response(405, json={"detail": "Method Not Allowed"}))
    assert (fastapi_default.code, fastapi_default.message) == ("HTTP_405", "Method Not Allowed")
    empty = parse_error(httpx.Response(500))
    assert (empty.code, empty.message) == ("HTTP_500", "Internal Server Error")


def test_check_passes_success_and_raises_errors():
    ok = httpx.Response(200, json={"status": "healthy"})
    assert check(ok) is ok
    with pytest.raises(WanApiError) as exc:
        check(httpx.Response(422, json=_error_body("VALIDATION_ERROR", "invalid request: prompts: required")))
    assert exc.value.status == 422 and exc.value.code == "VALIDATION_ERROR"


def test_check_reads_a_streamed_error_body():
    body = json.dumps(_error_body("OUTPUT_GONE", "gone")).encode()
    response = httpx.Response(410, stream=httpx.ByteStream(body), headers={"content-type": "application/json"})
    with pytest.raises(WanApiError) as exc:
        check(response)
    assert (exc.value.status, exc.value.code) == (410, "OUTPUT_GONE")


# -- commands without a server -----------------------------------------------------------------


def test_unreachable_server_is_a_clean_failure(capsys):
    # Port 9 (discard) on localhost: nothing listens there in the test environment.
    started = time.monotonic()
    assert main(["models", "--server", "http://127.0.0.1:9", "--http-timeout", "5"]) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert time.monotonic() - started < 10


def test_missing_image_is_a_usage_error(tmp_path, capsys):
    code = main(["submit", "--server", "http://127.0.0.1:9", "--image", str(tmp_path / "no.png"), "--prompt", "p"])
    assert code == 2
    assert "image not found" in capsys.readouterr().err


def test_client_joins_base_url_and_sends_the_key():
    with WanClient("http://127.0.0.1:8000/", api_key="k") as client:
        assert client.base_url == "http://127.0.0.1:8000"
        assert client._http.headers["authorization"] == "Bearer k"
    with WanClient("http://127.0.0.1:8000") as client:
        assert "authorization" not in client._http.headers


def test_tiny_model_writes_a_loadable_checkpoint(tmp_path, capsys):
    from diffusers import WanImageToVideoPipeline

    out = tmp_path / "tiny"
    assert main(["tiny-model", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert (out / "model_index.json").is_file()
    pipe = WanImageToVideoPipeline.from_pretrained(out)
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.transformer.config.num_layers == 2


# -- progress on the terminal ----------------------------------------------------------------------


def _status(status: str, stage: str | None = None, step: int = 0, total: int = 4, index: int = 0, count: int = 1):
    progress = {"prompt_index": index, "num_prompts": count, "stage": stage or "queued", "step": step,
                "total_steps": total}
    return {"status": status, "progress": progress}


def test_progress_bar_counts_denoising_steps_only_and_shows_other_stages_as_lines():
    import io

    from serve_app.cli import _ProgressBar

    out = io.StringIO()
    bar = _ProgressBar(file=out)
    for stage in ("loading_loras", "encoding_text", "encoding_image", "vae_encoding"):
        bar.update(_status("in_progress", stage))
        assert bar.bar is None, stage  # no bar (and no ETA) while the encoders run
    bar.update(_status("in_progress", "denoising", step=1))
    assert (bar.bar.n, bar.bar.total) == (1, 4)
    bar.update(_status("in_progress", "denoising", step=3))
    assert bar.bar.n == 3
    bar.update(_status("in_progress", "vae_decoding", step=4))
    assert bar.bar is None  # closed: the decode is not a step at 100%
    bar.update(_status("in_progress", "vae_decoding", step=4))  # polled again: no second line
    bar.update(_status("in_progress", "encoding_video", step=4))
    bar.update(_status("succeeded", "encoding_video", step=4))
    lines = [line.strip() for line in out.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    stages = [line for line in lines if "step" not in line]
    assert stages == ["loading LoRAs", "encoding the prompt", "encoding the first frame",
                      "VAE encoding the first frame", "VAE decoding the frames", "encoding the video", "succeeded"]
    # Past the last step seen (3 of 4: a poll missed the last), the bar ends full.
    assert lines[-4].startswith("denoising: 100%") and "4/4" in lines[-4], lines


def test_progress_bar_starts_again_for_each_prompt_and_a_retry():
    import io

    from serve_app.cli import _ProgressBar

    out = io.StringIO()
    bar = _ProgressBar(file=out)
    bar.update(_status("in_queue"))
    bar.update(_status("in_progress", "denoising", step=2, count=2))
    first = bar.bar
    bar.update(_status("in_progress", "encoding_text", index=1, count=2))
    bar.update(_status("in_progress", "denoising", step=1, index=1, count=2))
    assert bar.bar is not first and bar.bar.n == 1
    assert "prompt 2/2 denoising" in out.getvalue() and "prompt 2/2: encoding the prompt" in out.getvalue()
    bar.update(_status("in_progress", "encoding_text", index=1, count=2))  # a retry starts over
    bar.update(_status("in_progress", "denoising", step=0, index=1, count=2))
    assert bar.bar.n == 0
    bar.close()


def test_submit_polls_a_server_without_the_event_stream(tmp_path, capsys):
    """An older server answers 404 on /events: the CLI follows the job by polling /status instead."""
    from tests.http_server import LocalServer, Route

    rid = "0b5e5c4e-8a53-4a43-9d55-0f6f8c1a2e77"
    base = f"/v1/requests/{rid}"
    image = tmp_path / "first.png"
    image.write_bytes(png_bytes(make_image(64, 48)))

    def status(state: str, stage: str, step: int = 0) -> Route:
        return Route(body=json.dumps(_status(state, stage, step, total=2)).encode(),
                     headers={"Content-Type": "application/json"})

    with LocalServer() as server:
        server.add("/v1/inference", json.dumps({"request_id": rid, "status": "queued"}).encode(),
                   headers={"Content-Type": "application/json"})
        server.add_sequence(f"{base}/status", status("in_queue", "queued"), status("in_progress", "denoising", 1),
                            status("in_progress", "vae_decoding", 2), status("succeeded", "done", 2))
        server.add(f"{base}/result", json.dumps({"request_id": rid, "status": "succeeded", "outputs": {"videos": [
            {"format": "mp4", "url": f"{base}/outputs/0"}]}}).encode(), headers={"Content-Type": "application/json"})
        server.add(f"{base}/outputs/0", b"an mp4")
        out = tmp_path / "video.mp4"
        code = main(["submit", "--server", server.url(""), "--image", str(image), "--prompt", "a runner",
                     "--out", str(out), "--poll", "0.01"])
        assert code == 0 and out.read_bytes() == b"an mp4"
        assert server.count(f"{base}/events") == 1 and server.count(f"{base}/status") == 4
    lines = [line.strip() for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if "step" not in line and not line.startswith("submitted")] == [
        "queued", "VAE decoding the frames", "succeeded"], lines
    # The bar ends at 100% although no poll saw the last step.
    assert any(line.startswith("denoising: 100%") and "2/2" in line for line in lines), lines


def test_samples_hint_names_the_readme_section_with_the_request_examples():
    """``wan-serve samples`` ends pointing at a README section: it exists and holds the examples using its files."""
    import re
    from pathlib import Path

    from serve_app.cli import SAMPLES_README_SECTION

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(rf"^## {re.escape(SAMPLES_README_SECTION)}\n(.*?)^## ", readme, flags=re.S | re.M)
    assert section, SAMPLES_README_SECTION
    for example in ("small-curl", "small-cli"):
        assert f"<!-- readme-example: {example} -->" in section.group(1)
    assert "first_frame.png" in section.group(1) and "sample/sample.safetensors" in section.group(1)
