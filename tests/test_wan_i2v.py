"""The GPU replica over HTTP: the hub token reaches the LoRA cache, failed LoRA sets leave nothing
resident, and every failure leaves the replica as a typed error that a process without torch unpickles.

``rapp`` is an app variant at its own route prefix: a local server stands in for the hub
(``gpu.fetch.hf_endpoint``), the server's token is a config secret, and the test-only fault fires
while adapters are set or loaded (outside the pipeline call) instead of in a denoising step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import FAIL_PROMPT, small_request, tiny_spec
from tests.http_server import LocalServer

TOKEN = "hf_ReplicaTokenThatMustNeverLeak456"
GOOD = "0-replica-good.safetensors"  # sorts before the faulty one: loaded first, so there is something to undo
FAULTY = f"{FAIL_PROMPT}-replica.safetensors"  # the load_lora fault fires for a reference holding FAIL_PROMPT


@pytest.fixture(scope="module")
def hub():
    with LocalServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def lora_files(serve_env, tiny_shapes) -> dict[str, Path]:
    """Valid LoRA files in the LoRA root (one to load first, one whose name triggers the load fault) and
    one that does not fit the transformer."""
    from safetensors.torch import save_file
    import torch

    from tests.lora_factory import make_lora

    files = {name: make_lora(serve_env.lora_root / name, "ai-toolkit", tiny_shapes, seed=i).path
             for i, name in enumerate((GOOD, FAULTY, "0-half-good.safetensors"))}
    bad = serve_env.lora_root / "z-half-bad.safetensors"
    save_file({"diffusion_model.blocks.39.self_attn.q.lora_A.weight": torch.zeros(4, 16),
               "diffusion_model.blocks.39.self_attn.q.lora_B.weight": torch.zeros(16, 4)}, str(bad))
    files[bad.name] = bad
    return files


@pytest.fixture(scope="module")
def rapp(serve_env, hub):
    from ray import serve

    args = serve_env.args_for("replica", gpu={
        "model": {"hf_token": TOKEN},
        "fetch": {"hf_endpoint": hub.url("")},
        "lora": {"retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05}},
        "replica": {"generator_options": {"fail_stages": ["activate", "load_lora"]}},
    })
    app = serve_env.deploy("replica", "/replica", args)
    yield app
    serve.delete("replica")


def _with_loras(*refs: str, **prompt) -> dict:
    return {**small_request(**prompt), "loras": [{"path": ref} for ref in refs]}


def _ray_log_files() -> list[Path]:
    import ray._private.worker

    return [p for p in Path(ray._private.worker._global_node.get_logs_dir_path()).rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------
# the hub token


def test_private_hf_lora_is_fetched_with_the_servers_token_which_never_leaks(rapp, hub, lora_files):
    bearer = f"Bearer {TOKEN}"
    hub.add("/o/r/resolve/main/private.safetensors", lora_files[GOOD].read_bytes(),
            require_headers={"Authorization": bearer})
    ok = rapp.run(_with_loras("hf://o/r/private.safetensors"))
    assert ok["status"] == "succeeded", ok
    assert hub.count("/o/r/resolve/main/private.safetensors") == 1
    assert hub.requests[-1]["authorization"] == bearer

    # A private file the token does not open, and one the hub does not have: typed, token-free failures.
    hub.add("/o/r/resolve/main/other.safetensors", b"", status=403)
    for ref in ("hf://o/r/other.safetensors", "hf://o/r/missing.safetensors"):
        r = rapp.submit(_with_loras(ref))
        assert r.status_code == 200, r.text
        status = rapp.wait(r.json()["request_id"])
        assert status["status"] == "failed" and status["error"]["code"] == "LORA_NOT_FOUND", status
        assert TOKEN not in json.dumps(status)

    # Nothing that Ray or Serve wrote (replica, cache actor and controller logs) holds the token.
    leaked = [p.name for p in _ray_log_files() if TOKEN.encode() in p.read_bytes()]
    assert leaked == []


# ---------------------------------------------------------------------------------------------
# failures outside the pipeline call, and half-loaded sets


def test_oom_while_setting_adapters_fails_the_job_with_out_of_memory(rapp):
    failed = rapp.run(small_request(prompt=f"{FAIL_PROMPT} at activate"))
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "OUT_OF_MEMORY", failed
    assert failed["error"]["details"]["stage"] == "generating"
    assert "\n" not in failed["error"]["message"]
    assert rapp.run(small_request())["status"] == "succeeded"  # the replica serves the next job


def test_oom_while_loading_a_lora_set_fails_with_out_of_memory_and_unloads_the_set(rapp, lora_files):
    before = rapp.replica_stats()
    failed = rapp.run(_with_loras(GOOD, FAULTY))
    assert failed["status"] == "failed" and failed["error"]["code"] == "OUT_OF_MEMORY", failed
    assert failed["error"]["details"]["stage"] == "loading LoRAs"
    after = rapp.replica_stats()
    assert after["adapter_loads"] == before["adapter_loads"] + 1  # GOOD was loaded before the fault...
    assert GOOD not in after["resident_adapters"]  # ...and removed again
    assert after["resident_adapters"] == before["resident_adapters"]
    assert rapp.run(_with_loras(GOOD))["status"] == "succeeded"


def test_a_set_that_fails_half_way_leaves_no_adapter_resident(app, lora_files):
    good, bad = "0-half-good.safetensors", "z-half-bad.safetensors"
    before = app.replica_stats()
    failed = app.run(_with_loras(good, bad))
    assert failed["status"] == "failed" and failed["error"]["code"] == "LORA_INCOMPATIBLE", failed
    after = app.replica_stats()
    assert after["adapter_loads"] == before["adapter_loads"] + 1  # the good one was loaded first
    assert good not in after["resident_adapters"]
    # Making room for the set may have evicted the least recently used adapters; nothing new stays.
    assert set(after["resident_adapters"]) <= set(before["resident_adapters"])

    # An adapter that a resident set owns stays when another set holding it fails.
    assert app.run(_with_loras(good))["status"] == "succeeded"
    owned = app.replica_stats()
    assert good in owned["resident_adapters"]
    assert app.run(_with_loras(good, bad))["error"]["code"] == "LORA_INCOMPATIBLE"
    left = app.replica_stats()["resident_adapters"]
    assert good in left and set(left) <= set(owned["resident_adapters"])


# ---------------------------------------------------------------------------------------------
# what leaves the replica unpickles where torch cannot be imported (the ingress)

_NO_TORCH = textwrap.dedent("""
    import pickle, sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch cannot be imported here")

    sys.meta_path.insert(0, NoTorch())
    errors = [pickle.loads(blob) for blob in pickle.load(sys.stdin.buffer)]
    assert "torch" not in sys.modules
    print(" ".join(f"{type(e).__name__}:{e.code}" for e in errors))
