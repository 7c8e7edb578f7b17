"""Turbo mode's scheduler: the sampling a step-and-CFG-distillation LoRA was trained for.

Followed source: ModelTC/LightX2V, ``lightx2v/models/schedulers/wan/step_distill/scheduler.py``
(``WanStepDistillScheduler``), run for Wan 2.1 I2V with
``configs/distill/wan21/wan_i2v_distill_lora_4step_cfg.json``: ``denoising_step_list``
[1000, 750, 500, 250], ``sample_shift`` 5, ``enable_cfg`` false, the LoRA at strength 1.0.

- Sigmas: the 1000-entry grid ``linspace(1, 0, 1001)[:-1]`` (float32), shifted by
  ``shift * s / (1 + (shift - 1) * s)``; step ``t`` of the list takes grid entry ``1000 - t``. With
  shift 5: sigmas 1.0, 0.9375, 0.8333, 0.625; the transformer sees ``1000 * sigma`` as its timestep.
- Step: the model predicts the flow ``v = noise - x0``, so ``x0 = x - sigma * v``; before the last step
  ``x0`` is noised afresh to the next sigma, ``(1 - sigma') * x0 + sigma' * noise``, with new Gaussian
  noise (not an Euler step). LightX2V draws that noise from the run's seeded generator; here it comes
  from the request's CPU generator (the one the pipeline drew the initial latents from), so a seed
  gives the same video on any device, as in the other modes.

The distillation LoRA itself (``speed.turbo.lora``) is found like a request's LoRA: ``distill_lora_file``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

if TYPE_CHECKING:
    from ..config import GpuConfig


def distill_lora_file(cfg: "GpuConfig") -> str:
    """The distillation LoRA as a verified file on this node, fetched at most once per node.

    An absolute path is the operator's own file and is used as it is; anything else (a path under
    ``gpu.lora.root``, a directory or an object-store prefix, or a LoRA URL) resolves through this
    node's LoRA cache exactly as a request's LoRA does: the same root rules, checks, cache and codes.

    Raises:
        LoraNotFound (LORA_NOT_FOUND), LoraRefInvalid, LoraInvalid, LoraFetchFailed: the replica does not start.
    """
    from ..errors import LoraNotFound
    from ..lora.actor import resolve_on_node

    ref = cfg.model.speed.turbo.lora
    path = os.path.expanduser(ref)
    if os.path.isabs(path):
        if not os.path.isfile(path):
            raise LoraNotFound(f"speed.turbo.lora not found: {ref}", {"ref": ref})
        return path
    return resolve_on_node(ref, cfg.lora, cfg.fetch, cfg.model.token())


def distill_sigmas(denoising_step_list: Sequence[int], shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas of the distillation's steps, computed on LightX2V's grid (float32)."""
    grid = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    grid = shift * grid / (1 + (shift - 1) * grid)
    return grid[[num_train_timesteps - int(t) for t in denoising_step_list]]


class DistillScheduler(SchedulerMixin, ConfigMixin):
    """LightX2V's step-distillation sampler behind diffusers' scheduler interface (``set_timesteps``, ``step``)."""

    order = 1

    @register_to_config
    def __init__(self, denoising_step_list: Sequence[int] = (1000, 750, 500, 250), shift: float = 5.0,
                 num_train_timesteps: int = 1000):
        self.sigmas = distill_sigmas(denoising_step_list, shift, num_train_timesteps)
        self.timesteps = self.sigmas * num_train_timesteps
        self.generator: torch.Generator | None = None
        self.step_index = 0

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        steps = len(self.config.denoising_step_list)
        if num_inference_steps != steps:
            raise ValueError(f"the distilled model runs exactly {steps} steps, got {num_inference_steps}")
        self.timesteps = (self.sigmas * self.config.num_train_timesteps).to(device)
        self.step_index = 0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, **_):
        """One distilled step: the clean estimate, noised again to the next sigma unless it is the last."""
        i = self.step_index
        sigma = float(self.sigmas[i])
        x0 = sample.to(torch.float32) - sigma * model_output.to(torch.float32)
        if i + 1 < len(self.sigmas):
            nxt = float(self.sigmas[i + 1])
            noise = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32, device="cpu").to(x0.device)
            x0 = (1 - nxt) * x0 + nxt * noise
        self.step_index = i + 1
        prev = x0.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
