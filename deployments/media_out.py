"""Frames -> an encoded video: MP4 (H.264, yuv420p) or animated WebP written as the reference does."""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

CONTENT_TYPES = {"mp4": "video/mp4", "webp": "image/webp"}


def encode_webp(frames: np.ndarray, fps: int) -> bytes:
    """Animated WebP exactly as the reference server writes it (PIL, duration int(1000/fps), loop 0)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 in MP4, yuv420p so every player opens it; odd sizes are padded by one pixel."""
    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = imageio.get_writer(
            path,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=8,
            macro_block_size=2,  # yuv420p needs even sizes; our sizes are multiples of 16
            ffmpeg_log_level="error",
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        with open(path, "rb") as f:
            return f.read()


def encode(frames: np.ndarray, fps: int, output_format: str) -> bytes:
    """Encode uint8 frames (n, h, w, 3) in the requested format."""
    if output_format == "mp4":
        return encode_mp4(frames, fps)
    if output_format == "webp":
        return encode_webp(frames, fps)
    raise ValueError(f"unknown output format {output_format!r}")
