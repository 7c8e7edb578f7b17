"""The replica's log policy: a request's own mistake is one WARNING line, a fault keeps its traceback.

Serve logs every exception that leaves a replica method as ``ERROR ... Request failed.`` with its
traceback, and the LoRA multiplexer logs a failed load as an ERROR line before that; a missing or
incompatible LoRA is the request's fault, and a traceback of it in the logs reads like a bug. The
filter sits on Serve's logger in the replica's process and looks at the exception each record is
about (its ``exc_info``, or the one being handled where the record was made). Inside a generation
(``joblog.JOB_ID`` set) the replica's own handler logs the failure as one warning naming the job and
marks it ``said``, so Serve's and the multiplexer's records about it are dropped (Serve logs its
"Request failed." outside the generation's context); elsewhere the first becomes that one warning.
"""

from __future__ import annotations

import logging
import sys

from ..errors import is_client_error
from ..joblog import JOB_ID

SERVE_LOGGER = "ray.serve"
LOGGED = "_logged_as_warning"  # set on an exception once a line about it has been logged


def said(exc: BaseException) -> None:
    """``exc`` has been logged (by the generation's own handler): Serve's later records about it are dropped."""
    setattr(exc, LOGGED, True)


class ClientErrorsAsWarnings(logging.Filter):
    """ERROR records about a client error: dropped inside a generation; elsewhere the first becomes
    one WARNING line and the rest are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        if not is_client_error(exc):
            return True  # a fault: as logged, traceback and all
        if JOB_ID.get() is not None:
            return False  # said once, with the job's id, by the generation's own handler (wan_i2v.generate)
        if getattr(exc, LOGGED, False):
            return False  # the same error, already said once (the multiplexer, then Serve's request)
        setattr(exc, LOGGED, True)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "request failed (client error): %s: %s", (exc.code, exc.message)
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def install() -> None:
    """Put the filter on Serve's logger in this process (once)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorsAsWarnings) for f in logger.filters):
        logger.addFilter(ClientErrorsAsWarnings())
