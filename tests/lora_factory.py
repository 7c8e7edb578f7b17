"""Random LoRA files for the tiny transformer, in every layout we accept, with their expected effect.

Each writer returns a :class:`LoraFile` whose ``deltas`` (and ``bias_deltas``) are the dense weight
(and bias) changes the file stands for at multiplier 1 (``scale * B @ A``, ``scale * bias``, keyed by
diffusers module name), so a test can merge them into a copy of the base transformer by hand and
compare against what the pipeline does with the file. The scale is worked out here from the file's
own numbers (``.alpha`` / rank, or the metadata's ``lora_alpha`` / ``r``), not by the code under test.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pytest
import torch
from safetensors.torch import save_file

from deployments.lora.files import WAN_TO_DIFFUSERS
from deployments.lora.writer import LIGHTX2V_HEAD, bias_key, block_indices, file_keys, random_lora

FORMATS = ("ai-toolkit", "kohya", "diffusers")  # the three the hand-merge tests run on
ALL_FORMATS = FORMATS + ("musubi", "lightx2v")

BLOCK_TARGETS = WAN_TO_DIFFUSERS  # native name -> diffusers name, inside one block

# Every layout stock ``load_lora_weights`` accepts, as keyword arguments of :func:`make_lora`.
LAYOUTS: dict[str, dict] = {
    "ai-toolkit": dict(fmt="ai-toolkit"),
    "kohya": dict(fmt="kohya"),  # .alpha = rank / 2
    "musubi": dict(fmt="musubi"),  # lora_unet_*, .alpha = rank / 2
    "lightx2v": dict(fmt="lightx2v"),  # kohya keys + diff_b on every layer, norm/modulation diffs, head.head
    "diffusers": dict(fmt="diffusers"),
    "diffusers-bias": dict(fmt="diffusers", bias=True),
    "diffusers-metadata": dict(fmt="diffusers", metadata={"lora_alpha": 8}),  # rank 4: scale 2
    "diffusers-metadata-rslora-patterns": dict(
        fmt="diffusers",
        bias=True,
        metadata={"lora_alpha": 6, "use_rslora": True, "alpha_pattern": {"blocks.1.ffn.net.2": 1.5}},
    ),
    "kohya-fp16": dict(fmt="kohya", dtype=torch.float16),
    "lightx2v-bf16": dict(fmt="lightx2v", dtype=torch.bfloat16),
    "diffusers-metadata-bf16": dict(fmt="diffusers", metadata={"lora_alpha": 2}, dtype=torch.bfloat16),
}


@dataclass
class LoraFile:
    """One written LoRA file and the dense update it should apply at multiplier 1."""

    path: Path
    fmt: str
    rank: int
    deltas: dict[str, torch.Tensor]  # diffusers module name -> (out, in) float32
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # module -> (out,) float32
    metadata: dict | None = None  # the LoRA config written as diffusers' adapter metadata


def metadata_scale(metadata: Mapping, module: str, rank: int) -> float:
    """The scale a LoRA config gives ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = metadata.get("alpha_pattern", {}).get(module, metadata["lora_alpha"])
    return alpha / (math.sqrt(rank) if metadata.get("use_rslora") else rank)


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
    bias: bool = False,
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraFile:
    """Write a random LoRA in ``fmt`` covering ``targets`` (native names) of ``blocks``.

    Args:
        path: where to write the ``.safetensors`` file.
        fmt: 'ai-toolkit', 'kohya', 'musubi', 'lightx2v' or 'diffusers'.
        shapes: ``deployments.lora.files.linear_shapes`` of the base transformer.
        std: standard deviation of A, B and biases; 0.3 at rank 4 changes outputs visibly.
        alpha: kohya/musubi/lightx2v, stored as ``.alpha`` (scale = alpha / rank); default rank / 2,
            so that a wrong alpha handling shows up as a factor of 2.
        blocks: block numbers (default: every block of the model).
        targets: keys of :data:`BLOCK_TARGETS` (default: all twelve).
        bias: diffusers only: a ``lora_B.bias`` on every layer (lightx2v files always have ``diff_b``).
        metadata: diffusers only: LoRA config entries (``lora_alpha``, ``use_rslora``,
            ``alpha_pattern``...) written as diffusers' adapter metadata by stock
            ``save_lora_weights``, with ``r``, ``target_modules`` and ``lora_bias`` filled in.
        dtype: the tensors' dtype in the file; the expected deltas use the rounded values.
    Returns:
        The file, with its expected dense deltas.
    """
    blocks = list(block_indices(shapes) if blocks is None else blocks)
    targets = list(BLOCK_TARGETS if targets is None else targets)
    has_alpha = fmt in ("kohya", "musubi", "lightx2v")
    if has_alpha and alpha is None:
        alpha = rank / 2
    bias = bias or fmt == "lightx2v"
    if metadata is not None:
        assert fmt == "diffusers", "adapter metadata is a diffusers-format feature"
        modules = sorted({BLOCK_TARGETS[t] for t in targets})
        metadata = {"r": rank, "target_modules": modules, "lora_bias": bias, **metadata}
    state_dict = random_lora(shapes, fmt, rank=rank, std=std, seed=seed, alpha=alpha, blocks=blocks,
                             targets=targets, bias=bias, dtype=dtype)

    # What the file stands for, worked out from its own tensors and numbers.
    deltas: dict[str, torch.Tensor] = {}
    bias_deltas: dict[str, torch.Tensor] = {}

    def add(module: str, key_a: str, key_b: str, key_bias: str | None, scale: float, bias_scale: float):
        a, b = state_dict[key_a], state_dict[key_b]
        deltas[module] = (scale * (b.double() @ a.double())).float()
        if key_bias is not None:
            bias_deltas[module] = (bias_scale * state_dict[key_bias].double()).float()

    for block in blocks:
        for native in targets:
            module = f"blocks.{block}.{BLOCK_TARGETS[native]}"
            key_a, key_b, _ = file_keys(fmt, block, native)
            if metadata is not None:
                scale = metadata_scale(metadata, module, rank)
            else:
                scale = alpha / rank if has_alpha else 1.0
            # the converter folds .alpha into A and B only; peft scales the bias by the config's scale
            bias_scale = 1.0 if has_alpha else scale
            add(module, key_a, key_b, bias_key(fmt, block, native) if bias else None, scale, bias_scale)
    if fmt == "lightx2v":  # the output head, with its bias delta, unscaled (it has no .alpha)
        add("proj_out", f"{LIGHTX2V_HEAD}.lora_down.weight", f"{LIGHTX2V_HEAD}.lora_up.weight",
            f"{LIGHTX2V_HEAD}.diff_b", 1.0, 1.0)
    path = Path(path)
    if metadata is not None:
        from diffusers import WanImageToVideoPipeline

        with tempfile.TemporaryDirectory() as tmp:
            WanImageToVideoPipeline.save_lora_weights(
                tmp,
                transformer_lora_layers={k.removeprefix("transformer."): v for k, v in state_dict.items()},
                weight_name="lora.safetensors",
                transformer_lora_adapter_metadata=dict(metadata),
            )
            path.write_bytes((Path(tmp) / "lora.safetensors").read_bytes())
    else:
        save_file(state_dict, str(path))
    return LoraFile(
        path=path, fmt=fmt, rank=rank, deltas=deltas, state_dict=state_dict, bias_deltas=bias_deltas, metadata=metadata
    )


