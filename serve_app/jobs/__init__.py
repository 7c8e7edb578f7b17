"""Durable jobs: records and states, the store interface, one module per backend (SQLite, PostgreSQL)."""

from .records import ACTIVE, FINAL, Job, JobEvent, StoredSpec
from .store import AsyncJobStore, JobStore, Lease, QueueFull, SchemaTooNew, StoreRefused, open_job_store

__all__ = ["ACTIVE", "FINAL", "AsyncJobStore", "Job", "JobEvent", "JobStore", "Lease", "QueueFull", "SchemaTooNew",
           "StoreRefused", "StoredSpec", "open_job_store"]
