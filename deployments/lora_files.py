"""Read and check a safetensors LoRA before any of it reaches the pipeline.

Accepted: ai-toolkit files (``diffusion_model.*`` PEFT keys, no alpha), kohya-style
``lora_down``/``lora_up`` + ``.alpha`` and diffusers-format files. Everything is converted to
diffusers names with diffusers' own converter, then every key is matched against the transformer:
a file that does not fit is rejected whole, naming what did not match, never half applied.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

from .errors import LoraIncompatible, LoraInvalid, LoraNotFound

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

# Wan's original layer names (ai-toolkit / kohya files) -> diffusers names, inside one block.
WAN_TO_DIFFUSERS: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
MAX_LISTED = 10  # unmatched keys quoted in an error


def read_header(path: str | os.PathLike, max_header_bytes: int = 16 * 1024**2) -> dict:
    """Parse and check a safetensors header without loading tensors.

    Raises:
        LoraInvalid: not a well-formed safetensors file of float tensors.
    """
    p = Path(path)
    if p.suffix != ".safetensors":
        raise LoraInvalid(f"only .safetensors LoRA files are accepted, got {p.name!r}", {"file": p.name})
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise LoraInvalid("file is too short to be safetensors", {"file": p.name})
            (n,) = struct.unpack("<Q", raw_len)
            if n > max_header_bytes or n + 8 > size:
                raise LoraInvalid(
                    f"safetensors header length {n} is invalid or larger than {max_header_bytes} bytes",
                    {"file": p.name, "header_bytes": n},
                )
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise LoraNotFound(f"LoRA file not found: {p.name}", {"file": p.name}) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraInvalid(f"safetensors header is not valid JSON: {e}", {"file": p.name}) from e
    if not isinstance(header, dict):
        raise LoraInvalid("safetensors header is not an object", {"file": p.name})
    data_len = size - 8 - n
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise LoraInvalid("safetensors file holds no tensors", {"file": p.name})
    for name, info in tensors.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("dtype"), str)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise LoraInvalid(f"malformed entry {name!r} in safetensors header", {"file": p.name})
        if info["dtype"] not in FLOAT_DTYPES:
            raise LoraInvalid(
                f"tensor {name!r} has dtype {info['dtype']}; a LoRA holds float tensors only",
                {"file": p.name, "tensor": name, "dtype": info["dtype"]},
            )
        start, end = info["data_offsets"]
        if not (0 <= start <= end <= data_len):
            raise LoraInvalid(f"tensor {name!r} points outside the file", {"file": p.name, "tensor": name})
    return tensors


def load_state_dict(path: str | os.PathLike, max_header_bytes: int = 16 * 1024**2) -> dict:
    """Check the header, then load the tensors (CPU)."""
    from safetensors.torch import load_file

    read_header(path, max_header_bytes)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise LoraInvalid(f"cannot read safetensors data: {e}", {"file": Path(path).name}) from e


def detect_format(state_dict: Mapping) -> str:
    """'ai-toolkit', 'kohya', 'diffusers' or 'musubi' (lora_unet_*), from the key names."""
    keys = list(state_dict)
    if any(k.startswith("diffusion_model.") for k in keys):
        return "kohya" if any(".lora_down." in k or k.endswith(".alpha") for k in keys) else "ai-toolkit"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    raise LoraIncompatible(
        "unrecognised LoRA key names: expected diffusion_model.*, lora_unet_* or transformer.* keys",
        {"unmatched_keys": keys[:MAX_LISTED], "unmatched_count": len(keys)},
    )


def linear_shapes(transformer) -> dict[str, tuple[int, int]]:
    """Every Linear of the transformer by name: (in_features, out_features). Call before any load."""
    import torch

    return {
        name: (m.in_features, m.out_features)
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def to_diffusers(state_dict: dict, pipeline_cls) -> dict:
    """Convert any accepted format to diffusers names with diffusers' own converter."""
    fmt = detect_format(state_dict)
    try:
        converted = pipeline_cls.lora_state_dict(dict(state_dict))
    except Exception as e:  # the converter raises ValueError/KeyError for keys it cannot place
        raise LoraIncompatible(f"cannot convert {fmt} LoRA: {e}", {"format": fmt}) from e
    return converted


def check_fits(converted: Mapping, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Every LoRA pair must target an existing Linear with matching shapes, or nothing loads.

    Raises:
        LoraIncompatible: naming the unmatched keys.
    """
    unmatched: list[str] = []
    bad_shapes: list[str] = []
    pairs = 0
    # module -> {part: key}: a lone lora_B would load next to a randomly initialised lora_A.
    parts_of: dict[str, dict[str, str]] = {}
    for key, tensor in converted.items():
        name = key[len("transformer.") :] if key.startswith("transformer.") else key
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"):
            if name.endswith(part):
                module = name[: -len(part)]
                break
        else:
            unmatched.append(key)
            continue
        if not key.startswith("transformer.") and not module.startswith(("blocks.", "condition_embedder.", "proj_out")):
            unmatched.append(key)
            continue
        if module not in shapes:
            unmatched.append(key)
            continue
        parts_of.setdefault(module, {})[part] = key
        fan_in, fan_out = shapes[module]
        if part == ".lora_A.weight":
            pairs += 1
            ok = tensor.ndim == 2 and tensor.shape[1] == fan_in
        elif part == ".lora_B.weight":
            ok = tensor.ndim == 2 and tensor.shape[0] == fan_out
        else:
            ok = tensor.ndim == 1 and tensor.shape[0] == fan_out
        if not ok:
            bad_shapes.append(f"{key}: {tuple(tensor.shape)} vs Linear({fan_in}, {fan_out})")
    for module, parts in parts_of.items():
        if ".lora_A.weight" not in parts or ".lora_B.weight" not in parts:
            unmatched.extend(sorted(parts.values()))  # half a pair matches no usable layer
            continue
        a, b = converted[parts[".lora_A.weight"]], converted[parts[".lora_B.weight"]]
        if a.ndim == 2 and b.ndim == 2 and a.shape[0] != b.shape[1]:
            bad_shapes.append(f"{parts['.lora_A.weight']}: rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
    if unmatched or bad_shapes:
        raise LoraIncompatible(
            "LoRA does not fit the Wan 2.1 I2V transformer: "
            + (f"{len(unmatched)} key(s) match no layer" if unmatched else "")
            + (", " if unmatched and bad_shapes else "")
            + (f"{len(bad_shapes)} tensor(s) have the wrong shape" if bad_shapes else ""),
            {
                "unmatched_keys": unmatched[:MAX_LISTED],
                "unmatched_count": len(unmatched),
                "shape_mismatches": bad_shapes[:MAX_LISTED],
            },
        )
    if pairs == 0:
        raise LoraIncompatible("LoRA holds no lora_A/lora_B pairs", {"keys": list(converted)[:MAX_LISTED]})


def read_lora(path: str | os.PathLike, shapes: Mapping[str, tuple[int, int]], pipeline_cls, max_header_bytes: int = 16 * 1024**2) -> dict:
    """Load, convert and check one LoRA file; returns a diffusers-format state dict ready to load."""
    raw = load_state_dict(path, max_header_bytes)
    detect_format(raw)
    converted = to_diffusers(raw, pipeline_cls)
    check_fits(converted, shapes)
    return converted