def make_layout(path: str | Path, layout: str, shapes: Mapping[str, tuple[int, int]], **kwargs) -> LoraFile:
    """:func:`make_lora` with the settings of one of :data:`LAYOUTS`."""
    return make_lora(path, shapes=shapes, **{**LAYOUTS[layout], **kwargs})


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
    """Merge ``W + sum(m * dW)`` (and ``b + sum(m * db)``) into a plain transformer's Linears, in place."""
    modules = dict(transformer.named_modules())
    totals: dict[tuple[str, str], torch.Tensor] = {}
    for lora, multiplier in applied:
        for kind, deltas in (("weight", lora.deltas), ("bias", lora.bias_deltas)):
            for name, delta in deltas.items():
                totals[name, kind] = totals.get((name, kind), 0) + multiplier * delta.double()
    with torch.no_grad():
        for (name, kind), delta in totals.items():
            linear = modules[name]
            if not isinstance(linear, torch.nn.Linear):
                raise TypeError(f"{name} is {type(linear).__name__}, not a plain Linear (LoRA already loaded?)")
            param = getattr(linear, kind)
            param.copy_((param.double() + delta).to(param.dtype))


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
    from deployments.lora.files import linear_shapes

    return linear_shapes(base.pipe.transformer)


@pytest.fixture(scope="module")
def inputs():
    return transformer_inputs(seed=0)


@pytest.fixture(scope="module")
def base_out(base, inputs):
    return forward(base.pipe.transformer, inputs)
