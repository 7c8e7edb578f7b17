"""The outbound fetcher: every refusal happens before a connection; limits hold while streaming.

All traffic stays on 127.0.0.1: ``loopback_only`` fails a test that would resolve a real name or
connect anywhere else, so a regression cannot reach the network either.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import socket
import ssl

import httpx
import pytest

from deployments import fetch as fetch_mod
from deployments.config import FetchConfig
from deployments.fetch import (
    FetchFailed,
    FetchTimeout,
    FetchTooLarge,
    UrlNotAllowed,
    check_url,
    fetch_bytes,
    fetch_to_file,
    is_hub_url,
    normalize_lora_url,
    post,
    vet_url,
)
from tests.http_server import LocalServer, local_server, loopback_only  # noqa: F401  (fixtures)
from tests.services import free_port

DEFAULT = FetchConfig()
LOCAL = FetchConfig(allow_http=True, allowed_hosts=["127.0.0.1"], connect_timeout_s=2, read_timeout_s=2)


@pytest.fixture(autouse=True)
def _guard(loopback_only):  # noqa: F811
    return loopback_only


def _reason(exc_info) -> str:
    return exc_info.value.details["reason"]


# -- check_url: no network ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://example.com/x", "scheme"),  # http needs allow_http
        ("ftp://example.com/x", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://example.com/", "scheme"),
        ("https://user:pw@example.com/x", "credentials"),
        ("https://user@example.com/x", "credentials"),
        ("https://example.com\\@evil.com/", "credentials"),  # parser confusion ends up as userinfo
        ("", "malformed"),
        ("https://", "malformed"),
        ("https://exa mple.com/", "malformed"),
        ("https://example.com:99999/", "malformed"),
        ("https://[fe80::1%25eth0]/", "malformed"),
        ("https://exa%20mple.com/", "malformed"),
    ],
)
def test_check_url_refuses_syntax(url, reason):
    with pytest.raises(UrlNotAllowed) as e:
        check_url(url, DEFAULT)
    assert e.value.code == "URL_NOT_ALLOWED" and e.value.status == 400
    assert _reason(e) == reason


PRIVATE_HOSTS = [
    "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    # spellings a resolver turns into 127.0.0.1
    "2130706433", "127.1", "0x7f.0.0.1", "017700000001",
    # IPv6: loopback, unspecified, link-local, ULA, multicast, IPv4-mapped (even of a public address),
    # 6to4 of 127.0.0.1, NAT64 of 10.0.0.1
    "[::1]", "[::]", "[fe80::1]", "[fc00::1]", "[ff02::1]",
    "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[::ffff:8.8.8.8]", "[::ffff:7f00:1]",
    "[2002:7f00:1::]", "[64:ff9b::a00:1]",
    # names that are local without DNS
    "localhost", "LOCALHOST.", "api.localhost",
]


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_check_url_refuses_private_literals(host):
    with pytest.raises(UrlNotAllowed) as e:
        check_url(f"https://{host}/x", DEFAULT)
    assert _reason(e) == "address"


@pytest.mark.parametrize(
    "url",
    ["https://example.com/a.safetensors", "https://8.8.8.8/x", "https://[2606:4700::1111]/x", "https://bücher.de/"],
)
def test_check_url_accepts_public(url):
    check_url(url, DEFAULT)  # and no DNS happened: loopback_only would have refused it


def test_allowed_hosts_and_allow_private():
    check_url("http://127.0.0.1:8080/x", LOCAL)
    check_url("http://127.0.0.5/x", FetchConfig(allow_http=True, allowed_hosts=["127.0.0.0/8"]))
    check_url("https://lora.test/x", FetchConfig(allowed_hosts=["lora.test"]))
    check_url("https://[::1]/x", FetchConfig(allowed_hosts=["::1"]))
    check_url("https://10.1.2.3/x", FetchConfig(allow_private=True))
    with pytest.raises(UrlNotAllowed):  # an exemption for one address is not one for others
        check_url("http://10.0.0.1/x", LOCAL)
    with pytest.raises(UrlNotAllowed):  # nor for the IPv4-mapped spelling of it
        check_url("http://[::ffff:127.0.0.1]/x", LOCAL)


# -- resolution and pinning -----------------------------------------------------------------------


def test_hostname_resolving_to_private_is_refused(loopback_only):  # noqa: F811
    loopback_only["internal.test"] = ["10.0.0.5"]
    loopback_only["mixed.test"] = ["93.184.216.34", "10.0.0.5"]  # ANY bad address refuses the name
    loopback_only["v6.test"] = ["fd00::5"]
    for host in ("internal.test", "mixed.test", "v6.test"):
        with pytest.raises(UrlNotAllowed) as e:
            fetch_bytes(f"https://{host}/x", DEFAULT, 100)
        assert _reason(e) == "address"


def test_localhost_name_refused_even_when_it_would_resolve(local_server):  # noqa: F811
    local_server.add("/a", b"x")
    with pytest.raises(UrlNotAllowed):
        fetch_bytes(local_server.url("/a", host="localhost"), LOCAL, 100)
    assert local_server.count("/a") == 0


def test_connects_to_the_vetted_address_only(local_server, loopback_only, monkeypatch):  # noqa: F811
    """DNS rebinding: the name is resolved once per hop; the connection uses that answer."""
    local_server.add("/a", b"pinned")
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])
    calls = []
    guarded_dns = socket.getaddrinfo  # the guard's: answers only loopback names

    def rebinding_dns(host, port, *a, **k):
        if host != "lora.test":
            return guarded_dns(host, port, *a, **k)
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in next(answers)]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    cfg = LOCAL.model_copy(update={"allowed_hosts": ["lora.test"]})
    assert fetch_bytes(local_server.url("/a", host="lora.test"), cfg, 100) == b"pinned"
    assert calls == ["lora.test"]
    assert local_server.requests[-1]["host"] == f"lora.test:{local_server.port}"


# -- fetching ---------------------------------------------------------------------------------------


def test_fetch_bytes_and_file(local_server, tmp_path):  # noqa: F811
    body = bytes(range(256)) * 1000
    url = local_server.add("/a.bin", body)
    assert fetch_bytes(url, LOCAL, len(body)) == body  # exactly at the limit is fine
    dest = tmp_path / "a.bin"
    assert fetch_to_file(url, dest, LOCAL, len(body)) == len(body)
    assert dest.read_bytes() == body


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_follows_redirects(local_server, status):  # noqa: F811
    local_server.add("/target", b"ok")
    local_server.redirect("/abs", local_server.url("/target"), status)
    local_server.redirect("/rel", "/abs", status)
    assert fetch_bytes(local_server.url("/rel"), LOCAL, 10) == b"ok"
    assert local_server.count("/target") == 1


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:10.0.0.1]/",
        "http://localhost/",
        "http://user:pw@127.0.0.1/",
        "ftp://127.0.0.1/",
        "http://internal.test/",
    ],
)
def test_redirect_to_disallowed_is_refused(local_server, loopback_only, location):  # noqa: F811
    loopback_only["internal.test"] = ["192.168.0.10"]
    url = local_server.redirect("/r", location)
    with pytest.raises(UrlNotAllowed):
        fetch_bytes(url, LOCAL, 100)
    assert local_server.count("/r") == 1


def test_too_many_redirects(local_server):  # noqa: F811
    local_server.add("/end", b"ok")
    for i in range(3):
        local_server.redirect(f"/r{i}", f"/r{i + 1}" if i < 2 else "/end")
    cfg = LOCAL.model_copy(update={"max_redirects": 2})
    with pytest.raises(FetchFailed) as e:
        fetch_bytes(local_server.url("/r0"), cfg, 10)
    assert e.value.code == "FETCH_FAILED" and _reason(e) == "too_many_redirects"
    assert fetch_bytes(local_server.url("/r1"), cfg, 10) == b"ok"  # exactly max_redirects is fine
    local_server.redirect("/loop", "/loop")
    with pytest.raises(FetchFailed):
        fetch_bytes(local_server.url("/loop"), cfg, 10)


def test_credentials_not_forwarded_across_origins(local_server, loopback_only):  # noqa: F811
    loopback_only["other.test"] = ["127.0.0.1"]
    cfg = LOCAL.model_copy(update={"allowed_hosts": ["127.0.0.1", "other.test"]})
    local_server.add("/a", b"ok")
    local_server.redirect("/same", "/a")
    local_server.redirect("/cross", local_server.url("/a", host="other.test"))
    auth = {"Authorization": "Bearer secret"}
    fetch_bytes(local_server.url("/same"), cfg, 10, auth)
    assert local_server.requests[-1]["authorization"] == "Bearer secret"
    fetch_bytes(local_server.url("/cross"), cfg, 10, auth)
    assert local_server.requests[-2]["authorization"] == "Bearer secret"
    assert "authorization" not in local_server.requests[-1]


def test_size_limit_by_content_length(local_server, tmp_path):  # noqa: F811
    url = local_server.add("/big", b"x" * 1000)
    with pytest.raises(FetchTooLarge) as e:
        fetch_bytes(url, LOCAL, 999)
    assert e.value.code == "FETCH_TOO_LARGE" and e.value.details["declared"] == 1000
    dest = tmp_path / "big"
    with pytest.raises(FetchTooLarge):
        fetch_to_file(url, dest, LOCAL, 999)
    assert not dest.exists()


def test_size_limit_while_streaming(local_server, tmp_path):  # noqa: F811
    # No Content-Length (the body ends at close), or one that understates it: counted as it arrives.
    url = local_server.add("/stream", b"x" * 100_000, content_length=None, chunk_size=1000)
    with pytest.raises(FetchTooLarge) as e:
        fetch_bytes(url, LOCAL, 50_000)
    assert "declared" not in e.value.details
    dest = tmp_path / "stream"
    with pytest.raises(FetchTooLarge):
        fetch_to_file(url, dest, LOCAL, 50_000)
    assert not dest.exists()


@pytest.mark.parametrize("status", [404, 500, 204 + 100])
def test_non_2xx_fails(local_server, status):  # noqa: F811
    url = local_server.add("/s", b"nope", status=status)
    with pytest.raises(FetchFailed) as e:
        fetch_bytes(url, LOCAL, 100)
    assert e.value.status == 502 and e.value.details["upstream_status"] == status


def test_read_timeout(local_server):  # noqa: F811
    url = local_server.add("/slow", b"x", delay_s=1.0)
    cfg = LOCAL.model_copy(update={"read_timeout_s": 0.2})
    with pytest.raises(FetchTimeout) as e:
        fetch_bytes(url, cfg, 100)
    assert e.value.code == "FETCH_FAILED" and _reason(e) == "timeout"


def test_total_timeout_on_a_slow_drip(local_server):  # noqa: F811
    url = local_server.add("/drip", b"x" * 100, chunk_size=5, chunk_delay_s=0.05)
    with pytest.raises(FetchTimeout):
        fetch_bytes(url, LOCAL, 1000, total_timeout_s=0.3)


def test_connection_refused():
    port = free_port()  # nothing listens there
    with pytest.raises(FetchFailed) as e:
        fetch_bytes(f"http://127.0.0.1:{port}/x", LOCAL, 10)
    assert _reason(e) == "connection"


def test_truncated_body_fails_and_leaves_no_file(local_server, tmp_path):  # noqa: F811
    url = local_server.add("/cut", b"x" * 10_000, close_after=3000, chunk_size=1000)
    dest = tmp_path / "cut"
    with pytest.raises(FetchFailed):
        fetch_to_file(url, dest, LOCAL, 100_000)
    assert not dest.exists()


def test_error_details_redact_secrets(local_server):  # noqa: F811
    url = local_server.add("/s", b"", status=403) + "?token=secret"
    with pytest.raises(FetchFailed) as e:
        fetch_bytes(url, LOCAL, 10)
    assert "secret" not in str(e.value.to_dict())


# -- https: pinned IP, real hostname verified ----------------------------------------------------


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_https_pins_ip_and_verifies_hostname(tmp_path, loopback_only, monkeypatch):  # noqa: F811
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path, "lora.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)
    # The fetcher uses the system trust store; trust the test certificate instead for this test.
    monkeypatch.setattr(fetch_mod.httpx, "Client", functools.partial(httpx.Client, verify=client_ctx))
    loopback_only["lora.test"] = ["127.0.0.1"]
    loopback_only["wrong.test"] = ["127.0.0.1"]
    cfg = FetchConfig(allowed_hosts=["lora.test", "wrong.test"], connect_timeout_s=2, read_timeout_s=2)
    with LocalServer(tls_context=server_ctx) as srv:
        srv.add("/a", b"secure")
        assert fetch_bytes(srv.url("/a", host="lora.test"), cfg, 100) == b"secure"
        assert srv.requests[-1]["host"] == f"lora.test:{srv.port}"
        with pytest.raises(FetchFailed):  # same IP, but the certificate is not for this name
            fetch_bytes(srv.url("/a", host="wrong.test"), cfg, 100)


def test_pinned_request_shape():
    with httpx.Client() as client:
        req = fetch_mod.pinned_request(
            client, httpx.URL("https://huggingface.co/o/r"), ipaddress.ip_address("1.2.3.4"), {"X-A": "1"}
        )
    assert str(req.url) == "https://1.2.3.4/o/r"
    assert req.headers["host"] == "huggingface.co" and req.headers["x-a"] == "1"
    assert req.extensions["sni_hostname"] == "huggingface.co"


# -- post (webhook deliveries) ---------------------------------------------------------------------


def test_post_sends_the_body_to_the_vetted_address_and_answers_the_status(local_server, loopback_only):  # noqa: F811
    url = local_server.add("/hook", b"ignored", status=202)
    assert post(url, LOCAL, b'{"a":1}', {"X-Sig": "s"}, timeout_s=2) == 202
    (seen,) = local_server.requests
    assert (seen["method"], seen["body"], seen["x-sig"]) == ("POST", b'{"a":1}', "s")
    local_server.add("/down", status=500)
    assert post(local_server.url("/down"), LOCAL, b"{}", timeout_s=2) == 500  # an answer, not an error


def test_post_follows_no_redirect(local_server):  # noqa: F811
    local_server.add("/target", b"ok")
    url = local_server.redirect("/moved", local_server.url("/target"), 307)
    assert post(url, LOCAL, b"{}", timeout_s=2) == 307
    assert local_server.count("/target") == 0


def test_post_checks_the_address_on_every_call(local_server, loopback_only, monkeypatch):  # noqa: F811
    """Each delivery resolves again and refuses a name that now points somewhere private."""
    local_server.add("/hook")
    answers = iter([["127.0.0.1"], ["10.0.0.7"]])
    guarded_dns = socket.getaddrinfo

    def rebinding_dns(host, port, *a, **k):
        if host != "hook.test":
            return guarded_dns(host, port, *a, **k)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in next(answers)]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    cfg = LOCAL.model_copy(update={"allowed_hosts": ["127.0.0.1/32"]})  # the address is exempt, not the name
    url = local_server.url("/hook", host="hook.test")
    assert post(url, cfg, b"{}", timeout_s=2) == 200
    with pytest.raises(UrlNotAllowed) as e:
        post(url, cfg, b"{}", timeout_s=2)
    assert _reason(e) == "address" and local_server.count("/hook") == 1
    for refused in ("http://10.0.0.1/hook", "http://169.254.169.254/", "http://localhost:1/", "ftp://127.0.0.1/"):
        with pytest.raises(UrlNotAllowed):
            post(refused, LOCAL, b"{}", timeout_s=2)


def test_post_timeout(local_server):  # noqa: F811
    url = local_server.add("/slow", delay_s=1.0)
    with pytest.raises(FetchTimeout) as e:
        post(url, LOCAL, b"{}", timeout_s=0.2)
    assert _reason(e) == "timeout"


def test_vet_url_resolves_and_refuses_private_names(loopback_only):  # noqa: F811
    loopback_only["internal.test"] = ["10.0.0.5"]
    loopback_only["public.test"] = ["93.184.216.34"]
    with pytest.raises(UrlNotAllowed):
        vet_url("https://internal.test/hook", DEFAULT)
    vet_url("https://public.test/hook", DEFAULT)  # nothing is sent
    with pytest.raises(FetchFailed) as e:
        vet_url("https://nowhere.test/hook", DEFAULT)
    assert _reason(e) == "dns"


# -- Hugging Face references -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, expected",
    [
        (
            "https://huggingface.co/owner/repo/blob/main/sub/x.safetensors",
            "https://huggingface.co/owner/repo/resolve/main/sub/x.safetensors",
        ),
        (
            "https://huggingface.co/owner/repo/blob/abc123/x.safetensors?download=true",
            "https://huggingface.co/owner/repo/resolve/abc123/x.safetensors?download=true",
        ),
        ("hf://owner/repo/sub/x.safetensors", "https://huggingface.co/owner/repo/resolve/main/sub/x.safetensors"),
        ("hf://owner/repo@v2/x.safetensors", "https://huggingface.co/owner/repo/resolve/v2/x.safetensors"),
        (
            "https://huggingface.co/owner/repo/resolve/main/x.safetensors",
            "https://huggingface.co/owner/repo/resolve/main/x.safetensors",
        ),
        ("https://example.com/blob/x.safetensors", "https://example.com/blob/x.safetensors"),
    ],
)
def test_normalize_lora_url(ref, expected):
    assert normalize_lora_url(ref) == expected


@pytest.mark.parametrize("ref", ["hf://owner/x.safetensors", "hf://owner/repo/../x.safetensors", "hf://o//x"])
def test_bad_hf_refs(ref):
    with pytest.raises(UrlNotAllowed):
        normalize_lora_url(ref)


def test_hf_refs_on_a_configured_endpoint():
    mirror = "http://127.0.0.1:8080"
    assert normalize_lora_url("hf://o/r@v1/x.safetensors", mirror) == f"{mirror}/o/r/resolve/v1/x.safetensors"
    assert normalize_lora_url(f"{mirror}/o/r/blob/main/x.safetensors", mirror) == f"{mirror}/o/r/resolve/main/x.safetensors"
    # a page URL of the public hub is left alone when another endpoint is configured
    page = "https://huggingface.co/o/r/blob/main/x.safetensors"
    assert normalize_lora_url(page, mirror) == page


@pytest.mark.parametrize(
    "url, endpoint, same",
    [
        ("https://huggingface.co/o/r/resolve/main/x.safetensors", "https://huggingface.co", True),
        ("https://HuggingFace.co:443/o/r/x.safetensors", "https://huggingface.co", True),
        ("https://huggingface.co.evil.test/o/r/x.safetensors", "https://huggingface.co", False),
        ("https://evil.test/huggingface.co/x.safetensors", "https://huggingface.co", False),
        ("https://huggingface.co:8443/x.safetensors", "https://huggingface.co", False),
        ("http://huggingface.co/x.safetensors", "https://huggingface.co", False),
        ("https://cdn-lfs.huggingface.co/x.safetensors", "https://huggingface.co", False),
        ("http://127.0.0.1:8080/o/r/resolve/main/x.safetensors", "http://127.0.0.1:8080", True),
    ],
)
def test_the_token_goes_to_the_hub_origin_only(url, endpoint, same):
    assert is_hub_url(url, endpoint) is same


# -- object stores ----------------------------------------------------------------------------------


def test_object_stores_open_without_a_listing_cache_and_with_short_timeouts(s3_server, tmp_path):
    """What one process lists, another may delete or replace: a lookup asks the store, not a stale listing."""
    import fsspec

    from deployments.fetch import object_fs

    url = f"s3://{s3_server.bucket}/{tmp_path.name}"
    fs, root = object_fs(url, s3_server.options())
    other = fsspec.filesystem("s3", **s3_server.options(), skip_instance_cache=True)
    other.pipe_file(f"{root}/a.safetensors", b"one")
    assert [p.rsplit("/", 1)[1] for p in fs.ls(root)] == ["a.safetensors"]
    other.rm(f"{root}/a.safetensors")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{root}/a.safetensors")
    assert (fs.config_kwargs["connect_timeout"], fs.config_kwargs["read_timeout"]) == (5, 60)
    assert fs.retries == 1  # s3fs's own tries per call (its class default is 5); botocore still retries
    # A key the config gives replaces the default's whole.
    fs, _ = object_fs(url, {**s3_server.options(), "config_kwargs": {"connect_timeout": 1}})
    assert fs.config_kwargs == {"connect_timeout": 1}
