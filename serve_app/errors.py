"""Every typed error, ours and the replica's, mapped to one HTTP error shape, in one place.

Shape (the reference's): ``{"detail": {"error": {"code", "message", "details"}}}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.contract import InvalidRequest, ServiceError, jsonable

from .state_errors import OutputWriteFailed, RangeNotSatisfiable, StoreUnavailable


class ApiError(ServiceError):
    """An error raised by the HTTP floor, with its status."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, details, code)
        self.status = status
        self.headers = headers or {}

    def __reduce__(self):
        return (ApiError, (self.status, self.code, self.message, self.details, self.headers))


# Errors raised below the routes carry a code and no HTTP: their statuses are set here, the first
# class of an error's MRO found wins. Others (the replica's) keep the status their contract names.
_DOMAIN_STATUS: dict[type, int] = {
    StoreUnavailable: 503,  # and OutputStoreUnavailable
    OutputWriteFailed: 503,
    RangeNotSatisfiable: 416,
    InvalidRequest: 400,
}


def http_status(err: ServiceError) -> int:
    """The HTTP status of a typed error."""
    if isinstance(err, ApiError):
        return err.status
    for cls in type(err).__mro__:
        if cls in _DOMAIN_STATUS:
            return _DOMAIN_STATUS[cls]
    return getattr(err, "status", 500)


def http_headers(err: ServiceError) -> dict[str, str]:
    """The headers an error's answer carries (when to retry, the size a range missed)."""
    if isinstance(err, ApiError):
        return err.headers
    if isinstance(err, StoreUnavailable):
        return {"Retry-After": str(err.retry_after_s)}
    if isinstance(err, RangeNotSatisfiable):
        return {"Content-Range": f"bytes */{err.details.get('size', '*')}"}
    return {}


def not_found(request_id: str) -> ApiError:
    return ApiError(404, "REQUEST_NOT_FOUND", f"Request not found: {request_id}", {"request_id": request_id})


def body(code: str, message: str, details: dict[str, Any] | None = None) -> dict:
    return {"detail": {"error": {"code": code, "message": message, "details": details or {}}}}


def error_response(err: ServiceError) -> JSONResponse:
    return JSONResponse(status_code=http_status(err), content=body(err.code, err.message, jsonable(err.details)),
                        headers=http_headers(err))


_STATUS_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "QUEUE_FULL",
}


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the one shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        message = f"invalid request: {'.'.join(first['loc'])}: {first['msg']}"
        return JSONResponse(status_code=422, content=body("VALIDATION_ERROR", message, {"errors": errors[:20]}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, never a client's fault: the one shape still, and no internals in the message.
        return JSONResponse(status_code=500, content=body("INTERNAL_ERROR", "internal server error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.detail, dict) and "error" in exc.detail:
            return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail})
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            # FastAPI's body reader: JSON that json.loads gives up on other than by a syntax error
            # (bad UTF-8/UTF-16, nesting too deep, 5000-digit integers). Same answer as a syntax error.
            reason = type(exc.__cause__).__name__
            return JSONResponse(status_code=422, content=body(
                "VALIDATION_ERROR", f"invalid request: body is not valid JSON ({reason})",
                {"errors": [{"loc": ["body"], "msg": f"JSON decode error: {reason}", "type": "json_invalid"}]}))
        code = _STATUS_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
        return JSONResponse(status_code=exc.status_code, content=body(code, str(exc.detail)), headers=exc.headers)
