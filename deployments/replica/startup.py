"""A replica's (or a rank's) cold start, part by part: load, speed modes, parallel split, compile, warm-up.

``build_generator`` is the one way a GPU process gets its generator (``WanGenerator``, or what the
config's ``generator_factory`` makes): the one-GPU replica and every rank of a parallel replica call it, so the compile cache and the startup account are the same
for both. The account (seconds per part) is in the replica's ``stats()["startup"]`` and its log.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Callable

from ..config import GpuConfig
from ..generator import GeneratorFactory

log = logging.getLogger("ray.serve")


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so the account covers interpreter and imports too."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Seconds per named part, in the order they ran."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {"process_age_at_init_s": process_age_s()}

    @contextmanager
    def part(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = round(time.perf_counter() - t, 3)

    def report(self) -> dict:
        return {**self.parts, "init_s": round(time.perf_counter() - self.t0, 3)}


def build_generator(cfg: GpuConfig, split: Callable | None = None, rank: int = 0, clock: StartupClock | None = None,
                    factory: GeneratorFactory | None = None):
    """Load the pipeline, apply speed modes (and ``split``), then warm up with the compile cache around it.

    Args:
        cfg: the replica's config.
        factory: makes the generator from the loaded model (default: the config's ``generator_factory``).
        split: for a rank of a parallel group, ``split(generator) -> dict``, applied before warm-up so
            the warm-up compiles the split model.
        rank: this process's rank (part of the compile cache key).
    Returns:
        (loaded model, generator, startup report).
    """
    from ..engine.models import load_pipeline
    from ..speed import attention, compile_cache

    factory = factory or cfg.replica.make_generator_factory()
    clock = clock or StartupClock()
    compile_cache.CompileCache.use_inductor_dir(cfg.compile_cache)
    turbo_lora = None
    if cfg.model.speed.turbo.enabled:  # before the model: a missing file stops the replica at once
        from ..speed.turbo import distill_lora_file

        with clock.part("distill_lora_s"):
            turbo_lora = distill_lora_file(cfg)
    sequence_parallel = cfg.parallel.sequence_degree > 1
    if not sequence_parallel:  # those ranks never run FA4: no import for them
        attention.preload(cfg.model.speed.attention_backend, cfg.model.device)
    with clock.part("load_s"):
        loaded = load_pipeline(cfg.model, memory=cfg.memory)
    speed = cfg.model.speed
    if sequence_parallel:  # FA4 has no context-parallel path: cuDNN (flash4 asked for: a startup error)
        speed = attention.for_sequence_parallel(speed, loaded.device)
    with clock.part("speed_modes_s"):
        # Warm-up waits for the split and the compile cache, below.
        generator = factory(loaded, speed.model_copy(update={"warmup": False}), turbo_lora=turbo_lora)
    split_report = None
    if split is not None:
        with clock.part("parallel_split_s"):
            split_report = split(generator)
    parallel = cfg.parallel.model_dump(include={"degree", "cfg_degree", "ulysses_degree", "ring_degree"}) \
        if cfg.parallel.degree > 1 else None
    cache = compile_cache.for_generator(cfg.compile_cache, generator, parallel=parallel, rank=rank)
    with clock.part("compile_cache_load_s"):
        cache.load()
    if speed.warmup:
        with clock.part("warmup_s"):
            generator.warmup()  # compiles (or hits the cache) and runs the warm-up; nothing without speed modes
    with clock.part("compile_cache_save_s"):
        cache.save()
    report = {**clock.report(), "compile_cache": cache.report, "warmup": generator.speed_report.get("warmup"),
              "attention_backend": generator.speed_report.get("attention_backend"),
              "memory": generator.speed_report.get("memory")}
    if generator.speed_report.get("attention_fallback"):
        report["attention_fallback"] = generator.speed_report["attention_fallback"]
    if split_report is not None:
        report["parallel"] = split_report
    log.info("startup (rank %d): %s", rank, report)
    return loaded, generator, report
