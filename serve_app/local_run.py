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

# Read by Ray when ``ray`` is first imported, so it is set before that import.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def run(config: str) -> int:
    """Start a new local Ray on 127.0.0.1 and ``serve run`` the config on it; blocks until stopped.

    ``--address local`` makes Ray start its own instance even when ``RAY_ADDRESS`` is set or a
    ``ray start`` cluster (possibly a dead one) is recorded in Ray's temp directory: joining another
    cluster would both break the loopback promise and, with the loopback node address, fail.
    Ctrl-C or SIGTERM shuts the app and Ray down.
    """
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from ray.serve.scripts import cli

    # click exits through SystemExit with serve run's own status; there is nothing to return on success.
    cli.main(["run", "--address", "local", config], prog_name="wan-serve run")
    return 0
