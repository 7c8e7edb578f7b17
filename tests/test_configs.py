"""The shipped Serve configs: both validate into AppConfig; production refuses to start without keys."""

from __future__ import annotations

import json
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
    assert cfg_model["speed"]["compile_blocks"] and cfg_model["speed"]["attention_backend"] == "auto"
    assert args["ingress"]["lora_root_visible"] is False  # the LoRA root is on each GPU node, not the ingress's
    speed = AppConfig.model_validate({**args, "auth": {"public_by_choice": True}}).gpu.model.speed
    assert speed.enabled_modes() == ("exact", "fast") and speed.fast.fp8  # turbo waits for its LoRA file
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


# -- secrets and the hub ----------------------------------------------------------------------------


def test_hub_token_from_the_config_or_the_environment_is_masked_everywhere(monkeypatch):
    from deployments.config import ModelConfig

    secret = "hf_ConfigTokenThatMustNeverLeak789"
    monkeypatch.delenv("WAN_TEST_TOKEN", raising=False)
    assert ModelConfig(hf_token_env="WAN_TEST_TOKEN").token() is None
    monkeypatch.setenv("WAN_TEST_TOKEN", "from-env")
    assert ModelConfig(hf_token_env="WAN_TEST_TOKEN").token().get_secret_value() == "from-env"
    cfg = AppConfig.model_validate({"gpu": {"model": {"hf_token": secret, "hf_token_env": "WAN_TEST_TOKEN"}}})
    assert cfg.gpu.model.token().get_secret_value() == secret  # the explicit setting wins
    # What gets printed or handed to the ingress (it receives the JSON dump) never shows it.
    for text in (repr(cfg), str(cfg), repr(cfg.gpu), json.dumps(cfg.model_dump(mode="json")), str(cfg.model_dump()),
                 repr(cfg.gpu.model.token())):
        assert secret not in text


@pytest.mark.parametrize("endpoint", ["ftp://hub.example", "https://u:p@hub.example", "https://hub.example/api",
                                      "https://hub.example?x=1", "not a url"])
def test_hf_endpoint_must_be_a_bare_origin(endpoint):
    from pydantic import ValidationError

    from deployments.config import FetchConfig

    with pytest.raises(ValidationError):
        FetchConfig(hf_endpoint=endpoint)
    assert FetchConfig(hf_endpoint="https://hub.example:8443/").hf_endpoint == "https://hub.example:8443"


# -- one request across several GPUs ----------------------------------------------------------------


@pytest.mark.parametrize("gpus, split", [(2, (2, 1, 1)), (4, (2, 2, 1))])
def test_multi_gpu_configs_are_production_plus_a_parallel_section(gpus, split, monkeypatch):
    production = yaml.safe_load((ROOT / "configs" / "wan21-i2v-480p.yaml").read_text())
    config, app = app_section(f"wan21-i2v-480p-{gpus}gpu.yaml")
    parallel = app["args"]["gpu"].pop("parallel")
    assert config == production  # everything else in step with the one-GPU production config
    app["args"]["gpu"]["parallel"] = parallel

    monkeypatch.setenv(app["args"]["auth"]["api_keys_env"], "k1")
    cfg = AppConfig.model_validate(app["args"])
    p = cfg.gpu.parallel
    assert (p.degree, (p.cfg_degree, p.ulysses_degree, p.ring_degree)) == (gpus, split)
    assert cfg.gpu.replica.num_gpus == 1  # per rank
    from deployments.replica.deployment import make_deployment

    options = make_deployment(cfg.gpu)._deployment_config, make_deployment(cfg.gpu)._replica_config
    replica = options[1]
    assert replica.placement_group_strategy == "STRICT_PACK"
    bundles = replica.placement_group_bundles
    assert bundles[0] == {"CPU": cfg.gpu.replica.num_cpus} and bundles[1:] == [{"CPU": p.rank_cpus, "GPU": 1}] * gpus
    assert replica.ray_actor_options["num_gpus"] == 0  # the replica drives; its ranks hold the GPUs
    build_app(app["args"])


