"""The LoRA cache: references stay inside their root, downloads are atomic and verified, LRU eviction,
one fetch for concurrent requests (in-process and through the per-node Ray actor).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import SecretStr
from safetensors.numpy import save

from deployments.config import FetchConfig, LoraCacheConfig, RetryConfig
from deployments.errors import LoraFetchFailed, LoraInvalid, LoraNotFound
from deployments.fetch import FetchTooLarge, UrlNotAllowed
from deployments.lora.actor import LoraCacheActor
from deployments.lora.cache import TEMP_PREFIX, LoraStore
from deployments.lora.refs import LoraRefInvalid, LoraSchemeUnsupported, check_in_root, validate_ref
from tests.conftest import wait_for
from tests.http_server import LocalServer, Route, local_server, loopback_only  # noqa: F401  (fixtures)
from tests.services import free_port

WAIT_S = 180  # generous: a loaded shared machine can take a minute to start an actor worker
FETCH = FetchConfig(allow_http=True, allowed_hosts=["127.0.0.1"], connect_timeout_s=2, read_timeout_s=2)
# Retries as configured in production, with waits shrunk so that tests do not sleep for seconds.
FAST_RETRY = RetryConfig(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
TOKEN = "hf_TestTokenThatMustNeverLeak123"


@pytest.fixture(autouse=True)
def _guard(loopback_only):  # noqa: F811
    return loopback_only


def lora_bytes(seed: int = 0, rank: int = 4) -> bytes:
    """A small, valid ai-toolkit-style LoRA file."""
    rng = np.random.default_rng(seed)
    return save(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": rng.standard_normal((rank, 32), dtype=np.float32),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": np.zeros((32, rank), np.float32),
        }
    )


@pytest.fixture
def dirs(tmp_path):
    root, cache, outside = tmp_path / "loras", tmp_path / "cache", tmp_path / "outside"
    for d in (root, cache, outside):
        d.mkdir()
    return root, cache, outside


@pytest.fixture
def store(dirs) -> LoraStore:
    root, cache, _ = dirs
    return LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), retry=FAST_RETRY), FETCH)


def leftovers(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


# -- validate_ref: syntax only --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "a.safetensors",
        "sub/dir/a.safetensors",
        "https://example.com/a.safetensors",
        "https://example.com/a.safetensors?download=1",
        "https://huggingface.co/o/r/blob/main/a.safetensors",
        "hf://o/r/sub/a.safetensors",
    ],
)
def test_validate_ref_accepts(ref):
    validate_ref(ref, FetchConfig())


@pytest.mark.parametrize(
    "ref, code",
    [
        ("../x.safetensors", "LORA_REF_INVALID"),
        ("/etc/passwd", "LORA_REF_INVALID"),
        ("/abs/x.safetensors", "LORA_REF_INVALID"),
        ("a/../../x.safetensors", "LORA_REF_INVALID"),
        ("~/x.safetensors", "LORA_REF_INVALID"),
        ("a\\..\\x.safetensors", "LORA_REF_INVALID"),
        ("", "LORA_REF_INVALID"),
        ("a.bin", "LORA_REF_INVALID"),
        ("https://example.com/a.bin", "LORA_REF_INVALID"),
        ("ftp://example.com/a.safetensors", "LORA_SCHEME_UNSUPPORTED"),
        ("file:///etc/x.safetensors", "LORA_SCHEME_UNSUPPORTED"),
        ("http://example.com/a.safetensors", "URL_NOT_ALLOWED"),  # allow_http is off by default
        ("https://u:p@example.com/a.safetensors", "URL_NOT_ALLOWED"),
        ("https://169.254.169.254/a.safetensors", "URL_NOT_ALLOWED"),
        ("hf://o/a.safetensors", "URL_NOT_ALLOWED"),
    ],
)
def test_validate_ref_refuses(ref, code):
    with pytest.raises((LoraInvalid, UrlNotAllowed)) as e:
        validate_ref(ref, FetchConfig())
    assert e.value.code == code and e.value.status == 400


def test_object_store_refs_need_fsspec_backends():
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(LoraSchemeUnsupported):
            validate_ref("s3://bucket/a.safetensors")
    else:
        validate_ref("s3://bucket/a.safetensors")


# -- local root -----------------------------------------------------------------------------------


def test_local_file_resolves_in_place(store, dirs):
    root, cache, _ = dirs
    (root / "sub").mkdir()
    (root / "sub" / "a.safetensors").write_bytes(lora_bytes())
    assert store.resolve("sub/a.safetensors") == os.path.realpath(root / "sub" / "a.safetensors")
    assert leftovers(cache) == []  # verified, not copied
    assert store.stats()["local"] == 1


@pytest.mark.parametrize(
    "ref, error",
    [
        ("../outside/x.safetensors", LoraRefInvalid),
        ("/etc/passwd", LoraRefInvalid),
        ("a/../../x.safetensors", LoraRefInvalid),
        ("link.safetensors", LoraRefInvalid),  # symlink inside the root to a file outside
        ("linkdir/x.safetensors", LoraRefInvalid),  # symlinked directory leading out
        ("x.bin", LoraRefInvalid),
        ("bin-link.safetensors", LoraRefInvalid),  # the real file behind the name is not .safetensors
        ("missing.safetensors", LoraNotFound),
        ("dir.safetensors", LoraNotFound),
        ("bad.safetensors", LoraInvalid),
    ],
)
def test_local_refusals(store, dirs, ref, error):
    root, _, outside = dirs
    (outside / "x.safetensors").write_bytes(lora_bytes())
    (root / "link.safetensors").symlink_to(outside / "x.safetensors")
    (root / "linkdir").symlink_to(outside)
    (root / "x.bin").write_bytes(lora_bytes())
    (root / "bin-link.safetensors").symlink_to(root / "x.bin")
    (root / "dir.safetensors").mkdir()
    (root / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(error) as e:
        store.resolve(ref)
    assert e.value.status == 400


def test_symlink_within_root_is_fine(store, dirs):
    root, _, _ = dirs
    (root / "real.safetensors").write_bytes(lora_bytes())
    (root / "alias.safetensors").symlink_to(root / "real.safetensors")
    assert store.resolve("alias.safetensors") == os.path.realpath(root / "real.safetensors")


# -- downloads ------------------------------------------------------------------------------------


def test_download_once_then_hit(store, dirs, local_server):  # noqa: F811
    _, cache, _ = dirs
    body = lora_bytes()
    url = local_server.add("/a.safetensors", body)
    path = store.resolve(url)
    assert open(path, "rb").read() == body and os.path.dirname(path) == str(cache)
    assert store.resolve(url) == path
    assert local_server.count("/a.safetensors") == 1
    assert store.stats()["fetches"] == 1 and store.stats()["hits"] == 1


def test_hf_refs_share_one_cache_entry(store, dirs):
    """Page URL, hf:// and resolve URL are one file; a cached one needs no network (the guard checks)."""
    _, cache, _ = dirs
    refs = [
        "https://huggingface.co/o/r/blob/main/a.safetensors",
        "hf://o/r/a.safetensors",
        "https://huggingface.co/o/r/resolve/main/a.safetensors",
    ]
    assert len({store.cache_path(r) for r in refs}) == 1
    store.cache_path(refs[0]).write_bytes(lora_bytes())
    for ref in refs:
        assert store.resolve(ref) == str(store.cache_path(ref))


