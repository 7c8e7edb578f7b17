"""The one outbound fetcher: ctrl_img URLs, LoRA URLs and webhook deliveries all go through here.

Every URL a client sends is untrusted, so a fetch is refused *before any connection* when it could
reach something the server can see but the client should not (loopback, private networks, cloud
metadata at 169.254.169.254, ...):

1. ``check_url``: syntax, scheme (https; http only with ``allow_http``), no credentials, a sane host
   and port, and IP literals (in every spelling ``inet_aton`` accepts) checked without DNS.
2. Before each hop the hostname is resolved once with ``socket.getaddrinfo``; if ANY address is
   disallowed the fetch is refused (a name with one public and one private address is refused).
3. The connection then goes to the vetted IP itself (the URL's host is replaced by the IP, the
   ``Host`` header and TLS SNI/certificate check keep the real name), so a second DNS answer
   (DNS rebinding) can never redirect the connection.
4. Redirects are followed by hand, each hop re-checked as in 1-3, at most ``max_redirects``.
5. Bodies are size-limited: by ``Content-Length`` up front and by counting while streaming.

``allowed_hosts`` entries are exemptions, not a whitelist: an exact hostname (then all its
addresses are accepted) or an IP/CIDR (addresses inside it are accepted) may be private.
Environment proxies are ignored (``trust_env=False``): vetting an address and then handing the
request to a proxy would vet the wrong thing.

``post`` (webhook deliveries) sends one POST under the same rules 1-3 and follows no redirect (a 3xx
is an answer like any other: a redirect could only lead the body somewhere the client did not name).

Residual risks: a hostname listed in ``allowed_hosts`` is trusted with whatever it resolves to;
``total_timeout_s`` is checked between chunks, so one stalled read can still take ``read_timeout_s``.

Object stores (``s3://``, ``gs://``: the LoRA root and LoRA references, output storage) are not
vetted here: the SDK talks to its own endpoints with the node's credentials. ``object_fs`` is the one
way every part opens one, with the defaults below under the options its config gives.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import socket
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import httpx

from .config import FetchConfig
from .errors import ServiceError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HF_HOST = "huggingface.co"
HF_ENDPOINT = f"https://{HF_HOST}"
REDIRECT_CODES = {301, 302, 303, 307, 308}
# Headers that carry the caller's identity; never sent to another origin after a redirect.
SENSITIVE_HEADERS = {"authorization", "cookie", "proxy-authorization"}
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(\.{_LABEL})*\.?$")
# Forms inet_aton accepts besides dotted quads ("127.1", "2130706433", "0x7f.0.0.1"); resolvers do too.
_LOOSE_IPV4_RE = re.compile(r"^[0-9a-fx.]+$")


class FetchError(ServiceError):
    """Base of every fetch error."""

    code = "FETCH_FAILED"
    status = 502


class UrlNotAllowed(FetchError):
    """Malformed URL, wrong scheme, credentials, or an address the server must not reach."""

    code = "URL_NOT_ALLOWED"
    status = 400


class FetchTooLarge(FetchError):
    code = "FETCH_TOO_LARGE"
    status = 413


class FetchFailed(FetchError):
    """Connection error, non-2xx status, too many redirects, broken body."""

    code = "FETCH_FAILED"
    status = 502


class FetchTimeout(FetchFailed):
    """A timeout; same code as FetchFailed (``details.reason == "timeout"``) so clients see one code.

    Status 504: the remote was too slow (a gateway timeout), not the client's request malformed.
    """

    status = 504


# ---------------------------------------------------------------------------------------------
# URL and address checks (no network)


def _parse_ip(host: str) -> IPAddress | None:
    """An IP literal in any spelling a resolver would accept, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LOOSE_IPV4_RE.match(host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 embeddings of IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv6 address can carry an IPv4 one that the kernel or a gateway will actually reach.
        embedded = [ip.ipv4_mapped, ip.sixtofour]
        if ip.teredo:
            embedded.extend(ip.teredo)
        if any(e is not None and not _is_public(e) for e in embedded):
            return False
        if ip.ipv4_mapped is not None:  # no legitimate use in a URL
            return False
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global  # catches the rest, e.g. 100.64.0.0/10 (carrier-grade NAT)
    )


