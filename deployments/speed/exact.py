"""CUDA speed modes for exact mode: attention backend, regional compilation, compile-safe LoRA slots.

Everything here keeps results within bf16 noise of the plain diffusers path (measured in
``benchmarks/gpu_bench.py``). On CPU :func:`apply_speed_modes` changes nothing, so CPU results stay
bit-exact.

Adapters on a compiled model. ``set_adapters`` on a compiled transformer recompiles (the
scaling becomes a new Python float), and so does loading a new adapter (new modules) or switching
the active adapter (a new guard). So, before the first forward, one LoRA *slot* of fixed rank
(``SpeedConfig.lora_hotswap_rank``) is created on every ``Linear`` of the transformer, with
scaling 1.0 and zero weights, and it never changes shape or Python attributes afterwards:

- a resident adapter is a set of GPU tensors (already converted, in the model dtype), with the
  scale peft would give each layer (``lora_alpha / r`` from the file's metadata, kohya's ``.alpha``
  already folded in by the converter, rsLoRA's ``alpha / sqrt(r)``) folded into its ``lora_B`` and
  ``lora_B.bias``;
- a request's adapters are written *into* the slot with in-place copies: adapter i occupies rank
  columns ``[o_i, o_i + r_i)``, its multiplier folded into its ``lora_B`` block, and the slot's
  ``lora_B`` bias holds ``sum_i m_i * s_i * bias_i`` (LightX2V-style ``diff_b``), so the slot adds
  ``sum_i m_i * s_i * (B_i @ A_i x + bias_i)``: what peft computes for several active adapters;
- a request without adapters turns the slot off (``_disable_adapters``, peft's own switch), which
  runs the plain ``Linear`` path: both variants are compiled during warm-up, so flipping between
  them later is a cache hit, not a recompile.

This is diffusers' ``enable_lora_hotswap`` idea (pad to a target rank, swap weights in place) done
with one slot instead of one per adapter, so several adapters cost one rank-R LoRA, multipliers
cost no recompile and the switch is a device-to-device copy. The limit: the ranks of one request's
adapters must add up to at most ``lora_hotswap_rank``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from ..config import SpeedConfig
from ..engine import compat
from ..errors import LoraIncompatible
from . import attention

log = logging.getLogger(__name__)

SLOT = "slot"  # the one adapter name peft sees on the compiled path

# Inductor keeps fused intermediates in fp32 unless told to round them to bf16 where eager does.
# Rounding like eager puts the compiled forward within attention-kernel noise of the reference
# (H200: 0.0071 relative L2 vs 0.0124 without; flash-vs-cuDNN eager is 0.0071) at the same speed
# (1.120 vs 1.117 s per forward). Without it the output is slightly closer to an fp32 forward
# (0.0102 vs 0.0119) but further from the reference server's, which exact mode is judged against.
EMULATE_PRECISION_CASTS = True


@dataclass
class ResidentAdapter:
    """One adapter kept on the device, ready to be copied into the slot."""

    name: str
    rank: int  # the largest rank over its layers: the slot columns it occupies
    # module -> (lora_A (r, in), scale * lora_B (out, r), scale * lora_B.bias (out,) or None)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.pairs.values() for t in ts if t is not None)


@dataclass(frozen=True)
class FixedAdapter:
    """A LoRA installed once beside the slot (turbo's distillation LoRA)."""

    name: str
    rank: int
    layers: frozenset
    nbytes: int
    strength: float


def resident_adapter(name: str, lora, device, dtype, strength: float = 1.0) -> ResidentAdapter:
    """A checked LoRA (``lora.files.CheckedLora``) as device tensors, peft's per-layer scale (times
    ``strength``) folded into B and its bias.

    Raises:
        LoraIncompatible: a key other than lora_A/lora_B(.bias), or a layer without both A and B.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.state_dict.items():
        module = key[len("transformer.") :] if key.startswith("transformer.") else key
        for part, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias")):
            if module.endswith(part):
                groups.setdefault(module[: -len(part)], {})[slot] = tensor
                break
        else:  # read_lora lets no other key through
            raise LoraIncompatible(f"LoRA key {key!r} is not supported with compiled blocks", {"key": key})
    rank = 0
    for module, g in groups.items():
        if module not in lora.scales or not {"A", "B"} <= set(g):
            raise LoraIncompatible(f"LoRA layer {module!r} has no slot or lacks lora_A/lora_B", {"module": module})
        rank = max(rank, g["A"].shape[0])

    def scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
        # the scale is applied in fp32, then rounded once to the model dtype
        t = t.to(device, torch.float32)
        return (t * scale if scale != 1.0 else t).to(dtype).contiguous()

    with torch.no_grad():
        pairs = {
            m: (
                g["A"].to(device, dtype).contiguous(),
                scaled(g["B"], lora.scales[m] * strength),
                scaled(g["bias"], lora.scales[m] * strength) if "bias" in g else None,
            )
            for m, g in groups.items()
        }
    return ResidentAdapter(name=name, rank=rank, pairs=pairs)


class LoraSlots:
    """A fixed-rank LoRA slot on every Linear of a transformer, written in place per request."""

    def __init__(self, transformer: torch.nn.Module, rank: int):
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"slot rank must be >= 1, got {rank}")
        self.rank = rank
        names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        ref = next(transformer.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        # A bias on every slot lora_B, zero unless an adapter brings one: a fixed graph either way,
        # and adding a zero bias leaves the LoRA output unchanged bit for bit.
        config = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, init_lora_weights=False, lora_bias=True
        )
        transformer.add_adapter(config, adapter_name=SLOT)
        from peft.tuners.lora import LoraLayer

        self.layers: dict[str, LoraLayer] = {}
        for name, module in transformer.named_modules():
            if isinstance(module, LoraLayer) and SLOT in module.lora_A:
                self.layers[name] = module
        missing = set(names) - set(self.layers)
        if missing:
            raise RuntimeError(f"LoRA slot not created on {sorted(missing)[:5]}")
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                # peft may upcast adapter weights to fp32; the LoRA matmuls must run in the model dtype.
                layer.lora_A[SLOT].to(device=self.device, dtype=self.dtype)
                layer.lora_B[SLOT].to(device=self.device, dtype=self.dtype)
                a, b, bias = layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight, layer.lora_B[SLOT].bias
                for t in (a, b, bias):
                    t.requires_grad_(False)
                    t.zero_()
                if layer.scaling[SLOT] != 1.0:
                    raise RuntimeError(f"slot scaling is {layer.scaling[SLOT]}, expected 1.0")
                self.A[name], self.B[name], self.bias[name] = a, b, bias
        self._dirty: set[str] = set()  # modules whose slot weights are non-zero
        self._current: tuple | None = ()  # (name, multiplier) pairs now in the slot; None = unknown
        self.transformer = transformer
        # What peft made each layer's active adapter: restored as is whenever the fixed adapter is off,
        # so the slot's own graphs see the same attributes as before one was installed.
        self._slot_active = {name: compat.active_adapter(layer) for name, layer in self.layers.items()}
        self.fixed: FixedAdapter | None = None
        self.fixed_on = False
        self.enable(False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.B, self.bias) for t in d.values())

    def enable(self, on: bool) -> None:
        """Slot on (LoRA path) or off (plain Linear path); both are compiled at warm-up."""
        self.enabled = on
        self._sync()

    def _sync(self) -> None:
        """Write the slot's and the fixed adapter's on/off state into every layer (peft's own switches,
        set directly: its setters also flip requires_grad)."""
        fixed = self.fixed if self.fixed_on else None
        for name, layer in self.layers.items():
            with_fixed = fixed is not None and name in fixed.layers
            if not with_fixed:
                compat.set_adapter_switches(layer, self._slot_active[name], disabled=not self.enabled)
            else:
                compat.set_adapter_switches(layer, ([SLOT] if self.enabled else []) + [fixed.name], disabled=False)

    def add_fixed(self, name: str, lora, strength: float = 1.0) -> "FixedAdapter":
        """Install a LoRA that never changes (turbo's distillation LoRA) as a peft adapter of its own,
        beside the slot, with ``strength`` and peft's scales folded into it; off until ``use_fixed(True)``.

        It stacks with the slot: the two add up as peft adds two active adapters. Call before the
        first forward (it adds modules).
        """
        from peft import LoraConfig

        if self.fixed is not None:
            raise RuntimeError(f"a fixed adapter is already installed ({self.fixed.name})")
        resident = resident_adapter(name, lora, self.device, self.dtype, strength)
        unknown = sorted(set(resident.pairs) - set(self.layers))
        if unknown:
            raise LoraIncompatible(f"fixed LoRA layers without a slot: {unknown[:5]}", {"modules": unknown[:20]})
        has_bias = any(bias is not None for _, _, bias in resident.pairs.values())
        config = LoraConfig(r=resident.rank, lora_alpha=resident.rank, lora_dropout=0.0,
                            target_modules=sorted(resident.pairs), init_lora_weights=False, lora_bias=has_bias)
        self.transformer.add_adapter(config, adapter_name=name)
        with torch.no_grad():
            for module, (a, b, bias) in resident.pairs.items():
                layer = self.layers[module]
                layer.lora_A[name].to(device=self.device, dtype=self.dtype)
                layer.lora_B[name].to(device=self.device, dtype=self.dtype)
                if layer.scaling[name] != 1.0:
                    raise RuntimeError(f"fixed adapter scaling is {layer.scaling[name]}, expected 1.0")
                dst_a, dst_b = layer.lora_A[name].weight, layer.lora_B[name].weight
                for t in (dst_a, dst_b):
                    t.requires_grad_(False)
                    t.zero_()
                r = a.shape[0]  # a lower-rank layer fills the first columns; the rest stay zero
                dst_a[:r].copy_(a)
                dst_b[:, :r].copy_(b)
                dst_bias = layer.lora_B[name].bias
                if dst_bias is not None:
                    dst_bias.requires_grad_(False)
                    dst_bias.zero_()
                    if bias is not None:
                        dst_bias.copy_(bias)
        self.transformer.eval()  # peft makes new modules in training mode
        self.fixed = FixedAdapter(name=name, rank=resident.rank, layers=frozenset(resident.pairs),
                                  nbytes=resident.nbytes, strength=strength)
        self._sync()
        return self.fixed

    def use_fixed(self, on: bool) -> None:
        """The fixed adapter on or off (a graph variant of its own, compiled at warm-up)."""
        if on and self.fixed is None:
            raise RuntimeError("no fixed adapter installed")
        if on != self.fixed_on:
            self.fixed_on = on
            self._sync()

    def prepare(self, name: str, lora) -> ResidentAdapter:
        """Turn a checked LoRA (``lora.files.CheckedLora``) into a resident adapter on the device.

        Raises:
            LoraIncompatible: a rank above the slot's.
        """
        resident = resident_adapter(name, lora, self.device, self.dtype)
        unknown = [m for m in resident.pairs if m not in self.layers]
        if unknown:
            raise LoraIncompatible(f"LoRA layer {unknown[0]!r} has no slot", {"module": unknown[0]})
        if resident.rank > self.rank:
            raise LoraIncompatible(
                f"LoRA rank {resident.rank} exceeds the compiled slot rank {self.rank} (speed.lora_hotswap_rank)",
                {"rank": resident.rank, "slot_rank": self.rank},
            )
        return resident

    def invalidate(self, name: str | None = None) -> None:
        """Forget what the slot holds (all, or if it holds ``name``), so the next apply rewrites it."""
        if name is None or (self._current and any(n == name for n, _ in self._current)):
            self._current = None

    def apply(self, entries: list[tuple[ResidentAdapter, float]]) -> bool:
        """Put these adapters with their multipliers into the slot; [] turns the slot off.

        Returns True if the slot weights were rewritten.
        Raises:
            LoraIncompatible: the adapters' ranks add up to more than the slot's rank.
        """
        if not entries:
            if self.enabled:
                self.enable(False)
            return False
        key = tuple((adapter.name, float(m)) for adapter, m in entries)
        if key == self._current:
            if not self.enabled:
                self.enable(True)
            return False
        total = sum(adapter.rank for adapter, _ in entries)
        if total > self.rank:
            raise LoraIncompatible(
                f"the request's LoRAs have total rank {total}, above the compiled slot rank {self.rank}",
                {"total_rank": total, "slot_rank": self.rank},
            )
        with torch.no_grad():
            if self._dirty:
                torch._foreach_zero_([t for n in self._dirty for t in (self.A[n], self.B[n], self.bias[n])])
            dst: list[torch.Tensor] = []
            src: list[torch.Tensor] = []
            scaled: dict[float, list[torch.Tensor]] = {}
            offset = 0
            dirty = set()
            for adapter, multiplier in entries:
                for module, (a, b, _) in adapter.pairs.items():
                    r = a.shape[0]
                    b_view = self.B[module][:, offset : offset + r]
                    dst += [self.A[module][offset : offset + r], b_view]
                    src += [a, b]
                    if multiplier != 1.0:
                        scaled.setdefault(float(multiplier), []).append(b_view)
                    dirty.add(module)
                offset += adapter.rank
            torch._foreach_copy_(dst, src)
            for multiplier, views in scaled.items():
                torch._foreach_mul_(views, multiplier)
            for adapter, multiplier in entries:  # biases of several adapters add up in one vector
                biased = [(self.bias[m], bias) for m, (_, _, bias) in adapter.pairs.items() if bias is not None]
                if biased:
                    torch._foreach_add_([d for d, _ in biased], [b for _, b in biased], alpha=float(multiplier))
        self._dirty = dirty
        self._current = key
        if not self.enabled:
            self.enable(True)
        return True


def apply_speed_modes(pipe, speed: SpeedConfig, device) -> dict:
    """Apply the exact-mode speed-ups on CUDA; on any other device change nothing.

    Must run before any adapter is loaded and before the first forward.
    Returns:
        A report: ``applied``, ``attention_backend``, ``compiled``, ``emulate_precision_casts``,
        ``lora_slot_rank``, ``lora_slot_bytes``, ``seconds``, and ``lora_slots`` (the
        :class:`LoraSlots` or None).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {"applied": False, "reason": f"device {device.type}", "lora_slots": None}
    return _apply(pipe, speed)


def _apply(pipe, speed: SpeedConfig) -> dict:
    """The speed modes, device-agnostic (CPU tests call this directly to exercise compile + slots)."""
    t0 = time.perf_counter()
    transformer = pipe.transformer
    report: dict = {"applied": True, "attention_backend": None, "compiled": False, "lora_slot_rank": 0}
    if speed.attention_backend:
        backend, why = attention.resolve(speed.attention_backend, next(transformer.parameters()).device)
        attention.set_backend(transformer, backend)
        report["attention_backend"] = backend
        if why:
            report["attention_fallback"] = why
    slots = None
    if speed.compile_blocks:
        if speed.lora_hotswap_rank > 0:
            slots = LoraSlots(transformer, speed.lora_hotswap_rank)
            report["lora_slot_rank"] = slots.rank
            report["lora_slot_bytes"] = slots.nbytes
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "emulate_precision_casts"):  # process-wide, read at compile time
            inductor_config.emulate_precision_casts = EMULATE_PRECISION_CASTS
            report["emulate_precision_casts"] = EMULATE_PRECISION_CASTS
        report["recompile_limit"] = _raise_recompile_limit(speed, slots is not None)
        # Compilation itself happens at the first forward (the warm-up).
        transformer.compile_repeated_blocks(fullgraph=True)
        report["compiled"] = True
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["lora_slots"] = slots
    return report


def _raise_recompile_limit(speed: SpeedConfig, with_slot: bool) -> int:
    """Room for every graph the warm-up compiles: one per size, speed mode (its kernels and adapters) and
    slot state, twice over for dynamo's own re-specialisations. Past the limit dynamo would silently run
    the block eagerly."""
    import torch._dynamo.config as dynamo_config

    needed = 2 * len(speed.enabled_modes()) * (2 if with_slot else 1) * (1 + len(speed.extra_warmup_sizes))
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(dynamo_config, name), needed)
    setattr(dynamo_config, name, limit)  # process-wide, like the inductor setting above
    return limit


