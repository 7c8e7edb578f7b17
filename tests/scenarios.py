"""Shared by the multi-node scenario scripts (run as subprocesses, each with its own Ray cluster) and their tests.

A script imports this first, before Ray: ``from scenarios import log, alive_replicas`` with the
tests folder on ``sys.path`` (``tests/`` is where the script lives).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Before Ray is imported: no token auth, no usage stats, no hub.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def alive_replicas(app: str, deployment: str) -> list[dict]:
    """Alive replica actors of a deployment (pid, node) from the GCS actor table (no dashboard needed)."""
    import ray._private.state

    cls = f"ServeReplica:{app}:{deployment}"
    return [{"pid": a["Pid"], "node_id": a["Address"]["NodeID"]}
            for a in ray._private.state.actors().values() if a["ActorClassName"] == cls and a["State"] == "ALIVE"]


def run_scenario(script: str, args: list[str], timeout: float) -> tuple[dict, str, int]:
    """Run a scenario script in a subprocess; returns (its JSON verdict, context for assertions, exit code)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    path = Path(__file__).with_name(script)
    proc = subprocess.run([sys.executable, str(path), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no verdict; rc={proc.returncode}\n{proc.stderr[-4000:]}"
    verdict = json.loads(lines[-1])
    return verdict, f"{json.dumps(verdict, indent=1)}\n{proc.stderr[-3000:]}", proc.returncode
