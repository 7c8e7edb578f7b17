"""Prometheus metrics of the GPU floor: the replica (through ``ray.serve.metrics``) and the LoRA cache actor.

Ray exports them with its own metrics from every node (the metrics agent's ``/metrics`` endpoint),
prefixed ``ray_``; counters get a ``_total`` suffix. ``ray.serve.metrics`` adds the ``application``,
``deployment`` and ``replica`` tags; the LoRA cache is a plain actor, so it uses ``ray.util.metrics``
and tags itself with its configuration digest (the suffix of its actor name). The queries that
matter are in ``docs/operations.md``; the dashboard is ``deploy/grafana/wan-i2v.json``.

Ray records a histogram observation as the midpoint of its bucket (``_sum`` is approximate), so the
bounds below are dense where the values are: stages and waits from tens of milliseconds to minutes.
"""

from __future__ import annotations

from typing import Mapping

# Seconds per stage of one generation: a text encode takes tens of ms, a denoise of 41 frames a minute.
STAGE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)
# The generation stages the replica times (``engine.pipeline.STAGES`` and the video encode), in their order.
STAGE_NAMES = ("text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "encode_video")


class ReplicaMetrics:
    """What one GPU replica reports: per-stage generation times, adapter loads, GPU memory."""

    def __init__(self):
        from ray.serve import metrics

        self.stage_seconds = metrics.Histogram(
            "wan_generation_stage_seconds", "time per stage of one generation (one prompt), in seconds",
            boundaries=list(STAGE_BUCKETS_S), tag_keys=("stage", "speed_mode"))
        self.adapter_loads = metrics.Counter(
            "wan_replica_adapter_loads", "LoRA files made resident on this replica (repeats and switches load none)")
        self.gpu_memory = metrics.Gauge(
            "wan_replica_gpu_memory_bytes", "GPU memory of this replica's process: allocated, reserved by the "
            "caching allocator, and the peak allocated during the last generation", tag_keys=("kind",))

    def generation(self, timings: Mapping[str, float], speed_mode: str) -> None:
        """One finished generation's stage timings (a stage that did not run is not observed), by the
        speed mode it ran in (``exact``, ``fast``, ``turbo``): the modes' times differ several-fold."""
        for stage in STAGE_NAMES:
            if stage in timings:
                self.stage_seconds.observe(timings[stage], tags={"stage": stage, "speed_mode": speed_mode})

    def loaded_adapters(self, n: int) -> None:
        if n > 0:
            self.adapter_loads.inc(n)

    def memory(self, device) -> None:
        """Report the device's memory now; nothing on a CPU replica."""
        self.memory_figures(gpu_memory(device))

    def memory_figures(self, values: Mapping[str, int] | None) -> None:
        """Report figures read elsewhere (a multi-GPU replica's ranks: ``parallel.rank_group.largest_memory``)."""
        for kind, value in (values or {}).items():
            self.gpu_memory.set(value, tags={"kind": kind})


def gpu_memory(device) -> dict[str, int] | None:
    """``torch.cuda``'s memory figures for ``device`` (None off CUDA). Reads allocator stats: no sync."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
    }


# The LoRA store's counters (``LoraStore.counts``) that are exported, and their metric names.
LORA_CACHE_COUNTERS = {
    "hits": ("wan_lora_cache_hits", "LoRA references answered from this node's cache without a download"),
    "misses": ("wan_lora_cache_misses", "LoRA references not in this node's cache: a download started"),
    "fetched_bytes": ("wan_lora_cache_fetched_bytes", "bytes of LoRA files downloaded into this node's cache"),
    "evictions": ("wan_lora_cache_evictions", "cached LoRA files deleted to stay under the disk quota"),
    "failures": ("wan_lora_cache_fetch_failures", "LoRA downloads that failed (after their retries)"),
}


class LoraCacheMetrics:
    """The counters of one node's LoRA cache actor, tagged with its configuration digest."""

    def __init__(self, cache: str):
        from ray.util import metrics

        self._counters = {
            name: metrics.Counter(metric, description, tag_keys=("cache",)).set_default_tags({"cache": cache})
            for name, (metric, description) in LORA_CACHE_COUNTERS.items()
        }

    def count(self, name: str, amount: int = 1) -> None:
        counter = self._counters.get(name)
        if counter is not None and amount > 0:
            counter.inc(amount)
