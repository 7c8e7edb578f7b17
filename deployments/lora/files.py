"""Read and check a safetensors LoRA before any of it reaches the pipeline.

Accepted: every layout stock ``WanImageToVideoPipeline.load_lora_weights`` (diffusers 0.42.1)
accepts for this transformer: ai-toolkit (``diffusion_model.*`` PEFT keys), kohya-style
``lora_down``/``lora_up`` + ``.alpha``, musubi-tuner (``lora_unet_*``), LightX2V-style files with
bias deltas (``diff_b``; ``diff`` keys are dropped as stock drops them) and diffusers format, with or
without its adapter metadata (``lora_adapter_metadata``: ``r``, ``lora_alpha``, patterns, rsLoRA).
The file is read and converted by the same functions stock diffusers uses, and the adapter config
is built as stock builds it, so the scale of every layer is the one stock applies. Then every
tensor is matched against the transformer: a file that does not fit, or that stock would load only
in part or fail on later, is rejected whole, naming what did not match, never half applied.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from ..engine import compat
from ..errors import LoraIncompatible, LoraInvalid, LoraNotFound

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
    """Check the header, then load the tensors (CPU) as stock diffusers does."""
    from safetensors.torch import load_file

    read_header(path, max_header_bytes)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise LoraInvalid(f"cannot read safetensors data: {e}", {"file": Path(path).name}) from e


def load_adapter_metadata(path: str | os.PathLike) -> dict | None:
    """The file's diffusers adapter metadata (``__metadata__["lora_adapter_metadata"]``), or None.

    Read with diffusers' own reader, which is what stock ``load_lora_weights(path)`` uses: a state
    dict handed over in memory carries none, so reading the tensors alone loses ``lora_alpha``.
    Raises:
        LoraInvalid: the metadata entry is not a JSON object.
    """
    try:
        metadata = compat.load_sft_metadata(str(path))
    except json.JSONDecodeError as e:
        raise LoraInvalid(f"lora_adapter_metadata is not valid JSON: {e}", {"file": Path(path).name}) from e
    except ImportError:  # diffusers moved its reader: an upgrade to port (engine/compat.py), not a bad file
        raise
    except Exception as e:  # safetensors' own errors for a header it cannot parse
        raise LoraInvalid(f"cannot read safetensors metadata: {e}", {"file": Path(path).name}) from e
    if metadata is not None and not isinstance(metadata, dict):
        raise LoraInvalid("lora_adapter_metadata is not a JSON object", {"file": Path(path).name})
    return metadata


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
        details = {"format": fmt, "error": repr(e)[:500]}
        if isinstance(e, KeyError) and e.args:
            details["missing_keys"] = [str(e.args[0])]  # the converter needs this key next to the ones present
        raise LoraIncompatible(f"cannot convert {fmt} LoRA: {e!r}", details) from e
    return converted


PREFIX = "transformer."  # stock loads only these keys (and metadata entries) into the transformer

# LoraConfig fields whose value changes nothing here, or that :func:`module_scale` reproduces.
# Any other field set away from its default (DoRA and the other variants, init schemes that rewrite
# the base weights, layer replication, extra trainable modules, ...) is refused.
_CONFIG_UNDERSTOOD = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_bias",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",  # stock targets by tensor names
    "lora_dropout",  # inference runs in eval mode (see WanGenerator._load_into_transformer)
    "fan_in_fan_out",  # peft turns it off for Linear layers (it is for GPT-2's Conv1D)
    "task_type", "peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "auto_mapping", "megatron_core", "qalora_group_size",  # bookkeeping, or used only by a refused option
}
_INIT_UNDERSTOOD = (True, False, "gaussian")  # each overwritten by the file's tensors; no base weight touched


def adapter_config(converted: Mapping, metadata: Mapping | None):
    """The peft ``LoraConfig`` stock ``load_lora_adapter`` builds for this state dict and metadata.

    Without metadata: rank from the tensors and ``lora_alpha == r`` (scale 1), ``lora_bias`` if any
    ``lora_B.bias``. With metadata: the metadata alone.
    Raises:
        LoraIncompatible: metadata stock could not turn into a config, or options we do not apply.
    """
    state_dict = {k[len(PREFIX) :]: v for k, v in converted.items() if k.startswith(PREFIX)}
    if metadata is not None:
        metadata = {k[len(PREFIX) :]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    try:
        config = compat.create_lora_config(state_dict, metadata, rank, adapter_name="check")
    except ImportError:  # diffusers moved it: an upgrade to port (engine/compat.py), not a bad file
        raise
    except Exception as e:  # TypeError for unknown fields, ValueError from LoraConfig's own checks
        cause = e.__cause__ or e
        raise LoraIncompatible(
            f"lora_adapter_metadata is not a LoRA config diffusers can load: {cause}", {"error": str(cause)[:500]}
        ) from e
    if metadata is None:
        return config
    if not config.target_modules:
        raise LoraIncompatible(
            "lora_adapter_metadata has no transformer.target_modules; diffusers cannot load it",
            {"metadata_keys": sorted(metadata)[:MAX_LISTED]},
        )
    from peft import LoraConfig

    default = LoraConfig()
    unsupported = sorted(
        f.name
        for f in fields(config)
        if f.name not in _CONFIG_UNDERSTOOD
        and (
            config.init_lora_weights not in _INIT_UNDERSTOOD
            if f.name == "init_lora_weights"
            else getattr(config, f.name) != getattr(default, f.name)
        )
    )
    if unsupported:
        raise LoraIncompatible(
            f"lora_adapter_metadata sets LoRA options this server does not apply: {', '.join(unsupported)}",
            {"unsupported_options": unsupported},
        )
    # Values peft would take and fail on (or scale by) only later: check them before anything loads.
    ranks, alphas, invalid = [("r", config.r)], [("lora_alpha", config.lora_alpha)], {}
    patterns = (("rank_pattern", config.rank_pattern, ranks), ("alpha_pattern", config.alpha_pattern, alphas))
    for name, pattern, out in patterns:
        if isinstance(pattern, dict):
            out += [(f"{name}[{k}]", v) for k, v in pattern.items()]
        else:
            invalid[name] = repr(pattern)
    invalid.update({n: repr(v) for n, v in ranks if not (_is_number(v) and isinstance(v, int) and v >= 1)})
    invalid.update({n: repr(v) for n, v in alphas if not _is_number(v)})
    if not (_is_number(config.lora_dropout) and 0 <= config.lora_dropout <= 1):
        invalid["lora_dropout"] = repr(config.lora_dropout)
    if invalid:
        raise LoraIncompatible("lora_adapter_metadata has invalid values", {"invalid": invalid})
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def module_scale(config, module: str) -> tuple[int, float]:
    """(rank, scale) peft gives ``module`` under ``config``: scale = alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")


