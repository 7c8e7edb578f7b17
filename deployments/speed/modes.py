"""Per-request speed modes in one pipeline: ``exact`` (today's path), ``fast`` and ``turbo``.

Every mode uses the same loaded base model; switching changes only references, never weights:

- kernels: the block linears swap between the model's own bf16 modules and FP8 copies made once at
  start (torchao float8, dynamic per-row scales; CUDA with compute capability >= 8.9). The copies
  cost about half the block weights' memory again (16.4 B parameters: ~15 GiB) and keep exact mode's
  modules untouched, so exact mode stays bit for bit what it was. On any other device there is no
  conversion: fast and turbo run the same code without it, and each result says so;
- attention: a mode may name its own diffusers backend; exact mode's per-processor state is saved
  and put back as it was (``reset_attention_backend`` is not the same thing);
- step cache (fast only): ``step_cache.StepCache`` with a schedule made before the request from the
  calibrated magnitude ratios;
- turbo: the distillation LoRA, resident once and switched on for turbo requests only (the
  generator owns adapters), and the distillation's scheduler (``turbo.DistillScheduler``).

With compiled blocks each kernel/adapter combination is a graph of its own; the warm-up compiles
all of them (``exact.warmup``), so alternating modes afterwards never recompiles.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from ..config import SpeedConfig
from ..engine import compat
from ..errors import SpeedModeNotSupported, SpeedModeUnavailable
from . import attention
from .step_cache import StepCache, magcache_schedule
from .turbo import DistillScheduler

log = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # float8 matmuls (torch._scaled_mm): Ada and Hopper and later


FP8_SETTINGS = "gpu.model.speed.fast.fp8 and gpu.model.speed.turbo.fp8"


def torchao_fp8_converter(device: torch.device, setting: str = FP8_SETTINGS, weight_only_fallback: bool = False):
    """A function turning a bf16 ``nn.Linear`` into an FP8 copy (torchao float8, dynamic per-row scales).

    Args:
        device: the CUDA device the copies run on.
        setting: the config setting that asked for FP8, named in the errors.
        weight_only_fallback: below compute capability 8.9 (no float8 matmuls), FP8 weights with bf16
            matmuls (torchao float8 weight-only: the memory saving without the speed) instead of an error.
    Raises:
        SpeedModeUnavailable: torchao is not installed, or the card cannot run float8 matmuls.
    """
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as e:
        raise SpeedModeUnavailable(
            f"{setting} asks for FP8 linears but torchao is not installed: pip install 'wan-i2v-serve[cuda]' "
            "(torchao>=0.18), or turn it off",
            {"missing": "torchao", "setting": setting},
        ) from e
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY and not weight_only_fallback:
        raise SpeedModeUnavailable(
            f"FP8 linears need compute capability >= 8.9 (Ada/Hopper); this card has {capability[0]}.{capability[1]}: "
            f"turn off {setting}",
            {"capability": list(capability), "setting": setting},
        )
    if capability < FP8_MIN_CAPABILITY:
        config = Float8WeightOnlyConfig()
    else:
        # set_inductor_config=False: torchao would otherwise change process-wide inductor settings, and
        # with them exact mode's compiled kernels.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)

    def convert(linear: torch.nn.Linear) -> torch.nn.Module:
        holder = torch.nn.Sequential(copy.deepcopy(linear))  # quantize_ replaces children, so give it a parent
        quantize_(holder, config)
        return holder[0]

    return convert


class KernelSwap:
    """Two versions of some Linear modules (the model's own, a converted copy); one is in place at a time.

    Owners are looked up at each swap, so a Linear that peft wraps later (an adapter loaded on the
    eager path) is swapped inside its wrapper (``base_layer``).
    """

    def __init__(self, transformer: torch.nn.Module, names: list[str], convert):
        self.transformer = transformer
        self.names = list(names)
        self.plain: dict[str, torch.nn.Module] = {}
        self.converted: dict[str, torch.nn.Module] = {}
        for name in self.names:
            owner, attr = self._locate(name)
            module = getattr(owner, attr)
            self.plain[name] = module
            self.converted[name] = convert(module)
        self.on = False

    def _locate(self, name: str) -> tuple[torch.nn.Module, str]:
        module = self.transformer.get_submodule(name)
        if hasattr(module, "base_layer"):  # a peft LoRA wrapper: the Linear is inside it
            return module, "base_layer"
        parent, _, attr = name.rpartition(".")
        return self.transformer.get_submodule(parent), attr

    def use(self, converted: bool) -> None:
        if converted == self.on:
            return
        table = self.converted if converted else self.plain
        for name in self.names:
            owner, attr = self._locate(name)
            setattr(owner, attr, table[name])
        self.on = converted

    @property
    def nbytes(self) -> int:
        total = 0
        for module in self.converted.values():
            for t in list(module.parameters()) + list(module.buffers()):
                inner = getattr(t, "qdata", None)  # torchao's float8 tensor: its payload and scales
                if inner is not None:
                    total += inner.numel() * inner.element_size()
                    scale = getattr(t, "scale", None)
                    total += scale.numel() * scale.element_size() if scale is not None else 0
                else:
                    total += t.numel() * t.element_size()
        return total


class AttentionSwitch:
    """Exact mode's attention backend and, per mode, another one; exact's state is put back exactly.

    ``set_attention_backend`` also sets diffusers' process-wide active backend (what a processor without
    one of its own runs), which ``reset_attention_backend`` leaves changed: both are saved and restored.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.saved = {id(p): (p, compat.processor_backend(p)) for p in compat.attention_processors(transformer)}
        self.saved_active = compat.active_attention_backend()
        self.current: str | None = None  # None: exact mode's

    def use(self, backend: str | None) -> None:
        if backend == self.current:
            return
        if backend is None:
            for processor, value in self.saved.values():
                compat.set_processor_backend(processor, value)
            compat.set_active_attention_backend(self.saved_active)
        else:
            attention.set_backend(self.transformer, backend)
        self.current = backend


