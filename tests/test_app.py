"""The Serve application over HTTP: real Ray cluster, real Serve app, real tiny pipeline."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import imageio.v3 as iio
import numpy as np
import pytest

from tests.conftest import BACKENDS, FAIL_PROMPT, SLOW_PROMPT, job_updates, small_request, wait_for
from tests.http_server import LocalServer


def _download(app, result: dict, n: int = 0):
    r = app.http.get(f"/v1/requests/{result['request_id']}/outputs/{n}")
    assert r.status_code == 200, r.text
    return r


def _core_bytes(app, generator, request: dict, index: int = 0, lora_paths: dict | None = None) -> bytes:
    """What the generation core alone makes of the same request: normalise, generate, encode."""
    from deployments.engine.media_out import encode
    from serve_app.config import AppConfig
    from serve_app.normalize import to_specs
    from serve_app.schemas import InferenceRequest

    spec = to_specs(InferenceRequest.model_validate(request), AppConfig.model_validate(app.args))[index]
    loaded = []
    try:
        for lora in spec.loras:
            generator.load_adapter(lora.ref, str(lora_paths[lora.ref]))
            loaded.append(lora.ref)
        frames = generator.generate(spec)
    finally:
        for ref in loaded:
            generator.delete_adapter(ref)
    return encode(frames.frames, spec.fps, spec.output_format)


def test_health_and_models(app):
    assert app.http.get("/health").json() == {"status": "healthy"}
    models = app.http.get("/v1/models").json()["models"]
    assert [m["id"] for m in models] == ["wan21_i2v_14b480p"]
    m = models[0]
    assert (m["default_width"], m["default_height"], m["default_num_frames"], m["default_fps"]) == (832, 480, 41, 16)
    assert (m["default_steps"], m["default_guidance_scale"], m["resolution_divisor"]) == (25, 4.0, 16)
    assert m["requires_control_image"] and m["is_video_model"]
    assert set(m["samplers"]) == {"unipc", "flowmatch_euler"} and set(m["output_formats"]) == {"mp4", "webp"}
    assert app.http.get("/docs").status_code == 200
    assert "/v1/inference" in app.http.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_everything_from_this_server(app, page):
    """Offline, a page that loads Swagger UI or ReDoc from a CDN is blank: every file is served here."""
    import re
    from urllib.parse import urlsplit

    r = app.http.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http:" not in html and "https:" not in html and "//" not in html.replace("://", "")
    refs = re.findall(r'(?:src|href|spec-url)="([^"]*)"', html) + re.findall(r"url: '([^']*)'", html)
    prefix = urlsplit(app.base_url).path  # the app's route prefix ("" or "/pg")
    types = {".css": "text/css", ".js": "javascript", ".png": "image/png", ".json": "application/json"}
    assert {Path(ref).suffix for ref in refs} >= ({".css", ".js", ".png", ".json"} if page == "/docs"
                                                   else {".js", ".png", ".json"})
    origin = app.base_url[:len(app.base_url) - len(prefix)]
    for ref in refs:
        assert ref.startswith(f"{prefix}/") and not ref.startswith("//"), ref
        got = httpx.get(origin + ref, timeout=30)
        assert got.status_code == 200, (ref, got.status_code)
        assert types[Path(ref).suffix] in got.headers["content-type"], (ref, got.headers["content-type"])
        assert len(got.content) > 1000, ref


def test_ready_once_a_model_replica_has_loaded_the_model(app):
    r = app.http.get("/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and body["model_replicas"]["running"] >= 1
    # counts and Serve's status word only: no hosts, pids, paths or error texts
    assert set(body) == {"status", "model_replicas", "deployment_status"}
    assert set(body["model_replicas"]) == {"running", "starting"} and body["deployment_status"] == "HEALTHY"


def test_ready_is_503_while_no_model_replica_is_loaded(serve_env):
    """The ingress serves (/health, submit) while the GPU replica cannot start: /ready says so."""
    from ray import serve

    from serve_app.app import build_app

    # A GPU the test cluster does not have: the replica waits for one, forever. (Serve waits the
    # graceful shutdown timeout before it gives up on a replica that never started.)
    args = serve_env.args_for("no-gpu", gpu={"replica": {"num_gpus": 1, "graceful_shutdown_timeout_s": 1}})
    serve.run_many([serve.RunTarget(build_app(args), name="no-gpu", route_prefix="/no-gpu")],
                   wait_for_applications_running=False)
    base = f"http://127.0.0.1:{serve_env.port}/no-gpu"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            wait_for(lambda: _get_or_none(http, "/health") == 200, 120, "the no-gpu ingress answers /health")
            r = http.get("/ready")
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5"
            error = r.json()["detail"]["error"]
            assert error["code"] == "NOT_READY"
            assert error["details"]["model_replicas"]["running"] == 0, error
            assert set(error["details"]) == {"model_replicas", "deployment_status"}
    finally:
        serve.delete("no-gpu")


def _get_or_none(http, path: str) -> int | None:
    try:
        return http.get(path).status_code
    except httpx.HTTPError:
        return None


def test_submit_progress_result_download(app):
    request = small_request(prompt=f"{SLOW_PROMPT} a runner", sample_steps=4, width=70, num_frames=6)
    r = app.submit(request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "queued" and body["request_id"]
    assert body["status_url"].endswith(f"/v1/requests/{body['request_id']}/status")
    seen_steps = set()
    deadline = time.time() + 60
    while time.time() < deadline:
        status = app.http.get(f"/v1/requests/{body['request_id']}/status").json()
        if status["status"] == "in_progress" and status["progress"]["stage"] == "denoising":
            seen_steps.add(status["progress"]["step"])
            assert status["progress"]["total_steps"] == 4 and status["progress"]["num_prompts"] == 1
        if status["status"] == "succeeded":
            break
        time.sleep(0.05)
    assert status["status"] == "succeeded", status
    assert seen_steps, "progress never showed a denoising step"
    result = app.http.get(f"/v1/requests/{body['request_id']}/result").json()
    (video,) = result["outputs"]["videos"]
    # normalised values are reported: 70 -> 64, 6 frames -> 5
    assert (video["width"], video["height"], video["num_frames"], video["fps"], video["seed"]) == (64, 48, 5, 16, 42)
    assert video["format"] == "mp4" and video["url"].endswith(f"/v1/requests/{body['request_id']}/outputs/0")
    timings = result["metadata"]["timings"][0]
    for stage in ("text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "encode_video"):
        assert timings[stage] >= 0
    # The stage account of the served path, each stage present and in the order it happened.
    assert [stage for stage, _ in timings["path"]] == ["queued", "dispatch", "replica_wait", "to_first_step",
                                                       "from_first_step", "store"]
    assert all(s >= 0 for _, s in timings["path"]) and result["metadata"]["submit_s"] > 0
    data = _download(app, result)
    assert data.headers["content-type"] == "video/mp4"
    frames = iio.imread(io.BytesIO(data.content), index=None, extension=".mp4")
    assert frames.shape == (5, 48, 64, 3)


def test_status_shows_every_stage_in_order(app, loras):
    """Every progress the job's status showed (each write of its row, so none is missed between polls)."""
    request = {**small_request(sample_steps=3), "loras": [{"path": "my_wan_job/my_wan_job.safetensors"}]}
    with job_updates(app) as updates:
        result = app.run(request)
        assert result["status"] == "succeeded", result
        shown = [(u["progress"]["stage"], u["progress"]["step"], u["progress"]["total_steps"])
                 for u in updates(result["request_id"]) if u["progress"].get("stage")]
    shown = [p for i, p in enumerate(shown) if i == 0 or p != shown[i - 1]]
    assert shown == [("queued", 0, 3), ("loading_loras", 0, 3), ("encoding_text", 0, 3), ("encoding_image", 0, 3), ("vae_encoding", 0, 3),
                     *[("denoising", step, 3) for step in range(4)], ("vae_decoding", 3, 3), ("encoding_video", 3, 3),
                     ("done", 3, 3)]
    progress = app.http.get(f"/v1/requests/{result['request_id']}/status").json()["progress"]
    assert (progress["stage"], progress["step"], progress["total_steps"]) == ("done", 3, 3)


