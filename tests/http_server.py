"""A small threaded HTTP(S) server on 127.0.0.1 for fetch and webhook tests, plus a loopback-only network guard.

Usage::

    with LocalServer() as srv:
        srv.add("/a.bin", b"data")
        srv.redirect("/r", "http://169.254.169.254/")   # never connected: the fetcher must refuse first
        srv.add_sequence("/flaky", Route(status=503), Route(body=b"ok"))  # 503 first, then ok for good
        fetch_bytes(srv.url("/a.bin"), cfg, 100)
        assert srv.count("/a.bin") == 1

Or as fixtures: ``from tests.http_server import local_server, loopback_only  # noqa: F401``.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass
class Route:
    """What one path answers. ``content_length``: "auto" (the real length), an int (a lie), None (omitted)."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | str | None = "auto"
    delay_s: float = 0.0  # before the status line: exercises read timeouts
    chunk_size: int = 64 * 1024
    chunk_delay_s: float = 0.0  # between body chunks: a slow drip
    close_after: int | None = None  # send this many body bytes, then drop the connection
    require_headers: dict[str, str] = field(default_factory=dict)  # else 401 (a private file)
    hold: threading.Event | None = None  # answer only once the test sets it (at most 60 s): a hung receiver


class LocalServer:
    """Threaded HTTP/1.0 server on a random loopback port; bodies end at close unless Content-Length says."""

    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.routes: dict[str, Route | list[Route]] = {}
        self.counts: Counter[str] = Counter()
        # Every request in order: path, method, body (bytes) and its headers (lower-case names).
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._tls = tls_context
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        if tls_context is not None:
            self._httpd.socket = tls_context.wrap_socket(self._httpd.socket, server_side=True)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    # -- routes ---------------------------------------------------------------------------------
    def add(self, path: str, body: bytes = b"", **kw) -> str:
        """Serve ``body`` at ``path`` (see :class:`Route` for options); returns the full URL."""
        self.routes[path] = Route(body=body, **kw)
        return self.url(path)

    def add_sequence(self, path: str, *routes: Route) -> str:
        """Answer the n-th request for ``path`` as ``routes[n]``, and every later one as the last route."""
        self.routes[path] = list(routes)
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        """Answer ``path`` with a redirect to ``location`` (a path here or any URL)."""
        self.routes[path] = Route(status=status, headers={"Location": location})
        return self.url(path)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def count(self, path: str) -> int:
        with self._lock:
            return self.counts[path]

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "LocalServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                self._handle(b"")

            def do_POST(self) -> None:  # webhook deliveries: the body is kept with the request
                self._handle(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def _handle(self, body: bytes) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.counts[path] += 1
                    server.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()},
                                            "method": self.command, "body": body})
                    route = server.routes.get(path, Route(body=b"not found", status=404))
                    if isinstance(route, list):
                        route = route[min(server.counts[path], len(route)) - 1]
                if any(self.headers.get(k) != v for k, v in route.require_headers.items()):
                    route = Route(body=b"unauthorized", status=401)
                try:
                    self._answer(route)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client gave up first (timeouts, size limits): expected in tests

            def _answer(self, route: Route) -> None:
                if route.hold is not None:
                    route.hold.wait(60)
                time.sleep(route.delay_s)
                self.send_response(route.status)
                for k, v in route.headers.items():
                    self.send_header(k, v)
                if route.content_length == "auto":
                    self.send_header("Content-Length", str(len(route.body)))
                elif route.content_length is not None:
                    self.send_header("Content-Length", str(route.content_length))
                self.end_headers()
                body = route.body if route.close_after is None else route.body[: route.close_after]
                for i in range(0, len(body), route.chunk_size):
                    self.wfile.write(body[i : i + route.chunk_size])
                    self.wfile.flush()
                    time.sleep(route.chunk_delay_s)
                if route.close_after is not None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        return Handler


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        yield srv


@pytest.fixture
def loopback_only(monkeypatch) -> dict[str, list[str]]:
    """Fail the test instead of touching the network: DNS only for names given in the returned dict
    (name -> addresses, editable by the test) and ``localhost``; socket connects only to loopback.
    A test that replaces ``socket.getaddrinfo`` itself must delegate non-test names to the guard's.
    """
    fake_dns: dict[str, list[str]] = {}
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in fake_dns:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port or 0))
                for a in fake_dns[name]
            ]
        if name in LOOPBACK:
            return real_getaddrinfo(host, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, f"test guard: no DNS for {name!r}")

    def _check(address) -> None:
        # Checked at the socket itself, so no higher layer (or a test's own DNS fake) can slip past.
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"test guard: connection to {address[0]!r} attempted")

    def connect(sock, address):
        _check(address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        _check(address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return fake_dns
