"""The generator contract: what a GPU replica calls on the thing that turns specs into frames.

Two generators implement it: ``engine.pipeline.WanGenerator`` (one pipeline in this process) and
``parallel.rank_group.RankGroup`` (the same calls, run by N rank processes together). The replica is given a
``GeneratorFactory`` (``WanI2VReplica(cfg, generator_factory)``), which makes one process's
``WanGenerator``-like generator from a loaded model; which factory is named in the config
(``gpu.replica.generator_factory``), so tests can put a fake that wraps the real one (``tests/fakes.py``)
in every replica and rank without product code knowing about it.

Torch-free: the ingress side may import this module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from .spec import GenerationSpec, Progress

DEFAULT_GENERATOR_FACTORY = "deployments.engine.pipeline:WanGenerator"


@runtime_checkable
class Generator(Protocol):
    """Spec -> frames with resident adapters; one call at a time (the replica's worker thread)."""

    adapters: dict[str, str]  # adapter name -> ref, what is resident
    adapter_loads: int  # LoRA files made resident so far (undone ones included)
    distill_loads: int  # times turbo's distillation LoRA was loaded (0 without turbo)

    @property
    def speed_modes(self) -> tuple[str, ...]:
        """The speed modes this generator runs (``exact`` always)."""
        ...

    def warmup(self) -> dict:
        """Compile and warm up now (idempotent); the warm-up's account ({} when nothing to do)."""
        ...

    def load_adapter(self, ref: str, path: str, max_header_bytes: int = ...) -> str:
        """Make the LoRA file at ``path`` resident for ``ref``; its adapter name. Idempotent."""
        ...

    def delete_adapter(self, ref: str) -> None:
        """Remove ``ref``'s adapter (nothing if not resident)."""
        ...

    def generate(self, spec: GenerationSpec, on_progress: Callable[[Progress], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, stream_video: bool = False) -> Any:
        """Run ``spec`` to ``engine.pipeline.Frames``. Raises typed errors (``Canceled``, ``OutOfMemory``, ...)."""
        ...


# (loaded model, speed config, turbo_lora=<file or None>) -> Generator
GeneratorFactory = Callable[..., Generator]


def parse_factory_path(path: str) -> tuple[str, str]:
    """``"module.sub:name"`` -> (module, name); ValueError quoting ``path`` for anything else."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"a generator factory is 'module:name' (e.g. {DEFAULT_GENERATOR_FACTORY!r}), got {path!r}")
    return module, name


@dataclass(frozen=True)
class ImportedFactory:
    """A ``GeneratorFactory`` named by import path, imported where it is first called (a GPU process).

    Naming it imports nothing, so the app builder binds one without loading torch; it pickles as its
    path, so a rank process imports the same factory itself.
    """

    path: str = DEFAULT_GENERATOR_FACTORY
    options: dict = field(default_factory=dict)  # keyword arguments for the factory, from the config

    def __post_init__(self):
        parse_factory_path(self.path)

    def resolve(self) -> Callable[..., Generator]:
        module, name = parse_factory_path(self.path)
        return getattr(importlib.import_module(module), name)

    def __call__(self, loaded, speed, turbo_lora: str | None = None) -> Generator:
        return self.resolve()(loaded, speed, turbo_lora=turbo_lora, **self.options)