def test_several_prompts_each_with_its_output(app):
    request = small_request()
    request["prompts"].append({**request["prompts"][0], "prompt": "a cat", "output_format": "webp", "fps": 8})
    result = app.run(request)
    assert result["status"] == "succeeded"
    first, second = result["outputs"]["videos"]
    assert (first["format"], first["seed"]) == ("mp4", 42)
    assert (second["format"], second["seed"], second["fps"]) == ("webp", 43, 8)  # seed 42 + prompt index
    assert _download(app, result, 1).headers["content-type"] == "image/webp"


@pytest.mark.parametrize("fmt", ["webp", "mp4"])
def test_served_output_equals_the_generation_core(app, generator, fmt):
    request = small_request(output_format=fmt, seed=7, sample_steps=3, sampler="flowmatch_euler")
    result = app.run(request)
    assert result["status"] == "succeeded", result
    assert _download(app, result).content == _core_bytes(app, generator, request)


def test_loras_by_path_by_url_and_stacked_without_reloading_the_base(app, generator, loras):
    base = app.run(small_request(output_format="webp"))
    before = app.replica_stats()

    def lora_request(*items):
        return {**small_request(output_format="webp"),
                "loras": [{"path": p, "network_multiplier": m} for p, m in items]}

    by_path = lora_request(("my_wan_job/my_wan_job.safetensors", 0.8))
    out_path = _download(app, app.run(by_path)).content
    assert out_path == _core_bytes(app, generator, by_path, lora_paths=loras)
    assert out_path != _download(app, base).content

    with LocalServer() as srv:
        url = srv.add("/loras/remote.safetensors", loras["style_b.safetensors"].read_bytes())
        by_url = lora_request((url, 1.0))
        out_url = _download(app, app.run(by_url)).content
        assert out_url == _core_bytes(app, generator, by_url, lora_paths={url: loras["style_b.safetensors"]})
        assert srv.count("/loras/remote.safetensors") == 1

        stacked = lora_request(("my_wan_job/my_wan_job.safetensors", 0.5), ("style_b.safetensors", -0.7))
        out_stacked = _download(app, app.run(stacked)).content
        assert out_stacked == _core_bytes(app, generator, stacked, lora_paths=loras)
        assert len({out_path, out_url, out_stacked}) == 3

        after = app.replica_stats()
        # The same process (a restarted replica would count from 1 again) loaded the base once.
        assert after["pid"] == before["pid"]
        assert after["pipeline_loads"] == before["pipeline_loads"] == 1
        loads = after["adapter_loads"]
        # Repeats and a multiplier change load nothing; the URL is fetched once per node.
        app.run(by_path)
        changed = lora_request(("my_wan_job/my_wan_job.safetensors", 1.0))
        out_changed = _download(app, app.run(changed)).content
        assert out_changed != out_path
        assert app.replica_stats()["adapter_loads"] == loads
        app.run(by_url)
        assert srv.count("/loras/remote.safetensors") == 1


