"""Errors of the state behind the API (the job database, the output store), with codes and no HTTP.

The job stores, the output store and the job runner raise these; only the HTTP layer
(``serve_app/errors.py``) turns them into statuses and headers.
"""

from __future__ import annotations

from deployments.contract import ServiceError


class StoreUnavailable(ServiceError):
    """The job database (or, at submit, the output store) cannot be reached now: retry later; nothing
    accepted is lost."""

    code = "STORE_UNAVAILABLE"
    retry_after_s = 5  # what a client is told to wait before trying again


class OutputStoreUnavailable(StoreUnavailable):
    """The output store cannot be read now (a download, a control image the runner needs)."""

    code = "OUTPUT_STORE_UNAVAILABLE"


class OutputWriteFailed(ServiceError):
    """The output store refused a write after every retry; the job fails with this code, nothing
    half-written is served."""

    code = "OUTPUT_WRITE_FAILED"


class RangeNotSatisfiable(ServiceError):
    """A ``Range`` that starts past the end of the object (``details.size`` is its size)."""

    code = "RANGE_NOT_SATISFIABLE"