def test_connection_dropped_mid_download_leaves_nothing(store, dirs, local_server):  # noqa: F811
    _, cache, _ = dirs
    url = local_server.add("/cut.safetensors", lora_bytes(rank=64), close_after=2000, chunk_size=500)
    with pytest.raises(LoraFetchFailed) as e:
        store.resolve(url)
    assert e.value.code == "LORA_FETCH_FAILED"
    assert e.value.details["attempts"] == FAST_RETRY.attempts  # a cut body may pass: retried, then given up
    assert local_server.count("/cut.safetensors") == FAST_RETRY.attempts
    assert leftovers(cache) == []


def test_truncated_without_content_length_fails_verification(store, dirs, local_server):  # noqa: F811
    # Without Content-Length a dropped connection looks like a complete body; the header check catches it.
    _, cache, _ = dirs
    url = local_server.add("/t.safetensors", lora_bytes(rank=64), content_length=None, close_after=2000)
    with pytest.raises(LoraInvalid):
        store.resolve(url)
    assert leftovers(cache) == []


def test_invalid_file_is_deleted(store, dirs, local_server):  # noqa: F811
    _, cache, _ = dirs
    url = local_server.add("/junk.safetensors", os.urandom(4096))
    with pytest.raises(LoraInvalid) as e:
        store.resolve(url)
    assert e.value.code == "LORA_INVALID"
    assert leftovers(cache) == []
    int_tensors = save({"diffusion_model.x.lora_A.weight": np.zeros((2, 2), np.int64)})
    url = local_server.add("/ints.safetensors", int_tensors)
    with pytest.raises(LoraInvalid):
        store.resolve(url)
    assert leftovers(cache) == []


