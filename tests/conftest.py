"""Shared fixtures: one tiny checkpoint, one loaded pipeline, per test session."""

from __future__ import annotations

import io
import os
import uuid
from contextlib import contextmanager

import numpy as np
import pytest

from tests.services import free_port

# Ray 2.60 turns token auth on for new local clusters and writes ~/.ray; tests need neither.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The bit-equality tests (ours vs stock diffusers, fp32 CPU) need the same GEMM kernels for the same math:
# on AVX-512 machines (seen on an AMD EPYC) MKL's default dispatch picked kernels whose sums differ
# by ~3e-6 between the two paths' calls. MKL's reproducibility mode fixes its code path; it must be
# set before torch loads MKL, and Ray's worker processes inherit it.
os.environ.setdefault("MKL_CBWR", "AVX2")


def pytest_configure(config):
    # The tiny model's ops are small: on 2 cores shared with Ray's replica processes, torch's
    # default thread pool makes them up to 25x slower (measured), so the test process uses one.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A cache dir holding the tiny checkpoint, built once per session."""
    from deployments.engine.models import ensure_tiny

    cache = tmp_path_factory.mktemp("models")
    ensure_tiny(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache):
    return model_cache / "tiny"


def load_tiny(model_cache):
    """A pipeline of the tiny source of its own (fp32, CPU), for tests that need pristine weights."""
    from deployments.config import ModelConfig
    from deployments.engine.models import load_pipeline

    return load_pipeline(ModelConfig(source="tiny", cache_dir=str(model_cache), device="cpu"))


@pytest.fixture(scope="session")
def loaded_model(model_cache):
    """The tiny checkpoint loaded through the same path as the real one (fp32, CPU).

    Shared: tests that load adapters leave PEFT wrappers in it; tests of pristine weights load their own.
    """
    return load_tiny(model_cache)


@pytest.fixture(scope="session")
def tiny_shapes(loaded_model):
    """``linear_shapes`` of the tiny transformer, taken before any adapter is loaded into it: a loaded
    adapter wraps each Linear, which then shows only as ``<name>.base_layer`` (also once deleted)."""
    from deployments.lora.files import linear_shapes

    return linear_shapes(loaded_model.pipe.transformer)


@pytest.fixture(scope="session")
def generator(loaded_model, tiny_shapes):
    """A WanGenerator over the session's tiny pipeline (shared: tests must not leave adapters active)."""
    from deployments.engine.pipeline import WanGenerator

    return WanGenerator(loaded_model)


def make_image(width: int = 64, height: int = 48, seed: int = 0, mode: str = "RGB"):
    """A deterministic random picture."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.rand(height, width, channels) * 255).astype("uint8")
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def stock_frames(pipe, spec, image=None) -> np.ndarray:
    """Float frames of the reference server's call on a stock pipeline, with its arguments (512 tokens)."""
    import torch
    from PIL import Image

    out = pipe(
        image=image if image is not None else Image.open(io.BytesIO(spec.image_png)).convert("RGB"),
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        height=spec.height,
        width=spec.width,
        num_frames=spec.num_frames,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(spec.seed),
        output_type="np",
        max_sequence_length=512,
    )
    return out.frames[0]


def tiny_spec(**overrides):
    """A fast spec on the tiny model: 64x48, 5 frames, 2 steps, CFG on."""
    from deployments.spec import GenerationSpec

    values = dict(
        prompt="a runner on a beach",
        negative_prompt="",
        width=64,
        height=48,
        num_frames=5,
        fps=8,
        steps=2,
        guidance_scale=4.0,
        seed=42,
        image_png=png_bytes(make_image(64, 48)),
    )
    values.update(overrides)
    return GenerationSpec(**values)


