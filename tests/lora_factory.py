"""Random LoRA files for the tiny transformer, in the formats we accept, with their expected effect.

Each writer returns a :class:`LoraFile` whose ``deltas`` are the dense weight changes the file
stands for (``scale * B @ A``, keyed by diffusers module name), so a test can merge them into a
copy of the base transformer by hand and compare against what the pipeline does with the file.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest
import torch
from safetensors.torch import save_file

from deployments.lora_files import WAN_TO_DIFFUSERS

FORMATS = ("ai-toolkit", "kohya", "diffusers")

BLOCK_TARGETS = WAN_TO_DIFFUSERS  # native name -> diffusers name, inside one block


@dataclass
class LoraFile:
    """One written LoRA file and the dense update it should apply at multiplier 1."""

    path: Path
    fmt: str
    rank: int
    deltas: dict[str, torch.Tensor]  # diffusers module name -> (out, in) float32
    state_dict: dict[str, torch.Tensor] = field(repr=False)


def block_indices(shapes: Mapping[str, tuple[int, int]]) -> list[int]:
    """The transformer block numbers present in a ``linear_shapes`` map."""
    return sorted({int(name.split(".")[1]) for name in shapes if name.startswith("blocks.")})


def file_keys(fmt: str, block: int, native: str) -> tuple[str, str, str | None]:
    """(A key, B key, alpha key or None) of one target layer in a given file format."""
    if fmt == "ai-toolkit":
        stem = f"diffusion_model.blocks.{block}.{native}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None
    if fmt == "kohya":
        stem = f"diffusion_model.blocks.{block}.{native}"
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    if fmt == "diffusers":
        stem = f"transformer.blocks.{block}.{BLOCK_TARGETS[native]}"
        return f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", None
    raise ValueError(f"unknown LoRA format {fmt!r}")


def make_lora(
    path: str | Path,
    fmt: str,
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int = 4,
    std: float = 0.3,
    seed: int = 0,
    alpha: float | None = None,
    blocks: Iterable[int] | None = None,
    targets: Sequence[str] | None = None,
) -> LoraFile:
    """Write a random LoRA in ``fmt`` covering ``targets`` (native names) of ``blocks``.

    Args:
        path: where to write the ``.safetensors`` file.
        fmt: 'ai-toolkit', 'kohya' or 'diffusers'.
        shapes: ``deployments.lora_files.linear_shapes`` of the base transformer.
        std: standard deviation of both A and B; 0.3 at rank 4 changes outputs visibly.
        alpha: kohya only, stored as ``.alpha`` (scale = alpha / rank); default rank / 2,
            so that a wrong alpha handling shows up as a factor of 2.
        blocks: block numbers (default: every block of the model).
        targets: keys of :data:`BLOCK_TARGETS` (default: all twelve).
    Returns:
        The file, with its expected dense deltas.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = list(block_indices(shapes) if blocks is None else blocks)
    targets = list(BLOCK_TARGETS if targets is None else targets)
    if fmt == "kohya" and alpha is None:
        alpha = rank / 2
    scale = alpha / rank if fmt == "kohya" else 1.0
    state_dict: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for block in blocks:
        for native in targets:
            module = f"blocks.{block}.{BLOCK_TARGETS[native]}"
            fan_in, fan_out = shapes.get(module, shapes[f"blocks.0.{BLOCK_TARGETS[native]}"])
            a = torch.randn(rank, fan_in, generator=gen) * std
            b = torch.randn(fan_out, rank, generator=gen) * std
            key_a, key_b, key_alpha = file_keys(fmt, block, native)
            state_dict[key_a] = a
            state_dict[key_b] = b
            if key_alpha is not None:
                state_dict[key_alpha] = torch.tensor(float(alpha))
            deltas[module] = (scale * (b.double() @ a.double())).float()
    path = Path(path)
    save_file(state_dict, str(path))
    return LoraFile(path=path, fmt=fmt, rank=rank, deltas=deltas, state_dict=state_dict)


def save_state_dict(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write arbitrary tensors as safetensors (for files that are wrong on purpose)."""
    path = Path(path)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_raw(path: str | Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors-like file with any header (and optionally a lying header length)."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path = Path(path)
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def merged_copy(transformer: torch.nn.Module, applied: Sequence[tuple[LoraFile, float]]) -> torch.nn.Module:
    """A deep copy of a plain (never LoRA-loaded) transformer with ``W + sum(m * dW)`` merged in.

    Args:
        transformer: the base transformer; it is not modified.
        applied: (LoRA file, multiplier) pairs.
    """
    merged = copy.deepcopy(transformer)
    merge_into(merged, applied)
    return merged


def merge_into(transformer: torch.nn.Module, applied: Sequence[tuple[LoraFile, float]]) -> None:
    """Merge ``W + sum(m * dW)`` into a plain transformer's Linear weights, in place."""
    modules = dict(transformer.named_modules())
    totals: dict[str, torch.Tensor] = {}
    for lora, multiplier in applied:
        for name, delta in lora.deltas.items():
            totals[name] = totals.get(name, 0) + multiplier * delta.double()
    with torch.no_grad():
        for name, delta in totals.items():
            linear = modules[name]
            if not isinstance(linear, torch.nn.Linear):
                raise TypeError(f"{name} is {type(linear).__name__}, not a plain Linear (LoRA already loaded?)")
            linear.weight.copy_((linear.weight.double() + delta).to(linear.weight.dtype))


def transformer_inputs(seed: int = 0, *, in_channels: int = 36, text_dim: int = 32, image_dim: int = 32) -> dict:
    """Fixed random inputs for one tiny transformer forward (2 latent frames of 4x4).

    The text context is 512 tokens long: with image cross-attention the processor takes
    everything before the last 512 tokens as the image context.
    """
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, in_channels, 2, 4, 4, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, text_dim, generator=gen),
        encoder_hidden_states_image=torch.randn(1, 5, image_dim, generator=gen),
        return_dict=False,
    )


@torch.no_grad()
def forward(transformer: torch.nn.Module, inputs: Mapping) -> torch.Tensor:
    """One transformer forward on ``inputs``; returns the noise prediction."""
    return transformer(**inputs)[0]


# -- module-scoped fixtures shared by the LoRA test modules (import them by name) -------------------


@pytest.fixture(scope="module")
def base(model_cache):
    """A pipeline of its own that never sees a LoRA: the reference for every comparison."""
    from .conftest import load_tiny

    return load_tiny(model_cache)


@pytest.fixture(scope="module")
def shapes(base):
    from deployments.lora_files import linear_shapes

    return linear_shapes(base.pipe.transformer)


@pytest.fixture(scope="module")
def inputs():
    return transformer_inputs(seed=0)


@pytest.fixture(scope="module")
def base_out(base, inputs):
    return forward(base.pipe.transformer, inputs)
