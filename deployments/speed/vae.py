"""The VAE's share of a request made smaller: its weights in channels-last layout, and the encoding of
a first frame kept per replica and reused when the same frame comes again.

Layout (``speed.vae_channels_last``): cuDNN's 3D convolutions run faster over NDHWC tensors on Hopper
(measured: ``benchmarks/vae_bench.py``, RESULTS.md); converting the 5D weights (and the 2D convolutions'
4D ones) is enough, the activations follow the weights' layout through each convolution.

Encode cache (``speed.vae_encode_cache``):

Wan's image-to-video pipeline encodes the first frame followed by ``num_frames - 1`` black frames
through the VAE (0.65 s at 41 frames, 1.3 s at 81 on an H100: a third of a turbo request's VAE time).
The encoding depends only on that input (the VAE's weights never change: LoRAs act on the
transformer), and the pipeline reads it with ``sample_mode="argmax"`` (the distribution's mode, no
sampling), so a second request with the same first frame at the same size can take the kept result:
the same tensor, bit for bit. People iterate on prompts, seeds and LoRAs over one first frame, and
ai-toolkit's sample sets reuse one ``ctrl_img`` across prompts, so repeats are the common case.

The key is the exact first frame (its bytes, hashed on the host: 2.4 MB at 832x480), the input's shape,
dtype and device; an input whose later frames are not all zero (a last-frame condition) is never kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch


def channels_last(vae, on: bool = True) -> None:
    """Every 5D weight NDHWC and every 4D one NHWC (``Module.to(memory_format=...)`` would ask rank 5 of both)."""
    formats = {5: torch.channels_last_3d, 4: torch.channels_last}
    for p in vae.parameters():
        if p.dim() in formats:
            p.data = p.data.contiguous(memory_format=formats[p.dim()] if on else torch.contiguous_format)


class EncodeCache:
    """Wraps ``vae.encode``: an LRU of the last ``size`` first-frame encodings (0: off, nothing wrapped).

    ``on_hit`` is called when a kept encoding is returned (the encoder's forward hooks do not run then:
    the caller uses it to announce and time the stage as if they had).
    """

    def __init__(self, vae, size: int, on_hit: Callable[[], None] | None = None):
        self.vae = vae
        self.size = size
        self.on_hit = on_hit or (lambda: None)
        self.hits = 0
        self.misses = 0
        self._kept: OrderedDict[tuple, object] = OrderedDict()
        self._encode = vae.encode
        if size > 0:
            vae.encode = self.encode  # the pipeline calls self.vae.encode(...)

    def detach(self) -> None:
        """Give the VAE its own ``encode`` back."""
        if self.vae.__dict__.get("encode") == self.encode:
            del self.vae.encode

    @staticmethod
    def key(x: torch.Tensor) -> tuple | None:
        """The cache key of an encoder input (batch, channels, frames, height, width), or None: not kept."""
        if x.dim() != 5 or x.shape[0] != 1:
            return None
        if x.shape[2] > 1 and bool(x[:, :, 1:].any()):
            return None  # more than a first frame: a last-frame condition or a video
        first = x[:, :, 0].detach().contiguous().cpu()
        digest = hashlib.sha256(first.view(torch.uint8).numpy().tobytes()).hexdigest()
        return tuple(x.shape), str(x.dtype), str(x.device), digest

    def encode(self, x: torch.Tensor, *args, **kwargs):
        key = self.key(x)
        if key is not None:
            try:
                key = (*key, args, tuple(sorted(kwargs.items())))
                hash(key)
            except TypeError:  # an argument that is not a plain value: not kept
                key = None
        if key is not None and key in self._kept:
            self._kept.move_to_end(key)
            self.hits += 1
            self.on_hit()
            return self._kept[key]
        out = self._encode(x, *args, **kwargs)
        if key is not None:
            self.misses += 1
            self._kept[key] = out
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return out

    def clear(self) -> None:
        self._kept.clear()