def wait_for(predicate, timeout: float, what, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy, and return that.

    For tests that expect a state: a fixed sleep is either too short on a busy machine or wasted on
    an idle one. Raises AssertionError after ``timeout`` seconds, saying ``what`` was awaited (a
    string, or a function called then, to describe the state at that moment).
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def small_spec():
    """``tiny_spec`` as a fixture."""
    return tiny_spec


# ---------------------------------------------------------------------------------------------
# The real Serve app over HTTP: one local Ray cluster and one default app per session
# ---------------------------------------------------------------------------------------------

FAIL_PROMPT = "INJECT_FAULT"
METRICS_PUSH_MS = 1000
SLOW_PROMPT = "SLOWLY"
# Serve stops an idle replica after one wait loop (2 s by default): each app deleted in a test paid it.
SHUTDOWN_LOOP_S = 0.2


# State backends: SQLite + a local directory, PostgreSQL + S3 (moto). Over HTTP (an app per backend)
# PostgreSQL is in the full tier only; at store level (the job store itself) both are in the fast one.
BACKENDS = ("sqlite", pytest.param("postgres", marks=[pytest.mark.full, pytest.mark.postgres]))
STORE_BACKENDS = ("sqlite", pytest.param("postgres", marks=pytest.mark.postgres))


@pytest.fixture(params=STORE_BACKENDS)
def store_url(request, tmp_path):
    """A fresh, empty job database of each backend (PostgreSQL started only for its case)."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.sqlite3")
    return request.getfixturevalue("pg_server").create_db()


@pytest.fixture
def store(store_url):
    """A job store on ``store_url``, closed after the test."""
    from serve_app.jobs import open_job_store

    s = open_job_store(store_url)
    yield s
    s.close()


class AppUnderTest:
    """One deployed Serve app: its config args, base URL and an HTTP client with small helpers."""

    def __init__(self, name: str, base_url: str, args: dict):
        import httpx

        self.name = name
        self.base_url = base_url
        self.args = args
        self.backend = "postgres" if args["storage"]["jobs_db"].startswith("postgresql://") else "sqlite"
        self.http = httpx.Client(base_url=base_url, timeout=60)

    def submit(self, request: dict, headers: dict | None = None):
        return self.http.post("/v1/inference", json=request, headers=headers or {})

    def wait(self, request_id: str, timeout: float = 120, headers: dict | None = None,
             until: tuple[str, ...] = ("succeeded", "failed", "canceled")) -> dict:
        def status() -> dict:
            return self.http.get(f"/v1/requests/{request_id}/status", headers=headers or {}).json()

        return wait_for(lambda: (s := status())["status"] in until and s, timeout,
                        lambda: f"job {request_id} still {status()} after {timeout}s", interval=0.1)

    def wait_running(self, request_id: str, step: int = 1, headers: dict | None = None, timeout: float = 60) -> dict:
        """Wait until the job is at a GPU replica, past denoising step ``step``: a job sent after this one
        then queues behind it (one replica, one job at a time), whichever runner sends it."""
        def running() -> dict | None:
            status = self.http.get(f"/v1/requests/{request_id}/status", headers=headers or {}).json()
            return status if status["status"] == "in_progress" and status["progress"]["step"] >= step else None

        return wait_for(running, timeout, lambda: f"job {request_id} in progress at step >= {step}", interval=0.05)

    def run(self, request: dict, headers: dict | None = None, timeout: float = 120) -> dict:
        """Submit, wait, return the result (asserting the submit was accepted)."""
        r = self.submit(request, headers)
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        self.wait(rid, timeout, headers)
        return self.http.get(f"/v1/requests/{rid}/result", headers=headers or {}).json()

    def replica_stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("WanI2V", self.name).stats.remote().result()

    def db_rows(self, where: str, params: tuple = ()) -> list[dict]:
        """Rows of this app's job table, read directly from its database (``?`` placeholders)."""
        return db_rows(self.args["storage"]["jobs_db"], where, params)

    def count_jobs(self) -> int:
        return len(self.db_rows("1=1"))


def db_rows(jobs_db: str, where: str, params: tuple = ()) -> list[dict]:
    """``SELECT * FROM jobs WHERE <where>`` on either backend, as dicts."""
    if jobs_db.startswith("postgresql://"):
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(jobs_db, row_factory=dict_row) as conn:
            return conn.execute(f"SELECT * FROM jobs WHERE {where.replace('?', '%s')}", params).fetchall()
    import sqlite3

    db = sqlite3.connect(jobs_db, timeout=30)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM jobs WHERE {where}", params).fetchall()]
    finally:
        db.close()


@contextmanager
def job_updates(app):
    """Record every write to the app's job rows, as it happens, in the job database itself (a trigger).

    A status poll sees only what is there when it asks; a state that lasts less than a poll (a
    retry's first steps) is in this log all the same. Yields ``updates(job_id)``: that job's rows
    after each write (attempts, status, lease_owner, lease_until, progress), oldest first.
    """
    import json
    import sqlite3

    jobs_db = app.args["storage"]["jobs_db"]
    if jobs_db.startswith("postgresql://"):
        import psycopg
        from psycopg.rows import dict_row

        db = psycopg.connect(jobs_db, autocommit=True, row_factory=dict_row)
        db.execute("""
            CREATE TABLE test_job_updates (seq bigserial PRIMARY KEY, job_id text, attempts int, status text,
                                           lease_owner text, lease_until double precision, progress jsonb);
            CREATE FUNCTION test_log_job_update() RETURNS trigger AS $$ BEGIN
                INSERT INTO test_job_updates (job_id, attempts, status, lease_owner, lease_until, progress)
                VALUES (NEW.id, NEW.attempts, NEW.status, NEW.lease_owner, NEW.lease_until, NEW.progress);
                RETURN NEW; END $$ LANGUAGE plpgsql;
            CREATE TRIGGER test_log_job_updates AFTER UPDATE ON jobs FOR EACH ROW
                EXECUTE FUNCTION test_log_job_update();""")
        select = "SELECT * FROM test_job_updates WHERE job_id=%s ORDER BY seq"
        drop = "DROP TRIGGER test_log_job_updates ON jobs; DROP FUNCTION test_log_job_update(); DROP TABLE test_job_updates;"
    else:
        db = sqlite3.connect(jobs_db, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.executescript("""
            CREATE TABLE test_job_updates (seq INTEGER PRIMARY KEY, job_id TEXT, attempts INTEGER, status TEXT,
                                           lease_owner TEXT, lease_until REAL, progress TEXT);
            CREATE TRIGGER test_log_job_updates AFTER UPDATE ON jobs BEGIN
                INSERT INTO test_job_updates (job_id, attempts, status, lease_owner, lease_until, progress)
                VALUES (NEW.id, NEW.attempts, NEW.status, NEW.lease_owner, NEW.lease_until, NEW.progress);
            END;""")
        select = "SELECT * FROM test_job_updates WHERE job_id=? ORDER BY seq"
        drop = "DROP TRIGGER test_log_job_updates; DROP TABLE test_job_updates;"

    def updates(job_id: str) -> list[dict]:
        rows = [dict(r) for r in db.execute(select, (job_id,)).fetchall()]
        return [{**r, "progress": json.loads(r["progress"]) if isinstance(r["progress"], str) else r["progress"]}
                for r in rows]

    try:
        yield updates
    finally:
        (db.execute(drop) if jobs_db.startswith("postgresql://") else db.executescript(drop))
        db.close()


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the whole session (Debian's postgresql-15, started by the tests)."""
    from tests.services import PgServer

    server = PgServer().start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) for the whole session, with one bucket."""
    from tests.services import S3Server

    server = S3Server().start()
    server.bucket = server.create_bucket("wan-tests")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def serve_env(request, tmp_path_factory, model_cache):
    """A local Ray cluster with Serve on a free loopback port, and a function that deploys app variants.

    ``args_for(name, backend=...)``: ``sqlite`` keeps jobs in a SQLite file and videos in a local
    directory (the embedded default); ``postgres`` keeps jobs in a database of its own on the
    session's PostgreSQL server and videos under a prefix of the session's S3 bucket (a cluster).
    ``env.pg`` and ``env.s3`` start those servers on first use only: a SQLite-only run starts neither.
    """
    import ray
    from ray import serve

    from serve_app.app import build_app

    root = tmp_path_factory.mktemp("serve")
    lora_root = root / "loras"
    lora_root.mkdir()
    port, metrics_port = free_port(), free_port()
    # The metrics agent (started with every node, dashboard or not) serves Prometheus text on
    # metrics_port; processes push to it every second here (Ray's default: 10 s).
    ctx = ray.init(num_cpus=8, include_dashboard=False, namespace="wan-tests", log_to_driver=False,
                   _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": METRICS_PUSH_MS})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _poll_serve_often()

    def storage_for(name: str, backend: str) -> dict:
        if backend == "sqlite":
            return {"outputs_dir": str(root / name / "videos"), "jobs_db": str(root / name / "jobs.sqlite3")}
        assert backend == "postgres", backend
        return {"outputs_dir": f"s3://{env.s3.bucket}/{name}-{uuid.uuid4().hex[:6]}/videos",
                "outputs_options": env.s3.options(), "jobs_db": env.pg.create_db()}

    def args_for(name: str, backend: str = "sqlite", **overrides) -> dict:
        base = {
            "gpu": {
                "model": {"source": "tiny", "device": "cpu", "cache_dir": str(model_cache)},
                "replica": {
                    "num_gpus": 0,
                    "num_cpus": 0.5,
                    # Every app under test runs the real generator with faults on cue (tests/fakes.py).
                    "generator_factory": "tests.fakes:FaultyGenerator",
                    "generator_options": {"fail_prompt_substring": FAIL_PROMPT, "fail_kind": "oom",
                                          "slow_prompt_substring": SLOW_PROMPT, "step_delay_s": 0.25},
                    "graceful_shutdown_wait_loop_s": SHUTDOWN_LOOP_S,
                },
                "lora": {"root": str(lora_root), "cache_dir": str(root / name / "lora-cache")},
                "fetch": {"allow_http": True, "allowed_hosts": ["127.0.0.1"]},
            },
            "ingress": {"graceful_shutdown_wait_loop_s": SHUTDOWN_LOOP_S},
            "storage": storage_for(name, backend),
            "jobs": {"lease_s": 3.0, "sweep_interval_s": 0.5, "metrics_interval_s": 0.5},
            # Three quick tries (the loopback receivers are allowed by gpu.fetch above).
            "webhooks": {"attempts": 3, "initial_backoff_s": 0.2, "max_backoff_s": 0.5, "timeout_s": 2.0},
        }
        return _merge(base, overrides)

    def deploy(name: str, route_prefix: str, args: dict) -> AppUnderTest:
        serve.run(build_app(args), name=name, route_prefix=route_prefix)
        return AppUnderTest(name, f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}", args)

    env = type("ServeEnv", (), {"pg": property(lambda _: request.getfixturevalue("pg_server")),
                                "s3": property(lambda _: request.getfixturevalue("s3_server"))})()
    env.port, env.root, env.lora_root = port, root, lora_root
    env.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    env.logs_dir = os.path.join(ctx.address_info["session_dir"], "logs")
    env.args_for, env.deploy = args_for, deploy
    yield env
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def loras(serve_env, tiny_shapes):
    """Two LoRA files in the app's LoRA root (ai-toolkit and kohya formats): root-relative path -> file."""
    from tests.lora_factory import make_lora

    sub = serve_env.lora_root / "my_wan_job"
    sub.mkdir(exist_ok=True)
    a = make_lora(sub / "my_wan_job.safetensors", "ai-toolkit", tiny_shapes, seed=1)
    b = make_lora(serve_env.lora_root / "style_b.safetensors", "kohya", tiny_shapes, seed=2)
    return {"my_wan_job/my_wan_job.safetensors": a.path, "style_b.safetensors": b.path}


def _poll_serve_often() -> None:
    """This process's Serve client checks every 0.1 s whether a ``serve.run`` is up or a ``serve.delete`` done.

    Its own interval is 1 s, a constant with no setting: each deploy and each delete (a delete takes
    about 2 s, Serve's graceful-shutdown loop) ended up to a second after the app had, some 70 times
    in the full tier. Only the client's waiting changes, not what Serve does; where a Ray version has
    no such constant, nothing changes.
    """
    try:
        from ray.serve._private import client
    except ImportError:
        return
    if hasattr(client, "CLIENT_POLLING_INTERVAL_S"):
        client.CLIENT_POLLING_INTERVAL_S = 0.1


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session", params=BACKENDS)
def app(request, serve_env) -> AppUnderTest:
    """The default app (open, tiny model, CPU), once per state backend: SQLite at /, PostgreSQL at /pg."""
    from ray import serve

    name, prefix = ("wan-i2v", "/") if request.param == "sqlite" else ("wan-i2v-pg", "/pg")
    app = serve_env.deploy(name, prefix, serve_env.args_for(name, request.param))
    yield app
    serve.delete(name)


def b64_png(width: int = 64, height: int = 48, seed: int = 0) -> str:
    import base64

    return base64.b64encode(png_bytes(make_image(width, height, seed))).decode()


def small_request(**prompt_overrides) -> dict:
    """A valid request that runs in well under a second on the tiny model."""
    prompt = {"prompt": "a runner on a beach", "width": 64, "height": 48, "num_frames": 5, "sample_steps": 2,
              "ctrl_img": b64_png()}
    prompt.update(prompt_overrides)
    return {"model": "wan21_i2v_14b480p", "prompts": [prompt], "loras": []}