@dataclass
class ModeRun:
    """One request's mode, as the generator runs it and the result reports it."""

    mode: str
    scheduler: object | None  # turbo's scheduler; None: the request's sampler
    fp8: bool
    attention_backend: str | None
    branches: int


class SpeedModes:
    """The fast and turbo modes of one pipeline, installed once; ``begin``/``end`` around each request."""

    def __init__(self, pipe, speed: SpeedConfig, device: torch.device, exact_backend: str | None,
                 linear_names: list[str], convert=None, weights_fp8: bool = False):
        """Install what the enabled modes need.

        Args:
            pipe: the loaded pipeline (its transformer is changed in place: block list, FP8 copies).
            speed: the replica's speed config.
            device: where the model runs; FP8 only on CUDA.
            exact_backend: the attention backend exact mode runs (reported only).
            linear_names: the Linears to give FP8 copies (the block linears, named as in the base model).
            convert: Linear -> converted copy; default: torchao FP8 on CUDA when a mode asks for it,
                nothing elsewhere. Tests pass their own to exercise the swap on CPU.
            weights_fp8: the block linears already are FP8 (``gpu.memory`` fp8 or offload): every mode runs
                them, and no copies are made.
        Raises:
            SpeedModeUnavailable: FP8 asked for on CUDA without torchao or a capable card.
        """
        self.speed = speed
        self.device = device
        self.transformer = pipe.transformer
        self.enabled = speed.enabled_modes()
        self.exact_backend = exact_backend
        wants_fp8 = any(getattr(speed, m).fp8 for m in ("fast", "turbo") if m in self.enabled)
        self.fp8_note: str | None = None
        self.kernels: KernelSwap | None = None
        self.weights_fp8 = weights_fp8
        if wants_fp8 and not weights_fp8:
            if convert is None and device.type == "cuda":
                convert = torchao_fp8_converter(device)
            if convert is None:
                self.fp8_note = (f"FP8 linears need CUDA (compute capability >= 8.9); on {device.type} this mode runs "
                                 "the same path without the FP8 conversion")
            else:
                self.kernels = KernelSwap(self.transformer, linear_names, convert)
        self.attention = AttentionSwitch(self.transformer)
        # auto / flash4 resolved once, here: a mode's kernel is fixed for the replica's life
        self.backends = {m: attention.resolve(getattr(speed, m).attention_backend, device)[0]
                         for m in ("fast", "turbo") if m in self.enabled}
        cache_cfg = speed.fast.step_cache
        self.cache = StepCache(self.transformer) if "fast" in self.enabled and cache_cfg.enabled else None
        self.turbo_scheduler = None
        if "turbo" in self.enabled:
            t = speed.turbo
            self.turbo_scheduler = DistillScheduler(denoising_step_list=tuple(t.denoising_step_list), shift=t.shift)

    def check(self, spec) -> None:
        """Refuse a request this replica cannot run in its mode (before anything changes).

        Raises:
            SpeedModeNotSupported: a mode not enabled here, or a turbo request with another step count.
        """
        mode = spec.speed
        if mode not in self.enabled:
            raise SpeedModeNotSupported(f"speed mode {mode!r} is not enabled on this replica",
                                        {"speed": mode, "allowed": list(self.enabled)})
        if mode == "turbo" and spec.steps != self.speed.turbo.steps:
            raise SpeedModeNotSupported(f"turbo runs {self.speed.turbo.steps} steps, the request has {spec.steps}",
                                        {"speed": mode, "steps": spec.steps})

    def begin(self, spec, generator: torch.Generator) -> ModeRun:
        """Set kernels, attention, step cache and scheduler for this request's mode (cheap: references only)."""
        self.check(spec)
        mode = spec.speed
        cfg = getattr(self.speed, mode) if mode != "exact" else None
        fp8 = self.weights_fp8 or (cfg is not None and cfg.fp8 and self.kernels is not None)
        if self.kernels is not None:
            self.kernels.use(fp8)
        backend = self.backends.get(mode)
        self.attention.use(backend)
        branches = 2 if spec.guidance_scale > 1 else 1  # CFG only when guidance > 1, as diffusers does
        scheduler = None
        if self.cache is not None:
            schedule = None
            if mode == "fast":
                c = self.speed.fast.step_cache
                schedule = magcache_schedule(c.mag_ratios, spec.steps, branches, c.threshold, c.max_skips,
                                             c.retention_ratio)
            self.cache.begin(schedule, branches)
        if mode == "turbo":
            scheduler = self.turbo_scheduler
            scheduler.generator = generator
        return ModeRun(mode=mode, scheduler=scheduler, fp8=fp8, attention_backend=backend or self.exact_backend,
                       branches=branches)

    def end(self, run: ModeRun | None) -> dict:
        """After a request (also a failed one): drop cached residuals and put exact mode's kernels and
        attention back, so that between requests the model is exact mode's (a direct forward, a LoRA
        load, a benchmark sees the model's own modules); the report of what the mode did."""
        cache_run = self.cache.end() if self.cache is not None else None
        self.plain()
        if run is None:
            return {}
        if self.turbo_scheduler is not None:
            self.turbo_scheduler.generator = None
        report: dict = {"mode": run.mode, "fp8": run.fp8, "attention_backend": run.attention_backend}
        if run.mode != "exact" and not run.fp8 and self.fp8_note:
            report["fp8_note"] = self.fp8_note
        if cache_run is not None:
            c = self.speed.fast.step_cache
            report["forwards_computed"] = cache_run.computed
            report["forwards_skipped"] = cache_run.skipped
            report["step_cache"] = {
                "rule": "magcache", "threshold": c.threshold, "max_skips": c.max_skips,
                "retention_ratio": c.retention_ratio, "ratios_source": c.ratios_source,
                "skipped_forwards": cache_run.skipped_forwards,
            }
        if run.mode == "turbo":
            t = self.speed.turbo
            report["scheduler"] = {"name": "lightx2v_step_distill", "denoising_step_list": list(t.denoising_step_list),
                                   "shift": t.shift}
        return report

    def plain(self) -> None:
        """Exact mode's kernels and attention in place (before adapters load: peft must wrap the model's own)."""
        if self.kernels is not None:
            self.kernels.use(False)
        self.attention.use(None)

    def describe(self) -> dict:
        """What was installed, for the replica's speed report."""
        return {
            "enabled": list(self.enabled),
            "fp8_linears": len(self.kernels.names) if self.kernels is not None else 0,
            "fp8_weights": self.weights_fp8,
            "fp8_bytes": self.kernels.nbytes if self.kernels is not None else 0,
            "fp8_note": self.fp8_note,
            "step_cache": self.cache is not None,
        }
