"""The benchmark scripts (benchmarks/) in their CPU smoke modes: every section of each must complete.

The GPU runs happen rarely and on another machine, so these smokes are what notices a benchmark
broken by a change elsewhere (a renamed config key, a removed helper). They read what each script
writes and fail on any section that recorded an error or was skipped. ``gpu_bench.py`` runs as its
own process (it compiles and changes process-wide torch settings); the served-app scripts and the
load benchmark run against the session's app instead of starting Ray Serve themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.full, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[1]

# Every section gpu_bench.py runs on a GPU; the smoke forces the optional ones on.
GPU_BENCH_SECTIONS = (
    "build", "ref_warm", "ref_request", "ref_forward", "noise_forward", "truth_forward",
    "ours_init", "ours_forward", "ours_request", "profile_exact", "lora", "mode_exact", "mode_fast", "fast_alt",
    "mode_turbo",
    "noise_request", "alt_casts",
)
STAGES = {"text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "total"}


def _errors(value, path="") -> list[str]:
    """Every recorded error or skip anywhere in a result tree, with where it is."""
    found = []
    if isinstance(value, dict):
        for key, v in value.items():
            if key in ("error", "recompile_error", "skipped") and v is not None:
                found.append(f"{path}.{key}: {v}")
            found += _errors(v, f"{path}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _errors(v, f"{path}[{i}]")
    return found


def test_gpu_bench_smoke_runs_every_section(model_cache, tmp_path):
    out = tmp_path / "out"
    # A budget of 1 s: in smoke mode no section may be skipped for time.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--cpu-smoke", "--out", str(out),
         "--cache-dir", str(model_cache), "--budget-s", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    results_file = out / "gpu_bench.json"
    assert results_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(results_file.read_text())
    assert r["sections_failed"] == [], {s: r[s] for s in r["sections_failed"]}
    assert [s for s in GPU_BENCH_SECTIONS if s not in r] == []
    assert _errors({s: r[s] for s in GPU_BENCH_SECTIONS}) == []
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The GPU run's paths, not a CPU shortcut: compiled blocks with the LoRA slot, warmed up ...
    report = r["ours_init"]["speed_report"]
    assert report["compiled"] and report["lora_slot_rank"] == 8 and "warmup" in report
    lora = r["lora"]
    assert lora["zero_recompiles"] is True and lora["graphs_compiled"] == 0
    assert lora["lora0_rel_change_vs_base"] > 0 and lora["switch_back_bit_equal"] and lora["off_bit_equal_base"]
    # ... and per-stage times from the product's stage clock on both the reference and our path.
    for section in ("ref_request", "ours_request", "noise_request", "mode_exact", "mode_fast", "mode_turbo"):
        assert set(r[section]["timings"]) == STAGES, section

    # Every speed mode ran in the one warmed-up generator, with the user LoRA, compiling nothing more.
    assert report["modes"]["enabled"] == ["exact", "fast", "turbo"] and report["turbo_lora"]["format"] == "kohya"
    assert {"fast_base_s", "fast_lora_s", "turbo_base_s", "turbo_lora_s"} <= set(report["warmup"])
    modes = {m: r[f"mode_{m}"] for m in ("exact", "fast", "turbo")}
    for mode, m in modes.items():
        assert m["speed"]["mode"] == mode and m["graphs_compiled"] == 0 and m["user_lora_rank"] == 4, (mode, m)
        assert m["speedup_vs_ref"] > 0
    steps = r["env"]["args"]["steps"]
    fast, turbo = modes["fast"]["speed"], modes["turbo"]["speed"]
    # fast: the schedule from MagCache's calibrated ratios skipped some of the 2 x steps forwards ...
    assert fast["forwards_computed"] + fast["forwards_skipped"] == 2 * steps and fast["forwards_skipped"] > 0
    assert fast["step_cache"]["ratios_source"].startswith("MagCache4Wan2.1")
    assert fast["fp8"] is False and "without the FP8 conversion" in fast["fp8_note"]  # CPU: said so
    assert modes["fast"]["forward"]["s_per_forward"] > 0
    # ... and turbo ran the distillation's 4 steps without CFG
    assert (turbo["forwards_computed"], turbo["steps"], turbo["guidance_scale"]) == (4, 4, 1.0)
    for m in (modes["fast"], modes["turbo"]):  # (fast's tiny-model frames may round to exact's: PSNR "inf")
        assert m["latents_rel_err_vs_exact"] > 0 and m["psnr_db_vs_exact"] is not None
    assert isinstance(modes["turbo"]["psnr_db_vs_exact"], float)
    # fast mode again under MagCache's other published settings: each schedule was the one asked for
    for name, (threshold, k) in {"E012K4R02": (0.12, 4), "E024K6R02": (0.24, 6)}.items():
        cache = r["fast_alt"][name]["speed"]["step_cache"]
        assert (cache["threshold"], cache["max_skips"]) == (threshold, k), name
        assert r["fast_alt"][name]["graphs_compiled"] == 0
    assert r["profile_exact"]["wall_s"] > 0
    # every timed request paid its VAE encode (a new picture); turbo's second one reused it
    assert modes["turbo"]["speed"]["vae_encode_reused"] is False
    assert modes["turbo"]["same_picture_again"]["vae_encode_reused"] is True


def test_attention_bench_smoke_runs_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_bench.py"), "--cpu-smoke", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "attention_bench.json").read_text())
    assert r["sections_failed"] == [] and _errors({s: r[s] for s in ("attention", "gemm")}) == []
    row = next(iter(r["attention"]["shapes"].values()))
    # the one kernel CPU has is timed and checked against float32; the GPU kernels say why they did not run
    assert row["math"]["s"] > 0 and 0 < row["math"]["rel_err_vs_fp32"] < 0.02
    assert row["flash4"] == {"unavailable": "device cpu"} and "unavailable" in row["sage_int8"]
    assert len(r["gemm"]["shapes"]) == 3
    for gemm in r["gemm"]["shapes"].values():
        assert gemm["cublas"]["s"] > 0 and gemm["inductor"]["rel_err_vs_cublas"] < 0.02


# The served-app smokes need one app, not one per state backend (the load smoke runs on both).
@pytest.mark.parametrize("app", ["sqlite"], indirect=True)
def test_gpu_serve_overhead_smoke(app, model_cache, tmp_path):
    from benchmarks import gpu_serve_overhead

    out = tmp_path / "out"
    rc = gpu_serve_overhead.main(["--cpu-smoke", "--out", str(out), "--url", app.base_url, "--work",
                                  str(tmp_path / "work"), "--cache-dir", str(model_cache), "--request-timeout-s", "300"])
    assert rc == 0
    r = json.loads((out / "serve_overhead.json").read_text())
    assert r["core"]["core_s"] > 0 and r["core"]["bytes"] > 0
    assert set(r["core"]["timings"]) == STAGES
    assert r["serve"]["serve_e2e_s"] > 0 and r["serve"]["bytes"] > 0
    assert {"total", "encode_video"} <= set(r["serve"]["timings"][0])
    assert _errors(r) == []


@pytest.mark.parametrize("app", ["sqlite"], indirect=True)
def test_gpu_serve_lora_smoke(app, serve_env, model_cache, tmp_path):
    from benchmarks import gpu_serve_lora

    out = tmp_path / "out"
    rc = gpu_serve_lora.main(["--cpu-smoke", "--out", str(out), "--url", app.base_url, "--app-name", app.name,
                              "--lora-root", str(serve_env.lora_root), "--work", str(tmp_path / "work"),
                              "--cache-dir", str(model_cache), "--request-timeout-s", "300"])
    r = json.loads((out / "serve_lora.json").read_text())
    assert [row["status"] for row in r["rows"]] == ["succeeded"] * 7, r["rows"]
    assert _errors(r) == []
    # The claims: the base loaded once by the same replica process, each adapter loaded once.
    assert r["same_replica_process"] and r["pipeline_loads"] == 1 and r["pipeline_loads_during"] == 0
    assert r["adapter_loads_during"] == 2
    assert r["pass"] and rc == 0


def test_load_bench_smoke(app, tmp_path):
    from benchmarks import load_bench

    out = tmp_path / "load.json"
    rc = load_bench.main(["--url", app.base_url, "--smoke", "--jobs-db", app.args["storage"]["jobs_db"],
                          "--json-out", str(out)])
    r = json.loads(out.read_text())
    n = r["n"]
    assert r["pass"] and rc == 0
    assert r["accepted"] == r["succeeded"] == n and r["failed"] == 0 and r["lost"] == 0
    assert r["dup_checks"] == n and r["duplicated"] == 0 and r["db_rows"] == n
    assert r["other_error_answers"] == {} and r["transport_errors"] == 0
    assert r["downloads"] == {"ok": 2, "bad": 0} and r["succeeded_without_output"] == 0


def test_state_bench_smoke_runs_both_backends(serve_env, model_cache, tmp_path):
    from benchmarks import state_bench

    out = tmp_path / "state.json"
    rc = state_bench.main(["--smoke", "--serve-port", str(serve_env.port), "--model-cache", str(model_cache),
                           "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["backends"]) == {"sqlite", "postgres"}
    for backend, b in r["backends"].items():
        assert b["pass"] and b["succeeded"] == b["n"] == b["db_rows"], (backend, b)
        assert b["lost"] == 0 and b["duplicated"] == 0 and b["other_error_answers"] == {}, (backend, b)
    assert r["backends"]["postgres"]["ingress_replicas"] == 2
    assert r["submit_p99_ratio_pg_over_sqlite"] > 0 and r["pass"] and rc == 0


@pytest.mark.parametrize("app", ["sqlite"], indirect=True)
def test_gpu_serve_stages_smoke(app, tmp_path):
    from benchmarks import gpu_serve_stages

    out = tmp_path / "out"
    rc = gpu_serve_stages.main(["--cpu-smoke", "--out", str(out), "--url", app.base_url, "--repeats", "1",
                                "--frames", "5", "--poll-s", "0.05"])
    r = json.loads((out / "serve_stages.json").read_text())
    assert rc == 0 and [(row["frames"], row["format"]) for row in r["rows"]] == [(5, "mp4"), (5, "webp")]
    for row in r["rows"]:
        assert [stage for stage, _ in row["server"]["path"]] == [
            "queued", "dispatch", "replica_wait", "to_first_step", "from_first_step", "store"]
        assert row["server"]["submit_s"] > 0 and row["generation_s"] > 0 and row["bytes"] > 0
        assert row["client"]["e2e_s"] >= row["client"]["until_succeeded_seen_s"] > 0


def test_gpu_multi_smoke(serve_env, model_cache, tmp_path):
    """Several GPUs, on CPU: 1 vs 2 gloo ranks for one request, 1 vs 2 replicas over HTTP, the switch to
    autoscaling and a burst, the replicas' startup accounts, and both weight-loading paths."""
    from benchmarks import gpu_multi

    out = tmp_path / "out"
    rc = gpu_multi.main(["--cpu-smoke", "--out", str(out), "--port", str(serve_env.port), "--work",
                         str(tmp_path / "work"), "--cache-dir", str(model_cache)])
    r = json.loads((out / "gpu_multi.json").read_text())
    assert r["sections_failed"] == [] and r["sections_skipped"] == [], {k: r.get(k) for k in r["sections_failed"]}
    assert _errors(r) == [] and rc == 0

    lat = r["latency"]  # CFG-parallel on CPU is bit-exact, and each rank computed one pass per step
    assert lat["parallel"]["split"] == {"cfg_degree": 2, "ulysses_degree": 1, "ring_degree": 1}
    assert lat["frames_equal"] and lat["frames_rel_l2_vs_1gpu"] == 0 and lat["ranks_frames_identical"]
    assert [x["passes"] for x in lat["parallel"]["ranks_last_request"]] == [3, 3]
    assert lat["ratio"] > 0 and len(lat["parallel"]["ranks_startup"]) == 2

    srv = r["serve"]
    assert srv["one"]["jobs_per_s"] > 0 and srv["many"]["jobs_per_s"] > 0 and srv["throughput_ratio"] > 0
    assert len(srv["one"]["replicas_seen"]) == 1 and len(srv["many"]["replicas_seen"]) == 2
    assert srv["first_replica_kept"]  # switching to autoscaling did not restart the running replica
    auto = srv["autoscale"]
    assert 0 <= auto["to_scale_decision_s"] <= auto["to_second_replica_running_s"] \
        <= auto["to_second_replica_first_job_done_s"]
    assert srv["jobs"]["failed"] == 0 and srv["jobs"]["succeeded"] >= 2 + 3 + 4
    starts = srv["cold_start"]["replicas"]
    assert len(starts) == 2 and all(s["init_s"] > 0 and s["load_s"] > 0 for s in starts)

    load = r["load"]
    assert load["via_host_s"] > 0 and load["direct_s"] > 0
    assert set(r["summary"]) >= {"latency_ratio", "throughput_ratio", "warm_cold_start_s", "meets"}