def test_too_large_is_refused(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    small = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), max_file_bytes=1000), FETCH)
    url = local_server.add("/big.safetensors", lora_bytes(rank=64))
    with pytest.raises(FetchTooLarge):
        small.resolve(url)
    url = local_server.add("/big2.safetensors", lora_bytes(rank=64), content_length=None)
    with pytest.raises(FetchTooLarge):
        small.resolve(url)
    assert leftovers(cache) == []


def test_upstream_404_is_lora_not_found(store, local_server):  # noqa: F811
    url = local_server.add("/gone.safetensors", b"", status=404)
    with pytest.raises(LoraNotFound):
        store.resolve(url)


def test_redirect_to_private_is_refused(store, local_server):  # noqa: F811
    url = local_server.redirect("/r.safetensors", "http://169.254.169.254/latest/x.safetensors")
    with pytest.raises(UrlNotAllowed):
        store.resolve(url)


# -- retries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        Route(status=503),
        Route(status=500),
        Route(status=429, headers={"Retry-After": "1"}),  # honoured, capped by max_backoff_s
        Route(body=lora_bytes(rank=64), close_after=1000, chunk_size=500),  # cut body
        Route(body=lora_bytes(), delay_s=1.0),  # read timeout (0.3 s here)
    ],
    ids=["503", "500", "429", "cut-body", "read-timeout"],
)
def test_transient_failures_are_retried_until_the_file_comes(dirs, local_server, failure):  # noqa: F811
    root, cache, _ = dirs
    body = lora_bytes(seed=3)
    store = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), retry=FAST_RETRY),
                      FETCH.model_copy(update={"read_timeout_s": 0.3}))
    url = local_server.add_sequence("/flaky.safetensors", failure, failure, Route(body=body))
    path = store.resolve(url)
    assert open(path, "rb").read() == body
    assert local_server.count("/flaky.safetensors") == 3
    assert store.stats()["retries"] == 2 and store.stats()["fetches"] == 1
    assert [p for p in leftovers(cache) if p.startswith(TEMP_PREFIX)] == []


def test_connection_errors_are_retried(store):
    port = free_port()  # nothing listens there
    with pytest.raises(LoraFetchFailed) as e:
        store.resolve(f"http://127.0.0.1:{port}/a.safetensors")
    assert e.value.details["reason"] == "connection" and e.value.details["attempts"] == FAST_RETRY.attempts
    assert store.stats()["retries"] == FAST_RETRY.attempts - 1


@pytest.mark.parametrize("status, error", [(401, LoraNotFound), (403, LoraNotFound), (404, LoraNotFound),
                                           (410, LoraNotFound), (400, LoraFetchFailed)])
def test_client_errors_are_never_retried(store, local_server, status, error):  # noqa: F811
    url = local_server.add_sequence("/x.safetensors", Route(status=status), Route(body=lora_bytes()))
    with pytest.raises(error) as e:
        store.resolve(url)
    assert local_server.count("/x.safetensors") == 1
    assert e.value.details["upstream_status"] == status
    assert store.stats()["retries"] == 0


def test_size_format_and_time_limit_errors_are_never_retried(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    store = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), max_file_bytes=5000, retry=FAST_RETRY),
                      FETCH.model_copy(update={"read_timeout_s": 0.5}))
    big = local_server.add("/big.safetensors", lora_bytes(rank=64))
    junk = local_server.add("/junk.safetensors", os.urandom(1000))
    # Every read well within the read timeout, the whole over the download limit (0.5 s + 5 kB at 2 MiB/s).
    drip = local_server.add("/drip.safetensors", lora_bytes(), chunk_size=50, chunk_delay_s=0.2)
    for url, error in ((big, FetchTooLarge), (junk, LoraInvalid), (drip, LoraFetchFailed)):
        with pytest.raises(error):
            store.resolve(url)
    assert [local_server.count(p) for p in ("/big.safetensors", "/junk.safetensors", "/drip.safetensors")] == [1, 1, 1]
    assert store.stats()["retries"] == 0


