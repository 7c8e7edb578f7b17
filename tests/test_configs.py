"""The shipped Serve configs: both validate into AppConfig; production refuses to start without keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.app import build_app
from serve_app.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]


def app_section(name: str) -> dict:
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    return config, app


def test_local_config_is_the_open_tiny_cpu_default():
    config, app = app_section("local.yaml")
    assert config["http_options"]["host"] == "127.0.0.1" and config["http_options"]["port"] == 8000
    cfg = AppConfig.model_validate(app["args"])
    assert (cfg.gpu.model.source, cfg.gpu.model.device, cfg.gpu.replica.num_gpus) == ("tiny", "cpu", 0)
    assert cfg.auth.load_keys() == [] and not cfg.auth.require_keys
    assert cfg.gpu.lora.root == "./loras" and cfg.storage.jobs_db.startswith("./outputs")
    assert cfg.ingress.lora_root_visible  # one machine: a missing LoRA is refused at submit
    build_app(app["args"])


def test_production_config_needs_keys(tmp_path, monkeypatch):
    _, app = app_section("wan21-i2v-480p.yaml")
    args = app["args"]
    cfg_model = args["gpu"]["model"]
    assert cfg_model["source"] == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" and args["gpu"]["replica"]["num_gpus"] == 1
    replica = args["gpu"]["replica"]
    assert replica["min_replicas"] == 1 and replica["max_replicas"] > 1 and replica["target_ongoing_requests"] == 1
    assert cfg_model["speed"]["compile_blocks"] and cfg_model["speed"]["attention_backend"] == "_native_cudnn"
    assert args["ingress"]["lora_root_visible"] is False  # the LoRA root is on each GPU node, not the ingress's
    variable = args["auth"]["api_keys_env"]
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(Exception, match="(?i)key"):
        build_app(args)
    monkeypatch.setenv(variable, "k1, k2")
    assert AppConfig.model_validate(args).auth.load_keys() == ["k1", "k2"]
    build_app(args)
    keys = tmp_path / "keys"  # a key file is still an option (one key per line)
    keys.write_text("k3\n")
    monkeypatch.delenv(variable)
    assert AppConfig.model_validate({**args, "auth": {"api_keys_file": str(keys)}}).auth.load_keys() == ["k3"]
    public = {**args, "auth": {"require_keys": True, "public_by_choice": True}}
    build_app(public)
