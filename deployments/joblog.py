"""The job a log line is about: set once per job (or per generation), named by every line logged for it.

The ingress's job runner and the GPU replica run many jobs at once or one after another in one
process; an operator following one job through both processes' logs greps for its id. The id lives
in a context variable, so it follows the job through ``await`` and into the tasks it starts, and
``job_logger`` prefixes each line with ``job <id>:`` (and hands ``job_id`` to structured log
formatters as an extra field). Worker threads do not inherit context variables:
``in_job_context`` carries the current context into a function run by an executor.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any, Callable

JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("wan_job_id", default=None)


class JobLogger(logging.LoggerAdapter):
    """A logger whose lines name the current job (``JOB_ID``), when there is one."""

    def process(self, msg: Any, kwargs: dict) -> tuple[Any, dict]:
        job_id = JOB_ID.get()
        if job_id is None:
            return msg, kwargs
        kwargs["extra"] = {**kwargs.get("extra", {}), "job_id": job_id}
        return f"job {job_id}: {msg}", kwargs


def job_logger(name: str) -> JobLogger:
    return JobLogger(logging.getLogger(name), {})


def in_job_context(fn: Callable, *args) -> Callable[[], Any]:
    """``fn(*args)`` bound to a copy of the calling context, for ``run_in_executor`` (which drops it)."""
    ctx = contextvars.copy_context()
    return lambda: ctx.run(fn, *args)