def test_a_permanently_failing_download_gives_up_with_its_attempts(store, local_server):  # noqa: F811
    url = local_server.add("/down.safetensors", b"", status=503)
    with pytest.raises(LoraFetchFailed) as e:
        store.resolve(url)
    assert e.value.code == "LORA_FETCH_FAILED" and e.value.status == 502
    assert e.value.details["attempts"] == FAST_RETRY.attempts == local_server.count("/down.safetensors")
    assert e.value.details["upstream_status"] == 503 and f"after {FAST_RETRY.attempts} attempts" in e.value.message


def test_retries_stop_at_the_time_budget(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    budget = RetryConfig(attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.1, max_elapsed_s=0.5)
    store = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), retry=budget), FETCH)
    url = local_server.add("/down.safetensors", b"", status=503)
    with pytest.raises(LoraFetchFailed) as e:
        store.resolve(url)
    tries = local_server.count("/down.safetensors")
    assert 1 < tries < budget.attempts and e.value.details["attempts"] == tries


# -- the hub token ----------------------------------------------------------------------------------


def test_hub_token_reaches_the_hub_and_nowhere_else(dirs, local_server, loopback_only, caplog):  # noqa: F811
    """A private hf:// file needs the token; it is sent to the hub's origin only, never logged or raised."""
    root, cache, _ = dirs
    loopback_only["cdn.test"] = ["127.0.0.1"]
    loopback_only["other.test"] = ["127.0.0.1"]
    fetch = FETCH.model_copy(update={"hf_endpoint": local_server.url(""),
                                     "allowed_hosts": ["127.0.0.1", "cdn.test", "other.test"]})
    store = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), retry=FAST_RETRY), fetch)
    body = lora_bytes(seed=5)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    # The hub answers 503 once (a retry, and its log line), then serves the private file.
    local_server.add_sequence("/o/r/resolve/main/private.safetensors", Route(status=503),
                              Route(body=body, require_headers=bearer))
    local_server.add("/o/r/resolve/main/private2.safetensors", body, require_headers=bearer)
    # Large files: the hub redirects to its CDN, another origin, which must not see the token.
    local_server.redirect("/o/r/resolve/main/lfs.safetensors", local_server.url("/cdn/lfs.safetensors", "cdn.test"))
    local_server.add("/cdn/lfs.safetensors", lora_bytes(seed=6))
    local_server.add("/elsewhere.safetensors", lora_bytes(seed=7))
    secret = SecretStr(TOKEN)

    caplog.set_level(logging.DEBUG)
    with pytest.raises(LoraNotFound) as e:  # no token: a private file is refused
        store.resolve("hf://o/r/private2.safetensors")
    assert e.value.details["upstream_status"] == 401
    assert open(store.resolve("hf://o/r/private.safetensors", secret), "rb").read() == body
    store.resolve("hf://o/r/lfs.safetensors", secret)
    store.resolve(local_server.url("/elsewhere.safetensors", "other.test"), secret)
    with pytest.raises(LoraNotFound) as missing:
        store.resolve("hf://o/r/missing.safetensors", secret)

    seen = {r["path"]: r.get("authorization") for r in local_server.requests}
    assert seen["/o/r/resolve/main/private.safetensors"] == bearer["Authorization"]
    assert seen["/o/r/resolve/main/lfs.safetensors"] == bearer["Authorization"]
    assert seen["/cdn/lfs.safetensors"] is None and seen["/elsewhere.safetensors"] is None
    assert store.stats()["retries"] == 1
    for text in (caplog.text, str(missing.value), repr(missing.value), str(missing.value.to_dict()),
                 repr(secret), str(secret), repr(store.fetch_cfg), repr(store.cfg)):
        assert TOKEN not in text


def test_stale_temp_files_cleaned_on_start(dirs):
    root, cache, _ = dirs
    stale = cache / f"{TEMP_PREFIX}abc-123.safetensors"
    stale.write_bytes(b"half a file")
    (cache / "kept.safetensors").write_bytes(lora_bytes())
    LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache)), FETCH)
    assert leftovers(cache) == ["kept.safetensors"]


