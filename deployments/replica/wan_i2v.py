"""The GPU replica: loads the pipeline once, keeps LoRA sets resident, generates one spec at a time.

A plain class; ``deployment.make_deployment`` turns it into a Serve deployment, and the app builder
binds it with the generator factory it runs (``generator.GeneratorFactory``). ``generate`` is a streaming
method: it yields progress events, then the result, so the caller can record progress and cancel
between denoising steps.

Every exception that leaves an entry point (``generate``, ``load_lora_set``) is a ``ServiceError``
with a code (``as_service_error``): the ingress unpickles what a replica raises and has no torch, and
a job records a code, not a raw ``torch.OutOfMemoryError`` as ``INTERNAL_ERROR``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
from typing import AsyncIterator

from ..config import GpuConfig
from ..errors import (
    GenerationFailed,
    LoraFetchFailed,
    OutOfMemory,
    ReplicaUnavailable,
    ServiceError,
    first_line,
    is_client_error,
    jsonable,
)
from ..generator import Generator, GeneratorFactory
from ..joblog import JOB_ID, in_job_context, job_logger
from ..spec import GenerationResult, GenerationSpec, Progress, VideoOutput, refs_from_key
from . import logs
from .metrics import ReplicaMetrics

# Every line logged while a generation runs names its job (the caller passes the job id along).
log = job_logger("ray.serve")

# How often a running generation checks that its caller (an ingress replica) is still alive.
CALLER_CHECK_S = 2.0


def as_service_error(exc: Exception, stage: str) -> ServiceError:
    """``exc`` as a typed error whose pickle holds only this package's classes and plain values.

    Typed errors keep their class, code and message (details made plain); an out-of-memory (torch's,
    or the host's ``MemoryError``) becomes ``OutOfMemory``; anything else, a failure the replica did
    not foresee, ``GenerationFailed`` naming the stage and the error's type. The original stays the
    ``__cause__`` for the replica's own logs (``ServiceError.__reduce__`` never pickles it).
    """
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError) and isinstance(exc.cause, ServiceError):
        exc = exc.cause  # the LoRA cache actor's error, without Ray's wrapper class around it
    if isinstance(exc, ServiceError):
        exc.details = jsonable(exc.details)
        return exc
    import torch

    line = first_line(exc) if str(exc).strip() else ""  # a textless error: its type alone names it
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemory(f"out of GPU memory while {stage}: {line}", {"stage": stage})
    if isinstance(exc, MemoryError):
        return OutOfMemory(f"out of host memory while {stage}", {"stage": stage})
    return GenerationFailed(f"{stage} failed: {type(exc).__name__}" + (f": {line}" if line else ""),
                            {"stage": stage, "error": type(exc).__name__})


class LoraSet:
    """A multiplexed 'model': one set of resident adapters. Eviction deletes what no other set uses."""

    def __init__(self, replica: "WanI2VReplica", key: str, refs: list[str]):
        self._replica = replica
        self.key = key
        self.refs = refs
        self._released = False

    def __del__(self):  # Serve calls this on LRU eviction; GC may call it again
        if not self._released:
            self._released = True
            self._replica._release(self.key)


class WanI2VReplica:
    """One GPU (or CPU) worth of Wan 2.1 I2V."""

    def __init__(self, cfg: GpuConfig, generator_factory: GeneratorFactory):
        """Args:
            cfg: the replica's config.
            generator_factory: makes this process's generator from the loaded model (each rank's, for a
                parallel replica); ``cfg.replica.make_generator_factory()`` is the configured one.
        """
        import torch  # noqa: F401  (fail early if the replica's environment lacks torch)

        logs.install()
        self.cfg = cfg
        self.metrics = ReplicaMetrics()
        # One worker thread: pipeline calls, adapter loads and deletes never overlap.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="wan-gpu")
        self._lock = asyncio.Lock()
        self._resident: dict[str, list[str]] = {}
        self.generator_factory = generator_factory
        self.generator: Generator
        self.loaded, self.generator, self.startup = self._make_generator(cfg)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        self._cache = None
        self._hf_token = cfg.model.token()  # a SecretStr: masked in any repr or log line
        self.caller_died_stops = 0  # generations stopped because their caller (an ingress) died
        self._warmup()
        self.metrics.memory(self.loaded.device)

    def _make_generator(self, cfg: GpuConfig):
        """(loaded model, generator, startup account) on this replica's GPU; ``rank_group`` uses several.

        Raises:
            GpuTooSmall: the card's free memory is under what ``gpu.memory``'s mode needs (checked before
                anything loads, so a too-small card fails here and never in a job).
        """
        from ..engine.memory import check_replica
        from ..engine.models import resolve_device
        from .startup import build_generator

        check_replica(cfg.memory, cfg.model.source, resolve_device(cfg.model))
        return build_generator(cfg, factory=self.generator_factory)

    def _warmup(self):
        """Compile and warm up before the replica reports ready (CUDA speed modes only)."""
        if self.loaded.device.type == "cuda" and self.cfg.model.speed.warmup:
            self.generator.warmup()

    # -- LoRA sets (multiplexed) ----------------------------------------------------------------

    def _lora_cache(self):
        from ..lora.actor import get_or_create_cache_actor

        if self._cache is None:
            self._cache = get_or_create_cache_actor(self.cfg.lora, self.cfg.fetch)
        return self._cache

    async def _resolve(self, ref: str) -> str:
        from ray.exceptions import RayActorError

        for attempt in range(2):
            try:
                return await self._lora_cache().resolve.remote(ref, self._hf_token)
            except RayActorError as e:  # the node's cache actor died: make a new one, once
                self._cache = None
                if attempt:
                    raise LoraFetchFailed(f"LoRA cache unavailable: {e}", {"ref": ref}) from e
        raise AssertionError("unreachable")

    async def load_lora_set(self, key: str) -> LoraSet:
        """Resolve every adapter of a set through this node's cache and make it resident.

        All or nothing: a set that fails part-way (or is canceled) removes the adapters it loaded, so
        none stays resident without a set to own and evict it.

        Raises:
            ServiceError: always typed (``as_service_error``).
        """
        try:
            refs = refs_from_key(key)
            paths = await asyncio.gather(*(self._resolve(ref) for ref in refs))
            loop = asyncio.get_running_loop()
            in_use = self._refs_in_use()
            loads_before = self.generator.adapter_loads
            work = loop.run_in_executor(self._executor, in_job_context(self._load_adapters, refs, paths, in_use))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                # The loads go on in their thread: wait for them (the caller's locks are still held,
                # so no other set loads meanwhile), then undo what they made resident.
                await asyncio.shield(asyncio.wait({work}))
                if not work.cancelled() and work.exception() is None:
                    await asyncio.shield(loop.run_in_executor(
                        self._executor, in_job_context(self._delete_adapters, work.result(), self._refs_in_use())))
                raise
            finally:
                # Counted by the generator as it loads: files made resident, also when undone after.
                self.metrics.loaded_adapters(self.generator.adapter_loads - loads_before)
        except Exception as e:
            typed = as_service_error(e, "loading LoRAs")
            if typed is e:
                raise
            raise typed from e
        self._resident[key] = refs
        return LoraSet(self, key, refs)

    def _refs_in_use(self) -> set[str]:
        """Adapters that some resident set owns (read on the event loop, where ``_resident`` changes)."""
        return {r for rs in self._resident.values() for r in rs}

    def _load_adapters(self, refs: list[str], paths: list[str], in_use: set[str]) -> list[str]:
        """Load a set's adapters (worker thread); returns those it newly made resident.

        On failure, removes those again (never one in ``in_use``) and re-raises.
        """
        fresh: list[str] = []
        try:
            for ref, path in zip(refs, paths):
                new = ref not in self.generator.adapters.values()
                self.generator.load_adapter(ref, path, self.cfg.lora.max_header_bytes)
                if new:
                    fresh.append(ref)
        except BaseException:
            self._delete_adapters(fresh, in_use)
            raise
        return fresh

    def _delete_adapters(self, refs: list[str], in_use: set[str]) -> None:
        for ref in refs:
            if ref in in_use:
                continue
            try:
                self.generator.delete_adapter(ref)
            except Exception:  # the load's own error is the one to report; this one only to the log
                log.exception("could not remove adapter %s after a failed LoRA set load", ref)

    async def get_lora_set(self, key: str) -> LoraSet:
        """Unmultiplexed by default; ``deployment.make_deployment`` wraps it in ``serve.multiplexed``."""
        return await self.load_lora_set(key)

    def _release(self, key: str) -> None:
        refs = self._resident.pop(key, [])
        still_used = {r for rs in self._resident.values() for r in rs}
        for ref in refs:
            if ref not in still_used:
                self._executor.submit(self.generator.delete_adapter, ref).result()

    # -- generation -----------------------------------------------------------------------------

    async def generate(self, spec: GenerationSpec, caller=None, job_id: str | None = None) -> AsyncIterator[dict]:
        """Stream ``{"started": {replica, pid}}``, ``{"progress": ...}`` events, then ``{"result": GenerationResult}``.

        Args:
            spec: what to generate.
            caller: the calling actor's handle (an ingress replica), if any. Ray does not cancel a
                stream whose caller died; this replica then stops at the next step itself, since
                nobody would receive the result and the job is retried through another ingress.
            job_id: the request this generation belongs to; every log line about it names it.
        """
        # Serve runs each request in a task of its own: the id stays with this request only.
        JOB_ID.set(job_id)
        where = {"stage": "starting"}  # the stage now, so a failure names where it happened
        stream = self._generate(spec, caller, where)
        try:
            async for event in stream:
                yield event
        except Exception as e:
            typed = as_service_error(e, where["stage"])
            if isinstance(typed, OutOfMemory) and self.loaded.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()  # an OOM outside the pipeline call leaves its cache behind
            if typed.code == "CANCELED":
                log.info("canceled while %s", where["stage"])
            else:
                log.warning("failed while %s (%s: %s)", where["stage"], typed.code, typed.message)
                if is_client_error(typed):  # this line is the one; Serve's "Request failed." would repeat it
                    logs.said(typed)
            if typed is e:
                raise
            raise typed from e
        except (asyncio.CancelledError, GeneratorExit):
            log.info("stopped by its caller while %s", where["stage"])
            raise
        finally:
            # Closed now, not when collected: a caller that stops reading must free the lock and the
            # pipeline (the inner stream waits for the running step) before the next request.
            await stream.aclose()

    async def _generate(self, spec: GenerationSpec, caller, where: dict) -> AsyncIterator[dict]:
        from ..engine.media_out import CONTENT_TYPES, encode

        async with self._lock:
            log.info("generating %dx%d, %d frames, %d steps, %s, %d LoRAs", spec.width, spec.height,
                     spec.num_frames, spec.steps, spec.sampler, len(spec.loras))
            # Where this attempt runs, so a job's record names its replica while it runs.
            yield {"started": {"replica": self.replica_id, "pid": os.getpid()}}
            if spec.loras:
                where["stage"] = "loading LoRAs"
                yield {"progress": Progress(stage="loading_loras", total_steps=spec.steps).model_dump()}
                await self.get_lora_set(spec.lora_key)  # multiplexed: see deployment.make_deployment
            where["stage"] = "generating"
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()
            cancel = threading.Event()

            def on_progress(p: Progress):
                loop.call_soon_threadsafe(events.put_nowait, p)

            if self.loaded.device.type == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats(self.loaded.device)  # the gauge's peak is this generation's
            work = loop.run_in_executor(self._executor, in_job_context(
                self.generator.generate, spec, on_progress, cancel.is_set, self.cfg.model.speed.stream_video))
            watch = asyncio.ensure_future(self._watch_caller(caller, cancel)) if caller is not None else None
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield {"progress": getter.result().model_dump()}
                        continue
                    getter.cancel()
                    break
                frames = work.result()  # raises the generation's typed error
                where["stage"] = "encoding the video"
                yield {"progress": Progress(stage="encoding_video", step=spec.steps, total_steps=spec.steps).model_dump()}
                t0 = loop.time()
                data = frames.video  # already encoded while the VAE decoded (MP4), else now
                try:
                    if data is None:
                        data = await loop.run_in_executor(self._executor, encode, frames.frames, spec.fps,
                                                          spec.output_format)
                except Exception as e:  # e.g. the ffmpeg subprocess died (seen under load: broken pipe)
                    raise GenerationFailed(f"video encoding failed: {type(e).__name__}: "
                                           f"{first_line(e) if str(e).strip() else ''}",
                                           {"stage": "encode_video", "format": spec.output_format}) from e
                timings = {"encode_video": round(loop.time() - t0, 4), **frames.timings}
                self.metrics.generation(timings, spec.speed)
                log.info("done in %.2f s (%s)", timings.get("total", 0.0) + timings["encode_video"],
                         ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if k != "total"))
                n, h, w, _ = frames.frames.shape
                video = VideoOutput(format=spec.output_format, content_type=CONTENT_TYPES[spec.output_format],
                                    width=w, height=h, num_frames=n, fps=spec.fps, seed=frames.seed, data=data)
                yield {"result": GenerationResult(video=video, timings=timings, speed=jsonable(frames.speed),
                                                  replica=self.replica_id)}
            except (asyncio.CancelledError, GeneratorExit):
                # The caller canceled: stop at the next denoising step, and hold the lock until the
                # pipeline is free so the next request never overlaps this one.
                cancel.set()
                await asyncio.shield(asyncio.wait({work}))
                if not work.cancelled():
                    work.exception()  # the expected Canceled, read: else asyncio logs it as a lost traceback
                raise
            finally:
                if watch is not None:
                    watch.cancel()
                self.metrics.memory(self.loaded.device)

    async def _watch_caller(self, caller, cancel: threading.Event) -> None:
        """Set ``cancel`` once the caller's actor is dead (slow or briefly unreachable is not dead)."""
        from ray.exceptions import ActorDiedError

        while not cancel.is_set():
            await asyncio.sleep(CALLER_CHECK_S)
            try:
                await asyncio.wait_for(caller.__ray_ready__.remote(), timeout=30)
            except ActorDiedError:
                log.warning("the caller of this generation died; stopping it at the next step")
                self.caller_died_stops += 1
                cancel.set()
            except Exception:
                pass

    # -- health and introspection ----------------------------------------------------------------

    def check_health(self) -> None:
        import torch

        # Health checks run every few seconds, busy or idle: the memory gauge stays current.
        self.metrics.memory(self.loaded.device)
        if self.loaded.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.loaded.device)
                torch.ones(1, device=self.loaded.device).add_(1).item()
            except Exception as e:
                raise ReplicaUnavailable(f"GPU is not usable: {e}") from e

    def stats(self) -> dict:
        from ..engine.models import pipeline_loads
        from ..speed.compile_cache import compiled_graphs

        return {
            "replica": self.replica_id,
            # Counted by load_pipeline itself: any reload in this process (a replica is one) shows.
            "pipeline_loads": pipeline_loads(),
            "caller_died_stops": self.caller_died_stops,
            "adapter_loads": self.generator.adapter_loads,
            "speed_modes": list(self.generator.speed_modes),
            "distill_loads": self.generator.distill_loads,
            "resident_adapters": sorted(self.generator.adapters.values()),
            "resident_sets": sorted(self._resident),
            "device": str(self.loaded.device),
            "pid": os.getpid(),
            "compiled_graphs": compiled_graphs(),
            "startup": self.startup,
        }
