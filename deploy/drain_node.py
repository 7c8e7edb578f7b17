#!/usr/bin/env python3
"""preStop hook of a Ray worker pod: drain this Ray node, then wait until Serve has moved its replicas off.

Kubernetes sends SIGTERM (and `ray start --block` ends every process of the node at once) as soon as the
hook returns, so without it a pod being deleted kills a running job mid-way. Draining makes Ray place no
new work here and Serve start replacement replicas elsewhere and stop these gracefully (a running job
finishes, up to gpu.replica.graceful_shutdown_timeout_s), as `docs/operations.md` ("Draining a node")
describes. The pod's terminationGracePeriodSeconds must exceed the deadline.

    python /home/ray/wan-i2v-serve/deploy/drain_node.py 600
"""

from __future__ import annotations

import subprocess
import sys
import time


def drain_command(node_id: str, deadline_s: int) -> list[str]:
    """`ray drain-node` for this node: no new work here, Serve moves its replicas off before the deadline."""
    return ["ray", "drain-node", "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", "pod terminating", "--deadline-remaining-seconds", str(deadline_s)]


def main(argv: list[str]) -> int:
    deadline_s = int(argv[0]) if argv else 600
    end = time.monotonic() + deadline_s

    import ray
    from ray.util.state import list_actors

    ray.init(address="auto", log_to_driver=False)  # RAY_ADDRESS, set by KubeRay in every Ray container
    node_id = ray.get_runtime_context().get_node_id()
    drained = subprocess.run(drain_command(node_id, deadline_s), check=False)
    if drained.returncode != 0:  # e.g. the head is gone already: nothing to hand over to
        return 0
    while time.monotonic() < end:
        alive = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=10_000)
        if not any(a.class_name.startswith("ServeReplica:") for a in alive):
            return 0
        time.sleep(5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
