"""Frames -> an encoded video: MP4 (H.264, yuv420p) or animated WebP written as the reference does."""

from __future__ import annotations

import io
import os
import queue
import shutil
import tempfile
import threading

import numpy as np

CONTENT_TYPES = {"mp4": "video/mp4", "webp": "image/webp"}
X264_STREAMING = ("-preset", "veryfast", "-tune", "zerolatency")


def encode_webp(frames: np.ndarray, fps: int) -> bytes:
    """Animated WebP exactly as the reference server writes it (PIL, duration int(1000/fps), loop 0)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


class Mp4Stream:
    """H.264 in MP4 (yuv420p, so every player opens it), fed frames while they are still being made.

    The VAE decodes a video a few frames at a time; fed each chunk as it comes, ffmpeg encodes in its
    own process while the GPU decodes the rest, so only the last chunk's encoding is left when the
    decode ends. ``encode_mp4`` is this with every frame at once: one writer, the same bytes.
    """

    def __init__(self, fps: int):
        self.fps = fps
        self.frames_added = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._tmp = tempfile.mkdtemp(prefix="wan-mp4-")
        self._path = os.path.join(self._tmp, "video.mp4")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(self, frames: np.ndarray) -> None:
        """Append uint8 frames (n, h, w, 3); returns at once unless the encoder is far behind."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name="mp4-encoder", daemon=True)
            self._thread.start()
        self.frames_added += len(frames)
        self._queue.put(frames)

    def _write(self) -> None:
        import imageio.v2 as imageio

        writer = None
        try:
            writer = imageio.get_writer(
                self._path,
                format="FFMPEG",
                mode="I",
                fps=self.fps,
                codec="libx264",
                pixelformat="yuv420p",
                quality=8,
                macro_block_size=2,  # yuv420p needs even sizes; our sizes are multiples of 16
                ffmpeg_log_level="error",
                # x264's default look-ahead holds ~40 frames back until the input ends, so the whole
                # encode landed after the VAE decode (1.1 s of 41 frames on an H100 host); with no
                # look-ahead each chunk is encoded while the next is decoded. Still H.264 yuv420p.
                output_params=list(X264_STREAMING),
            )
            while (chunk := self._queue.get()) is not None:
                for frame in chunk:
                    writer.append_data(frame)
        except BaseException as e:  # reported by finish(); keep draining so add() never blocks
            self._error = e
            while self._queue.get() is not None:
                pass
        finally:
            if writer is not None:
                try:
                    writer.close()
                except BaseException as e:
                    self._error = self._error or e

    @property
    def bytes_encoded(self) -> int:
        """How much of the file ffmpeg has written so far (frames encoded before the input ends)."""
        try:
            return os.path.getsize(self._path)
        except OSError:
            return 0

    def finish(self) -> bytes:
        """Wait for the encoder and return the file's bytes (raises what the encoder raised)."""
        try:
            if self._thread is None:
                raise ValueError("no frames to encode")
            self._queue.put(None)
            self._thread.join()
            if self._error is not None:
                raise self._error
            with open(self._path, "rb") as f:
                return f.read()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def abort(self) -> None:
        """Stop and clean up without a result (the generation failed or was canceled)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        shutil.rmtree(self._tmp, ignore_errors=True)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 in MP4, yuv420p so every player opens it."""
    stream = Mp4Stream(fps)
    stream.add(frames)
    return stream.finish()


def encode(frames: np.ndarray, fps: int, output_format: str) -> bytes:
    """Encode uint8 frames (n, h, w, 3) in the requested format."""
    if output_format == "mp4":
        return encode_mp4(frames, fps)
    if output_format == "webp":
        return encode_webp(frames, fps)
    raise ValueError(f"unknown output format {output_format!r}")