""")


def _raised_by_replica(app_name: str, spec) -> BaseException:
    """What the replica's generate stream raises, as the caller receives it (Ray's cause unwrapped)."""
    from ray import serve
    from ray.exceptions import RayTaskError

    handle = serve.get_deployment_handle("WanI2V", app_name).options(stream=True,
                                                                     multiplexed_model_id=spec.lora_key)
    with pytest.raises(Exception) as e:
        for _ in handle.generate.remote(spec):
            pass
    return e.value.cause if isinstance(e.value, RayTaskError) else e.value


def test_replica_errors_unpickle_without_torch(rapp, lora_files):
    import pickle

    from ray import cloudpickle

    from deployments.spec import LoraRef

    raised = [
        _raised_by_replica(rapp.name, tiny_spec(prompt=f"{FAIL_PROMPT} at activate")),
        _raised_by_replica(rapp.name, tiny_spec(loras=(LoraRef(ref=GOOD), LoraRef(ref=FAULTY)))),
        _raised_by_replica(rapp.name, tiny_spec(loras=(LoraRef(ref="none/missing.safetensors"),))),
    ]
    blobs = pickle.dumps([cloudpickle.dumps(e) for e in raised])
    out = subprocess.run([sys.executable, "-c", _NO_TORCH], input=blobs, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().split() == ["OutOfMemory:OUT_OF_MEMORY", "OutOfMemory:OUT_OF_MEMORY",
                                           "LoraNotFound:LORA_NOT_FOUND"]
