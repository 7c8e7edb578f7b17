"""Turbo mode's scheduler (deployments/speed/turbo.py): LightX2V's step-distillation sampling.

Expected values come from the source's formulas worked out here, not from the module: LightX2V's
``WanStepDistillScheduler`` shifts the grid ``s = 1 - i/1000`` by ``5 s / (1 + 4 s)`` and takes
``i = 1000 - t`` for t in [1000, 750, 500, 250]: s = 1, .75, .5, .25 -> sigma = 1, 15/16, 5/6, 5/8.
"""

from __future__ import annotations

import os

import pytest
import torch

from deployments.speed.turbo import DistillScheduler

from .conftest import load_tiny

SIGMAS = [1.0, 15 / 16, 5 / 6, 5 / 8]


def test_sigmas_and_timesteps_follow_lightx2v():
    s = DistillScheduler()
    s.set_timesteps(4)
    assert torch.allclose(s.sigmas.double(), torch.tensor(SIGMAS, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(s.timesteps.double(), torch.tensor(SIGMAS, dtype=torch.float64) * 1000, atol=1e-3)
    other = DistillScheduler(denoising_step_list=(1000, 500), shift=3.0)  # s = 1, .5 -> 3 * .5 / 2 = .75
    assert torch.allclose(other.sigmas, torch.tensor([1.0, 0.75]))


def test_a_distilled_model_runs_its_own_step_count():
    with pytest.raises(ValueError, match="exactly 4 steps"):
        DistillScheduler().set_timesteps(25)


def test_step_is_clean_estimate_then_fresh_noise_at_the_next_sigma():
    s = DistillScheduler()
    s.set_timesteps(4)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 3, 4, 4, generator=g)
    vs = [torch.randn(1, 2, 3, 4, 4, generator=g) for _ in range(4)]
    s.generator = torch.Generator().manual_seed(11)
    noise = torch.Generator().manual_seed(11)  # the same stream, drawn by hand
    for i in range(4):
        out = s.step(vs[i], s.timesteps[i], x, return_dict=False)[0]
        x0 = x - SIGMAS[i] * vs[i]
        if i < 3:
            expected = (1 - SIGMAS[i + 1]) * x0 + SIGMAS[i + 1] * torch.randn(x.shape, generator=noise)
        else:
            expected = x0  # the last step returns the clean estimate
        assert torch.allclose(out, expected, atol=1e-6), i
        x = out


def test_turbo_on_the_tiny_model_feeds_the_distilled_timesteps_without_cfg(model_cache, small_spec, tmp_path):
    """The transformer sees exactly 4 forwards (no CFG) at timesteps 1000 * sigma, whatever the request asked."""
    from deployments.config import SpeedConfig
    from deployments.engine.pipeline import WanGenerator
    from deployments.lora.files import linear_shapes

    from .lora_factory import make_layout

    loaded = load_tiny(model_cache)
    distill = make_layout(tmp_path / "distill.safetensors", "lightx2v", linear_shapes(loaded.pipe.transformer), seed=5)
    gen = WanGenerator(loaded, SpeedConfig(turbo={"enabled": True, "lora": str(distill.path)}))
    seen = []
    hook = gen.pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    try:
        frames = gen.generate(small_spec(speed="turbo", steps=4, guidance_scale=1.0))
    finally:
        hook.remove()
    assert [round(float(t[0]), 3) for t in seen] == [round(1000 * s, 3) for s in SIGMAS]
    assert frames.speed["mode"] == "turbo" and frames.speed["forwards_computed"] == 4
    assert frames.speed["scheduler"] == {"name": "lightx2v_step_distill", "denoising_step_list": [1000, 750, 500, 250],
                                         "shift": 5.0}
    # the seed decides the re-noising too: the same request gives the same frames, another seed others
    assert (gen.generate(small_spec(speed="turbo", steps=4, guidance_scale=1.0)).frames == frames.frames).all()
    assert (gen.generate(small_spec(speed="turbo", steps=4, guidance_scale=1.0, seed=43)).frames != frames.frames).any()


def test_turbo_lora_under_an_object_root_is_fetched_into_the_node_cache_and_loaded(model_cache, tiny_shapes, small_spec, s3_server,
                                                                      tmp_path):
    """The distillation LoRA named under an s3:// root: fetched into the node's cache at start, checked, and
    giving the frames of the same file named by its local path; a missing one stops the start with its code."""
    import fsspec

    from deployments.config import GpuConfig, SpeedConfig
    from deployments.engine.pipeline import WanGenerator
    from deployments.errors import LoraNotFound
    from deployments.replica.startup import build_generator

    from .lora_factory import make_layout

    distill = make_layout(tmp_path / "distill.safetensors", "lightx2v", tiny_shapes, seed=5)
    prefix = f"{s3_server.bucket}/{tmp_path.name}"
    fsspec.filesystem("s3", **s3_server.options()).pipe_file(f"{prefix}/lightx2v/distill.safetensors",
                                                             distill.path.read_bytes())
    cache = tmp_path / "lora-cache"

    def config(lora: str) -> GpuConfig:
        return GpuConfig(
            model={"source": "tiny", "device": "cpu", "cache_dir": str(model_cache),
                   "speed": {"turbo": {"enabled": True, "lora": lora}}},
            lora={"root": f"s3://{prefix}", "cache_dir": str(cache), "storage_options": s3_server.options()})

    _, gen, report = build_generator(config("lightx2v/distill.safetensors"))
    path = gen.speed_report["turbo_lora"]["path"]
    assert os.path.dirname(path) == str(cache) and open(path, "rb").read() == distill.path.read_bytes()
    assert gen.distill_loads == 1 and "distill_lora_s" in report

    local = WanGenerator(load_tiny(model_cache), SpeedConfig(turbo={"enabled": True, "lora": str(distill.path)}))
    spec = small_spec(speed="turbo", steps=4, guidance_scale=1.0)
    assert (gen.generate(spec).frames == local.generate(spec).frames).all()

    with pytest.raises(LoraNotFound) as e:
        build_generator(config("lightx2v/missing.safetensors"))
    assert e.value.details == {"ref": "lightx2v/missing.safetensors"}
