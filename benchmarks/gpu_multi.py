"""Several GPUs on one machine: one request across N GPUs, N replicas vs one, cold starts, autoscaling up.

    python benchmarks/gpu_multi.py --out $OUT                  # N-GPU machine: random-full, N = all GPUs
    python benchmarks/gpu_multi.py --cpu-smoke --out /tmp/gm    # CPU: tiny model, gloo, 2 CPU "GPUs"

One command, one Ray cluster, sections in this order (each written to ``gpu_multi.json`` as soon as it
ends; a failing section is recorded and the rest go on; ``--budget-s`` skips what no longer fits):

1. ``latency``: the default request (832x480, 41 frames, 25 steps, CFG 4) on a ``RankGroup`` of 1 rank
   (the baseline: the one-GPU replica's code path) and then of N ranks (``gpu.parallel.degree`` N,
   default split: CFG x Ulysses), the same spec and seed on the same random weights: seconds, their
   ratio, per-stage times, and the relative L2 error of the N-GPU frames against the 1-GPU frames;
   each group's startup per rank (the 1-rank group's is the cold start with empty compile caches).
2. ``serve``: the real app (ingress + ``WanI2V``) through its HTTP endpoint, one-GPU replicas of
   ``random-full``, a steady queue of default-size requests with ``--tp-steps`` steps:
   ``one``: throughput (jobs/s) with 1 replica; ``autoscale``: the same deployment switched to
   autoscaling (min 1, max N; Serve keeps the running replica), idle, then a burst: seconds until
   the scale-up decision, until the new replicas are ready, and until the first of them serves a
   job; ``many``: throughput once all N replicas serve; ``cold_start``: every replica's startup
   account (load, compile cache load, compile + warm-up, cache save) from its log, the first
   replica's compile cache was filled by section 1, the later ones' by the first replica.
3. ``load``: a transformer of the full width (``--load-layers`` of its 40 blocks) saved as
   safetensors, then loaded through host memory and straight to the GPU (``model.load_direct``).

``summary`` compares with the targets (2 GPUs: latency <= 0.55x, throughput >= 1.9x; 4 GPUs: <=
0.30x, >= 3.8x; warm cold start <= 45 s). Figures on random weights show what runs and how fast, not
how good a video looks.
"""

from __future__ import annotations

import argparse
import ast
import base64
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# NVLink multicast stays off on shared hosts (see deployments/parallel/layout.py); set before torch/NCCL load.
for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

APP = "gpu-multi"
FINAL = ("succeeded", "failed", "canceled")
TARGETS = {2: {"latency_ratio": 0.55, "throughput_ratio": 1.9}, 4: {"latency_ratio": 0.30, "throughput_ratio": 3.8},
           8: {"latency_ratio": None, "throughput_ratio": None}}
