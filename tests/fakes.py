"""A generator that fails or slows down on cue, for the tests that need a generation to do so.

``FaultyGenerator`` is the real ``WanGenerator`` (the real tiny pipeline underneath) with faults put
in through its own entry points, so product code holds no test switch. Apps under test name it in
their config, and every replica and rank process imports it from there:

    gpu.replica.generator_factory: "tests.fakes:FaultyGenerator"
    gpu.replica.generator_options: {fail_prompt_substring: ..., slow_prompt_substring: ..., ...}

(Ray's workers import ``tests`` because they get the driver's ``sys.path``.)
"""

from __future__ import annotations

import time
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from deployments.engine.pipeline import WanGenerator
from deployments.spec import GenerationSpec, Progress

FACTORY = "tests.fakes:FaultyGenerator"


class Faults(BaseModel):
    """What fails and what is slow: off unless set."""

    model_config = ConfigDict(extra="forbid")

    fail_prompt_substring: str | None = Field(
        None, description="a prompt containing this raises fail_kind inside the replica")
    fail_kind: Literal["oom", "bad_weights"] = "oom"
    fail_stages: list[Literal["denoise", "activate", "load_lora"]] = Field(
        default_factory=lambda: ["denoise"],
        description="where the fault is raised: in a denoising step, while the request's adapters are set "
        "(outside the pipeline call), or while a LoRA whose reference contains the substring is loaded "
        "(the loader never sees the prompt)")
    slow_prompt_substring: str | None = Field(
        None, description="a prompt containing this sleeps step_delay_s after each denoising step")
    step_delay_s: float = Field(0.0, description="the sleep per step of a slow prompt")


def raise_fault(kind: str, where: str) -> None:
    """Raise what a fault stands for: a real torch OOM, or a broken run."""
    if kind == "oom":
        raise torch.OutOfMemoryError(f"injected fault ({where}): CUDA out of memory")
    raise RuntimeError(f"injected fault ({where}): weights produced NaN")


class FaultyGenerator(WanGenerator):
    """``WanGenerator`` that raises (or sleeps) where ``Faults`` says, then does the real work."""

    def __init__(self, loaded, speed=None, turbo_lora: str | None = None, **faults):
        self.faults = Faults(**faults)
        super().__init__(loaded, speed, turbo_lora=turbo_lora)

    def _fails(self, text: str, stage: str) -> bool:
        f = self.faults
        return bool(f.fail_prompt_substring) and f.fail_prompt_substring in text and stage in f.fail_stages

    def load_adapter(self, ref: str, path: str, max_header_bytes: int = 16 * 1024**2) -> str:
        if self._fails(ref, "load_lora"):
            raise_fault(self.faults.fail_kind, "load_lora")
        return super().load_adapter(ref, path, max_header_bytes)

    def generate(self, spec: GenerationSpec, on_progress: Callable[[Progress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, stream_video: bool = False):
        f = self.faults
        if self._fails(spec.prompt, "activate"):
            self.modes.check(spec)  # a speed mode the replica does not run is refused first, as without faults
            raise_fault(f.fail_kind, "activate")
        fail_in_steps = self._fails(spec.prompt, "denoise")
        delay = f.step_delay_s if f.slow_prompt_substring and f.slow_prompt_substring in spec.prompt else 0.0
        if not (fail_in_steps or delay):
            return super().generate(spec, on_progress, should_cancel, stream_video)
        inner = on_progress or (lambda p: None)

        def progress(p: Progress) -> None:
            # After each denoising step (step 0 is the stage's start, before any step): inside the
            # pipeline's step callback, where a real failure of a step surfaces.
            if p.stage == "denoising" and p.step > 0:
                if delay:
                    time.sleep(delay)
                if fail_in_steps:
                    raise_fault(f.fail_kind, "denoise")
            inner(p)

        return super().generate(spec, progress, should_cancel, stream_video)