def _zero_lora_file(directory: str, shapes: dict[str, tuple[int, int]]) -> str:
    """A rank-1 all-zero ai-toolkit LoRA on one layer: it switches the slot on and changes nothing."""
    from safetensors.torch import save_file

    fan_in, fan_out = shapes["blocks.0.attn1.to_q"]
    path = os.path.join(directory, "warmup-zero.safetensors")
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(1, fan_in),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(fan_out, 1),
        },
        path,
    )
    return path


WARMUP_LORA_REF = "__warmup_zero_lora__"


def warmup_spec(speed: SpeedConfig, steps: int = 2, loras: tuple = (), size: tuple[int, int, int] | None = None,
                mode: str = "exact"):
    """A warm-up request: the configured size (or ``size``), CFG on (turbo: its own steps, no CFG), a random
    picture."""
    import io

    import numpy as np
    from PIL import Image

    from ..spec import GenerationSpec

    width, height, frames = size or (speed.warmup_width, speed.warmup_height, speed.warmup_frames)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return GenerationSpec(
        prompt="warm-up",
        negative_prompt="",
        width=width,
        height=height,
        num_frames=frames,
        fps=16,
        steps=speed.turbo.steps if mode == "turbo" else steps,
        guidance_scale=1.0 if mode == "turbo" else 4.0,
        seed=0,
        image_png=buf.getvalue(),
        loras=loras,
        speed=mode,
    )


