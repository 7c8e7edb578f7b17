"""Prometheus metrics of the jobs, reported by each ingress replica (through ``ray.serve.metrics``).

Counted where the transition really happens, once: a submit that created a job (not an idempotent
repeat), a job final state that the store actually wrote (``finish`` / an immediate cancel returned
True), so counters summed over ingress replicas equal the rows that changed. The gauge of jobs per
state is read from the shared database by every ingress replica: each reports the same cluster-wide
value, so take ``max`` over replicas, never ``sum``. Names as exported: ``ray_`` prefix, ``_total``
on counters; the queries are in ``docs/operations.md``.
"""

from __future__ import annotations

from typing import Mapping

# Seconds from submit to the start on a GPU replica: none at all when idle, minutes under load.
QUEUE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
# States of the active jobs, as ``JobStore.active_counts`` reports them.
ACTIVE_STATES = ("waiting", "dispatched", "running")


class JobMetrics:
    """Counters, the active-jobs gauge and the time-in-queue histogram of one ingress replica."""

    def __init__(self):
        from ray.serve import metrics

        self.submitted = metrics.Counter("wan_jobs_submitted", "jobs created by a submit (idempotent repeats excluded)")
        self.succeeded = metrics.Counter("wan_jobs_succeeded", "jobs that ended succeeded")
        self.failed = metrics.Counter("wan_jobs_failed", "jobs that ended failed, by error code",
                                      tag_keys=("error_code",))
        self.canceled = metrics.Counter("wan_jobs_canceled", "jobs that ended canceled")
        self.active = metrics.Gauge(
            "wan_jobs_active", "active jobs in the database: waiting (no runner holds it), dispatched (held, not yet "
            "started on a GPU replica), running", tag_keys=("state",))
        self.time_in_queue = metrics.Histogram(
            "wan_job_queue_seconds", "from submit to the first start on a GPU replica, in seconds",
            boundaries=list(QUEUE_BUCKETS_S))

    def finished(self, status: str, error: Mapping | None) -> None:
        """A job reached a final state (call once per job, when the store wrote it)."""
        if status == "succeeded":
            self.succeeded.inc()
        elif status == "canceled":
            self.canceled.inc()
        else:
            self.failed.inc(tags={"error_code": str((error or {}).get("code", "UNKNOWN"))})

    def active_counts(self, counts: Mapping[str, int]) -> None:
        for state in ACTIVE_STATES:
            self.active.set(counts.get(state, 0), tags={"state": state})