def test_missing_lora_is_refused_at_submit_where_the_ingress_sees_the_root(app, loras):
    # The default app's ingress sees the LoRA root as its replica does (one machine), like the local default.
    missing = {**small_request(), "loras": [{"path": "my_wan_job/my_wan_job.safetensors"},
                                            {"path": "missing/nothing.safetensors"}]}
    before = app.count_jobs()
    r = app.submit(missing)
    assert r.status_code == 400, r.text
    error = r.json()["detail"]["error"]
    assert error["code"] == "LORA_NOT_FOUND" and error["details"] == {"ref": "missing/nothing.safetensors"}
    assert app.count_jobs() == before


def test_missing_lora_fails_the_job_where_the_ingress_cannot_see_the_root(serve_env):
    # As on a cluster whose LoRA root exists only on the GPU nodes: the replica's LoRA cache finds out.
    from ray import serve

    args = serve_env.args_for("unseen-root", ingress={"lora_root_visible": False})
    app = serve_env.deploy("unseen-root", "/unseen-root", args)
    try:
        with ServeLogs("unseen-root") as logs:
            r = app.submit({**small_request(), "loras": [{"path": "missing/nothing.safetensors"}]})
            assert r.status_code == 200, r.text
            rid = r.json()["request_id"]
            status = app.wait(rid)
            assert status["status"] == "failed" and status["error"]["code"] == "LORA_NOT_FOUND", status
            # A user's mistake is one WARNING line naming the job in each process that saw it (the
            # ingress's job runner, the GPU replica), not ERROR tracebacks from Serve and its multiplexer.
            def warned() -> dict[str, list[str]]:
                return {name: [line for line in lines if line.startswith("WARNING") and "LORA_NOT_FOUND" in line]
                        for name, lines in logs.lines_by_file().items()}

            wait_for(lambda: sum(map(len, warned().values())) >= 2, 30, lambda: f"two warnings about {rid}: {warned()}")
            said = {name: lines for name, lines in warned().items() if lines}
            assert len(said) == 2 and all(len(lines) == 1 and rid in lines[0] for lines in said.values()), said
            assert any("_Ingress_" in name for name in said), said
            assert not [line for line in logs.lines() if line.startswith(("ERROR", "CRITICAL"))], logs.text()
            assert "Traceback" not in logs.text(), logs.text()
        # A fault of the service still logs its traceback (an injected out-of-memory in a denoising step).
        with ServeLogs("unseen-root") as logs:
            failed = app.run(small_request(prompt=f"{FAIL_PROMPT} bug"))
            assert failed["status"] == "failed" and failed["error"]["code"] == "OUT_OF_MEMORY", failed
            wait_for(lambda: "Traceback" in logs.text(), 30, "a traceback for the injected fault")
    finally:
        serve.delete("unseen-root")