def warmup(generator, speed: SpeedConfig) -> dict:
    """Compile at replica start: at the warm-up size (and each of ``extra_warmup_sizes``), for each
    enabled speed mode, one generation without LoRA and, if the slot exists, one with a zero LoRA
    through the public adapter path (the slot-on variant is a graph of its own, and so is each mode's
    kernel and adapter set).

    Returns seconds per part (``base_s``, ``lora_s`` for exact mode; ``fast_base_s``... for the others).
    """
    from ..spec import LoraRef

    out: dict = {}
    t0 = time.perf_counter()
    sizes = [None] + [tuple(s) for s in speed.extra_warmup_sizes]
    modes = getattr(getattr(generator, "modes", None), "enabled", ("exact",))
    for size in sizes:
        tag = "" if size is None else f"_{size[0]}x{size[1]}x{size[2]}"
        for mode in modes:
            prefix = "" if mode == "exact" else f"{mode}_"
            t1 = time.perf_counter()
            generator.generate(warmup_spec(speed, steps=2 if size is None else 1, size=size, mode=mode))
            out[f"{prefix}base{tag}_s"] = round(time.perf_counter() - t1, 2)
            if getattr(generator, "_slots", None) is not None:
                loads = generator.adapter_loads
                t1 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    path = _zero_lora_file(tmp, generator._shapes)
                    generator.load_adapter(WARMUP_LORA_REF, path)
                try:
                    generator.generate(warmup_spec(speed, steps=1, loras=(LoraRef(ref=WARMUP_LORA_REF),), size=size,
                                                   mode=mode))
                finally:
                    generator.delete_adapter(WARMUP_LORA_REF)
                    generator.adapter_loads = loads
                    generator._slots.apply([])
                out[f"{prefix}lora{tag}_s"] = round(time.perf_counter() - t1, 2)
    out["total_s"] = round(time.perf_counter() - t0, 2)
    return out