class _Exemptions:
    """``allowed_hosts`` split into exact names and networks."""

    def __init__(self, entries: list[str]):
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            entry = entry.strip().lower().rstrip(".")
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)

    def allows(self, host: str, ip: IPAddress | None) -> bool:
        if host.lower().rstrip(".") in self.names:
            return True
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)


def _address_allowed(host: str, ip: IPAddress, cfg: FetchConfig) -> bool:
    return cfg.allow_private or _is_public(ip) or _Exemptions(cfg.allowed_hosts).allows(host, ip)


def _refuse(url: str, reason: str, message: str) -> UrlNotAllowed:
    return UrlNotAllowed(message, {"url": _redact(url), "reason": reason})


def _redact(url: str) -> str:
    """The URL for error messages: no userinfo, no query (either may hold secrets), bounded length."""
    try:
        u = httpx.URL(url)
        return str(u.copy_with(userinfo=b"", query=None, fragment=None))[:300]
    except Exception:
        return url.split("?", 1)[0].split("@")[-1][:300]


def _parse(url: str, cfg: FetchConfig) -> httpx.URL:
    """``check_url``'s work, returning the parsed URL (the same parser later sends the request)."""
    if not isinstance(url, str) or not url or len(url) > 8192 or any(c in url for c in "\r\n\t\x00 "):
        raise _refuse(str(url)[:300], "malformed", "URL is empty, too long or contains whitespace")
    try:
        u = httpx.URL(url)
        port = u.port
    except (httpx.InvalidURL, ValueError) as e:
        raise _refuse(url, "malformed", f"malformed URL: {e}") from e
    allowed_schemes = ("https", "http") if cfg.allow_http else ("https",)
    if u.scheme not in allowed_schemes:
        raise _refuse(url, "scheme", f"URL scheme {u.scheme!r} is not allowed (use {' or '.join(allowed_schemes)})")
    if u.userinfo:
        raise _refuse(url, "credentials", "URLs with credentials (user:password@) are not allowed")
    if port is not None and not 0 < port < 65536:
        raise _refuse(url, "malformed", f"invalid port {port}")
    host = u.raw_host.decode("ascii", "replace").lower()
    ip = None if "%" in host else _parse_ip(host)  # "%": an IPv6 zone id or an escaped name, both refused
    if ip is None and not _HOSTNAME_RE.match(host):
        raise _refuse(url, "malformed", f"invalid host {host!r}")
    if ip is not None and not _address_allowed(host, ip, cfg):
        raise _refuse(url, "address", f"address {ip} is not a public address")
    # "localhost" never needs DNS to be known as local; refuse it at submit time already.
    if ip is None and (host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost")):
        if not (cfg.allow_private or _Exemptions(cfg.allowed_hosts).allows(host, None)):
            raise _refuse(url, "address", f"host {host!r} is local")
    return u


def check_url(url: str, cfg: FetchConfig) -> None:
    """Syntax, scheme, credentials and IP-literal checks, without DNS.

    Raises:
        UrlNotAllowed: with ``details.reason`` in malformed, scheme, credentials, address.
    """
    _parse(url, cfg)


def vet_url(url: str, cfg: FetchConfig) -> None:
    """``check_url`` and then what a fetch does before connecting: the host resolved now and every
    address vetted. Nothing is sent.

    Raises:
        UrlNotAllowed; FetchFailed (``reason`` ``dns``) when the host does not resolve.
    """
    resolve_vetted(_parse(url, cfg), cfg)


def resolve_vetted(url: httpx.URL, cfg: FetchConfig) -> list[IPAddress]:
    """Resolve the URL's host once; every address must be allowed, else the whole URL is refused."""
    host = url.raw_host.decode("ascii").lower()
    literal = _parse_ip(host)
    if literal is not None:
        addrs = [literal]
    else:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise FetchFailed(f"cannot resolve host {host!r}: {e}", {"url": _redact(str(url)), "reason": "dns"}) from e
        addrs = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if ip not in addrs:
                addrs.append(ip)
        if not addrs:
            raise FetchFailed(f"host {host!r} has no address", {"url": _redact(str(url)), "reason": "dns"})
    for ip in addrs:
        if not _address_allowed(host, ip, cfg):
            raise _refuse(str(url), "address", f"host {host!r} resolves to {ip}, which is not a public address")
    return addrs


# ---------------------------------------------------------------------------------------------
# Hugging Face references


def normalize_lora_url(ref: str, endpoint: str = HF_ENDPOINT) -> str:
    """Hugging Face page and ``hf://`` references -> direct download URLs; other refs unchanged.

    ``<endpoint>/<o>/<r>/blob/<rev>/<path>`` -> ``.../resolve/<rev>/<path>``;
    ``hf://<o>/<r>[@<rev>]/<path>`` -> ``<endpoint>/<o>/<r>/resolve/<rev or main>/<path>``.
    ``endpoint`` is ``FetchConfig.hf_endpoint`` (``https://huggingface.co`` unless a mirror is configured).
    """
    endpoint = endpoint.rstrip("/")
    if ref.startswith("hf://"):
        parts = ref[len("hf://") :].split("/")
        if len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
            raise _refuse(ref, "malformed", "hf:// references look like hf://owner/repo/path/file.safetensors")
        owner, repo, path = parts[0], parts[1], "/".join(parts[2:])
        repo, _, rev = repo.partition("@")
        return f"{endpoint}/{owner}/{repo}/resolve/{rev or 'main'}/{path}"
    m = re.match(rf"^{re.escape(endpoint)}/([^/?#]+)/([^/?#]+)/blob/(.+)$", ref)
    if m:
        return f"{endpoint}/{m.group(1)}/{m.group(2)}/resolve/{m.group(3)}"
    return ref


def is_hub_url(url: str, endpoint: str = HF_ENDPOINT) -> bool:
    """True if ``url`` is on the hub's own origin (scheme, host and port), the only place its token may go."""
    try:
        return _origin(httpx.URL(url)) == _origin(httpx.URL(endpoint))
    except (httpx.InvalidURL, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Fetching


def _timeout(cfg: FetchConfig) -> httpx.Timeout:
    return httpx.Timeout(
        connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=cfg.read_timeout_s, pool=cfg.connect_timeout_s
    )


def pinned_request(client: httpx.Client, url: httpx.URL, ip: IPAddress, headers: dict[str, str],
                   method: str = "GET", content: bytes | None = None) -> httpx.Request:
    """A request for ``url`` that connects to ``ip``: Host header and TLS SNI keep the real hostname.

    httpcore verifies the certificate against ``sni_hostname``, so https stays fully verified.
    """
    host = url.raw_host.decode("ascii")
    default_port = 443 if url.scheme == "https" else 80
    host_header = host if url.port in (None, default_port) else f"{host}:{url.port}"
    if ":" in host and not host.startswith("["):  # an IPv6 literal in the Host header needs brackets
        host_header = f"[{host}]" if url.port in (None, default_port) else f"[{host}]:{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" and _parse_ip(host) is None else {}
    return client.build_request(
        method, url.copy_with(host=str(ip)), headers={**headers, "Host": host_header}, content=content,
        extensions=extensions,
    )


@contextmanager
def _open(
    client: httpx.Client, url: httpx.URL, addrs: list[IPAddress], headers: dict[str, str],
    method: str = "GET", content: bytes | None = None,
) -> Iterator[httpx.Response]:
    """Send to the first vetted address that accepts a connection."""
    last: Exception | None = None
    for ip in addrs:
        try:
            resp = client.send(pinned_request(client, url, ip, headers, method, content), stream=True)
        except httpx.ConnectError as e:
            last = e
            continue
        try:
            yield resp
        finally:
            resp.close()
        return
    assert last is not None
    raise last


@contextmanager
def _typed_errors(url: str) -> Iterator[None]:
    """httpx's exceptions -> the typed fetch errors, naming the URL without secrets."""
    try:
        yield
    except httpx.TimeoutException as e:
        raise FetchTimeout(
            f"timed out fetching {_redact(url)}: {type(e).__name__}", {"url": _redact(url), "reason": "timeout"}
        ) from e
    except httpx.InvalidURL as e:
        raise _refuse(url, "malformed", f"malformed URL: {e}") from e
    except httpx.HTTPError as e:
        raise FetchFailed(
            f"fetching {_redact(url)} failed: {type(e).__name__}: {e}", {"url": _redact(url), "reason": "connection"}
        ) from e


def _origin(u: httpx.URL) -> tuple[str, bytes, int | None]:
    return (u.scheme, u.raw_host, u.port)


def _stream(
    url: str,
    cfg: FetchConfig,
    max_bytes: int,
    headers: dict[str, str] | None,
    sink: Callable[[bytes], None],
    total_timeout_s: float | None,
) -> int:
    current = _parse(url, cfg)
    hdrs = dict(headers or {})
    deadline = None if total_timeout_s is None else time.monotonic() + total_timeout_s

    def check_deadline() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise FetchTimeout(f"fetch took longer than {total_timeout_s:.1f}s",
                               {"url": _redact(url), "reason": "timeout", "limit_s": total_timeout_s})

    with _typed_errors(url), httpx.Client(trust_env=False, follow_redirects=False, timeout=_timeout(cfg)) as client:
        for _hop in range(cfg.max_redirects + 1):
            check_deadline()
            addrs = resolve_vetted(current, cfg)
            with _open(client, current, addrs, hdrs) as resp:
                location = resp.headers.get("location")
                if resp.status_code in REDIRECT_CODES and location:
                    nxt = _parse(str(current.join(location)), cfg)
                    if _origin(nxt) != _origin(current):
                        hdrs = {k: v for k, v in hdrs.items() if k.lower() not in SENSITIVE_HEADERS}
                    current = nxt
                    continue
                if not 200 <= resp.status_code < 300:
                    details = {"url": _redact(url), "reason": "status", "upstream_status": resp.status_code}
                    retry_after = resp.headers.get("retry-after", "")
                    if retry_after.isdigit():  # the HTTP-date form is rare; a retrying caller backs off anyway
                        details["retry_after_s"] = int(retry_after)
                    raise FetchFailed(f"{_redact(str(current))} answered HTTP {resp.status_code}", details)
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchTooLarge(
                        f"{_redact(url)} is {declared} bytes; the limit is {max_bytes}",
                        {"url": _redact(url), "limit": max_bytes, "declared": int(declared)},
                    )
                total = 0
                # Decoded bytes (a compressed body is limited by its real size), as they arrive: a
                # chunk_size here would buffer up to it before the limit and deadline are checked.
                for chunk in resp.iter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise FetchTooLarge(
                            f"{_redact(url)} is larger than the limit of {max_bytes} bytes",
                            {"url": _redact(url), "limit": max_bytes},
                        )
                    sink(chunk)
                    check_deadline()
                return total
        raise FetchFailed(
            f"more than {cfg.max_redirects} redirects", {"url": _redact(url), "reason": "too_many_redirects"}
        )


def fetch_to_file(
    url: str,
    dest_path: str | os.PathLike,
    cfg: FetchConfig,
    max_bytes: int,
    headers: dict[str, str] | None = None,
    *,
    total_timeout_s: float | None = None,
) -> int:
    """Stream ``url`` into ``dest_path`` (created or truncated); returns the byte count.

    On any error the partial file is removed. The data is fsync'ed before returning so that a
    caller's rename afterwards cannot publish a file whose content a crash lost.

    Raises:
        UrlNotAllowed, FetchTooLarge, FetchFailed (FetchTimeout).
    """
    try:
        with open(dest_path, "wb") as f:
            n = _stream(url, cfg, max_bytes, headers, f.write, total_timeout_s)
            f.flush()
            os.fsync(f.fileno())
        return n
    except BaseException:
        try:
            os.unlink(dest_path)
        except FileNotFoundError:
            pass
        raise


def fetch_bytes(
    url: str,
    cfg: FetchConfig,
    max_bytes: int,
    headers: dict[str, str] | None = None,
    *,
    total_timeout_s: float | None = None,
) -> bytes:
    """Fetch ``url`` into memory (for small things such as control images)."""
    buf = bytearray()
    _stream(url, cfg, max_bytes, headers, buf.extend, total_timeout_s)
    return bytes(buf)


def post(url: str, cfg: FetchConfig, body: bytes, headers: dict[str, str] | None = None, *,
         timeout_s: float) -> int:
    """POST ``body`` to ``url`` once, under the same address rules as a fetch; returns the HTTP status.

    The host is resolved and vetted now (every call re-checks it) and the connection pinned to the
    vetted address. No redirect is followed and the response body is never read: only the status
    counts. ``timeout_s`` bounds the connection and each read and write.

    Raises:
        UrlNotAllowed, FetchFailed (connection, DNS), FetchTimeout.
    """
    current = _parse(url, cfg)
    with _typed_errors(url), httpx.Client(trust_env=False, follow_redirects=False,
                                          timeout=httpx.Timeout(timeout_s)) as client:
        addrs = resolve_vetted(current, cfg)
        with _open(client, current, addrs, dict(headers or {}), "POST", body) as resp:
            return resp.status_code


# ---------------------------------------------------------------------------------------------
# Object stores (fsspec)

# botocore's own defaults retry a dead endpoint for about ten seconds a call; with a caller's own
# retries on top, a lost store would hold a request for a minute. s3fs's listing cache would let one
# process see an object another one already deleted or replaced. Options given in a config win.
OBJECT_STORE_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False,
           "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}},
}
# s3fs retries every call 5 times with backoff on top of botocore's attempts (a class setting, not an
# option): 7-10 s before a call to a dead store failed, and a download waited that long for its 503.
# One s3fs try keeps botocore's two attempts (its retry of throttling, 5xx and dropped connections):
# 1.5-3 s to a 503 (measured on the test server); writes keep their own retry window above this.
OBJECT_STORE_CALL_TRIES: dict[str, int] = {"s3": 1}


def object_fs(url: str, options: dict[str, Any] | None = None):
    """The fsspec filesystem and path of ``url`` (a local path too), opened with the defaults above.

    Args:
        url: ``s3://bucket/prefix``, ``gs://...``, or a local path.
        options: fsspec storage options from the config (``client_kwargs.endpoint_url``, region,
            credentials where not from the node's role or environment); each top-level key replaces
            the default's.
    Raises:
        ImportError: the scheme's fsspec backend is not installed; ValueError: fsspec cannot parse it.
    """
    import fsspec

    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    # A copy: s3fs rewrites the retry settings it is given in place.
    defaults = copy.deepcopy(OBJECT_STORE_DEFAULTS.get(scheme, {}))
    fs, path = fsspec.core.url_to_fs(url, **{**defaults, **copy.deepcopy(options or {})})
    if scheme in OBJECT_STORE_CALL_TRIES:
        fs.retries = OBJECT_STORE_CALL_TRIES[scheme]
    return fs, path
