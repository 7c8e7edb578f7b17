"""The first-frame VAE encoding kept per replica (deployments/speed/vae.py), on the tiny pipeline (CPU).

A kept encoding is reused only for the same first frame at the same size, and the video it gives is
the one the VAE's own encoding gives, bit for bit; the stage is still announced and timed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.speed.vae import EncodeCache

from .conftest import make_image, png_bytes


@pytest.fixture
def fresh(generator):
    """The session generator with nothing kept (earlier tests encoded the same pictures)."""
    generator.encodings.clear()
    yield generator
    generator.encodings.clear()


def _run(generator, spec, events=None):
    return generator.generate(spec, on_progress=(events.append if events is not None else None))


def test_the_same_first_frame_reuses_its_encoding_and_gives_the_same_video(fresh, small_spec):
    first = _run(fresh, small_spec(seed=7))
    assert first.speed["vae_encode_reused"] is False
    again = _run(fresh, small_spec(seed=7))
    assert again.speed["vae_encode_reused"] is True
    assert np.array_equal(first.frames, again.frames)
    # and a request that differs elsewhere (prompt, seed) reuses it too
    other = _run(fresh, small_spec(seed=8, prompt="a dog on a beach"))
    assert other.speed["vae_encode_reused"] is True
    fresh.encodings.clear()
    assert np.array_equal(other.frames, _run(fresh, small_spec(seed=8, prompt="a dog on a beach")).frames)


def test_one_changed_pixel_or_another_size_encodes_again(fresh, small_spec):
    image = make_image(64, 48, seed=11)
    before = (fresh.encodings.misses, fresh.encodings.hits)
    _run(fresh, small_spec(image_png=png_bytes(image)))
    image.putpixel((10, 10), tuple(255 - c for c in image.getpixel((10, 10))))
    changed = small_spec(image_png=png_bytes(image))
    assert _run(fresh, changed).speed["vae_encode_reused"] is False
    assert _run(fresh, small_spec(image_png=png_bytes(image), num_frames=9)).speed["vae_encode_reused"] is False
    assert _run(fresh, changed).speed["vae_encode_reused"] is True
    assert (fresh.encodings.misses - before[0], fresh.encodings.hits - before[1]) == (3, 1)


def test_a_reused_encoding_still_shows_and_times_its_stage(fresh, small_spec):
    missed: list = []
    _run(fresh, small_spec(), missed)
    kept: list = []
    result = _run(fresh, small_spec(), kept)
    assert result.speed["vae_encode_reused"] is True
    assert [e.stage for e in kept] == [e.stage for e in missed]
    assert "vae_encoding" in [e.stage for e in kept] and "vae_encode" in result.timings


def test_the_cache_keeps_the_newest_and_only_first_frame_inputs():
    calls = []

    class Vae:
        def encode(self, x):
            calls.append(x)
            return x.sum()

    vae = Vae()
    cache = EncodeCache(vae, size=2)
    videos = [torch.cat([torch.full((1, 3, 1, 4, 4), float(i)), torch.zeros(1, 3, 4, 4, 4)], dim=2) for i in range(3)]
    for v in videos:
        vae.encode(v)
    vae.encode(videos[2])
    vae.encode(videos[0])  # pushed out by the third: encoded again
    assert len(calls) == 4 and (cache.hits, cache.misses) == (1, 4)
    last = videos[1].clone()
    last[:, :, -1] = 1.0  # a last-frame condition: never kept
    assert EncodeCache.key(last) is None
    vae.encode(last)
    vae.encode(last)
    assert len(calls) == 6
    cache.detach()
    assert "encode" not in vae.__dict__


def test_size_zero_leaves_the_vae_alone():
    class Vae:
        def encode(self, x):
            return x

    vae = Vae()
    EncodeCache(vae, size=0)
    assert "encode" not in vae.__dict__
