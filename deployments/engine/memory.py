"""Memory modes (``gpu.memory``): the 480P model with its LoRAs on 80, 48 and 24 GB cards.

- ``full``: every weight in the model dtype on the GPU (what the speed figures are measured on).
- ``fp8``: the transformer's block linears (16.2 of its 16.4 B parameters) stored in FP8, in place,
  made by the fast mode's converter (``speed.modes.torchao_fp8_converter``: torchao float8, dynamic per-row
  activation scales; weight-only FP8 on cards without float8 matmuls). Nothing else changes: LoRA
  adapters stay bf16 beside the FP8 base layer (peft wraps the quantized ``Linear``; adapters are never
  merged into it, so a LoRA switch touches only adapter tensors), compiled blocks and the LoRA slot work
  as in fast mode, which then needs no FP8 copies of its own.
- ``offload``: ``fp8``, and the base weights of the 40 blocks live in pinned host memory. Each block's
  weights are copied to the GPU on a side CUDA stream while the block before it runs, and dropped after
  its forward (:class:`BlockPrefetch`: at most two blocks on the GPU). The text encoder (UMT5-XXL, ~11 GB
  bf16) and the image encoder also live on the host and are on the GPU only from their first call in a
  request until the VAE encode starts. Adapter weights are never moved (the moved weights are listed at
  load, before any adapter exists): they stay on the GPU, so loading and switching LoRAs is what it is in
  the other modes. The blocks run
  eagerly (a compiled block cannot swap its weights around the call): ``compile_blocks`` must be off.

How weights move: a module's parameters keep their identity (peft, the LoRA slot and the optimizer-free
inference path hold references to them); only what they point at changes (``tensor.data``): the host
copy's bytes on the GPU while resident, an empty tensor otherwise. Quantized weights (torchao's tensor
subclasses) are moved through their inner tensors (``__tensor_flatten__``). On CPU the same code runs
host -> host (a copy, then the emptied tensor), so tests exercise the hooks and their order.

Which mode a card needs is decided at replica start (:func:`check_card`) from the free memory and the
peak each mode was measured to need (``NEED_GIB``), never by an out-of-memory half-way through a job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import GpuTooSmall

log = logging.getLogger(__name__)

MODES = ("full", "fp8", "offload")  # largest to smallest need

# Peak GPU memory allocated by one default request (832x480, 41 frames, 25 steps, CFG 4, a rank-32 LoRA;
# above what start-up and warm-up reach) on the 480P 14B model, per mode, measured on an H100 with
# benchmarks/memory_bench.py (benchmarks/RESULTS.md, "Memory modes", H100: full 48.36, fp8 33.34, offload
# 13.91 GiB), plus MARGIN_GIB for the CUDA context and the allocator's slack.
NEED_GIB = {"full": 48.4, "fp8": 33.4, "offload": 14.0}
MARGIN_GIB = 1.5
NEED_MODEL = "the Wan 2.1 I2V 14B model at 832x480, 41 frames"


def need_gib(mode: str) -> float:
    return NEED_GIB[mode] + MARGIN_GIB


def check_card(mode: str, free_bytes: int, total_bytes: int) -> None:
    """Refuse a mode this card cannot hold; the error names the mode that fits.

    Args:
        mode: the configured ``gpu.memory``.
        free_bytes, total_bytes: ``torch.cuda.mem_get_info()`` at replica start.
    Raises:
        GpuTooSmall: the mode needs more than is free.
    """
    free = free_bytes / 2**30
    if need_gib(mode) <= free:
        return
    fits = [m for m in MODES if need_gib(m) <= free]
    details = {"mode": mode, "need_gib": need_gib(mode), "free_gib": round(free, 2),
               "total_gib": round(total_bytes / 2**30, 2), "fits": fits[0] if fits else None}
    hint = (f"set gpu.memory: {fits[0]} (needs ~{need_gib(fits[0]):.1f} GiB)" if fits
            else f"no mode fits: the smallest, offload, needs ~{need_gib('offload'):.1f} GiB")
    raise GpuTooSmall(
        f"gpu.memory: {mode} needs ~{need_gib(mode):.1f} GiB for {NEED_MODEL}; this card has {free:.1f} GiB free "
        f"of {total_bytes / 2**30:.1f} GiB: {hint}", details)


def check_replica(mode: str, source: str, device: torch.device) -> None:
    """:func:`check_card` on this process's GPU, for the 14B model (the tiny test model needs nothing)."""
    from .models import TINY

    if device.type != "cuda" or source == TINY:
        return
    free, total = torch.cuda.mem_get_info(device)
    check_card(mode, free, total)


# ---------------------------------------------------------------------------------------------
# moving weights
# ---------------------------------------------------------------------------------------------