def test_lru_eviction_under_quota(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    bodies = {name: lora_bytes(seed=i) for i, name in enumerate("abc")}
    size = len(bodies["a"])
    reported = collections.Counter()  # what the actor exports as metrics (LoraCacheMetrics.count)
    store = LoraStore(
        LoraCacheConfig(root=str(root), cache_dir=str(cache), disk_quota_bytes=int(size * 2.5)), FETCH,
        on_count=lambda name, amount: reported.update({name: amount}),
    )
    urls = {name: local_server.add(f"/{name}.safetensors", body) for name, body in bodies.items()}
    # Recency is a file's access time, set here explicitly (a an hour ago, b a minute later): file
    # times tick coarsely (milliseconds), so back-to-back resolves could share one.
    hour_ago = time.time() - 3600
    pa = store.resolve(urls["a"])
    os.utime(pa, (hour_ago, hour_ago))
    pb = store.resolve(urls["b"])
    os.utime(pb, (hour_ago + 60, hour_ago + 60))
    store.resolve(urls["a"])  # a cache hit makes a the most recent again: b is now the oldest
    pc = store.resolve(urls["c"])
    assert os.path.exists(pa) and os.path.exists(pc) and not os.path.exists(pb)
    assert store.stats()["evictions"] == 1
    store.resolve(urls["b"])  # fetched again after eviction
    assert local_server.count("/b.safetensors") == 2
    assert sorted(p.name for p in cache.glob("*.safetensors")) == sorted([os.path.basename(pc), os.path.basename(pb)])
    downloads = sum(local_server.count(f"/{name}.safetensors") for name in "abc")
    assert dict(reported) == {"misses": downloads, "fetches": downloads, "fetched_bytes": downloads * size,
                              "hits": 1, "evictions": 2} == {k: v for k, v in store.stats().items() if v}


def test_file_larger_than_quota_is_kept(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    store = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(cache), disk_quota_bytes=10), FETCH)
    a = store.resolve(local_server.add("/a.safetensors", lora_bytes(1)))
    b = store.resolve(local_server.add("/b.safetensors", lora_bytes(2)))
    assert os.path.exists(b) and not os.path.exists(a)


# -- concurrency: in-process actor class ----------------------------------------------------------


