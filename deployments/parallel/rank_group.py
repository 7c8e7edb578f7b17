"""A Serve replica that owns N GPUs: N rank processes (Ray actors) that run every request together.

Why one replica drives its ranks, rather than N Serve replicas gang-scheduled (Serve's
``gang_scheduling_config``, alpha in Ray 2.60): a request must reach every rank at once, in the same
order as every other request, and adapters must change on all of them between requests. As N Serve
replicas, each would be a separate target for the router (two requests could start on two ranks of
one gang), multiplexed LoRA routing and ``max_ongoing_requests`` would count ranks, not requests,
and the autoscaler would scale ranks. As one replica, everything above the replica stays as it is:
one request at a time, LoRA sets resident per replica, autoscaling in whole replicas, one health
check; the replica's placement group (``placement_group_bundles``, ``STRICT_PACK``) reserves its
ranks' GPUs on one node before it starts, so a replica either gets all N GPUs or waits, and its ranks
die with it (they are its child actors).

``RankGroup`` is the replica's generator: it implements ``generator.Generator`` as ``WanGenerator``
does, so ``WanI2VReplica``'s LoRA sets, streaming, cancellation and error typing work unchanged; each
call goes to every rank. ``RankWorker`` is one rank: its own generator (what the replica's generator
factory makes, ``WanGenerator`` by default) on its own GPU, split by ``ranks.apply_parallel``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import socket
import threading
import time

from ..config import GpuConfig
from ..errors import GenerationFailed, InvalidRequest, ReplicaUnavailable, ServiceError
from ..generator import Generator, GeneratorFactory
from ..joblog import job_logger
from ..replica.wan_i2v import WanI2VReplica
from ..spec import GenerationSpec, Progress
from .layout import check_splittable

# generate() runs in the replica's job context: its lines name the job, as WanI2VReplica's do.
log = job_logger("ray.serve")

# Ray gives each rank its GPU by setting CUDA_VISIBLE_DEVICES to it alone unless told not to; then
# NCCL cannot copy peer to peer between the ranks' processes (it falls back to host memory).
NOSET_VISIBLE = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def _frames_digest(frames) -> str:
    return hashlib.sha256(frames.tobytes()).hexdigest()[:16]


def largest_memory(figures: list[dict | None]) -> dict | None:
    """Each memory figure's largest value over the ranks (None where no rank has a GPU): the rank
    nearest to running out is the one the gauge must show."""
    present = [f for f in figures if f]
    return {kind: max(f[kind] for f in present) for kind in present[0]} if present else None


def _unwrap(exc: BaseException) -> BaseException:
    """A rank's typed error without Ray's wrapper (``RayTaskError`` keeps it as ``cause``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RankWorker:
    """One rank: a ``WanGenerator`` on this process's GPU (or CPU), joined to the group."""

    def __init__(self, cfg: GpuConfig, rank: int, generator_factory: GeneratorFactory):
        self.cfg = cfg
        self.rank = rank
        self.generator_factory = generator_factory
        self._cancel = threading.Event()
        self.generator = None
        self.ranks = None
        self.applied = None
        self.startup: dict = {}
        self.device = None

    def _here(self) -> None:
        """Make this rank's GPU the current one in the calling thread.

        The current CUDA device is per thread, and each actor call (and each generation's thread)
        may run on another one: without this, a ``torch.device("cuda")`` there means GPU 0, which
        this rank does not own (it sees the node's GPUs: see ``NOSET_VISIBLE``).
        """
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.set_device(self.device)

    def rendezvous(self) -> str:
        """Rank 0: the address every rank joins the process group at."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def _device(self):
        import torch

        if self.cfg.replica.num_gpus <= 0:
            return torch.device("cpu")
        import ray

        gpu_id = str(ray.get_gpu_ids()[0])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # Ray's id is the node's: its index among what this process sees
            ids = [v.strip() for v in visible.split(",")]
            index = ids.index(gpu_id) if gpu_id in ids else 0
        else:
            index = int(gpu_id)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def setup(self, init_method: str) -> dict:
        """Join the group, load, split, warm up (compile cache around it); returns the startup account."""
        from ..replica.startup import StartupClock, build_generator
        from .ranks import Ranks, apply_parallel, check_same_weights

        clock = StartupClock()
        with clock.part("process_group_s"):
            device = self.device = self._device()
            self.ranks = Ranks(self.cfg.parallel, self.rank, init_method, device)

        def split(generator):
            check_same_weights(generator.pipe, self.ranks)
            self.applied = apply_parallel(generator.pipe, self.ranks)
            return self.applied.report()

        loaded, self.generator, self.startup = build_generator(self.cfg, split=split, rank=self.rank, clock=clock,
                                                               factory=self.generator_factory)
        # load_pipeline resolves "cuda" to the current GPU when it loads; keep the index, so that a
        # synchronize or an empty_cache from another thread still means this rank's GPU.
        loaded.device = self.generator.device = device
        self.startup["device"] = self._device_name(device)
        # Two ranks on one GPU would run (slowly, or out of memory); say so at startup instead.
        names = self.ranks.gather_objects(self.startup["device"])
        if device.type == "cuda" and len(set(names)) != len(names):
            raise RuntimeError(f"ranks share a GPU: {names}")
        self.ranks.barrier()
        return {"rank": self.rank, "pid": os.getpid(), "speed_modes": list(self.generator.speed_modes),
                **self.startup}

    @staticmethod
    def _device_name(device) -> str:
        import torch

        if device.type != "cuda":
            return f"cpu:{socket.gethostname()}:{os.getpid()}"
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} {getattr(props, 'uuid', device.index)}"

    # -- requests -------------------------------------------------------------------------------

    def run(self, spec: GenerationSpec, stream_video: bool):
        """Generate with every other rank. Rank 0 yields progress, then ``{"frames": Frames}``; the others
        yield ``{"done": summary}``. A typed error is raised on every rank alike."""
        self._cancel.clear()
        events: queue.Queue = queue.Queue()
        lead = self.rank == 0
        passes_before = self._passes()
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)  # the gauge's peak is this generation's

        def should_cancel() -> bool:
            # A collective: every rank stops at the same step, or none does.
            return self.ranks.any(self._cancel.is_set())

        def work():
            try:
                self._here()
                frames = self.generator.generate(spec, (lambda p: events.put(("progress", p))) if lead else None,
                                                 should_cancel, stream_video and lead)
                events.put(("frames", frames))
            except BaseException as e:  # noqa: BLE001 (handed to the caller, below)
                events.put(("error", e))

        thread = threading.Thread(target=work, name=f"wan-rank{self.rank}", daemon=True)
        thread.start()
        while True:
            kind, value = events.get()
            if kind == "progress":
                yield {"progress": value.model_dump()}
            elif kind == "error":
                thread.join()
                raise value
            else:
                thread.join()
                passes = None if passes_before is None else self._passes() - passes_before
                summary = {"rank": self.rank, "frames_digest": _frames_digest(value.frames), "passes": passes}
                yield {"frames": value, "summary": summary} if lead else {"done": summary}
                return

    def _passes(self) -> int | None:
        """Transformer passes this rank has computed so far (CFG-parallel ranks count them)."""
        cfg = self.applied.cfg_parallel if self.applied else None
        return cfg.passes if cfg is not None else None

    def cancel(self) -> None:
        self._cancel.set()

    def load_adapter(self, ref: str, path: str, max_header_bytes: int) -> str:
        self._here()
        return self.generator.load_adapter(ref, path, max_header_bytes)

    def delete_adapter(self, ref: str) -> None:
        self._here()
        self.generator.delete_adapter(ref)

    def adapter_state(self) -> dict:
        from .ranks import adapter_fingerprint

        self._here()
        return {"rank": self.rank, **adapter_fingerprint(self.generator)}

    def health(self) -> dict | None:
        """Raises if this rank's GPU is unusable; its memory figures (None off CUDA)."""
        import torch

        from ..replica.metrics import gpu_memory

        self._here()
        if self.generator is not None and self.generator.device.type == "cuda":
            torch.cuda.synchronize(self.generator.device)
            torch.ones(1, device=self.generator.device).add_(1).item()
            return gpu_memory(self.generator.device)
        return None

    def stats(self) -> dict:
        from ..engine.models import pipeline_loads
        from ..speed.compile_cache import compiled_graphs

        return {"rank": self.rank, "pid": os.getpid(), "pipeline_loads": pipeline_loads(),
                "adapter_loads": self.generator.adapter_loads, "compiled_graphs": compiled_graphs(),
                "distill_loads": self.generator.distill_loads, "startup": self.startup}


class RankGroup(Generator):
    """The replica's generator (``generator.Generator``): every call goes to each of its N ranks."""

    def __init__(self, cfg: GpuConfig, generator_factory: GeneratorFactory | None = None, on_broken=None):
        """Start the ranks and wait until every one is ready.

        Args:
            cfg: the replica's config.
            generator_factory: what makes each rank's generator (default: the config's).
            on_broken: called with the reason once the group cannot serve again (a rank lost).
        """
        import ray
        import torch
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..engine.models import LoadedModel

        self.cfg = cfg
        self.on_broken = on_broken
        p = cfg.parallel
        t0 = time.perf_counter()
        env = dict(p.env)
        if cfg.replica.num_gpus > 0 and not p.one_visible_gpu:
            env[NOSET_VISIBLE] = "1"
        factory = generator_factory or cfg.replica.make_generator_factory()
        pg = ray.util.get_current_placement_group()
        worker = ray.remote(RankWorker)
        self.workers = []
        for rank in range(p.degree):
            # Threads: a run, and a cancel, a health check or stats while it runs.
            options = {"num_cpus": p.rank_cpus, "num_gpus": cfg.replica.num_gpus, "max_concurrency": 4,
                       "runtime_env": {"env_vars": env}}
            if pg is not None:  # the replica's own bundle is 0; rank r reserved bundle r + 1
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank + 1)
            self.workers.append(worker.options(**options).remote(cfg, rank, factory))
        try:
            init_method = ray.get(self.workers[0].rendezvous.remote(), timeout=p.startup_timeout_s)
            self.rank_startup = self._all([w.setup.remote(init_method) for w in self.workers],
                                          timeout=p.startup_timeout_s)
        except BaseException:
            self.shutdown()  # ranks of a group that never formed must not keep their GPUs
            raise
        self.startup = {
            "ranks_ready_s": round(time.perf_counter() - t0, 3),
            "slowest_rank": {k: max(r.get(k) or 0 for r in self.rank_startup)
                             for k in ("process_group_s", "load_s", "speed_modes_s", "parallel_split_s",
                                       "compile_cache_load_s", "warmup_s", "compile_cache_save_s", "init_s")},
        }
        first = self.rank_startup[0]
        self.loaded = LoadedModel(pipe=None, device=torch.device("cpu"), dtype=torch.float32, source=cfg.model.source,
                                  load_seconds=self.startup["slowest_rank"]["load_s"])
        self.speed_report = {"warmup": first.get("warmup"), "ranks": p.degree}
        # Installed once at startup, the same on every rank (one config): no need to ask them again.
        self._speed_modes = tuple(first["speed_modes"])
        self.adapters: dict[str, str] = {}  # adapter name -> ref, identical on every rank
        self.adapter_loads = 0
        self.broken: str | None = None
        self.last_summaries: list[dict] = []

    @property
    def speed_modes(self) -> tuple[str, ...]:
        return self._speed_modes

    @property
    def distill_loads(self) -> int:
        return max(r["distill_loads"] for r in self.stats())

    def warmup(self) -> dict:
        """Done at construction: every rank warmed up before the group existed."""
        return self.speed_report.get("warmup") or {}

    # -- adapters: the same on every rank --------------------------------------------------------

    def _all(self, calls: list, timeout: float | None = None) -> list:
        """Results of one call per rank; the first rank's error if any failed (after all ended)."""
        import ray

        results, errors = [], []
        deadline = None if timeout is None else time.monotonic() + timeout
        for rank, ref in enumerate(calls):
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                results.append(ray.get(ref, timeout=left))
            except Exception as e:  # noqa: BLE001
                results.append(None)
                errors.append((rank, _unwrap(e)))
        if errors:
            raise errors[0][1]
        return results

    def load_adapter(self, ref: str, path: str, max_header_bytes: int = 16 * 1024**2) -> str:
        """Load on every rank; a rank that fails leaves none loaded (the others undo theirs)."""
        import ray

        from ..spec import adapter_name

        name = adapter_name(ref)
        if name in self.adapters:
            return name
        calls = [w.load_adapter.remote(ref, path, max_header_bytes) for w in self.workers]
        try:
            self._all(calls)
        except BaseException:
            ray.get([w.delete_adapter.remote(ref) for w in self.workers])  # idempotent where not loaded
            raise
        self.adapters[name] = ref
        self.adapter_loads += 1
        return name

    def delete_adapter(self, ref: str) -> None:
        from ..spec import adapter_name

        self._all([w.delete_adapter.remote(ref) for w in self.workers])
        self.adapters.pop(adapter_name(ref), None)

    def adapter_states(self) -> list[dict]:
        import ray

        return ray.get([w.adapter_state.remote() for w in self.workers])

    # -- generation ------------------------------------------------------------------------------

    def generate(self, spec: GenerationSpec, on_progress=None, should_cancel=None, stream_video: bool = False):
        """Run ``spec`` on every rank; rank 0's frames. Raises the ranks' typed error (rank 0's first)."""
        import ray
        from ray.exceptions import RayActorError

        if self.broken:
            raise ReplicaUnavailable(f"this replica's ranks are out of step: {self.broken}")
        why = check_splittable(self.cfg.parallel, spec.width, spec.height, spec.num_frames)
        if why:
            raise InvalidRequest(why, {"width": spec.width, "height": spec.height, "num_frames": spec.num_frames,
                                       "sequence_degree": self.cfg.parallel.sequence_degree})
        on_progress = on_progress or (lambda p: None)
        lead = self.workers[0].run.options(num_returns="streaming").remote(spec, stream_video)
        others = {self.workers[r].run.options(num_returns="streaming").remote(spec, False): r
                  for r in range(1, len(self.workers))}
        waiting = [lead, *others]
        frames, summaries, errors = None, {}, {}
        canceled = False
        deadline = None
        while waiting:
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            if should_cancel is not None and not canceled and should_cancel():
                canceled = True
                for w in self.workers:
                    w.cancel.remote()
            for stream in ready:
                rank = 0 if stream is lead else others[stream]
                try:
                    event = ray.get(next(stream))
                except StopIteration:
                    waiting.remove(stream)
                    continue
                except Exception as e:  # noqa: BLE001  a rank's error: the stream ends with it
                    errors[rank] = _unwrap(e)
                    waiting.remove(stream)
                    continue
                if "progress" in event:
                    on_progress(Progress(**event["progress"]))
                elif "frames" in event:
                    frames = event["frames"]
                    summaries[0] = event["summary"]
                else:
                    summaries[rank] = event["done"]
            dead = sorted(r for r, e in errors.items() if isinstance(e, RayActorError))
            if dead and not self.broken:  # a rank process is gone: this group cannot run another request
                self._break(f"rank(s) {dead} died: {errors[dead[0]]!r:.200}")
            if errors and deadline is None:
                deadline = time.monotonic() + self.cfg.parallel.error_grace_s
            if deadline is not None and waiting and time.monotonic() > deadline:
                self._break(f"rank(s) {sorted(errors)} failed ({errors[min(errors)]!r:.200}) and rank(s) "
                            f"{sorted(0 if s is lead else others[s] for s in waiting)} did not stop")
                raise ReplicaUnavailable(f"a rank failed and the others did not stop: {self.broken}")
        if self.broken:
            raise ReplicaUnavailable(f"this replica's ranks are out of step: {self.broken}")
        if errors:
            first = errors[min(errors)]
            if isinstance(first, ServiceError):
                raise first
            raise GenerationFailed(f"rank {min(errors)} failed: {type(first).__name__}: {first}"[:500],
                                   {"rank": min(errors)}) from first
        if frames is None:
            raise GenerationFailed("rank 0 ended without frames")
        self.last_summaries = [summaries[r] for r in sorted(summaries)]
        digests = {s["frames_digest"] for s in self.last_summaries}
        if len(digests) > 1:  # every rank combines the same predictions: a difference is a defect
            log.warning("ranks made different frames: %s", self.last_summaries)
        return frames

    def _break(self, why: str) -> None:
        """A lost rank, or ranks stuck in a collective, cannot be trusted again: stop them all, and fail
        every request and health check from now on, so Serve replaces this replica."""
        self.broken = why
        log.error("rank group broken: %s", why)
        self.shutdown()
        if self.on_broken is not None:
            self.on_broken(why)

    def check_health(self) -> dict | None:
        """Raises if a rank is lost or stuck; the ranks' largest memory figures (``largest_memory``)."""
        import ray

        if self.broken:
            raise ReplicaUnavailable(f"this replica's ranks are out of step: {self.broken}")
        try:
            return largest_memory(ray.get([w.health.remote() for w in self.workers],
                                          timeout=self.cfg.replica.health_check_timeout_s))
        except Exception as e:  # noqa: BLE001  a dead or stuck rank
            raise ReplicaUnavailable(f"a rank is not usable: {type(e).__name__}: {e}"[:500]) from e

    def stats(self) -> list[dict]:
        import ray

        return ray.get([w.stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001  already gone
                pass


class ParallelWanI2VReplica(WanI2VReplica):
    """``WanI2VReplica`` whose generator is a ``RankGroup`` of ``gpu.parallel.degree`` ranks."""

    def _make_generator(self, cfg: GpuConfig):
        group = RankGroup(cfg, self.generator_factory, on_broken=self._exit)
        return group.loaded, group, group.startup

    @staticmethod
    def _exit(why: str) -> None:
        """A replica that lost a rank cannot serve again. It exits, as a crash would: Serve starts a new
        one at once, and the job runner retries the job it was running, as for any replica that dies."""
        log.error("replica exiting: %s", why)
        for handler in logging.getLogger("ray.serve").handlers:
            handler.flush()
        os._exit(1)

    def check_health(self) -> None:
        # This process holds no GPU: the memory gauge shows the ranks' (read by their health checks).
        self.metrics.memory_figures(self.generator.check_health())

    def stats(self) -> dict:
        base = super().stats()
        ranks = self.generator.stats()
        states = self.generator.adapter_states()
        # The base counts this (driver) process; the pipelines live in the ranks.
        base.update(
            pipeline_loads=max(r["pipeline_loads"] for r in ranks),
            compiled_graphs=max(r["compiled_graphs"] for r in ranks),
            device=f"{len(ranks)} ranks",
            parallel=self.cfg.parallel.model_dump(include={"degree", "cfg_degree", "ulysses_degree", "ring_degree"}),
            ranks=[{**r, "adapters": s} for r, s in zip(ranks, states)],
            last_request_ranks=self.generator.last_summaries,
        )
        return base


def placement_options(cfg: GpuConfig) -> dict:
    """Deployment options that reserve the replica (bundle 0) and its ranks (one bundle each) on one node."""
    r, p = cfg.replica, cfg.parallel
    rank_bundle = {"CPU": p.rank_cpus}
    if r.num_gpus > 0:
        rank_bundle["GPU"] = r.num_gpus
    return {
        "ray_actor_options": {"num_gpus": 0, "num_cpus": r.num_cpus},
        # Ray refuses an empty bundle: a replica configured with no CPU still reserves a sliver.
        "placement_group_bundles": [{"CPU": r.num_cpus or 0.01}] + [dict(rank_bundle) for _ in range(p.degree)],
        "placement_group_strategy": "STRICT_PACK",
    }
