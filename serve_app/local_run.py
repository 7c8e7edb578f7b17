"""``wan-serve run``: a Serve config on a Ray of its own, every Ray port bound to the loopback interface.

Plain ``serve run`` starts Ray with the machine's network address as the node address, and Ray 2.60 on
Linux then opens the GCS, raylet, object manager, every worker's gRPC port and the dashboard agent on all
interfaces, and the runtime-env agent on that address: anyone who can reach the machine can reach Ray,
which runs whatever code it is sent. Only Serve's HTTP port follows ``http_options.host``.

Ray has one switch that makes the node address the loopback address: its single-machine mode, the
default on macOS and Windows, turned on here by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. Its only
other effect is that ``ray start`` refuses to build a multi-node cluster, which a one-machine run never
does. (``ray.init(_node_ip_address="127.0.0.1")`` and ``ray start --node-ip-address 127.0.0.1`` do not
help: Ray replaces a loopback node address with the machine's address.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import yaml

# Read by Ray when ``ray`` is first imported, so it is set before that import.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
READY_POLL_S = 1.0


def run(config: str) -> int:
    """Start a new local Ray on 127.0.0.1 and ``serve run`` the config on it; blocks until stopped.

    ``--address local`` makes Ray start its own instance even when ``RAY_ADDRESS`` is set or a
    ``ray start`` cluster (possibly a dead one) is recorded in Ray's temp directory: joining another
    cluster would both break the loopback promise and, with the loopback node address, fail.
    Ctrl-C or SIGTERM shuts the app and Ray down, the same quiet way. Each application's URL is
    printed once its ``/ready`` answers 200: ``serving at http://HOST:PORT (ready)``.
    """
    os.environ[SINGLE_MACHINE_ENV] = "0"
    urls = app_urls(config)
    from ray.serve.scripts import cli

    _sigterm_as_interrupt()
    threading.Thread(target=announce_when_ready, args=(urls,), name="announce-ready", daemon=True).start()
    # click exits through SystemExit with serve run's own status; there is nothing to return on success.
    cli.main(["run", "--address", "local", config], prog_name="wan-serve run")
    return 0


def app_urls(config: str) -> list[str]:
    """The base URL of each application of a Serve config file (its HTTP host, port and route prefix)."""
    with open(config) as f:
        data = yaml.safe_load(f) or {}
    http = data.get("http_options") or {}
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    return [base + (app.get("route_prefix") or "/").rstrip("/") for app in data.get("applications") or []]


def announce_when_ready(urls: list[str], out=None) -> None:
    """Print ``serving at URL (ready)`` for each URL once its ``/ready`` answers 200 (polled each second)."""
    import httpx

    out = out if out is not None else sys.stdout
    waiting = list(urls)
    while waiting:
        for url in list(waiting):
            probe = url.replace("://0.0.0.0:", "://127.0.0.1:", 1)  # bound to every interface: ask locally
            try:
                ready = httpx.get(f"{probe}/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                ready = False
            if ready:
                print(f"serving at {url} (ready)", file=out, flush=True)
                waiting.remove(url)
        if waiting:
            time.sleep(READY_POLL_S)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> None:
    """SIGTERM takes the path of Ctrl-C: ``serve run`` shuts Serve down and exits quietly.

    ``serve run`` handles only KeyboardInterrupt gracefully. ``ray.init`` first sets a Python SIGTERM
    handler that exits at once (through ``set_sigterm_handler``), then Ray's core worker installs a
    C-level handler that prints a stack trace (``*** SIGTERM received ***``) and aborts, leaving the
    replicas to be killed mid-flight. Both are replaced by ours, in this process only (the
    ``wan-serve run`` driver): Ray's handlers of crash signals (SIGSEGV, ...) stay.
    """
    import ray
    import ray._private.utils as ray_utils

    signal.signal(signal.SIGTERM, _interrupt)
    ray_utils.set_sigterm_handler = lambda handler: signal.signal(signal.SIGTERM, _interrupt)
    init = ray.init

    def init_then_interrupt_on_sigterm(*args, **kwargs):
        context = init(*args, **kwargs)
        signal.signal(signal.SIGTERM, _interrupt)
        return context

    ray.init = init_then_interrupt_on_sigterm