WARM_COLD_START_TARGET_S = 45.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    """Sections recorded one by one into ``OUT/gpu_multi.json``."""

    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.results: dict = {"sections_failed": [], "sections_skipped": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def save(self) -> None:
        (self.out / "gpu_multi.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name: str, fn, need_s: float = 0.0):
        if self.left() < need_s:
            log(f"== {name}: skipped, {self.left():.0f} s left < {need_s:.0f} s")
            self.results["sections_skipped"].append(name)
            self.results[name] = {"skipped": f"{self.left():.0f} s left of the budget, needs ~{need_s:.0f} s"}
            self.save()
            return None
        log(f"== {name} (t={time.monotonic() - self.t0:.0f}s)")
        t = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # recorded; the other sections still run
            traceback.print_exc()
            self.results["sections_failed"].append(name)
            value = {"error": f"{type(e).__name__}: {e}"[:3000]}
        value = value if isinstance(value, dict) else {"value": value}
        value["section_s"] = round(time.monotonic() - t, 2)
        self.results[name] = value
        self.save()
        log(f"   {name}: {json.dumps(value, default=str)[:1500]}")
        return value


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def settings(a) -> dict:
    """Model, device and request sizes for the GPU run or the CPU smoke."""
    if a.cpu_smoke:
        return {"source": "tiny", "device": "cpu", "num_gpus": 0, "rank_cpus": 0.25, "replica_cpus": 0.25,
                "size": (64, 48, 5), "steps": 3, "tp_steps": 2, "output_format": "webp",
                "speed": {"warmup": False}}
    return {"source": "random-full", "device": "cuda", "num_gpus": 1, "rank_cpus": 2, "replica_cpus": 2,
            "size": (a.width, a.height, a.frames), "steps": a.steps, "tp_steps": a.tp_steps,
            # The GPU image has no ffmpeg for imageio (gpu_serve_overhead.py); the same encoder in both phases.
            "output_format": "webp", "speed": {}}


def gpu_config(a, s: dict, degree: int) -> dict:
    """The ``gpu`` section: the production speed settings, the given degree, this run's caches."""
    # A collective that hangs (a rank lost) fails within minutes, not the product's ten.
    parallel = {"degree": degree, "rank_cpus": s["rank_cpus"], "timeout_s": 240, "startup_timeout_s": 300}
    if degree > 1 and a.split:
        parallel.update({f"{k}_degree": int(v) for k, v in (p.split("=") for p in a.split.split(","))})
    return {
        "model": {"source": s["source"], "device": s["device"], "cache_dir": str(a.cache),
                  "speed": {**s["speed"], "warmup_width": s["size"][0], "warmup_height": s["size"][1],
                            "warmup_frames": s["size"][2]}},
        "replica": {"num_gpus": s["num_gpus"], "num_cpus": s["replica_cpus"], "health_check_timeout_s": 600,
                    "graceful_shutdown_timeout_s": 5},
        "lora": {"root": str(a.work / "loras"), "cache_dir": str(a.work / "lora-cache")},
        "parallel": parallel,
        "compile_cache": {"location": str(a.work / "compile-cache"), "inductor_dir": str(a.work / "inductor")},
    }


def image_png(width: int, height: int) -> bytes:
    import numpy as np
    from PIL import Image

    arr = (np.random.RandomState(0).rand(height, width, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def default_spec(s: dict):
    from deployments.spec import GenerationSpec

    w, h, f = s["size"]
    return GenerationSpec(prompt="a cinematic shot of a runner on a beach, handheld camera", negative_prompt="",
                          width=w, height=h, num_frames=f, fps=16, steps=s["steps"], guidance_scale=4.0, seed=42,
                          image_png=image_png(w, h))


# ---------------------------------------------------------------------------------------------
# 1. latency: one request on 1 GPU, then on N
# ---------------------------------------------------------------------------------------------


def gpus_idle(device: str, timeout_s: float = 120) -> float | None:
    """Wait until no GPU holds more than 2 GiB (killed actors take a moment to free theirs)."""
    if device != "cuda":
        return None
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
            if all(int(x) < 2048 for x in out.split()):
                return round(time.monotonic() - t0, 2)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
        time.sleep(1)
    return round(time.monotonic() - t0, 2)


def run_group(a, s: dict, degree: int, spec) -> tuple[dict, object]:
    """Start a rank group of ``degree`` ranks, run ``spec`` once, stop it; (record, frames)."""
    from deployments.config import GpuConfig
    from deployments.parallel.rank_group import RankGroup

    cfg = GpuConfig.model_validate(gpu_config(a, s, degree))
    t0 = time.monotonic()
    try:
        group = RankGroup(cfg)  # stops its ranks itself if it fails to start
    except BaseException:
        gpus_idle(s["device"])  # the next section needs the GPUs back
        raise
    start_s = time.monotonic() - t0
    try:
        t0 = time.monotonic()
        frames = group.generate(spec)
        seconds = time.monotonic() - t0
        record = {
            "degree": degree,
            "split": cfg.parallel.model_dump(include={"cfg_degree", "ulysses_degree", "ring_degree"}),
            "group_start_s": round(start_s, 2), "request_s": round(seconds, 3), "timings": frames.timings,
            "ranks_startup": group.rank_startup, "ranks_last_request": group.last_summaries,
        }
    finally:
        group.shutdown()
        freed = gpus_idle(s["device"])
    record["gpus_freed_s"] = freed
    return record, frames


def latency_section(a, s: dict, n: int, bench: Bench) -> dict:
    import numpy as np

    spec = default_spec(s)
    base, base_frames = run_group(a, s, 1, spec)
    out = {"request": f"{spec.width}x{spec.height}, {spec.num_frames} frames, {spec.steps} steps, CFG "
                      f"{spec.guidance_scale}, source {s['source']}", "baseline": base}
    bench.results["latency_partial"] = out  # kept if the N-GPU half fails
    bench.save()
    par, par_frames = run_group(a, s, n, spec)
    out["parallel"] = par
    ref = base_frames.frames.astype(np.float64)
    got = par_frames.frames.astype(np.float64)
    out["ratio"] = round(par["request_s"] / base["request_s"], 4)
    out["denoise_ratio"] = round(par["timings"].get("denoise", 0) / max(base["timings"].get("denoise", 1e-9), 1e-9), 4)
    out["frames_rel_l2_vs_1gpu"] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    out["frames_max_abs_diff"] = int(np.abs(got - ref).max())
    out["frames_equal"] = bool(np.array_equal(got, ref))
    out["ranks_frames_identical"] = len({r["frames_digest"] for r in par["ranks_last_request"]}) == 1
    return out


# ---------------------------------------------------------------------------------------------
# 2. the served app: 1 replica vs N, autoscaling up, cold starts
# ---------------------------------------------------------------------------------------------


class ReplicaWatch(threading.Thread):
    """Samples the WanI2V replica states (Serve's status) and live replica pids every 0.25 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, dict, tuple]] = []
        self.halt = threading.Event()

    def run(self):
        from ray import serve

        while not self.halt.is_set():
            try:
                states = dict(serve.status().applications[APP].deployments["WanI2V"].replica_states)
                self.samples.append((time.time(), states, tuple(sorted(replica_pids()))))
            except Exception:  # noqa: BLE001  a sample lost while the controller is busy
                pass
            time.sleep(0.25)

    def first(self, pred, after: float) -> float | None:
        for t, states, pids in self.samples:
            if t >= after and pred(states, pids):
                return t
        return None


def replica_pids() -> list[int]:
    import ray._private.state

    cls = f"ServeReplica:{APP}:WanI2V"
    return [a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == cls and a["State"] == "ALIVE"]


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


class Load:
    """Jobs through the HTTP API: keep a queue topped up, poll, remember when and where each ran."""

    def __init__(self, base_url: str, s: dict, poll_s: float):
        import httpx

        self.http = httpx.Client(base_url=base_url, timeout=120)
        self.poll_s = poll_s
        w, h, f = s["size"]
        self.body = {"model": "wan21_i2v_14b480p", "loras": [], "prompts": [{
            "prompt": "a runner on a beach", "width": w, "height": h, "num_frames": f, "sample_steps": s["tp_steps"],
            "guidance_scale": 4.0, "output_format": s["output_format"],
            "ctrl_img": base64.b64encode(image_png(w, h)).decode()}]}
        self.jobs: dict[str, dict] = {}
        self.n = 0

    def submit(self, k: int) -> None:
        for _ in range(k):
            self.n += 1
            body = json.loads(json.dumps(self.body))
            body["prompts"][0]["seed"] = self.n
            r = self.http.post("/v1/inference", json=body)
            r.raise_for_status()
            self.jobs[r.json()["request_id"]] = {"submitted": time.time(), "status": "in_queue"}

    def outstanding(self) -> list[str]:
        return [rid for rid, j in self.jobs.items() if j["status"] not in FINAL]

    def poll(self) -> None:
        for rid in self.outstanding():
            st = self.http.get(f"/v1/requests/{rid}/status").json()
            job = self.jobs[rid]
            job["status"] = st["status"]
            job["started"] = _epoch(st.get("started_at"))
            if st["status"] in FINAL:
                job["finished"] = _epoch(st.get("finished_at"))
                res = self.http.get(f"/v1/requests/{rid}/result").json()
                job["replica"] = res.get("metadata", {}).get("running_on")
                job["error"] = st.get("error")

    def steady(self, depth: int, until, deadline: float) -> None:
        """Keep ``depth`` jobs outstanding until ``until()`` or the deadline."""
        while time.time() < deadline and not until():
            self.poll()
            missing = depth - len(self.outstanding())
            if missing > 0:
                self.submit(missing)
            time.sleep(self.poll_s)

    def drain(self, timeout_s: float) -> None:
        """Cancel what is left and wait until every job is final."""
        for rid in self.outstanding():
            self.http.post(f"/v1/requests/{rid}/cancel")
        deadline = time.time() + timeout_s
        while self.outstanding() and time.time() < deadline:
            self.poll()
            time.sleep(self.poll_s)

    def done(self, after: float = 0.0) -> list[dict]:
        return sorted((j for j in self.jobs.values() if j["status"] == "succeeded" and j.get("finished")
                       and j["finished"] >= after), key=lambda j: j["finished"])


def throughput(done: list[dict], skip: int = 0) -> dict:
    """Jobs/s between the completions of a steady window: (k - 1) / (t_last - t_first)."""
    window = done[skip:]
    if len(window) < 2:
        return {"jobs": len(window), "jobs_per_s": None}
    span = window[-1]["finished"] - window[0]["finished"]
    return {"jobs": len(window), "span_s": round(span, 2),
            "jobs_per_s": round((len(window) - 1) / span, 5) if span > 0 else None,
            "replicas_seen": sorted({j.get("replica") or "?" for j in window})}


def replica_startups() -> list[dict]:
    """Every WanI2V replica's startup account of this session, from the replicas' logs."""
    import ray._private.worker

    logs = ray._private.worker._global_node.get_logs_dir_path()
    found = []
    for path in sorted(glob.glob(os.path.join(logs, "serve", f"replica_{APP}_WanI2V_*.log"))):
        for line in Path(path).read_text(errors="replace").splitlines():
            if "startup (rank 0): " in line:
                try:
                    found.append({"log": os.path.basename(path),
                                  **ast.literal_eval(line.split("startup (rank 0): ", 1)[1].strip())})
                except (ValueError, SyntaxError):
                    pass
    return found


def serve_section(a, s: dict, n: int, bench: Bench) -> dict:
    from ray import serve

    from deployments.replica.deployment import make_deployment
    from serve_app.config import AppConfig
    from serve_app.ingress import Ingress

    args = {
        "gpu": {**gpu_config(a, s, 1), "replica": {**gpu_config(a, s, 1)["replica"], "min_replicas": 1,
                                                   "max_replicas": n}},
        "storage": {"outputs_dir": str(a.work / "videos"), "jobs_db": str(a.work / "jobs.sqlite3")},
        "jobs": {"max_in_flight": 2 * n + 2, "sweep_interval_s": 0.2},
        "limits": {"max_work": 10**12},
        "ingress": {"num_cpus": 0.1},
    }
    cfg = AppConfig.model_validate(args)
    replica = make_deployment(cfg.gpu)
    ingress = Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    autoscale = {"min_replicas": 1, "max_replicas": n, "initial_replicas": 1, "target_ongoing_requests": 1,
                 "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": 600}

    def deploy(**options):
        # serve.run gives a deployment without a version a random one, so every call counts as new code
        # and restarts every replica (``serve deploy`` of a YAML keeps it, hashed from the import path).
        # A fixed version makes the second call what a YAML edit is: only autoscaling_config changes,
        # and the running replica stays. ``_version`` is internal (Ray 2.60); the smoke checks it works.
        front, back = ingress.options(), replica.options(**options)
        front._version = back._version = "gpu-multi"
        generator_factory = cfg.gpu.replica.make_generator_factory()
        serve.run(front.bind(cfg.model_dump(mode="json"), back.bind(cfg.gpu, generator_factory)), name=APP,
                  route_prefix=f"/{APP}")

    out: dict = {"replica_config": "1 GPU, speed defaults, compile cache " + str(a.work / "compile-cache"),
                 "job": f"{s['size'][0]}x{s['size'][1]}, {s['size'][2]} frames, {s['tp_steps']} steps, CFG 4, "
                        f"{s['output_format']}", "upscale_delay_s": a.upscale_delay_s}
    watch = ReplicaWatch()
    watch.start()
    load = Load(f"http://127.0.0.1:{a.port}/{APP}", s, a.poll_s)
    try:
        # -- one replica, fixed ------------------------------------------------------------------
        t0 = time.time()
        deploy(num_replicas=1, autoscaling_config=None)
        wait_running(1, min(a.deploy_timeout_s, bench.left()))
        out["first_replica_ready_s"] = round(time.time() - t0, 2)
        first_pids = replica_pids()
        phase = time.time()
        load.steady(depth=3, deadline=phase + min(a.tp_phase_s, share(bench, 0.3)),
                    until=lambda: len(load.done(phase)) >= a.tp_jobs_one + 1)
        out["one"] = throughput(load.done(phase), skip=1)  # the first job may have waited for nothing
        load.drain(a.drain_timeout_s)
        bench.results["serve_partial"] = out
        bench.save()

        # -- switch to autoscaling (Serve keeps the replica), then a burst ---------------------------
        deploy(autoscaling_config=autoscale)
        time.sleep(2)
        old = set(replica_pids())
        out["first_replica_kept"] = old == set(first_pids)
        burst = time.time()
        load.submit(2 * n)
        ready = lambda states, pids: states.get("RUNNING", 0) >= n  # noqa: E731
        load.steady(depth=2 * n, deadline=burst + min(a.scale_timeout_s, share(bench, 0.5)),
                    until=lambda: watch.first(ready, burst) is not None and _served_by_all(load, burst, n))

        def autoscale_account() -> dict:
            # Also called again after the steady phase: a replica that came up after this phase's share
            # of the budget ran out still counts (the watch keeps sampling; the x4 run had nulls here).
            new_jobs = [j for j in load.done(burst) if j.get("replica") and _pid(j["replica"]) not in old]
            decided = watch.first(lambda st, pids: sum(v for k, v in st.items() if k != "STOPPING") > 1, burst)
            second_ready = watch.first(lambda st, pids: st.get("RUNNING", 0) >= 2, burst)
            return {
                "burst_jobs": 2 * n,
                "to_scale_decision_s": _since(burst, decided),
                "to_second_replica_running_s": _since(burst, second_ready),
                "to_all_replicas_running_s": _since(burst, watch.first(ready, burst)),
                "to_second_replica_first_job_started_s": _since(burst, min((j["started"] for j in new_jobs
                                                                            if j.get("started")), default=None)),
                "to_second_replica_first_job_done_s": _since(burst, new_jobs[0]["finished"] if new_jobs else None),
                "decision_to_running_s": _since(decided, second_ready),
            }

        out["autoscale"] = autoscale_account()
        bench.results["serve_partial"] = out
        bench.save()

        # -- N replicas, steady ----------------------------------------------------------------------
        phase = time.time()
        load.steady(depth=2 * n + 1, deadline=phase + min(a.tp_phase_s, share(bench, 0.8)),
                    until=lambda: len(load.done(phase)) >= a.tp_jobs_per_replica * n + 1)
        out["many"] = throughput(load.done(phase), skip=1)
        out["replicas"] = n
        one, many = out["one"].get("jobs_per_s"), out["many"].get("jobs_per_s")
        out["throughput_ratio"] = round(many / one, 4) if one and many else None
        out["autoscale"] = autoscale_account()
        load.drain(a.drain_timeout_s)
        failed = [j for j in load.jobs.values() if j["status"] == "failed"]
        out["jobs"] = {"submitted": load.n, "succeeded": len(load.done()), "failed": len(failed),
                       "errors": sorted({json.dumps(j.get("error"))[:200] for j in failed})}
        starts = replica_startups()
        out["cold_start"] = {"replicas": starts,
                             "ready_s_per_replica": [r.get("init_s") for r in starts],
                             "warm_cache_ready_s": [r.get("init_s") for r in starts
                                                    if (r.get("compile_cache") or {}).get("hit")]}
    finally:
        watch.halt.set()
        out["replica_timeline"] = _timeline(watch.samples)
        try:
            serve.delete(APP)
        except Exception:  # noqa: BLE001
            pass
    return out


def share(bench: Bench, fraction: float, reserve_s: float = 60) -> float:
    """Seconds a phase may take: ``fraction`` of what the budget has left after ``reserve_s`` (the
    sections after it, the teardown), at least 20."""
    return max(20.0, fraction * (bench.left() - reserve_s))


def _pid(replica_id: str) -> int | None:
    """The pid in a replica id (``host:pid``)."""
    try:
        return int(replica_id.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def _served_by_all(load: Load, since: float, n: int) -> bool:
    return len({j.get("replica") for j in load.done(since) if j.get("replica")}) >= n


def _since(t0: float | None, t: float | None) -> float | None:
    return round(t - t0, 2) if t0 is not None and t is not None else None


def _timeline(samples) -> list:
    """Only the samples where the replica states changed."""
    out, last = [], None
    t0 = samples[0][0] if samples else 0
    for t, states, pids in samples:
        if (states, pids) != last:
            out.append([round(t - t0, 2), states, list(pids)])
            last = (states, pids)
    return out


def wait_running(n: int, timeout_s: float) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            states = serve.status().applications[APP].deployments["WanI2V"].replica_states
            if states.get("RUNNING", 0) >= n:
                return
        except KeyError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{n} WanI2V replica(s) not running after {timeout_s} s")


# ---------------------------------------------------------------------------------------------
# 3. loading weights: through host memory vs straight to the GPU
# ---------------------------------------------------------------------------------------------


def load_task(source: str, device: str, layers: int, work: str) -> dict:
    """Save a transformer of the full width with ``layers`` blocks, then load it both ways (in a Ray task)."""
    import torch
    from diffusers import WanTransformer3DModel

    from deployments.engine.models import FULL_TRANSFORMER_CONFIG, TINY_TRANSFORMER_CONFIG

    config = dict(FULL_TRANSFORMER_CONFIG if source == "random-full" else TINY_TRANSFORMER_CONFIG)
    config["num_layers"] = min(layers, config["num_layers"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    path = Path(tempfile.mkdtemp(prefix="load-", dir=work))
    t0 = time.perf_counter()
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    out = {"layers": config["num_layers"], "gib": round(nbytes / 2**30, 3), "save_s": round(time.perf_counter() - t0, 2)}

    def drop_page_cache() -> bool:
        if device != "cuda":  # never on a shared CPU machine (the smoke): it slows everyone's reads
            return False
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return True
        except OSError:
            return False

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    full_gib = 30.6 if source == "random-full" else nbytes / 2**30
    out["projected_full_transformer_s"] = {}
    for name, kwargs in (("via_host", {}), ("direct", {"device_map": device})):
        out[f"{name}_page_cache_dropped"] = drop_page_cache()
        t = time.perf_counter()
        m = WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype, **kwargs).to(device)
        sync()
        seconds = time.perf_counter() - t
        out[f"{name}_s"] = round(seconds, 3)
        out[f"{name}_gib_per_s"] = round(nbytes / 2**30 / seconds, 3)
        out["projected_full_transformer_s"][name] = round(full_gib * 2**30 / nbytes * seconds, 1)
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def environment(s: dict) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": sys.version.split()[0], "device": s["device"],
           "nccl_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                        "NVSHMEM_DISABLE_NVLS")}}
    if s["device"] == "cuda":
        for cmd, key in ((["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          "gpus"), (["nvidia-smi", "topo", "-m"], "topology")):
            try:
                env[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError) as e:
                env[key] = f"{type(e).__name__}: {e}"
    return env


def collect_error_logs(out: Path, since: float, limit_bytes: int = 4 * 2**20) -> int:
    """The tails of this Ray session's log files that hold a traceback, written since ``since``, into
    ``OUT/ray_errors.txt`` (the ranks' and replicas' own output is not printed here)."""
    import ray._private.worker

    root = ray._private.worker._global_node.get_logs_dir_path()
    chunks, size = [], 0
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        try:
            if not os.path.isfile(path) or os.path.getmtime(path) < since:
                continue
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        if any("Traceback" in line for line in lines):
            chunk = f"===== {os.path.relpath(path, root)}\n" + "\n".join(lines[-80:]) + "\n"
            if size + len(chunk) > limit_bytes:
                break
            chunks.append(chunk)
            size += len(chunk)
    (out / "ray_errors.txt").write_text("".join(chunks))
    return len(chunks)


def summary(results: dict, n: int) -> dict:
    target = TARGETS.get(n, {})
    lat = results.get("latency") or {}
    srv = results.get("serve") or {}
    warm = (srv.get("cold_start") or {}).get("warm_cache_ready_s") or []
    out = {
        "gpus": n,
        "latency_ratio": lat.get("ratio"), "latency_target": target.get("latency_ratio"),
        "frames_rel_l2_vs_1gpu": lat.get("frames_rel_l2_vs_1gpu"),
        "throughput_ratio": srv.get("throughput_ratio"), "throughput_target": target.get("throughput_ratio"),
        "warm_cold_start_s": max(warm) if warm else None, "warm_cold_start_target_s": WARM_COLD_START_TARGET_S,
        "to_second_replica_first_job_done_s": (srv.get("autoscale") or {}).get("to_second_replica_first_job_done_s"),
    }
    checks = {}
    if out["latency_ratio"] is not None and out["latency_target"]:
        checks["latency"] = out["latency_ratio"] <= out["latency_target"]
    if out["throughput_ratio"] is not None and out["throughput_target"]:
        checks["throughput"] = out["throughput_ratio"] >= out["throughput_target"]
    if out["warm_cold_start_s"] is not None:
        checks["warm_cold_start"] = out["warm_cold_start_s"] <= WARM_COLD_START_TARGET_S
    out["meets"] = checks
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, gloo, 2 CPU ranks/replicas")
    p.add_argument("--gpus", type=int, default=None, help="N (default: every GPU; 2 with --cpu-smoke)")
    p.add_argument("--split", default=None, help="the N-GPU split, e.g. cfg=2,ulysses=2 (default: the config's)")
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--sections", default="latency,serve,load")
    p.add_argument("--work", type=Path, default=None, help="caches, videos, job database (default: a temp dir)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (tiny tokenizer; default WORK/models)")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (an existing Serve's, if Ray runs)")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=41)
    p.add_argument("--steps", type=int, default=25, help="the latency request's steps")
    p.add_argument("--tp-steps", type=int, default=4, help="steps of each throughput job")
    p.add_argument("--tp-jobs-one", type=int, default=5, help="completions timed with one replica")
    p.add_argument("--tp-jobs-per-replica", type=int, default=4, help="completions timed per replica with N")
    p.add_argument("--tp-phase-s", type=float, default=150, help="longest a throughput phase may run")
    p.add_argument("--upscale-delay-s", type=float, default=10)
    p.add_argument("--scale-timeout-s", type=float, default=240)
    p.add_argument("--deploy-timeout-s", type=float, default=300)
    p.add_argument("--drain-timeout-s", type=float, default=120)
    p.add_argument("--poll-s", type=float, default=0.25)
    p.add_argument("--load-layers", type=int, default=10, help="blocks of the transformer saved and loaded")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        a.tp_jobs_one, a.tp_jobs_per_replica = min(a.tp_jobs_one, 3), min(a.tp_jobs_per_replica, 2)
        a.upscale_delay_s = min(a.upscale_delay_s, 1)
    a.work = a.work or Path(tempfile.mkdtemp(prefix="gpu-multi-"))
    a.work.mkdir(parents=True, exist_ok=True)
    a.cache = a.cache_dir or a.work / "models"
    s = settings(a)
    bench = Bench(a.out, a.budget_s)
    started = time.time()

    import ray
    from ray import serve

    from deployments.engine.models import ensure_tiny

    ensure_tiny(a.cache)  # the random-full build takes its tokenizer from here; the smoke its model
    own = not ray.is_initialized()
    if own:
        path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    n = a.gpus or (2 if a.cpu_smoke else int(ray.cluster_resources().get("GPU", 0)))
    bench.results.update(gpus=n, settings={**s, "args": {k: str(v) for k, v in vars(a).items()}},
                         env=environment(s))
    bench.save()
    sections = a.sections.split(",")
    try:
        if n < 2:
            raise SystemExit(f"needs at least 2 GPUs, found {n}")
        if "latency" in sections:
            timed = bench.section("latency", lambda: latency_section(a, s, n, bench), need_s=0 if a.cpu_smoke else 150)
            if timed and "error" not in timed:
                bench.results.pop("latency_partial", None)
        if "serve" in sections:
            served = bench.section("serve", lambda: serve_section(a, s, n, bench), need_s=0 if a.cpu_smoke else 150)
            if served and "error" not in served:
                bench.results.pop("serve_partial", None)  # else kept: what the section had measured
        if "load" in sections:
            task = ray.remote(num_gpus=s["num_gpus"], num_cpus=1)(load_task)
            bench.section("load", lambda: ray.get(task.remote(s["source"], s["device"], a.load_layers, str(a.work))),
                          need_s=0 if a.cpu_smoke else 60)
    finally:
        bench.results["summary"] = summary(bench.results, n)
        try:
            bench.results["logs_with_tracebacks"] = collect_error_logs(a.out, started)
        except Exception as e:  # noqa: BLE001  a diagnostic only
            bench.results["logs_with_tracebacks"] = f"{type(e).__name__}: {e}"
        bench.save()
        if own:
            serve.shutdown()
            ray.shutdown()
    log(f"summary: {json.dumps(bench.results['summary'])}")
    return 1 if bench.results["sections_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
