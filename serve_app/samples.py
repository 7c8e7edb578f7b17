"""``wan-serve samples``: a first frame and a LoRA to try the local default with, in the places it looks.

The LoRA fits the tiny checkpoint of ``configs/local.yaml`` (ai-toolkit layout, random weights), not the
real model; both files are the same bytes on every run.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

FIRST_FRAME = "first_frame.png"
# Relative to the LoRA root (./loras in configs/local.yaml): what a request's "path" names.
LORA_REF = "sample/sample.safetensors"
LORA_ROOT = "loras"


@dataclass
class Written:
    path: Path
    kept: bool  # a different file was there already and was left as it was


def first_frame_png(width: int = 832, height: int = 480) -> bytes:
    """A drawn picture (sky, sun, sea, beach) as PNG: something to look at, unlike random pixels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon, shore = int(height * 0.55), int(height * 0.78)
    for y in range(horizon):  # sky: deep blue to pale orange
        t = y / max(horizon - 1, 1)
        draw.line([(0, y), (width, y)], fill=(int(40 + 210 * t), int(70 + 120 * t), int(160 - 40 * t)))
    r = height // 8
    cx, cy = int(width * 0.68), horizon - r // 2
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 214, 120))
    for y in range(horizon, shore):  # sea
        t = (y - horizon) / max(shore - horizon - 1, 1)
        draw.line([(0, y), (width, y)], fill=(int(30 + 40 * t), int(90 + 60 * t), int(140 + 40 * t)))
    draw.rectangle([0, shore, width, height], fill=(222, 196, 150))  # sand
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_lora_bytes() -> bytes:
    """The sample LoRA file: ai-toolkit layout, rank 4, for the tiny checkpoint's transformer."""
    from safetensors.torch import save

    from deployments.contract import sample_lora

    return save({k: v.contiguous() for k, v in sample_lora().items()})


def _write(path: Path, data: bytes, force: bool) -> Written:
    if path.exists() and not force and path.read_bytes() != data:
        return Written(path, kept=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return Written(path, kept=False)


def write_samples(out: str | os.PathLike = ".", force: bool = False) -> dict[str, Written]:
    """Write ``<out>/first_frame.png`` and ``<out>/loras/sample/sample.safetensors``.

    Args:
        out: the directory ``wan-serve run`` runs in (the local config's LoRA root is ``./loras``).
        force: replace files of the same name that differ (by default they are kept, and reported).
    Returns:
        {"first_frame": ..., "lora": ...}
    """
    root = Path(out)
    return {
        "first_frame": _write(root / FIRST_FRAME, first_frame_png(), force),
        "lora": _write(root / LORA_ROOT / LORA_REF, sample_lora_bytes(), force),
    }