class ServeLogs:
    """What the Serve log files of one app (its replicas' logs in this Ray session) get while the block runs."""

    def __init__(self, app_name: str):
        self.app_name = app_name

    def _files(self) -> list:
        import ray

        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
        return sorted(p for p in logs.glob(f"replica_{self.app_name}_*.log"))

    def __enter__(self):
        self.start = {p: p.stat().st_size for p in self._files()}
        return self

    def __exit__(self, *exc):
        return False

    def text(self) -> str:
        return "\n".join("\n".join(lines) for lines in self.lines_by_file().values())

    def lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if line.strip()]

    def lines_by_file(self) -> dict[str, list[str]]:
        out = {}
        for p in self._files():
            with open(p, "rb") as f:
                f.seek(self.start.get(p, 0))
                out[p.name] = [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return out


def test_lora_errors_fail_the_job_clearly(app, serve_env, loras):
    bad = serve_env.lora_root / "wrong_blocks.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"diffusion_model.blocks.39.self_attn.q.lora_A.weight": torch.zeros(4, 16),
               "diffusion_model.blocks.39.self_attn.q.lora_B.weight": torch.zeros(16, 4)}, str(bad))
    r = app.submit({**small_request(), "loras": [{"path": "wrong_blocks.safetensors"}]})
    assert r.status_code == 200
    status = app.wait(r.json()["request_id"])
    assert status["status"] == "failed" and status["error"]["code"] == "LORA_INCOMPATIBLE"
    assert "blocks.39" in str(status["error"]["details"])
    # the replica is fine afterwards
    assert app.run(small_request())["status"] == "succeeded"


def test_cancel_running_and_queued_jobs(app):
    slow = small_request(prompt=f"{SLOW_PROMPT} slow", sample_steps=40)
    running = app.submit(slow).json()["request_id"]
    app.wait_running(running)  # holds the one replica: the next job waits
    queued = app.submit(slow).json()["request_id"]
    assert app.http.get(f"/v1/requests/{queued}/status").json()["status"] == "in_queue"
    r = app.http.post(f"/v1/requests/{queued}/cancel")
    assert r.status_code == 200
    assert app.wait(queued, timeout=20)["status"] == "canceled"
    t0 = time.time()
    app.http.post(f"/v1/requests/{running}/cancel")
    final = app.wait(running, timeout=20)
    assert final["status"] == "canceled" and final["error"]["code"] == "CANCELED"
    assert final["progress"]["step"] < 40
    assert time.time() - t0 < 10
    # the replica is free for the next job right away
    assert app.run(small_request(), timeout=30)["status"] == "succeeded"
    # canceling a finished job changes nothing
    assert app.http.post(f"/v1/requests/{running}/cancel").json()["status"] == "canceled"


