"""Speed modes over HTTP: selection and validation, per-prompt override, the mode in each result and in
/v1/models, and one replica serving every mode without reloading its base model."""

from __future__ import annotations

import pytest

from tests.conftest import load_tiny, small_request


def _download(app, result: dict, n: int = 0) -> bytes:
    r = app.http.get(f"/v1/requests/{result['request_id']}/outputs/{n}")
    assert r.status_code == 200, r.text
    return r.content


@pytest.fixture(scope="module")
def speed_files(serve_env, model_cache):
    """A random distillation LoRA (LightX2V's layout) and a user LoRA, in the app's LoRA root."""
    from deployments.lora.files import linear_shapes
    from tests.lora_factory import make_layout, make_lora

    shapes = linear_shapes(load_tiny(model_cache).pipe.transformer)
    sub = serve_env.lora_root / "speed"
    sub.mkdir(exist_ok=True)
    distill = make_layout(sub / "distill.safetensors", "lightx2v", shapes, seed=70)
    user = make_lora(sub / "user.safetensors", "ai-toolkit", shapes, seed=71)
    return {"distill": "speed/distill.safetensors", "user": "speed/user.safetensors",
            "distill_path": distill.path, "user_path": user.path}


@pytest.fixture(scope="module")
def turbo_app(serve_env, speed_files):
    """An app with all three modes; the distillation LoRA named relative to the LoRA root."""
    from ray import serve

    args = serve_env.args_for("speed-modes", gpu={"model": {"speed": {
        "turbo": {"enabled": True, "lora": speed_files["distill"], "strength": 0.9}}}})
    app = serve_env.deploy("speed-modes", "/speed-modes", args)
    yield app
    serve.delete("speed-modes")


def test_models_list_the_enabled_modes(app, turbo_app):
    (m,) = app.http.get("/v1/models").json()["models"]
    assert (m["speed_modes"], m["default_speed"], m["turbo_steps"]) == (["exact", "fast"], "exact", None)
    (m,) = turbo_app.http.get("/v1/models").json()["models"]
    assert (m["speed_modes"], m["turbo_steps"]) == (["exact", "fast", "turbo"], 4)


@pytest.mark.parametrize("where", ["prompt", "request"])
@pytest.mark.parametrize("value", ["turbo", "warp-speed"])
def test_unknown_and_disabled_modes_are_400(app, where, value):
    request = small_request(speed=value) if where == "prompt" else {**small_request(), "speed": value}
    jobs = app.count_jobs()
    r = app.submit(request)
    assert r.status_code == 400, r.text
    error = r.json()["detail"]["error"]
    assert error["code"] == "SPEED_MODE_NOT_SUPPORTED"
    assert error["details"] == {"prompt_index": 0, "allowed": ["exact", "fast"]}
    assert app.count_jobs() == jobs  # refused at submit: no job stored


def test_each_prompt_runs_its_mode_and_the_result_says_what_ran(turbo_app):
    request = {**small_request(sample_steps=6), "speed": "fast"}
    request["prompts"] = [dict(request["prompts"][0]), {**request["prompts"][0], "speed": "turbo"},
                          {**request["prompts"][0], "speed": "exact"}]
    result = turbo_app.run(request)
    assert result["status"] == "succeeded", result
    fast, turbo, exact = (v["speed"] for v in result["outputs"]["videos"])
    assert fast["mode"] == "fast" and (fast["steps"], fast["guidance_scale"]) == (6, 4.0)
    assert fast["forwards_computed"] + fast["forwards_skipped"] == 12 and fast["forwards_skipped"] > 0
    assert fast["step_cache"]["ratios_source"].startswith("MagCache4Wan2.1")
    assert fast["fp8"] is False and "without the FP8 conversion" in fast["fp8_note"]  # CPU: said so
    assert turbo["mode"] == "turbo" and (turbo["steps"], turbo["guidance_scale"]) == (4, 1.0)
    assert (turbo["forwards_computed"], turbo["forwards_skipped"]) == (4, 0)
    assert turbo["scheduler"]["name"] == "lightx2v_step_distill"
    assert exact == {**exact, "mode": "exact", "fp8": False, "fp8_note": None, "forwards_computed": 12,
                     "forwards_skipped": 0}


def test_switching_modes_reloads_nothing_and_turbo_matches_the_core(turbo_app, model_cache, speed_files):
    """exact, fast and turbo (with a user LoRA) alternate on one replica: same process, base loaded once,
    the distillation LoRA loaded once, the user's once; each mode gives the same bytes every time, and
    turbo's are what the generation core makes with the same settings."""
    from deployments.config import SpeedConfig
    from deployments.engine.media_out import encode
    from deployments.engine.pipeline import WanGenerator
    from serve_app.config import AppConfig
    from serve_app.normalize import to_specs
    from serve_app.schemas import InferenceRequest

    def request(speed):
        return {**small_request(speed=speed), "loras": [{"path": speed_files["user"], "network_multiplier": 0.7}]}

    turbo_app.run(request("exact"))  # the user LoRA is loaded here
    before = turbo_app.replica_stats()
    outputs: dict[str, list[bytes]] = {}
    for speed in ("fast", "turbo", "exact", "turbo", "fast", "exact"):
        result = turbo_app.run(request(speed))
        assert result["outputs"]["videos"][0]["speed"]["mode"] == speed
        outputs.setdefault(speed, []).append(_download(turbo_app, result))
    after = turbo_app.replica_stats()
    assert (after["pid"], after["pipeline_loads"], after["distill_loads"]) == (before["pid"], 1, 1)
    assert after["adapter_loads"] == before["adapter_loads"] and after["speed_modes"] == ["exact", "fast", "turbo"]
    for speed, runs in outputs.items():
        assert runs[0] == runs[1], speed
    assert len({runs[0] for runs in outputs.values()}) == 3

    cfg = AppConfig.model_validate(turbo_app.args)
    spec = to_specs(InferenceRequest.model_validate(request("turbo")), cfg)[0]
    speed: SpeedConfig = cfg.gpu.model.speed
    core = WanGenerator(load_tiny(model_cache), speed, turbo_lora=str(speed_files["distill_path"]))
    core.load_adapter(speed_files["user"], str(speed_files["user_path"]))
    assert encode(core.generate(spec).frames, spec.fps, spec.output_format) == outputs["turbo"][0]
