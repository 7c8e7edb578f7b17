"""Model sources (deployments/engine/models.py): the tiny checkpoint is deterministic, is a miniature of the
real Wan 2.1 I2V checkpoint (same classes, same image cross-attention path, same scheduler), and
loads through the one ``from_pretrained`` path whether named ``tiny`` or given as a directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deployments.config import ModelConfig
from deployments.engine.models import build_tiny, ensure_tiny, load_pipeline, pipeline_loads

from .conftest import load_tiny

COMPONENTS = ("transformer", "text_encoder", "image_encoder", "vae")


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    a = build_tiny(tmp_path_factory.mktemp("tiny_a"))
    b = build_tiny(tmp_path_factory.mktemp("tiny_b"))
    return Path(a), Path(b)


def files_of(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        assert a[key].dtype == b[key].dtype, f"{what}: {key}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_building_twice_gives_identical_checkpoints(two_builds):
    a, b = two_builds
    files_a, files_b = files_of(a), files_of(b)
    assert files_a.keys() == files_b.keys()
    weights = [name for name in files_a if name.endswith(".safetensors")]
    assert {name.split("/")[0] for name in weights} == set(COMPONENTS)
    for name in weights:
        assert_same_tensors(load_file(files_a[name]), load_file(files_b[name]), name)
    # Tokenizer, configs, index: byte for byte.
    for name in files_a:
        if not name.endswith(".safetensors"):
            assert files_a[name].read_bytes() == files_b[name].read_bytes(), name
    assert any(name.startswith("tokenizer/") for name in files_a)


def test_weights_are_not_trivial(two_builds):
    a, _ = two_builds
    for component in COMPONENTS:
        (weights,) = (a / component).glob("*.safetensors")
        tensors = load_file(weights)
        matrices = [t for t in tensors.values() if t.ndim >= 2]
        assert matrices, component
        assert all(torch.isfinite(t).all() for t in tensors.values()), component
        # Random, not a default-initialised shell (norm scales of ones are constant by design).
        varied = sum(float(t.float().std()) > 0 for t in matrices)
        assert varied >= len(matrices) / 2, component


def test_session_checkpoint_equals_a_fresh_build(two_builds, tiny_dir):
    a, _ = two_builds
    for component in COMPONENTS:
        (fresh,) = (a / component).glob("*.safetensors")
        (session,) = (tiny_dir / component).glob("*.safetensors")
        assert_same_tensors(load_file(fresh), load_file(session), component)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def from_dir(two_builds, tmp_path_factory):
    """The fresh build loaded by directory path (not ``tiny``); its cache_dir stays empty."""
    a, _ = two_builds
    cache = tmp_path_factory.mktemp("unused_cache")
    return load_pipeline(ModelConfig(source=str(a), device="cpu", cache_dir=str(cache)))


@pytest.fixture(scope="module")
def tiny_loaded(model_cache):
    """The ``tiny`` source loaded afresh: the session's shared pipeline may carry PEFT wrappers
    (and another sampler) from tests that loaded adapters into it, which changes its state dicts."""
    return load_tiny(model_cache)


def test_directory_and_tiny_sources_load_the_same_weights(from_dir, tiny_loaded):
    assert from_dir.source != tiny_loaded.source == "tiny"
    for component in COMPONENTS:
        assert_same_tensors(
            getattr(from_dir.pipe, component).state_dict(),
            getattr(tiny_loaded.pipe, component).state_dict(),
            component,
        )


@pytest.mark.parametrize("component", COMPONENTS)
def test_loaded_weights_are_the_saved_ones(tiny_loaded, tiny_dir, component):
    """Nothing is re-initialised on load (a key prefix mismatch would only warn)."""
    (weights,) = (tiny_dir / component).glob("*.safetensors")
    saved = load_file(weights)
    state = getattr(tiny_loaded.pipe, component).state_dict()
    assert saved, component
    for key, tensor in saved.items():
        assert key in state, f"{component}: {key} not in the loaded model"
        assert torch.equal(state[key], tensor), f"{component}: {key} differs after load"
    # Every loaded parameter came from the file (tied embeddings share one stored tensor).
    stored = {t.data_ptr() for k, t in state.items() if k in saved}
    for key, tensor in state.items():
        assert key in saved or tensor.data_ptr() in stored, f"{component}: {key} was not loaded"


def test_weights_read_straight_to_the_device_equal_those_read_through_host_memory(model_cache, tiny_loaded):
    # model.load_direct (the default) reads each component's safetensors onto the device (a device map
    # of the device's type, on a GPU the current one); off, diffusers' default path then .to(device).
    assert tiny_loaded.pipe.hf_device_map == "cpu"
    via_host = load_pipeline(ModelConfig(source="tiny", device="cpu", cache_dir=str(model_cache), load_direct=False))
    assert via_host.pipe.hf_device_map is None
    for component in COMPONENTS:
        assert_same_tensors(getattr(via_host.pipe, component).state_dict(),
                            getattr(tiny_loaded.pipe, component).state_dict(), component)


def test_loaded_on_cpu_in_float32(tiny_loaded):
    assert tiny_loaded.device == torch.device("cpu")
    assert tiny_loaded.dtype == torch.float32
    for component in COMPONENTS:
        params = list(getattr(tiny_loaded.pipe, component).parameters())
        assert {p.dtype for p in params} == {torch.float32}, component
        assert {p.device.type for p in params} == {"cpu"}, component


def test_tiny_source_uses_the_cache_dir(model_cache, tiny_loaded):
    assert (model_cache / "tiny" / "model_index.json").is_file()
    assert not (model_cache / "hub").exists()  # a local checkpoint never touches the hub cache


# ---------------------------------------------------------------------------------------------
# a miniature of the real checkpoint
# ---------------------------------------------------------------------------------------------


def test_component_classes_match_the_real_checkpoint(from_dir, tiny_dir):
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPVisionModel, UMT5EncoderModel

    pipe = from_dir.pipe  # a pipeline no generator has touched (generate swaps the scheduler)
    assert type(pipe) is WanImageToVideoPipeline
    assert type(pipe.transformer) is WanTransformer3DModel
    assert type(pipe.text_encoder) is UMT5EncoderModel
    assert type(pipe.image_encoder) is CLIPVisionModel
    assert type(pipe.vae) is AutoencoderKLWan
    assert type(pipe.scheduler) is UniPCMultistepScheduler
    assert "CLIPImageProcessor" in type(pipe.image_processor).__name__
    assert "T5Tokenizer" in type(pipe.tokenizer).__name__
    assert getattr(pipe, "transformer_2", None) is None  # Wan 2.1: one transformer, no MoE

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]


def test_scheduler_is_the_checkpoints_unipc(from_dir):
    config = from_dir.pipe.scheduler.config
    assert config.flow_shift == 3.0
    assert config.prediction_type == "flow_prediction"
    assert config.use_flow_sigmas is True
    assert config.num_train_timesteps == 1000
    assert config.solver_order == 2
    assert config.solver_type == "bh2"


def test_transformer_has_the_image_cross_attention_path(tiny_loaded):
    transformer = tiny_loaded.pipe.transformer
    config = transformer.config
    assert config.added_kv_proj_dim == config.num_attention_heads * config.attention_head_dim
    assert config.image_dim == tiny_loaded.pipe.image_encoder.config.hidden_size
    assert config.in_channels == 36  # 16 noise + 16 image latents + 4 mask channels, as in I2V
    assert config.out_channels == 16
    assert config.text_dim == tiny_loaded.pipe.text_encoder.config.d_model
    assert transformer.condition_embedder.image_embedder is not None  # CLIP features -> context tokens
    for block in transformer.blocks:
        assert isinstance(block.attn2.add_k_proj, torch.nn.Linear)
        assert isinstance(block.attn2.add_v_proj, torch.nn.Linear)
        assert block.attn2.add_k_proj.in_features == config.added_kv_proj_dim


def test_vae_matches_the_wan_latent_layout(tiny_loaded):
    vae = tiny_loaded.pipe.vae
    assert vae.config.z_dim == 16
    assert list(vae.config.temperal_downsample) == [False, True, True]  # 4x in time, 8x in space


def test_tokenizer_knows_words_and_pads_to_512(tiny_loaded):
    tokenizer = tiny_loaded.pipe.tokenizer
    ids = tokenizer("a runner on a beach at sunset", add_special_tokens=True).input_ids
    assert tokenizer.unk_token_id not in ids  # transformers 5 can silently drop the vocab
    assert len(tokenizer) == tiny_loaded.pipe.text_encoder.config.vocab_size
    padded = tokenizer(["x"], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 512)


# ---------------------------------------------------------------------------------------------
# ensure_tiny, random-full
# ---------------------------------------------------------------------------------------------


def test_ensure_tiny_is_idempotent(model_cache):
    target = model_cache / "tiny"
    stamps = {name: path.stat().st_mtime_ns for name, path in files_of(target).items()}
    inode = target.stat().st_ino
    assert ensure_tiny(model_cache) == target
    assert ensure_tiny(model_cache) == target
    assert target.stat().st_ino == inode
    assert {name: path.stat().st_mtime_ns for name, path in files_of(target).items()} == stamps
    assert not list(model_cache.glob(".tiny-*"))  # no half-built leftovers


def test_random_full_refuses_cpu(tmp_path):
    loads = pipeline_loads()
    with pytest.raises(ValueError, match="cuda"):
        load_pipeline(ModelConfig(source="random-full", device="cpu", cache_dir=str(tmp_path)))
    assert not (tmp_path / "tiny").exists()  # refused before building anything
    assert pipeline_loads() == loads  # a refused load is not a load


def test_every_completed_load_is_counted(model_cache):
    """The replica's ``pipeline_loads`` comes from this counter: each real load must move it."""
    loads = pipeline_loads()
    first, second = load_tiny(model_cache), load_tiny(model_cache)
    assert first.pipe is not second.pipe
    assert pipeline_loads() == loads + 2


def test_loading_logs_no_torchvision_fallback_warning_and_other_transformers_warnings_pass(model_cache):
    """torchvision is left out on purpose: transformers' warning about it is dropped, and only it."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from deployments.config import ModelConfig\n"
        "from deployments.engine.models import load_pipeline\n"
        f"load_pipeline(ModelConfig(source='tiny', cache_dir={str(model_cache)!r}, device='cpu'))\n"
        "logging.getLogger('transformers.utils.import_utils').warning('another warning of that logger')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "requires torchvision" not in run.stderr
    assert "another warning of that logger" in run.stderr