def _leaves(module: torch.nn.Module) -> list[torch.Tensor]:
    """The plain tensors holding ``module``'s weights: parameters and buffers, and the inner tensors of
    tensor subclasses (torchao's FP8 weights). Taken at load, before any adapter exists, so adapters
    added later are never moved."""
    out = []
    seen = set()
    for _, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        flatten = getattr(t, "__tensor_flatten__", None)
        inner = [getattr(t, a) for a in flatten()[0]] if flatten is not None and type(t) not in (
            torch.Tensor, torch.nn.Parameter) else [t]
        out += [x for x in inner if x.numel() > 0]
    return out


class Offloader:
    """Groups of weights kept in host memory (pinned where the device is CUDA), on the device on demand.

    ``load`` copies a group on the side stream (CUDA) and records when it is done; ``wait`` makes the
    current stream wait for it; ``evict`` points the weights at empty tensors again. A weight copied on
    the side stream is marked used by the current stream, so its memory is not handed to the next copy
    while the block that reads it may still be running.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # (weight, host copy)
        self.resident: set[int] = set()
        self.ready: dict[int, object] = {}
        self.loads = 0
        self.bytes_moved = 0
        self.max_resident = 0

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for g in self.groups for _, h in g)

    def add(self, module: torch.nn.Module) -> int:
        """Move ``module``'s base weights to the host (wherever they are now) and leave them evicted."""
        pairs = []
        with torch.inference_mode(False), torch.no_grad():
            for t in _leaves(module):
                host = t.detach().to("cpu", copy=True)
                if self.cuda:
                    host = host.pin_memory()
                pairs.append((t, host))
        self.groups.append(pairs)
        i = len(self.groups) - 1
        self.resident.add(i)
        self.evict(i)
        return i

    def load(self, i: int) -> None:
        """Start putting group ``i`` on the device (no-op if it is there)."""
        if i in self.resident:
            return
        # Set outside inference mode: the weights are ordinary tensors and must stay so.
        with torch.inference_mode(False), torch.no_grad():
            if self.cuda:
                consumer = torch.cuda.current_stream(self.device)
                with torch.cuda.stream(self.stream):
                    for t, host in self.groups[i]:
                        on_device = host.to(self.device, non_blocking=True)
                        on_device.record_stream(consumer)
                        t.data = on_device
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.ready[i] = event
            else:
                for t, host in self.groups[i]:
                    t.data = host.clone()
        self.resident.add(i)
        self.loads += 1
        self.bytes_moved += sum(h.numel() * h.element_size() for _, h in self.groups[i])
        self.max_resident = max(self.max_resident, len(self.resident))

    def wait(self, i: int) -> None:
        """The current stream waits until group ``i`` is on the device (loading it now if it is not)."""
        self.load(i)
        event = self.ready.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def evict(self, i: int) -> None:
        if i not in self.resident:
            return
        with torch.inference_mode(False), torch.no_grad():
            for t, _ in self.groups[i]:
                t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident.discard(i)
        self.ready.pop(i, None)


class BlockPrefetch:
    """Forward hooks on a list of blocks: block i waits for its weights, block i+1's start copying, and
    block i's are dropped after its forward. After the last block the first one is fetched for the next
    forward (the next denoising pass), so at most two blocks are ever on the device.

    The host thread may not run more than a block ahead of the GPU: before block i+1's copy is queued it
    waits until block i-1 has finished, so the memory of dropped blocks is free again (the allocator holds
    it until the GPU is done with it) and the device never holds more than about three blocks' bytes.
    """

    def __init__(self, offloader: Offloader, blocks: list[torch.nn.Module], ids: list[int]):
        self.offloader = offloader
        self.ids = ids
        self.max_resident = 0
        self.done: dict[int, object] = {}
        self.handles = []
        for k, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(lambda *_, k=k: self._before(k)))
            self.handles.append(block.register_forward_hook(lambda *_, k=k: self._after(k)))

    def _before(self, k: int) -> None:
        o = self.offloader
        if k == 0:  # a forward that failed half-way left its blocks behind
            for i in self.ids[1:]:
                o.evict(i)
        o.wait(self.ids[k])
        previous = self.done.pop((k - 1) % len(self.ids), None)
        if previous is not None:
            previous.synchronize()
        nxt = (k + 1) % len(self.ids)
        if nxt != k:
            o.load(self.ids[nxt])
        self.max_resident = max(self.max_resident, sum(i in o.resident for i in self.ids))

    def _after(self, k: int) -> None:
        if len(self.ids) > 1:
            self.offloader.evict(self.ids[k])
        if self.offloader.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.offloader.device))
            self.done[k] = event