def test_concurrent_resolves_share_one_fetch(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    url = local_server.add("/slow.safetensors", lora_bytes(), delay_s=0.3)
    actor = LoraCacheActor(LoraCacheConfig(root=str(root), cache_dir=str(cache)), FETCH)

    async def main():
        paths = await asyncio.gather(*(actor.resolve(url) for _ in range(8)))
        return paths, await actor.stats()

    paths, stats = asyncio.run(main())
    assert len(set(paths)) == 1
    assert local_server.count("/slow.safetensors") == 1
    assert stats["fetches"] == 1 and stats["merged"] == 7 and stats["inflight"] == 0


def test_actor_class_failures_reach_every_waiter(dirs, local_server):  # noqa: F811
    root, cache, _ = dirs
    url = local_server.add("/junk.safetensors", b"junk" * 100, delay_s=0.2)
    actor = LoraCacheActor(LoraCacheConfig(root=str(root), cache_dir=str(cache)), FETCH)

    async def main():
        return await asyncio.gather(*(actor.resolve(url) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, LoraInvalid) for r in results)
    assert local_server.count("/junk.safetensors") == 1


# -- an object-store root (the suite's S3-compatible server) -----------------------------------------


@pytest.fixture
def s3_root(s3_server, tmp_path):
    """A LoRA root on a fresh prefix of the session's bucket: its URL, options, and ``put(key, bytes)``
    for keys under the prefix (``loras/...`` is inside the root, anything else beside it)."""
    import fsspec

    prefix = f"{s3_server.bucket}/{tmp_path.name}"
    fs = fsspec.filesystem("s3", **s3_server.options())
    return SimpleNamespace(url=f"s3://{prefix}/loras", options=s3_server.options(),
                           put=lambda key, data: fs.pipe_file(f"{prefix}/{key}", data))


def s3_store(s3_root, cache, **cfg) -> LoraStore:
    return LoraStore(LoraCacheConfig(root=s3_root.url, cache_dir=str(cache), storage_options=s3_root.options,
                                     retry=FAST_RETRY, **cfg), FETCH)


def test_object_root_fetches_on_first_use_serves_the_cache_then_notices_a_replaced_object(s3_root, dirs):
    _, cache, _ = dirs
    first, second = lora_bytes(seed=1), lora_bytes(seed=2)
    s3_root.put("loras/sub/a.safetensors", first)
    store = s3_store(s3_root, cache)
    path = store.resolve("sub/a.safetensors")
    assert open(path, "rb").read() == first and os.path.dirname(path) == str(cache)
    assert store.resolve("sub/a.safetensors") == path
    assert (store.stats()["fetches"], store.stats()["hits"], store.stats()["fetched_bytes"]) == (1, 1, len(first))
    # Another process of the node (a restarted cache actor) finds the file on disk: no download.
    again = s3_store(s3_root, cache)
    assert again.resolve("sub/a.safetensors") == path and again.stats()["fetches"] == 0

    s3_root.put("loras/sub/a.safetensors", second)  # re-uploaded under the same name
    newer = store.resolve("sub/a.safetensors")
    assert newer != path and open(newer, "rb").read() == second and store.stats()["fetches"] == 2


@pytest.mark.parametrize("ref", ["missing.safetensors", "sub/missing.safetensors", "folder.safetensors"])
def test_a_missing_object_is_lora_not_found_in_the_cache_and_at_submit(s3_root, dirs, ref):
    _, cache, _ = dirs
    s3_root.put("loras/folder.safetensors/inside.safetensors", lora_bytes())  # a "directory", not a file
    s3_root.put("loras/present.safetensors", lora_bytes())
    cfg = LoraCacheConfig(root=s3_root.url, cache_dir=str(cache), storage_options=s3_root.options)
    for check in (s3_store(s3_root, cache).resolve, lambda r: check_in_root(cfg, r)):
        with pytest.raises(LoraNotFound) as e:
            check(ref)
        assert (e.value.code, e.value.status, e.value.details) == ("LORA_NOT_FOUND", 400, {"ref": ref})
    check_in_root(cfg, "present.safetensors")
    assert leftovers(cache) == []


@pytest.mark.parametrize("ref", ["../outside/x.safetensors", "sub/../../outside/x.safetensors",
                                 "/outside/x.safetensors", "~/x.safetensors",
                                 "x.safetensors?versionId=v1.safetensors", "x.safetensors#.safetensors"])
def test_paths_leaving_an_object_root_are_refused(s3_root, dirs, ref):
    """Each would otherwise name an object the root does not hold (s3fs reads '?versionId=' as a version)."""
    _, cache, _ = dirs
    s3_root.put("outside/x.safetensors", lora_bytes())
    s3_root.put("loras/x.safetensors", lora_bytes())
    cfg = LoraCacheConfig(root=s3_root.url, cache_dir=str(cache), storage_options=s3_root.options)
    for check in (s3_store(s3_root, cache).resolve, lambda r: check_in_root(cfg, r)):
        with pytest.raises(LoraRefInvalid) as e:
            check(ref)
        assert e.value.code == "LORA_REF_INVALID"
    assert leftovers(cache) == []


@pytest.mark.parametrize("body, limit, code", [
    (b"\x00" * 64, None, "LORA_INVALID"),
    (b"junk" * 100, None, "LORA_INVALID"),
    (lora_bytes(), 100, "LORA_TOO_LARGE"),
])
def test_an_object_root_checks_files_as_a_local_root_does(s3_root, dirs, tmp_path, body, limit, code):
    root, cache, _ = dirs
    s3_root.put("loras/f.safetensors", body)
    (root / "f.safetensors").write_bytes(body)
    extra = {"max_file_bytes": limit} if limit else {}
    local = LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(tmp_path / "local-cache"), **extra), FETCH)
    store = s3_store(s3_root, cache, **extra)
    for resolve in (local.resolve, store.resolve):
        with pytest.raises(LoraInvalid) as e:
            resolve("f.safetensors")
        assert (e.value.code, e.value.status) == (code, 400)
    assert leftovers(cache) == []  # a bad file never gets a name in the cache
    if limit:
        assert store.stats()["misses"] == 0  # refused by its size before any byte was read


def test_an_unreachable_store_serves_the_cached_copy_and_fails_what_it_never_had(dirs, s3_server):
    _, cache, _ = dirs
    server = s3_server.front()
    try:
        import fsspec

        bucket = server.create_bucket()
        fsspec.filesystem("s3", **server.options()).pipe_file(f"{bucket}/loras/a.safetensors", lora_bytes())
        cfg = LoraCacheConfig(root=f"s3://{bucket}/loras", cache_dir=str(cache), storage_options=server.options())
        store = LoraStore(cfg, FETCH)
        path = store.resolve("a.safetensors")
    finally:
        server.stop()
    assert store.resolve("a.safetensors") == path and store.stats()["stale_hits"] == 1
    with pytest.raises(LoraFetchFailed) as e:
        store.resolve("never-fetched.safetensors")
    assert e.value.code == "LORA_FETCH_FAILED" and e.value.details == {"ref": "never-fetched.safetensors"}
    check_in_root(cfg, "never-fetched.safetensors")  # the ingress cannot tell: the replica decides


