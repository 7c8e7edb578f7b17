"""Frames -> MP4 / WebP (deployments/engine/media_out.py), checked by decoding the bytes back with
independent readers (ffmpeg through imageio, PIL) rather than by trusting the writer."""

from __future__ import annotations

import io
import re
import subprocess

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from deployments.engine.media_out import CONTENT_TYPES, Mp4Stream, encode, encode_mp4, encode_webp


def make_frames(n: int = 5, width: int = 64, height: int = 48) -> np.ndarray:
    """Smooth, clearly different frames: a gradient whose brightness and hue change per frame."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(n):
        r = (x * 255 // max(width - 1, 1) + i * 40) % 256
        g = (y * 255 // max(height - 1, 1)) * (n - i) // n
        b = np.full_like(x, (i * 255) // max(n - 1, 1))
        frames.append(np.stack([r, g, b], -1))
    return np.asarray(frames, dtype="uint8")


def ffprobe_stream(path) -> str:
    """The video stream line of ``ffmpeg -i`` (no ffprobe needed)."""
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True).stderr
    line = next(line for line in out.splitlines() if "Video:" in line)
    return line


@pytest.fixture(params=[(5, 64, 48, 16), (9, 96, 64, 24), (1, 64, 48, 8), (5, 848, 464, 16)],
                ids=["5f-64x48-16fps", "9f-96x64-24fps", "1f", "5f-848x464"])
def case(request):
    n, w, h, fps = request.param
    return make_frames(n, w, h), fps


# ---------------------------------------------------------------------------------------------
# MP4
# ---------------------------------------------------------------------------------------------


def test_mp4_stream_encodes_chunks_before_the_input_ends():
    """Streaming only helps if ffmpeg emits frames as they come: x264's default look-ahead (about
    40 frames) would hold a whole 41-frame video back until finish(). Noise frames, so that what 24
    frames encode to overflows ffmpeg's 512 KiB output buffer and reaches the file."""
    import time

    stream = Mp4Stream(16)
    frames = np.random.default_rng(0).integers(0, 256, (24, 144, 256, 3), dtype=np.uint8)
    try:
        for i in range(0, 24, 4):
            stream.add(frames[i:i + 4])
        deadline = time.monotonic() + 120
        while stream.bytes_encoded < 512 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stream.bytes_encoded >= 512 * 1024, stream.bytes_encoded
    finally:
        data = stream.finish()
    assert len(iio.imread(data, plugin="FFMPEG", extension=".mp4", index=None)) == 24


def test_mp4_decodes_to_the_frames(case, tmp_path):
    frames, fps = case
    data = encode_mp4(frames, fps)
    assert data[4:8] == b"ftyp"  # an ISO-BMFF (MP4) file
    path = tmp_path / "v.mp4"
    path.write_bytes(data)

    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["fps"] == fps
    assert tuple(meta["size"]) == (frames.shape[2], frames.shape[1])

    decoded = iio.imread(path, plugin="FFMPEG")
    assert decoded.shape == frames.shape
    # Lossy, but each decoded frame is closest to its own source frame, in order.
    for i, got in enumerate(decoded):
        errors = [np.abs(got.astype(int) - src.astype(int)).mean() for src in frames]
        assert int(np.argmin(errors)) == i
        assert errors[i] < 8


def test_mp4_is_h264_yuv420p(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(encode_mp4(make_frames(), 16))
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    stream = ffprobe_stream(path)
    assert re.search(r"Video: h264\b", stream), stream
    assert "yuv420p" in stream and "64x48" in stream and "16 fps" in stream


def test_mp4_duration_matches_frames_and_fps(tmp_path):
    path = tmp_path / "v.mp4"
    path.write_bytes(encode_mp4(make_frames(8), 16))
    assert iio.immeta(path, plugin="FFMPEG")["duration"] == pytest.approx(8 / 16, abs=0.02)


# ---------------------------------------------------------------------------------------------
# WebP
# ---------------------------------------------------------------------------------------------


def test_webp_decodes_to_the_frames(case):
    frames, fps = case
    data = encode_webp(frames, fps)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    img = Image.open(io.BytesIO(data))
    assert img.format == "WEBP"
    assert getattr(img, "n_frames", 1) == len(frames)
    assert img.size == (frames.shape[2], frames.shape[1])
    for i in range(len(frames)):
        img.seek(i)
        img.load()  # PIL fills in a frame's duration when it decodes it
        if len(frames) > 1:
            assert img.info["duration"] == int(1000 / fps)
        got = np.asarray(img.convert("RGB")).astype(int)
        errors = [np.abs(got - src.astype(int)).mean() for src in frames]
        assert int(np.argmin(errors)) == i
        assert errors[i] < 10


@pytest.mark.parametrize("fps", [16, 24, 7, 120])
def test_webp_frame_time_is_truncated_milliseconds(fps):
    img = Image.open(io.BytesIO(encode_webp(make_frames(3), fps)))
    durations, timestamps = [], []
    for i in range(img.n_frames):
        img.seek(i)
        img.load()
        durations.append(img.info["duration"])
        timestamps.append(img.info["timestamp"])
    ms = {16: 62, 24: 41, 7: 142, 120: 8}[fps]  # int(1000 / fps), written out
    assert durations == [ms] * 3
    assert timestamps == [0, ms, 2 * ms]
    assert img.info.get("loop", 0) == 0


@pytest.mark.parametrize("fps", [16, 24])
def test_webp_bytes_equal_the_reference_writer(fps):
    frames = make_frames(5)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    assert encode_webp(frames, fps) == buf.getvalue()


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def test_encode_dispatches_by_format(tmp_path):
    frames = make_frames(5)
    assert encode(frames, 16, "webp") == encode_webp(frames, 16)
    data = encode(frames, 16, "mp4")
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    assert iio.immeta(path, plugin="FFMPEG")["codec"] == "h264"
    assert CONTENT_TYPES == {"mp4": "video/mp4", "webp": "image/webp"}


@pytest.mark.parametrize("fmt", ["gif", "MP4", "", "mov"])
def test_unknown_format_is_refused(fmt):
    with pytest.raises(ValueError):
        encode(make_frames(2), 16, fmt)