class StageResidency:
    """The encoders on the device from their first call in a request until ``until`` (the VAE encoder)
    starts; in host memory the rest of the time."""

    def __init__(self, offloader: Offloader, modules: list[torch.nn.Module], ids: list[int], until: list):
        self.offloader = offloader
        self.ids = ids
        self.handles = [m.register_forward_pre_hook(lambda *_, i=i: offloader.wait(i)) for m, i in zip(modules, ids)]
        self.handles += [m.register_forward_pre_hook(lambda *_: self.release()) for m in until]

    def release(self) -> None:
        for i in self.ids:
            self.offloader.evict(i)


# ---------------------------------------------------------------------------------------------
# the modes
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """What a memory mode did to a pipeline; ``describe()`` goes into the replica's reports."""

    mode: str = "full"
    fp8: bool = False  # the block linears are FP8
    converted: int = 0
    note: str | None = None
    offloader: Offloader | None = None
    prefetch: BlockPrefetch | None = None
    hooks: list = field(default_factory=list)

    def describe(self) -> dict:
        out: dict = {"mode": self.mode, "fp8_weights": self.fp8, "fp8_linears": self.converted}
        if self.note:
            out["note"] = self.note
        o = self.offloader
        if o is not None:
            out.update(host_gib=round(o.host_bytes / 2**30, 2), loads=o.loads, moved_gib=round(o.bytes_moved / 2**30, 2),
                       max_blocks_resident=self.prefetch.max_resident if self.prefetch else None)
        return out


def _block_linears(block: torch.nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and n]


def _move(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)


def apply_memory_mode(pipe, mode: str, device: torch.device, convert: Callable | None = None) -> MemoryPlan:
    """Put ``pipe`` on ``device`` the way ``mode`` keeps it; before any adapter or speed mode is applied.

    The pipeline may be anywhere (host memory after a checkpoint load, the device for ``random-full``);
    the transformer is converted block by block, so at most one block in the model dtype is on the
    device beside what the mode keeps there.

    Args:
        pipe: the loaded pipeline (changed in place).
        mode: ``full``, ``fp8`` or ``offload``.
        device: where the model runs.
        convert: ``Linear -> FP8 Linear``; default the fast mode's torchao converter on CUDA, nothing on
            any other device (the plan's note says so). Tests pass their own.
    Returns:
        The plan (its ``offloader`` moves weights; keep it with the pipeline).
    """
    device = torch.device(device)
    plan = MemoryPlan(mode=mode)
    if mode not in MODES:
        raise ValueError(f"unknown memory mode {mode!r}; one of {MODES}")
    if mode == "full":
        pipe.to(device)
        return plan
    if convert is None and device.type == "cuda":
        from ..speed.modes import torchao_fp8_converter

        convert = torchao_fp8_converter(device, setting="gpu.memory: fp8/offload", weight_only_fallback=True)
    if convert is None:
        plan.note = (f"FP8 weights need CUDA (and torchao); on {device.type} this mode keeps the model's "
                     f"{next(pipe.transformer.parameters()).dtype} weights")
    transformer = pipe.transformer
    offload = mode == "offload"
    plan.offloader = Offloader(device) if offload else None
    # Everything but the blocks stays on the device: embeddings, the output head, the VAE.
    for name, child in transformer.named_children():
        if name != "blocks":
            _move(child, device)
    with torch.no_grad():
        for p in transformer.parameters(recurse=False):
            p.data = p.data.to(device)
    ids = []
    for i, block in enumerate(transformer.blocks):
        _move(block, device)
        if convert is not None:
            for name in _block_linears(block, f"blocks.{i}"):
                parent, _, attr = name.rpartition(".")
                owner = transformer.get_submodule(parent)
                setattr(owner, attr, convert(getattr(owner, attr)))
                plan.converted += 1
        if offload:
            ids.append(plan.offloader.add(block))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the block's bf16 weights: free for the next block's
    plan.fp8 = plan.converted > 0
    _move(pipe.vae, device)
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "image_encoder", None)) if m is not None]
    if offload:
        prefetch = BlockPrefetch(plan.offloader, list(transformer.blocks), ids)
        enc_ids = [plan.offloader.add(m) for m in encoders]
        for m in encoders:  # their non-weight state (none today) on the device
            _move(m, device)
        stages = StageResidency(plan.offloader, encoders, enc_ids, until=[pipe.vae.encoder, transformer])
        plan.prefetch = prefetch
        plan.hooks = prefetch.handles + stages.handles
    else:
        for m in encoders:
            _move(m, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("memory mode %s: %d FP8 linears%s", mode, plan.converted,
             f", {plan.offloader.host_bytes / 2**30:.1f} GiB in host memory" if offload else "")
    return plan