def test_unknown_request_is_404(app):
    r = app.http.get("/v1/requests/does-not-exist/status")
    assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
    r = app.http.get("/v1/requests/does-not-exist/outputs/0")
    assert r.status_code == 404


def test_recent_requests_newest_first_in_pages(app):
    submitted = []
    for seed in range(3):
        r = app.submit(small_request(seed=seed))
        assert r.status_code == 200, r.text
        submitted.append(r.json()["request_id"])
    first = app.http.get("/v1/requests", params={"limit": 2}).json()
    assert [s["request_id"] for s in first["requests"]] == submitted[::-1][:2]
    assert first["next_before"] == submitted[1] and first["requests"][0]["status"] in ("in_queue", "in_progress")
    for rid in submitted:
        app.wait(rid)
    # Every job of this (open: the one shared) owner, each once, newest first, over pages of 3.
    seen, before = [], None
    while True:
        page = app.http.get("/v1/requests", params={"limit": 3, **({"before": before} if before else {})}).json()
        seen += page["requests"]
        if not (before := page["next_before"]):
            break
    ids = [s["request_id"] for s in seen]
    assert len(ids) == len(set(ids)) == app.count_jobs() and ids[:3] == submitted[::-1]
    assert [s["created_at"] for s in seen] == sorted((s["created_at"] for s in seen), reverse=True)
    assert seen[0]["status"] == "succeeded" and seen[0]["progress"]["total_steps"] == 2
    assert app.http.get("/v1/requests").json()["requests"][0]["request_id"] == submitted[-1]  # default limit
    r = app.http.get("/v1/requests", params={"before": "no-such-job"})
    assert r.status_code == 404 and r.json()["detail"]["error"]["code"] == "REQUEST_NOT_FOUND"
    for bad in (0, 101, "x"):
        r = app.http.get("/v1/requests", params={"limit": bad})
        assert r.status_code == 422 and r.json()["detail"]["error"]["code"] == "VALIDATION_ERROR", bad


def test_playground_page_and_files_are_served_under_the_apps_prefix(app):
    """The page's <base> is the app's route prefix (``/`` or ``/pg``), so its relative URLs reach this app."""
    from serve_app import playground

    prefix = app.base_url.split(str(app.http.base_url.port), 1)[1]  # "" or "/pg"
    for path in ("", "/"):
        r = httpx.get(app.base_url + path, follow_redirects=True)  # Serve redirects /pg to /pg/
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (path, r.text)
        assert f'<base href="{prefix}/">' in r.text and "{{" not in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
    for name, media_type in playground.ASSETS.items():
        r = app.http.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media_type)
        assert r.content == (playground.STATIC_DIR / name).read_bytes()
    assert app.http.get("/static/playground.html").status_code == 404  # the template is not a file to fetch
    assert app.http.get("/docs").status_code == 200
    assert "/" not in app.http.get("/openapi.json").json()["paths"]


@pytest.mark.full
@pytest.mark.kills  # the whole app, mid-job
@pytest.mark.parametrize("backend", BACKENDS)
def test_restart_keeps_results_and_runs_queued_jobs(serve_env, backend):
    from ray import serve

    args = serve_env.args_for("restart", backend)
    app = serve_env.deploy("restart", "/restart", args)
    done = app.run(small_request())
    slow = small_request(prompt=f"{SLOW_PROMPT} across a restart", sample_steps=12)
    running = app.submit(slow).json()["request_id"]
    app.wait_running(running)  # holds the one replica: the next job waits
    queued = app.submit(small_request(seed=5)).json()["request_id"]
    serve.delete("restart")
    app = serve_env.deploy("restart", "/restart", args)
    again = app.http.get(f"/v1/requests/{done['request_id']}/result").json()
    assert again["status"] == "succeeded" and again["outputs"] == done["outputs"]
    assert _download(app, again).content
    for rid in (running, queued):
        final = app.wait(rid, timeout=90)
        assert final["status"] == "succeeded", final
    assert app.http.get(f"/v1/requests/{running}/status").json()["attempts"] == 2
    serve.delete("restart")