def check_fits(
    converted: Mapping, shapes: Mapping[str, tuple[int, int]], metadata: Mapping | None = None
) -> dict[str, float]:
    """Every LoRA pair must target an existing Linear with matching shapes, or nothing loads.

    Also refused, as stock would load them only in part or fail on them at the first forward: keys
    outside ``transformer.``, half pairs, a rank other than the metadata's, ``lora_B.bias`` on only
    some layers while biases are on, biases the metadata turns off.
    Args:
        converted: the state dict from :func:`to_diffusers`.
        shapes: :func:`linear_shapes` of the transformer.
        metadata: the file's adapter metadata (:func:`load_adapter_metadata`).
    Returns:
        module -> the scale peft applies to its ``B @ A`` (and bias) at multiplier 1.
    Raises:
        LoraIncompatible: naming the unmatched keys.
    """
    unmatched: list[str] = []
    bad_shapes: list[str] = []
    # module -> {part: key}: a lone lora_B would load next to a randomly initialised lora_A.
    parts_of: dict[str, dict[str, str]] = {}
    for key, tensor in converted.items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        module = key[len(PREFIX) : -len(part)] if part and key.startswith(PREFIX) else None
        if module not in shapes:
            unmatched.append(key)
            continue
        parts_of.setdefault(module, {})[part] = key
        fan_in, fan_out = shapes[module]
        if part == ".lora_A.weight":
            ok = tensor.ndim == 2 and tensor.shape[1] == fan_in
        elif part == ".lora_B.weight":
            ok = tensor.ndim == 2 and tensor.shape[0] == fan_out
        else:
            ok = tensor.ndim == 1 and tensor.shape[0] == fan_out
        if not ok:
            bad_shapes.append(f"{key}: {tuple(tensor.shape)} vs Linear({fan_in}, {fan_out})")
    pairs = {m: parts for m, parts in parts_of.items() if ".lora_A.weight" in parts and ".lora_B.weight" in parts}
    for module, parts in parts_of.items():
        if module not in pairs:
            unmatched.extend(sorted(parts.values()))  # half a pair matches no usable layer
    for module, parts in pairs.items():
        a, b = converted[parts[".lora_A.weight"]], converted[parts[".lora_B.weight"]]
        if a.ndim == 2 and b.ndim == 2 and a.shape[0] != b.shape[1]:
            bad_shapes.append(f"{parts['.lora_A.weight']}: rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
    _raise_unfit(unmatched, bad_shapes)
    if not pairs:
        raise LoraIncompatible("LoRA holds no lora_A/lora_B pairs", {"keys": list(converted)[:MAX_LISTED]})

    config = adapter_config(converted, metadata)
    scales: dict[str, float] = {}
    for module, parts in pairs.items():
        if config.lora_bias and ".lora_B.bias" not in parts:
            # peft gives every layer a bias when any has one; this one would have no value and the
            # first forward would fail on it
            unmatched.append(f"{PREFIX}{module}.lora_B.bias (missing; other layers have one)")
        elif not config.lora_bias and ".lora_B.bias" in parts:
            unmatched.append(f"{parts['.lora_B.bias']} (ignored: lora_adapter_metadata has lora_bias false)")
        rank, scales[module] = module_scale(config, module)
        if converted[parts[".lora_A.weight"]].shape[0] != rank:
            bad_shapes.append(
                f"{parts['.lora_A.weight']}: rank {converted[parts['.lora_A.weight']].shape[0]} "
                f"but lora_adapter_metadata says {rank}"
            )
    _raise_unfit(unmatched, bad_shapes)
    return scales


def _raise_unfit(unmatched: list[str], bad_shapes: list[str]) -> None:
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


@dataclass
class CheckedLora:
    """A LoRA file read, converted and checked; what stock ``load_lora_weights(path)`` would load."""

    format: str
    state_dict: dict  # diffusers names (``transformer.*``), as stock's ``lora_state_dict`` returns them
    metadata: dict | None  # the file's adapter metadata as stock reads it (None: none in the file)
    scales: dict[str, float] = field(default_factory=dict)  # module -> peft's scale at multiplier 1


def read_lora(
    path: str | os.PathLike, shapes: Mapping[str, tuple[int, int]], pipeline_cls, max_header_bytes: int = 16 * 1024**2
) -> CheckedLora:
    """Load, convert and check one LoRA file, reading it once."""
    raw = load_state_dict(path, max_header_bytes)
    metadata = load_adapter_metadata(path)
    fmt = detect_format(raw)
    converted = to_diffusers(raw, pipeline_cls)
    scales = check_fits(converted, shapes, metadata)
    return CheckedLora(format=fmt, state_dict=converted, metadata=metadata, scales=scales)
