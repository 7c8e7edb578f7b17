"""The README's run command as a new user runs it: the embedded default answers, and every TCP port its
processes listen on (Ray's GCS, raylet, object manager, workers, dashboard and agents, Serve's HTTP) is
on the loopback interface.

The run gets its own HOME, Ray temp directory and working directory, and starts a Ray of its own
(``wan-serve run`` passes ``--address local``), so it never joins the test session's cluster. It
keeps Ray's token authentication on, as the README's command does.

One kind of port cannot be on loopback: Ray Serve 2.60 binds each replica's inter-deployment gRPC
server to ``[::]:0``, with no setting. The test allows exactly that one per replica and checks that it
refuses a call without Ray's token (SECURITY.md says so).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import yaml

from tests.conftest import small_request
from tests.services import free_port

pytestmark = [pytest.mark.full, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
RUN_COMMAND = "wan-serve run configs/local.yaml"
START_TIMEOUT_S = 420  # Ray with its dashboard, the tiny checkpoint build, two replicas: slow on 2 shared cores
STOP_TIMEOUT_S = 60


def test_readme_quick_start_runs_the_local_default_with_wan_serve_run():
    # The command the test below runs is the one the README tells users to run, not plain `serve run`.
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)
    run_line = next(c for c in commands if "pytest" not in c)
    assert run_line.split(" && ")[-1] == RUN_COMMAND


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, a dual-stack socket bound to IPv4 loopback
    return addr.is_loopback


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list[psutil.Process]) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of these processes."""
    found = set()
    for proc in procs:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def _refuses_strangers(port: int) -> bool:
    """Whether a Serve replica's gRPC server on this port refuses a request without Ray's token."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=30)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _stop(proc: subprocess.Popen, pids: set[int]) -> None:
    """SIGTERM the run (it shuts Serve and Ray down), then SIGKILL whatever of its tree is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    leftovers = []
    for pid in pids - {proc.pid}:
        try:
            leftovers.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(leftovers, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=15)


def test_local_run_listens_on_loopback_only(tmp_path):
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # 8000 may be taken on a shared machine; nothing else changes
    (work / "configs" / "local.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "home").mkdir()
    # Short: Ray's unix socket paths under it must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # As the README's command runs: no cluster address, Ray's defaults (token authentication on).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(HOME=str(tmp_path / "home"), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path / "run.log"
    argv = [sys.executable, "-m", "serve_app.cli", *RUN_COMMAND.split()[1:]]
    pids: set[int] = set()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(base_url=base, timeout=10) as http:
            while True:
                pids |= {p.pid for p in _tree(proc.pid)}
                if proc.poll() is not None:
                    pytest.fail(f"the run exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"/health did not answer within {START_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            # The run says where it serves once, when the app is ready (and not before: /ready is 200).
            line = f"serving at {base} (ready)"
            while line not in log_path.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.5)
            assert http.get("/ready").status_code == 200
            assert log_path.read_text(errors="replace").count("serving at ") == 1
            # One job end to end: the GPU replica is up too, so every process of the run exists.
            r = http.post("/v1/inference", json=small_request())
            assert r.status_code == 200, r.text
            rid = r.json()["request_id"]
            while (status := http.get(f"/v1/requests/{rid}/status").json())["status"] not in (
                    "succeeded", "failed", "canceled"):
                assert time.monotonic() < deadline, f"job still {status}"
                time.sleep(0.5)
            assert status["status"] == "succeeded", status

        procs = _tree(proc.pid)
        pids |= {p.pid for p in procs}
        listening = _listening(procs)
        names = {p.name() for p in procs if p.is_running()}
        # The walk sees the run's processes: Serve's HTTP port and Ray's GCS are among them.
        assert (port, "ray::ProxyActor") in {(p, n) for _, p, n in listening}, listening
        assert "gcs_server" in names, names
        exposed = sorted(s for s in listening if not _loopback(s[0]))
        replica_grpc = [s for s in exposed if s[2].startswith("ray::ServeReplica:")]
        others = [s for s in exposed if s not in replica_grpc]
        assert not others, f"listening beyond loopback (ip, port, process): {others}"
        per_replica = [name for _, _, name in replica_grpc]
        assert len(per_replica) == len(set(per_replica)), f"more than one exposed port in a replica: {replica_grpc}"
        for _, exposed_port, name in replica_grpc:
            assert _refuses_strangers(exposed_port), f"{name} port {exposed_port} answers without Ray's token"

        # SIGTERM (a server in the background stopped with kill) shuts down as quietly as Ctrl-C.
        running_log = len(log_path.read_bytes())
        _stop(proc, pids)
        stopping = log_path.read_bytes()[running_log:].decode(errors="replace")
        assert proc.returncode == 0 and "Traceback" not in stopping and "SIGTERM" not in stopping, stopping
    finally:
        pids |= {p.pid for p in _tree(proc.pid)}
        _stop(proc, pids)
        shutil.rmtree(ray_tmp, ignore_errors=True)