def test_memory_bench_smoke_runs_every_mode(model_cache, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_bench.py"), "--cpu-smoke", "--out",
                           str(out), "--cache-dir", str(model_cache)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    results_file = out / "memory_bench.json"
    assert results_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(results_file.read_text())
    assert r["sections_failed"] == [] and _errors(r) == [], r
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for mode in ("full", "fp8", "offload"):
        m = r[mode]
        assert m["request"]["memory"]["mode"] == mode and set(m["request"]["timings"]) == STAGES, mode
        # the LoRA switch reloaded nothing and compiled nothing
        assert (m["switch"]["graphs_compiled"], m["switch"]["pipeline_loads"]) == (0, 0), mode
    # CPU: no FP8, said so; the offloaded blocks moved through the hooks, two at most on the "device"
    for mode in ("fp8", "offload"):
        assert "FP8 weights need CUDA" in r[mode]["request"]["memory"]["note"]
        assert r[mode]["latents_rel_l2_vs_full"] == 0.0 and r[mode]["psnr_db_vs_full"] == "inf"
    moved = r["offload"]["memory_after"]
    assert moved["max_blocks_resident"] == 2 and moved["loads"] > 0 and moved["host_gib"] >= 0


def test_vae_bench_smoke_runs_every_variant(model_cache, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vae_bench.py"), "--cpu-smoke", "--out", str(out),
                           "--cache-dir", str(model_cache)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    results_file = out / "vae_bench.json"
    assert results_file.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (size,) = json.loads(results_file.read_text())["sizes"]
    assert "errors" not in size, size
    for stage in ("decode", "encode"):
        assert set(size[stage]) >= {"default", "cudnn_benchmark", "channels_last"}
        # on CPU cuDNN plays no part and the layout changes only rounding
        assert size[stage]["cudnn_benchmark"]["rel_l2_vs_default"] == 0.0
        assert size[stage]["channels_last"]["rel_l2_vs_default"] < 1e-5
    cache = size["encode"]["cache"]
    assert (cache["misses"], cache["hits"]) == (1, 1) and cache["hit_bit_equal_to_miss"]
