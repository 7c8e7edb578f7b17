"""HTTP guards in front of every route: body size limit and API keys (ASGI middleware)."""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from . import errors, playground
from .config import AuthConfig


class BodyLimit:
    """ASGI middleware: refuse bodies over the configured size while they stream in."""

    max_bytes = 32 * 1024**2

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = BodyLimit.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _BodyTooLarge(limit).response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body, or one longer than it said
                    raise _BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge as e:  # raised where no exception handler turned it into the response
            await e.response()(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reader re-raises it as is (it turns other errors into 400)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(413, errors.body("REQUEST_TOO_LARGE", f"request body is larger than {limit} bytes",
                                          {"limit": limit})["detail"])

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=413, content={"detail": self.detail})


def _route_path(scope) -> str:
    """The path inside the app: Serve's route prefix (``root_path``) removed."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def bearer_key(authorization: str | None, keys: list[str]) -> str | None:
    """The configured key an ``Authorization: Bearer <key>`` header carries, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return AuthConfig.matches(token, keys)


def unauthorized() -> errors.ApiError:
    return errors.ApiError(401, "UNAUTHORIZED", "missing or invalid API key (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})


class ApiKeyAuth:
    """ASGI middleware: with API keys configured, every path but /health and the playground needs a valid key.

    A gate in front of everything (the docs, the OpenAPI schema, unknown paths included), so an
    unauthenticated caller learns nothing and never gets its body read; the routes still derive the
    caller's identity through ``Ingress._owner``. A GET of the playground's page or files is open
    too (exact paths, no prefix): a browser loads them before it has a key to send, and they hold no data.
    """

    keys: list[str] = []
    open_paths = ("/health",)
    open_gets = playground.PAGE_PATHS

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not ApiKeyAuth.keys or self._open(scope):
            return await self.app(scope, receive, send)
        authorization = None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if bearer_key(authorization, ApiKeyAuth.keys) is None:
            return await errors.error_response(unauthorized())(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    def _open(scope) -> bool:
        path = _route_path(scope)
        return path in ApiKeyAuth.open_paths or (scope.get("method") == "GET" and path in ApiKeyAuth.open_gets)


class ReplicaHeader:
    """ASGI middleware: name the answering ingress replica in ``X-Wan-Ingress`` (``ingress.replica_header``).

    Off by default (it tells clients a host name and a pid); operators turn it on to see which replica
    answered, and the multi-node test to prove that every replica serves every job.
    """

    value: bytes | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or ReplicaHeader.value is None:
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-wan-ingress", ReplicaHeader.value)]}
            await send(message)

        return await self.app(scope, receive, send_named)