def test_a_multi_gpu_config_with_a_bad_split_does_not_start(monkeypatch):
    from pydantic import ValidationError

    _, app = app_section("wan21-i2v-480p-4gpu.yaml")
    monkeypatch.setenv(app["args"]["auth"]["api_keys_env"], "k1")
    for bad, message in (({"degree": 3, "cfg_degree": 1, "ulysses_degree": 3}, "must divide the transformer's 40"),
                         ({"degree": 16, "gpus_per_node": 8, "cfg_degree": 2, "ulysses_degree": 8},
                          "does not fit one node"),
                         ({"ulysses_degree": 1}, "must equal cfg_degree x ulysses_degree x ring_degree")):
        args = {**app["args"], "gpu": {**app["args"]["gpu"], "parallel": {**app["args"]["gpu"]["parallel"], **bad}}}
        with pytest.raises(ValidationError, match=message):
            build_app(args)


# -- smaller cards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("card, memory, speed_changes", [
    ("48gb", "fp8", {}),
    ("24gb", "offload", {"compile_blocks": False}),  # offloaded blocks run eagerly
])
def test_memory_configs_are_production_plus_a_memory_mode(card, memory, speed_changes, monkeypatch):
    production = yaml.safe_load((ROOT / "configs" / "wan21-i2v-480p.yaml").read_text())
    config, app = app_section(f"wan21-i2v-480p-{card}.yaml")
    gpu = app["args"]["gpu"]
    assert gpu.pop("memory") == memory
    speed = gpu["model"]["speed"]
    assert {k: speed[k] for k in speed_changes} == speed_changes
    speed.update({k: production["applications"][0]["args"]["gpu"]["model"]["speed"][k] for k in speed_changes})
    assert config == production  # everything else in step with the 80 GB production config

    _, app = app_section(f"wan21-i2v-480p-{card}.yaml")
    monkeypatch.setenv(app["args"]["auth"]["api_keys_env"], "k1")
    cfg = AppConfig.model_validate(app["args"])
    assert cfg.gpu.memory == memory and cfg.gpu.replica.num_gpus == 1
    build_app(app["args"])


def test_production_config_keeps_full_memory():
    _, app = app_section("wan21-i2v-480p.yaml")
    cfg = AppConfig.model_validate({**app["args"], "auth": {"public_by_choice": True}})
    assert cfg.gpu.memory == "full" and cfg.gpu.model.speed.compile_blocks


def test_the_shutdown_wait_loop_reaches_both_deployments_and_defaults_to_serves():
    """A stopping replica sleeps one ``graceful_shutdown_wait_loop_s`` even when idle; tests set it short."""
    from ray.serve._private.config import DeploymentConfig

    ingress = build_app({})._bound_deployment
    replica = ingress.init_args[1]._bound_deployment
    serves = DeploymentConfig().graceful_shutdown_wait_loop_s
    assert ingress._deployment_config.graceful_shutdown_wait_loop_s == serves
    assert replica._deployment_config.graceful_shutdown_wait_loop_s == serves
    ingress = build_app({"ingress": {"graceful_shutdown_wait_loop_s": 0.2},
                         "gpu": {"replica": {"graceful_shutdown_wait_loop_s": 0.3}}})._bound_deployment
    assert ingress._deployment_config.graceful_shutdown_wait_loop_s == 0.2
    assert ingress.init_args[1]._bound_deployment._deployment_config.graceful_shutdown_wait_loop_s == 0.3
    from pydantic import ValidationError

    for bad in ({"ingress": {"graceful_shutdown_wait_loop_s": 0}},
                {"gpu": {"replica": {"graceful_shutdown_wait_loop_s": -1}}}):
        with pytest.raises(ValidationError, match="graceful_shutdown_wait_loop_s"):
            build_app(bad)