def test_the_lora_root_shares_the_outputs_store_options():
    """One endpoint setting for an S3-compatible store: a LoRA root on it needs no second copy."""
    from serve_app.config import AppConfig

    endpoint = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    storage = {"outputs_dir": "s3://out/videos", "outputs_options": endpoint}
    shared = AppConfig(gpu={"lora": {"root": "s3://loras/prefix"}}, storage=storage)
    assert shared.gpu.lora.storage_options == endpoint
    own = AppConfig(gpu={"lora": {"root": "s3://loras/prefix", "storage_options": {"anon": True}}}, storage=storage)
    assert own.gpu.lora.storage_options == {"anon": True}
    assert AppConfig(gpu={"lora": {"root": "gs://loras/prefix"}}, storage=storage).gpu.lora.storage_options == {}
    assert AppConfig(storage=storage).gpu.lora.storage_options == {}  # a directory root


def test_a_lora_from_an_object_root_gives_the_frames_of_the_same_file_from_a_local_root(
        generator, small_spec, tiny_shapes, s3_root, dirs, tmp_path):
    from deployments.spec import LoraRef
    from tests.lora_factory import make_lora

    root, cache, _ = dirs
    lora = make_lora(root / "style.safetensors", "ai-toolkit", tiny_shapes, seed=21)
    s3_root.put("loras/style.safetensors", lora.path.read_bytes())
    paths = {"local": LoraStore(LoraCacheConfig(root=str(root), cache_dir=str(tmp_path / "c2")), FETCH),
             "s3": s3_store(s3_root, cache)}
    paths = {kind: store.resolve("style.safetensors") for kind, store in paths.items()}
    assert os.path.dirname(paths["s3"]) == str(cache)  # fetched into the node's cache, not read in place
    frames = {}
    for kind, path in paths.items():
        generator.load_adapter(f"{kind}/style.safetensors", path)
        try:
            spec = small_spec(loras=(LoraRef(ref=f"{kind}/style.safetensors", multiplier=0.8),))
            frames[kind] = generator.generate(spec).frames
        finally:
            generator.delete_adapter(f"{kind}/style.safetensors")
    assert np.array_equal(frames["s3"], frames["local"])
    assert not np.array_equal(frames["s3"], generator.generate(small_spec()).frames)  # the LoRA was applied


@pytest.mark.full
@pytest.mark.postgres  # the S3 half of that backend, over HTTP (the roots' equality at store level: fast tier)
def test_an_object_store_lora_root_over_http(serve_env, generator, tiny_shapes, tmp_path):
    """The Serve app with its LoRA root and turbo's distillation LoRA in S3, sharing the outputs' endpoint.

    Kept before the Ray actor tests below: this module's ``ray_cluster`` joins the session's cluster
    when one runs, and ``serve_env`` must be the one that starts it.
    """
    import uuid

    import fsspec
    from ray import serve

    from tests.conftest import small_request
    from tests.lora_factory import make_layout, make_lora
    from tests.test_app import _core_bytes, _download

    s3 = serve_env.s3
    prefix = f"{s3.bucket}/lora-root-{uuid.uuid4().hex[:6]}"
    style = make_lora(tmp_path / "a.safetensors", "kohya", tiny_shapes, seed=22)
    distill = make_layout(tmp_path / "distill.safetensors", "lightx2v", tiny_shapes, seed=23)
    fs = fsspec.filesystem("s3", **s3.options())
    fs.pipe_file(f"{prefix}/styles/a.safetensors", style.path.read_bytes())
    fs.pipe_file(f"{prefix}/distill/turbo.safetensors", distill.path.read_bytes())
    args = serve_env.args_for("s3-lora-root", "postgres", gpu={
        "lora": {"root": f"s3://{prefix}/"},
        "model": {"speed": {"turbo": {"enabled": True, "lora": "distill/turbo.safetensors"}}}})
    assert "storage_options" not in args["gpu"]["lora"]  # the outputs' options reach the root
    app = serve_env.deploy("s3-lora-root", "/s3-lora-root", args)
    try:
        missing = {**small_request(), "loras": [{"path": "styles/missing.safetensors"}]}
        r = app.submit(missing)
        assert r.status_code == 400 and r.json()["detail"]["error"]["code"] == "LORA_NOT_FOUND", r.text

        request = {**small_request(output_format="webp"), "loras": [{"path": "styles/a.safetensors",
                                                                     "network_multiplier": 0.9}]}
        result = app.run(request)
        assert result["status"] == "succeeded", result
        assert _download(app, result).content == _core_bytes(app, generator, request,
                                                             lora_paths={"styles/a.safetensors": style.path})
        turbo = app.run(small_request(speed="turbo"))
        assert turbo["status"] == "succeeded", turbo
        stats = app.replica_stats()
        assert stats["distill_loads"] == 1 and stats["adapter_loads"] == 1
    finally:
        serve.delete("s3-lora-root")


