"""Exact mode's attention kernel: FlashAttention-4 on Hopper when installed, cuDNN otherwise.

``SpeedConfig.attention_backend`` takes a diffusers backend name, or:

- ``flash4``: FlashAttention-4 (``flash-attn-4``, CuTe DSL; ``pip install '.[fa4]'``). Exact attention
  (same maths as cuDNN's, another summation order): on an H100 0.78-0.86x cuDNN's time at 17,160
  tokens, output within 0.003 of it (``benchmarks/attention_bench.py``). A startup error where it
  cannot run (not installed, not sm90/sm100, sequence-parallel ranks).
- ``auto`` (the default): ``flash4`` where it can run, else ``_native_cudnn``.

diffusers 0.42.1 has a FlashAttention-4 backend (``flash_4_hub``) but it downloads the kernel from the
Hub through the ``kernels`` package, which no serving machine here can reach, and it calls the CuTe
kernel from Python, which ``torch.compile(fullgraph=True)`` cannot trace. So the installed kernel is
wrapped in a torch custom op (opaque to dynamo, kept in the compiled block's graph, with a shape-only
fake for tracing) and put in that backend's kernel slot; the backend is then set the way
``set_attention_backend`` does, less its ``kernels`` package check.

FlashAttention-4 has no context-parallel path in diffusers (no LSE exchange), so Ulysses/ring ranks keep
cuDNN; CFG-parallel ranks (whole sequences) use it.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from ..engine import compat

FLASH4 = "flash4"
AUTO = "auto"
CUDNN = "_native_cudnn"
_DIFFUSERS_FLASH4 = "flash_4_hub"  # the diffusers backend whose kernel slot holds our op


_import_thread: threading.Thread | None = None


def _import_flash4() -> None:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:  # noqa: BLE001  flash4_unavailable imports again and says why
        pass


def preload(requested: str | None, device) -> None:
    """Start importing FlashAttention-4 in the background where it may be used: the import takes ~10 s
    (its DSL's libraries), which then overlaps the weights load instead of adding to the replica start."""
    global _import_thread
    if device == "auto":  # ModelConfig.device's default
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if requested in (AUTO, FLASH4) and torch.device(device).type == "cuda" and _import_thread is None:
        _import_thread = threading.Thread(target=_import_flash4, name="flash4-import", daemon=True)
        _import_thread.start()


def flash4_unavailable(device) -> str | None:
    """Why FlashAttention-4 cannot run on ``device`` (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):  # FA4's forward kernels: sm90 (Hopper), sm100 (Blackwell)
        return f"compute capability {major}.{minor} (FlashAttention-4 has sm90 and sm100 kernels)"
    if _import_thread is not None:
        _import_thread.join()
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # noqa: BLE001  a broken install is as unusable as a missing one
        return f"flash-attn-4 not importable ({type(e).__name__}: {e})"[:300]
    return None


def resolve(requested: str | None, device, sequence_parallel: bool = False) -> tuple[str | None, str | None]:
    """The backend to set for ``requested`` on ``device`` (``flash4``, a diffusers name, or None: diffusers'
    default), and why FlashAttention-4 was not taken (or None).

    Raises:
        ValueError: ``flash4`` was asked for explicitly and cannot run here.
    """
    if requested not in (AUTO, FLASH4):
        return requested, None
    if requested == AUTO and torch.device(device).type != "cuda":
        return None, f"device {torch.device(device).type}"  # diffusers' default: cuDNN is CUDA's
    why = "sequence-parallel ranks (no context-parallel FlashAttention-4)" if sequence_parallel else None
    why = why or flash4_unavailable(device)
    if why is None:
        return FLASH4, None
    if requested == FLASH4:
        raise ValueError(f"speed.attention_backend flash4 cannot run here: {why}")
    return CUDNN, why


def for_sequence_parallel(speed, device):
    """``speed`` (a ``SpeedConfig``) for ranks that split the sequence: ``auto`` resolved to cuDNN in exact
    mode and in each mode's own setting, so no warm-up meets FA4 on a context-parallel transformer.

    Raises:
        ValueError: ``flash4`` asked for anywhere in ``speed``.
    """
    def resolved(requested):
        return resolve(requested, device, sequence_parallel=True)[0]

    modes = {m: getattr(speed, m) for m in ("fast", "turbo")}
    modes = {m: c.model_copy(update={"attention_backend": resolved(c.attention_backend)}) for m, c in modes.items()}
    return speed.model_copy(update={"attention_backend": resolved(speed.attention_backend), **modes})


@torch.library.custom_op("wan_serve::flash4_attention", mutates_args=(), device_types="cuda")
def flash4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashAttention-4 forward, (batch, tokens, heads, head_dim) in and out, no mask, not causal."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(query, key, value, softmax_scale=scale, causal=False)
    return out[0] if isinstance(out, tuple) else out


@flash4_attention.register_fake
def _(query, key, value, scale):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _kernel(q, k, v, softmax_scale=None, causal=False):
    """What diffusers' ``flash_4_hub`` backend calls (the Hub kernel's signature)."""
    if causal:
        raise ValueError("causal attention is not wired to FlashAttention-4 here")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return flash4_attention(q, k, v, float(scale))


@functools.cache
def _install() -> None:
    compat.install_hub_kernel(_DIFFUSERS_FLASH4, _kernel)  # never downloaded once a kernel is in the slot


def set_backend(transformer: torch.nn.Module, backend: str) -> None:
    """``transformer.set_attention_backend``, which also takes ``flash4`` (see the module's docstring)."""
    if backend != FLASH4:
        transformer.set_attention_backend(backend)
        return
    _install()
    name = compat.attention_backend_name(_DIFFUSERS_FLASH4)
    for processor in compat.attention_processors(transformer):
        if compat.processor_is_context_parallel(processor):
            raise ValueError("flash4 attention on a context-parallel transformer (it has no context-parallel path)")
        compat.set_processor_backend(processor, name)
    compat.set_active_attention_backend(name)
