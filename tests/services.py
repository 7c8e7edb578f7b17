"""Real services the tests start themselves: a PostgreSQL server and an S3-compatible object store.

- ``PgServer``: Debian's ``postgresql-15`` binaries (not on PATH: found under /usr/lib/postgresql);
  PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user. Password
  authentication (scram) on 127.0.0.1 only, a free port, data in a fresh temp directory.
- ``S3Server``: moto in server mode (``python -m moto.server``) in its own process, on 127.0.0.1.

Both can be stopped and started again (the fault tests do): PostgreSQL keeps its data; moto keeps
its objects only in memory, so an S3 outage that must not lose them is ``S3Server.down()``/``up()``
(its endpoint hangs up on every connection, as a store that is down does, while moto keeps running behind).
Neither ever skips: a missing binary is an error that says what to install.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

PG_USER = "wan"
PG_PASSWORD = "wan-test-password"


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Below the kernel's ephemeral range and above Ray's worker ports (10002-19999).
_PORTS = range(20000, max(_ephemeral_low(), 20100))
_rng = random.Random()


def free_port() -> int:
    """A free port on 127.0.0.1 that no client socket will take as its own.

    Not the kernel's pick (``bind(0)``): that is an ephemeral port, and a server that stops and comes back
    (PostgreSQL in the outage tests) found it taken meanwhile by the local end of some client's
    connection, a client retrying that very port included (TCP connects to itself there).
    """
    for _ in range(1000):
        port = _rng.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


def _wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        if time.time() > deadline:
            raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.1)


def pg_bindir() -> Path:
    """Where initdb/pg_ctl live: Debian's versioned directory, else PATH."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "pg_ctl")):
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries not found: install Debian's postgresql-15 "
                       "(apt-get install postgresql-15); .ci/run does")


class PgServer:
    """A throwaway PostgreSQL server on 127.0.0.1 (password auth), started and stopped by the tests."""

    def __init__(self):
        self.bindir = pg_bindir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="wan-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(self.dir, 0o700)
        pwfile = self.dir / "pw"
        pwfile.write_text(PG_PASSWORD + "\n")
        if self._as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", PG_USER, "--pwfile", str(pwfile), "-E", "UTF8",
                   "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "--no-sync"])
        pwfile.unlink()
        self.databases: set[str] = set()

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}{self._log_tail()}")
        return proc

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + self.log.read_text()[-2000:]
        except OSError:
            return ""

    def start(self) -> "PgServer":
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start"])
        _wait_port(self.port, 30, "postgres")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"], check=False)

    def url(self, dbname: str = "postgres", password: bool = True) -> str:
        auth = f"{PG_USER}:{PG_PASSWORD}" if password else PG_USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def create_db(self, name: str | None = None) -> str:
        """A new empty database; returns its URL (with the password)."""
        import psycopg

        name = name or f"wan_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.add(name)
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class _Forwarder:
    """TCP from ``port`` to ``target`` on 127.0.0.1. While ``refusing``, every connection is closed as soon
    as it is made (and counted in ``rejected``), as a load balancer with no server behind it does."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.refusing = False
        self.rejected = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def refuse(self) -> None:
        """Close every open connection and every new one."""
        self.refusing = True
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _hang_up(conn)

    def close(self) -> None:
        self.refuse()
        if self._listener is not None:
            _hang_up(self._listener)  # shutdown wakes the accept() blocked in its thread
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            if self.refusing:
                self.rejected += 1
                _hang_up(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                _hang_up(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _hang_up(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class S3Server:
    """moto's S3 in server mode, in its own process (so the tests can stop it like a real outage).

    Clients reach it through ``endpoint``, a port of its own in front of moto's, so ``down()`` can make
    the store unreachable while moto keeps its buckets and objects for ``up()``.
    """

    def __init__(self):
        self.port = free_port()
        self._moto_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._front = _Forwarder(self.port, self._moto_port)

    def start(self) -> "S3Server":
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                      str(self._moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env)
        _wait_port(self._moto_port, 60, "moto S3 server", self.proc)
        self._front.open()
        return self

    def down(self) -> None:
        """The store becomes unreachable (every connection closed at once); its data stays."""
        self._front.refuse()

    def up(self) -> None:
        """Reachable again, with everything it held."""
        self._front.refusing = False

    @property
    def rejected(self) -> int:
        """Connections closed unanswered while down: how often clients tried."""
        return self._front.rejected

    def front(self) -> S3Front:
        """Another endpoint to this moto, with a ``down()`` of its own: an outage seen by one app or store
        only, without starting a moto of its own (1-3 s each). ``stop()`` it after use."""
        return S3Front(self)

    def stop(self) -> None:
        """Stop moto itself (its data is lost)."""
        self._front.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def options(self) -> dict:
        """fsspec/s3fs storage options that reach this server."""
        return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": self.endpoint,
                                                                   "region_name": "us-east-1"}}

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"wan-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket=name)
        return name


class S3Front(S3Server):
    """An endpoint of its own in front of a running ``S3Server``'s moto (see ``S3Server.front``); its
    ``stop()`` closes the endpoint only (``proc`` is None: moto is the server's)."""

    def __init__(self, server: S3Server):
        self.port, self._moto_port, self.proc = free_port(), server._moto_port, None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._front = _Forwarder(self.port, self._moto_port)
        self._front.open()