@pytest.mark.full  # a full-size generation on CPU: about 1.5 minutes
@pytest.mark.parametrize("app", ["sqlite"], indirect=True)  # about generation, not state: one backend
def test_seed_page_example_works_as_written(app, loras):
    """The model page's request, verbatim but for a reachable image (832x480, 41 frames) and its steps.

    Its 25 steps change no shape and only repeat the denoising: at this size on 2 CPU cores a step of
    the tiny model is about 5 s (120 of the 195 s the page's 25 took), while the VAE encode and decode
    of 41 full-size frames, which the steps do not touch, are about 65 s. Two steps run the same
    sampler, sizes, decode and encoding.
    """
    from tests.conftest import make_image, png_bytes

    with LocalServer() as srv:
        url = srv.add("/first_frame.png", png_bytes(make_image(1024, 768, seed=3)), headers={"Content-Type": "image/png"})
        model_page = {
            "model": "wan21_i2v_14b480p",
            "trigger_word": "sks",
            "prompts": [{
                "prompt": "[trigger] a cinematic shot of a runner on a beach, handheld camera",
                "neg": "", "seed": 42, "width": 832, "height": 480, "num_frames": 41, "fps": 16,
                "sample_steps": 25, "guidance_scale": 4.0, "ctrl_img": url,
            }],
            "loras": [{"path": "my_wan_job/my_wan_job.safetensors", "network_multiplier": 1.0}],
        }
        request = {**model_page, "prompts": [{**model_page["prompts"][0], "sample_steps": 2}]}
        result = app.run(request, timeout=900)
    assert result["status"] == "succeeded", result
    (video,) = result["outputs"]["videos"]
    assert (video["width"], video["height"], video["num_frames"], video["fps"], video["seed"]) == (832, 480, 41, 16, 42)
    frames = iio.imread(io.BytesIO(_download(app, result).content), index=None, extension=".mp4")
    assert frames.shape == (41, 480, 832, 3)
    assert np.ptp(frames) > 0


def test_evicted_lora_sets_are_deleted_from_the_pipeline(serve_env, loras):
    from ray import serve

    args = serve_env.args_for("evict", gpu={"replica": {"max_loras_per_replica": 1}})
    app = serve_env.deploy("evict", "/evict", args)
    try:
        for ref in ("my_wan_job/my_wan_job.safetensors", "style_b.safetensors"):
            result = app.run({**small_request(), "loras": [{"path": ref}]})
            assert result["status"] == "succeeded", result
            assert app.replica_stats()["resident_adapters"] == [ref]
    finally:
        serve.delete("evict")


