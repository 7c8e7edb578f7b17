"""Readiness: whether a GPU replica has the model loaded and warmed up, so that a job would start now.

``/health`` answers for the ingress alone. A GPU replica reports RUNNING to Serve only once its
constructor has returned, and the constructor loads the pipeline and compiles/warms it up
(``deployments/replica/wan_i2v.py``), so RUNNING replicas of the model deployment are ready ones. The
count comes from Serve's controller (``serve.status()``), not from calling a replica: a replica
runs one generation at a time, and a busy one is still ready.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

# A probe every second from every load balancer must not become a controller call each time.
CACHE_S = 1.0
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Readiness:
    ready: bool
    running: int  # model replicas loaded and warmed up
    starting: int  # model replicas loading (or waiting for resources)
    deployment_status: str  # Serve's status of the model deployment (HEALTHY, UPDATING, UNHEALTHY, ...)

    def details(self) -> dict:
        return {"model_replicas": {"running": self.running, "starting": self.starting},
                "deployment_status": self.deployment_status}


class ReadinessProbe:
    """Asks Serve about one model deployment, at most once per ``CACHE_S``."""

    def __init__(self, app_name: str, deployment_name: str):
        self.app_name = app_name
        self.deployment_name = deployment_name
        self._last: tuple[float, Readiness] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> Readiness:
        async with self._lock:  # concurrent probes share one controller call
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < CACHE_S:
                return self._last[1]
            try:
                readiness = await asyncio.wait_for(asyncio.to_thread(self._ask_serve), TIMEOUT_S)
            except Exception:  # the controller is busy or restarting: not known to be ready
                readiness = Readiness(False, 0, 0, "UNKNOWN")
            self._last = (time.monotonic(), readiness)
            return readiness

    def _ask_serve(self) -> Readiness:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        deployment = app.deployments.get(self.deployment_name) if app is not None else None
        if deployment is None:
            return Readiness(False, 0, 0, "NOT_DEPLOYED")
        states = {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items()}
        running = states.get("RUNNING", 0)
        starting = states.get("STARTING", 0) + states.get("RECOVERING", 0) + states.get("UPDATING", 0)
        status = str(getattr(deployment.status, "value", deployment.status))
        return Readiness(running > 0, running, starting, status)
