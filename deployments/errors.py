"""Typed errors a replica (or the LoRA cache) can raise, each with a stable code.

The ingress maps them to HTTP in one place (``serve_app/errors.py``); here they know nothing of
HTTP beyond a suggested status, which is part of the contract the codes stand for.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every typed error: ``code`` is stable, ``message`` is for people."""

    code = "INTERNAL_ERROR"
    status = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def __reduce__(self):
        # Ray pickles exceptions across processes; keep code and details intact.
        return (_rebuild, (type(self), self.message, self.details, self.code))

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


def _rebuild(cls, message, details, code):
    return cls(message, details, code)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line of text (its type's name when it has none): for messages and logs."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def jsonable(value: Any) -> Any:
    """``value`` with every dict key a string and every leaf a plain JSON scalar (anything else, numpy
    scalars and str/int subclasses included, becomes its text), so unpickling it never imports a library."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    return str(value)


def is_client_error(exc: BaseException | None) -> bool:
    """A typed error that the request itself caused (a 4xx: a missing or unusable LoRA, a cancel).

    Such an error is an answer to the request, not a fault of the service: logged as one warning
    line, never as an error with a traceback.
    """
    return isinstance(exc, ServiceError) and 400 <= exc.status < 500


class InvalidRequest(ServiceError):
    code = "INVALID_REQUEST"
    status = 400


class SpeedModeNotSupported(ServiceError):
    """A speed mode this replica does not run (unknown, or disabled in its config)."""

    code = "SPEED_MODE_NOT_SUPPORTED"
    status = 400


class SpeedModeUnavailable(ServiceError):
    """A speed mode the config enables cannot run here (e.g. FP8 on without torchao): a startup error."""

    code = "SPEED_MODE_UNAVAILABLE"
    status = 503


class GpuTooSmall(ServiceError):
    """The card has less memory than the configured ``gpu.memory`` mode needs: a startup error, never a
    job's out-of-memory half-way; its message names the mode that fits."""

    code = "GPU_TOO_SMALL"
    status = 503


class LoraNotFound(ServiceError):
    code = "LORA_NOT_FOUND"
    status = 400


class LoraInvalid(ServiceError):
    """The file is not a usable safetensors LoRA (bad header, dtype, size, extension)."""

    code = "LORA_INVALID"
    status = 400


class LoraIncompatible(ServiceError):
    """The file's keys or shapes do not match the Wan I2V transformer."""

    code = "LORA_INCOMPATIBLE"
    status = 400


class LoraFetchFailed(ServiceError):
    code = "LORA_FETCH_FAILED"
    status = 502


class GenerationFailed(ServiceError):
    code = "GENERATION_FAILED"
    status = 500


class OutOfMemory(GenerationFailed):
    code = "OUT_OF_MEMORY"
    status = 503


class Canceled(ServiceError):
    code = "CANCELED"
    status = 409


class ReplicaUnavailable(ServiceError):
    code = "REPLICA_UNAVAILABLE"
    status = 503