# -- the Ray actor ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        # Workers must import `deployments` from this checkout.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",  # tests use loopback only
            runtime_env={"env_vars": {"PYTHONPATH": repo}},
        )
    yield ray
    if started:
        ray.shutdown()


def test_ray_actor_per_node_fetches_once(ray_cluster, dirs):
    from ray.exceptions import RayActorError

    from deployments.lora.actor import get_or_create_cache_actor

    ray = ray_cluster
    root, cache, _ = dirs
    lora_cfg = LoraCacheConfig(root=str(root), cache_dir=str(cache))
    # The actor lives in another process: the loopback guard cannot follow it, so only local URLs here.
    with LocalServer() as srv:
        url = srv.add("/a.safetensors", lora_bytes(), delay_s=0.5)
        actor = get_or_create_cache_actor(lora_cfg, FETCH)
        assert get_or_create_cache_actor(lora_cfg, FETCH)._actor_id == actor._actor_id
        paths = ray.get([actor.resolve.remote(url) for _ in range(8)], timeout=WAIT_S)
        assert len(set(paths)) == 1 and os.path.dirname(paths[0]) == str(cache)
        assert srv.count("/a.safetensors") == 1
        stats = ray.get(actor.stats.remote())
        assert stats["fetches"] == 1 and stats["merged"] + stats["hits"] == 7

        # Typed errors cross the process boundary with their code.
        with pytest.raises(LoraRefInvalid) as e:
            ray.get(actor.resolve.remote("../x.safetensors"))
        assert e.value.code == "LORA_REF_INVALID"

        # A dead actor: calling the helper again gives a working one (the name is free again).
        ray.kill(actor)

        def dead() -> bool:  # the kill reaches the actor through the GCS: a call just after may still run
            try:
                ray.get(actor.stats.remote(), timeout=WAIT_S)
            except RayActorError:
                return True
            return False

        wait_for(dead, WAIT_S, "the killed actor's calls to fail")
        fresh = get_or_create_cache_actor(lora_cfg, FETCH)
        assert fresh._actor_id != actor._actor_id
        assert ray.get(fresh.resolve.remote(url), timeout=WAIT_S) == paths[0]  # still on disk: a hit
        assert srv.count("/a.safetensors") == 1
        ray.kill(fresh)


def test_ray_actor_takes_the_token_with_each_call_and_never_in_its_name(ray_cluster, dirs):
    from deployments.lora.actor import ACTOR_NAMESPACE, get_or_create_cache_actor

    ray = ray_cluster
    root, cache, _ = dirs
    lora_cfg = LoraCacheConfig(root=str(root), cache_dir=str(cache), retry=FAST_RETRY)
    with LocalServer() as hub:
        fetch = FETCH.model_copy(update={"hf_endpoint": hub.url("")})
        hub.add("/o/r/resolve/main/p.safetensors", lora_bytes(seed=8),
                require_headers={"Authorization": f"Bearer {TOKEN}"})
        actor = get_or_create_cache_actor(lora_cfg, fetch)
        with pytest.raises(LoraNotFound):
            ray.get(actor.resolve.remote("hf://o/r/p.safetensors"), timeout=WAIT_S)
        path = ray.get(actor.resolve.remote("hf://o/r/p.safetensors", SecretStr(TOKEN)), timeout=WAIT_S)
        assert os.path.dirname(path) == str(cache)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == ACTOR_NAMESPACE]
        assert names and not any(TOKEN in n for n in names)
        assert TOKEN not in str(ray.get(actor.config.remote()))
        ray.kill(actor)