def test_cli_submits_shows_every_stage_and_downloads(app, loras, tmp_path, capsys):
    from serve_app.cli import main
    from tests.conftest import make_image

    image = tmp_path / "first.png"
    make_image(80, 60).save(image)
    out = tmp_path / "video.webp"
    code = main(["submit", "--server", app.base_url, "--image", str(image), "--prompt", "a runner",
                 "--lora", "my_wan_job/my_wan_job.safetensors:0.5",
                 "--width", "64", "--height", "48", "--frames", "5", "--steps", "2", "--format", "webp",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out
    # A job of a few seconds: every stage a line, however short (the CLI follows the event stream),
    # and the denoising bar up to its last step.
    lines = [line.strip() for line in printed.err.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if "step" not in line and not line.startswith("submitted")] == [
        "queued", "loading LoRAs", "encoding the prompt", "encoding the first frame", "VAE encoding the first frame",
        "VAE decoding the frames", "encoding the video", "succeeded"], lines
    assert any(line.startswith("denoising: 100%") and "2/2" in line for line in lines), lines
    from PIL import Image

    with Image.open(out) as video:
        assert (video.size, video.n_frames) == ((64, 48), 5)


def _output_store(app):
    """The app's output store, opened in the test process (same config: a local dir or the S3 server)."""
    from serve_app.config import StorageConfig
    from serve_app.storage import OutputStore

    return OutputStore(StorageConfig.model_validate(app.args["storage"]))


def test_download_honours_range_requests(app):
    result = app.run(small_request(seed=17))
    whole = _download(app, result)
    data = whole.content
    assert whole.headers["accept-ranges"] == "bytes" and int(whole.headers["content-length"]) == len(data)
    url = f"/v1/requests/{result['request_id']}/outputs/0"
    part = app.http.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(data)}"
    tail = app.http.get(url, headers={"Range": "bytes=-7"})
    assert tail.status_code == 206 and tail.content == data[-7:]
    resumed = app.http.get(url, headers={"Range": f"bytes={len(data) - 3}-"})  # a resumed download
    assert resumed.status_code == 206 and resumed.content == data[-3:]
    beyond = app.http.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert beyond.json()["detail"]["error"]["code"] == "RANGE_NOT_SATISFIABLE"
    # HEAD answers as GET would, without the body (download tools probe the size this way).
    head = app.http.head(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(data) and head.headers["accept-ranges"] == "bytes"
    assert head.headers["content-type"] == whole.headers["content-type"]
    head = app.http.head(url, headers={"Range": "bytes=10-99"})
    assert head.status_code == 206 and head.content == b"" and head.headers["content-length"] == "90"
    assert head.headers["content-range"] == f"bytes 10-99/{len(data)}"
    head = app.http.head(url, headers={"Range": f"bytes={len(data)}-"})
    assert head.status_code == 416 and head.headers["content-range"] == f"bytes */{len(data)}"
    assert app.http.head(f"/v1/requests/{result['request_id']}/outputs/1").status_code == 404


def test_control_images_are_kept_once_in_the_store_not_in_the_job_row(app):
    from tests.conftest import b64_png

    request = small_request(ctrl_img=b64_png(seed=1))
    first = request["prompts"][0]
    request["prompts"] += [{**first, "seed": 5}, {**first, "ctrl_img": b64_png(seed=2)}]  # two images, three prompts
    result = app.run(request)
    assert result["status"] == "succeeded" and len(result["outputs"]["videos"]) == 3
    (row,) = app.db_rows("id=?", (result["request_id"],))
    assert len(row["specs"]) < 6000 and first["ctrl_img"][:200] not in row["specs"]  # no image in the row
    store = _output_store(app)
    keys = sorted(s["image_key"] for s in map(json.loads, json.loads(row["specs"])))
    assert len(set(keys)) == 2 and all(k.startswith(result["request_id"] + "/ctrl-") for k in keys)
    from PIL import Image

    for key in set(keys):
        with Image.open(io.BytesIO(store.read(key))) as image:
            assert image.size == (64, 48)  # stored already resized, as the replica runs it


@pytest.mark.full
@pytest.mark.postgres
def test_presigned_redirect_sends_the_client_to_the_object_store(serve_env):
    from ray import serve

    args = serve_env.args_for("presign", "postgres", storage={"presigned_redirect": True, "presign_expiry_s": 120})
    app = serve_env.deploy("presign", "/presign", args)
    try:
        result = app.run(small_request(seed=23))
        assert result["status"] == "succeeded", result
        r = app.http.get(f"/v1/requests/{result['request_id']}/outputs/0")
        assert r.status_code == 307
        location = r.headers["location"]
        assert location.startswith(serve_env.s3.endpoint) and "Expires=" in location
        video = httpx.get(location)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"  # an MP4 straight from the store
        assert video.content == _output_store(app).read(f"{result['request_id']}/0.mp4")
        head = app.http.head(f"/v1/requests/{result['request_id']}/outputs/0")  # the same redirect
        assert head.status_code == 307 and head.headers["location"].startswith(serve_env.s3.endpoint)
        # S3 signs the method into the URL, so a HEAD is sent to one signed for head_object (moto does not
        # check signatures: tests/test_storage.py checks the signed operation).
        probe = httpx.head(head.headers["location"])
        assert probe.status_code == 200 and int(probe.headers["content-length"]) == len(video.content)
        part = httpx.get(location, headers={"Range": "bytes=4-7"})  # the store honours Range itself
        assert part.status_code == 206 and part.content == b"ftyp"
    finally:
        serve.delete("presign")
