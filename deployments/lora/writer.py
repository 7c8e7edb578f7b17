"""Write LoRA files: random adapters in each layout we accept, and the sample LoRA for the tiny model.

The key names of every layout live here (``file_keys``, ``bias_key``), and ``random_lora`` draws a
LoRA's tensors from a seed in a fixed order, so the same arguments always write the same file.
``wan-serve samples`` writes the sample; the tests' LoRA factory writes its files with
``random_lora`` too and works out what each one should do to the weights on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .files import WAN_TO_DIFFUSERS

# What random_lora writes: the layouts of deployments/lora/files.py.
FORMATS = ("ai-toolkit", "kohya", "musubi", "lightx2v", "diffusers")
LIGHTX2V_HEAD = "diffusion_model.head.head"


def block_indices(shapes: Mapping[str, tuple[int, int]]) -> list[int]:
    """The transformer block numbers present in a ``linear_shapes`` map."""
    return sorted({int(name.split(".")[1]) for name in shapes if name.startswith("blocks.")})


def file_keys(fmt: str, block: int, native: str) -> tuple[str, str, str | None]:
    """(A key, B key, alpha key or None) of one target layer (``WAN_TO_DIFFUSERS`` name) in a layout."""
    if fmt == "ai-toolkit":
        stem = f"diffusion_model.blocks.{block}.{native}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None
    if fmt in ("kohya", "lightx2v"):
        stem = f"diffusion_model.blocks.{block}.{native}"
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    if fmt == "musubi":
        stem = f"lora_unet_blocks_{block}_{native.replace('.', '_')}"
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    if fmt == "diffusers":
        stem = f"transformer.blocks.{block}.{WAN_TO_DIFFUSERS[native]}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None
    raise ValueError(f"unknown LoRA format {fmt!r}")


def bias_key(fmt: str, block: int, native: str) -> str:
    """The key of one layer's bias delta: LightX2V's ``diff_b`` or diffusers' ``lora_B.bias``."""
    if fmt == "lightx2v":
        return f"diffusion_model.blocks.{block}.{native}.diff_b"
    if fmt == "diffusers":
        return f"transformer.blocks.{block}.{WAN_TO_DIFFUSERS[native]}.lora_B.bias"
    raise ValueError(f"{fmt} files carry no bias deltas")


def random_lora(
    shapes: Mapping[str, tuple[int, int]],
    fmt: str = "ai-toolkit",
    *,
    rank: int = 4,
    std: float = 0.3,
    seed: int = 0,
    alpha: float | None = None,
    blocks: Iterable[int] | None = None,
    targets: Sequence[str] | None = None,
    bias: bool = False,
    dtype=None,
) -> dict:
    """A random LoRA state dict in layout ``fmt`` for a transformer with these Linear shapes.

    Args:
        shapes: ``deployments.lora.files.linear_shapes`` of the transformer.
        fmt: one of ``FORMATS``.
        rank: the rank of every layer.
        std: standard deviation of A, B and biases; 0.3 at rank 4 changes outputs visibly.
        seed: the tensors are drawn from ``torch.Generator().manual_seed(seed)``, layer by layer.
        alpha: kohya/musubi/lightx2v ``.alpha`` (stock scales by alpha / rank); default rank / 2.
        blocks: block numbers (default: every block of ``shapes``; later ones take block 0's shapes).
        targets: keys of ``WAN_TO_DIFFUSERS`` (default: all twelve).
        bias: diffusers only: a ``lora_B.bias`` on every layer (lightx2v files always have ``diff_b``).
        dtype: the tensors' dtype (default float32).
    Returns:
        Key -> CPU tensor, ready for ``safetensors.torch.save_file``.
    """
    import torch

    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)
    blocks = list(block_indices(shapes) if blocks is None else blocks)
    targets = list(WAN_TO_DIFFUSERS if targets is None else targets)
    has_alpha = fmt in ("kohya", "musubi", "lightx2v")
    if has_alpha and alpha is None:
        alpha = rank / 2
    bias = bias or fmt == "lightx2v"

    def rnd(*size):
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    state_dict: dict = {}
    for block in blocks:
        for native in targets:
            module = f"blocks.{block}.{WAN_TO_DIFFUSERS[native]}"
            fan_in, fan_out = shapes.get(module, shapes[f"blocks.0.{WAN_TO_DIFFUSERS[native]}"])
            key_a, key_b, key_alpha = file_keys(fmt, block, native)
            state_dict[key_a], state_dict[key_b] = rnd(rank, fan_in), rnd(fan_out, rank)
            if bias:
                state_dict[bias_key(fmt, block, native)] = rnd(fan_out)
            if key_alpha is not None:
                state_dict[key_alpha] = torch.tensor(float(alpha), dtype=dtype)
        if fmt == "lightx2v":
            # as real LightX2V files: norm diffs (zero) and modulation diffs, which stock's converter drops
            fan = shapes["blocks.0.attn1.to_q"][1]
            state_dict[f"diffusion_model.blocks.{block}.norm3.diff"] = torch.zeros(fan, dtype=dtype)
            state_dict[f"diffusion_model.blocks.{block}.norm3.diff_b"] = torch.zeros(fan, dtype=dtype)
            state_dict[f"diffusion_model.blocks.{block}.self_attn.norm_q.diff"] = torch.zeros(fan, dtype=dtype)
            state_dict[f"diffusion_model.blocks.{block}.diff_m"] = torch.zeros(1, 6, fan, dtype=dtype)
    if fmt == "lightx2v":  # the output head, with its bias delta and no .alpha
        fan_in, fan_out = shapes["proj_out"]
        state_dict[f"{LIGHTX2V_HEAD}.lora_down.weight"] = rnd(rank, fan_in)
        state_dict[f"{LIGHTX2V_HEAD}.lora_up.weight"] = rnd(fan_out, rank)
        state_dict[f"{LIGHTX2V_HEAD}.diff_b"] = rnd(fan_out)
    return state_dict


def tiny_shapes() -> dict[str, tuple[int, int]]:
    """The Linear shapes of the tiny checkpoint's transformer, from its config (no weights are made)."""
    import torch
    from diffusers import WanTransformer3DModel

    from ..engine.models import TINY_TRANSFORMER_CONFIG
    from .files import linear_shapes

    with torch.device("meta"):
        return linear_shapes(WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG))


def sample_lora() -> dict:
    """The sample LoRA of ``wan-serve samples``: ai-toolkit layout, rank 4, every block of the tiny model."""
    return random_lora(tiny_shapes(), "ai-toolkit", rank=4, seed=0)


def save(path: str | os.PathLike, state_dict: Mapping) -> Path:
    """Write a state dict as a ``.safetensors`` file (parent directories made)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path
