"""Output storage: byte ranges, and the store itself on a local directory and on a real S3-compatible server."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from serve_app.config import StorageConfig
from serve_app.errors import http_headers, http_status
from serve_app.state_errors import OutputStoreUnavailable, OutputWriteFailed, RangeNotSatisfiable, StoreUnavailable
from serve_app.storage import OutputStore, parse_range


@pytest.mark.parametrize("header, size, expected", [
    (None, 100, None),
    ("", 100, None),
    ("bytes=0-9", 100, (0, 9)),
    ("bytes=10-", 100, (10, 99)),
    ("bytes=-10", 100, (90, 99)),
    ("bytes=-500", 100, (0, 99)),        # a suffix longer than the file is the whole file
    ("bytes=95-200", 100, (95, 99)),     # a last byte past the end is clipped
    ("bytes=99-99", 100, (99, 99)),
    ("Bytes=5-6", 100, (5, 6)),          # the unit is case-insensitive
    ("bytes=5-6", 100, (5, 6)),
    ("items=0-9", 100, None),            # another unit: ignored
    ("bytes=0-1,5-6", 100, None),        # several ranges: we send the whole file (RFC 9110 allows it)
    ("bytes=9-3", 100, None),            # invalid: ignored
    ("bytes=a-b", 100, None),
    ("bytes=-", 100, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header, size", [("bytes=100-", 100), ("bytes=500-600", 100), ("bytes=-0", 100),
                                          ("bytes=0-", 0)])
def test_unsatisfiable_range_is_416_with_the_size(header, size):
    with pytest.raises(RangeNotSatisfiable) as e:
        parse_range(header, size)
    assert e.value.code == "RANGE_NOT_SATISFIABLE" and not hasattr(e.value, "headers")  # no HTTP below the routes
    assert http_status(e.value) == 416 and http_headers(e.value)["Content-Range"] == f"bytes */{size}"


@pytest.fixture(params=["local", "s3"])
def outputs(request, tmp_path):
    if request.param == "local":
        return OutputStore(StorageConfig(outputs_dir=str(tmp_path / "videos")))
    s3_server = request.getfixturevalue("s3_server")  # started only for the S3 case
    return OutputStore(StorageConfig(outputs_dir=f"s3://{s3_server.bucket}/{tmp_path.name}/videos",
                                     outputs_options=s3_server.options()))


def test_store_round_trip_ranges_and_delete(outputs):
    data = bytes(range(256)) * 1000
    key = outputs.video_key("job-1", 0, "mp4")
    image = outputs.image_key("job-1", b"png bytes")
    assert outputs.size(key) is None
    outputs.put(key, data)
    outputs.put(image, b"png bytes")
    assert outputs.size(key) == len(data) and outputs.read(image) == b"png bytes"
    assert b"".join(outputs.iter_range(key, 0, len(data) - 1)) == data
    assert b"".join(outputs.iter_range(key, 1000, 1000 + 2 * 1024 * 1024)) == data[1000:]
    assert b"".join(outputs.iter_range(key, 5, 9)) == data[5:10]
    assert outputs.key_of({"key": key, "file_path": "/elsewhere"}) == key
    assert outputs.url(key).endswith("/job-1/0.mp4")
    outputs.delete_job("job-1")
    assert outputs.size(key) is None and outputs.size(image) is None
    with pytest.raises(FileNotFoundError):
        outputs.read(image)
    outputs.delete_job("job-1")  # twice is fine (two ingress replicas sweeping at once)


def test_local_store_finds_outputs_recorded_by_the_first_release(tmp_path):
    outputs = OutputStore(StorageConfig(outputs_dir=str(tmp_path / "videos")))
    outputs.put("old-job/0.mp4", b"video")
    legacy = {"file_path": os.path.join(outputs.root, "old-job", "0.mp4")}  # no "key" then
    assert outputs.key_of(legacy) == "old-job/0.mp4"
    assert outputs.key_of({"file_path": "/somewhere/else/0.mp4"}) is None


def test_local_write_is_atomic_no_partial_file_under_the_final_name(tmp_path, monkeypatch):
    outputs = OutputStore(StorageConfig(outputs_dir=str(tmp_path / "videos"), write_attempts=2))
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputWriteFailed) as e:
        outputs.put("job/0.mp4", b"x" * 1000)
    assert e.value.code == "OUTPUT_WRITE_FAILED" and e.value.details["attempts"] == 2 and http_status(e.value) == 503
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert outputs.size("job/0.mp4") is None
    assert os.listdir(os.path.join(outputs.root, "job")) == []  # no temp file left behind


def test_presigned_url_serves_the_object(s3_server, tmp_path):
    outputs = OutputStore(StorageConfig(outputs_dir=f"s3://{s3_server.bucket}/{tmp_path.name}",
                                        outputs_options=s3_server.options(), presigned_redirect=True))
    outputs.put("j/0.mp4", b"signed bytes")
    url = outputs.presign("j/0.mp4", 60)
    assert "Signature=" in url or "X-Amz-Signature=" in url
    assert httpx.get(url).content == b"signed bytes"
    assert httpx.get(url.split("?")[0]).status_code == 403  # the bucket is not public


def _signed_for(url: str, secret: str) -> str:
    """The HTTP method a SigV2 query-signed S3 URL (what moto's endpoint gets) was signed for."""
    import base64
    import hashlib
    import hmac
    from urllib.parse import parse_qs, unquote, urlparse

    parts = urlparse(url)
    query = parse_qs(parts.query)
    for method in ("GET", "HEAD"):
        to_sign = f"{method}\n\n\n{query['Expires'][0]}\n{unquote(parts.path)}"
        digest = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha1).digest()
        if base64.b64encode(digest).decode() == query["Signature"][0]:
            return method
    raise AssertionError(f"signed for neither GET nor HEAD: {url}")


def test_a_presigned_url_is_signed_for_the_method_it_is_for(s3_server, tmp_path):
    """S3 checks the signed method: a HEAD sent to a GET URL is refused (403) on real S3."""
    outputs = OutputStore(StorageConfig(outputs_dir=f"s3://{s3_server.bucket}/{tmp_path.name}",
                                        outputs_options=s3_server.options(), presigned_redirect=True))
    outputs.put("j/0.mp4", b"signed bytes")
    secret = s3_server.options()["secret"]
    assert _signed_for(outputs.presign("j/0.mp4", 60), secret) == "GET"
    assert _signed_for(outputs.presign("j/0.mp4", 60, "HEAD"), secret) == "HEAD"


def test_presigned_redirect_needs_an_object_store(tmp_path):
    with pytest.raises(ValueError, match="presigned"):
        OutputStore(StorageConfig(outputs_dir=str(tmp_path), presigned_redirect=True))


@pytest.mark.full  # stops its server for tens of seconds
@pytest.mark.kills
def test_object_store_down_fails_writes_with_a_code_and_reads_as_unavailable(tmp_path, s3_server):
    server = s3_server.front()
    try:
        bucket = server.create_bucket()
        outputs = OutputStore(StorageConfig(outputs_dir=f"s3://{bucket}/v", outputs_options=server.options(),
                                            write_attempts=2))
        outputs.put("j/0.mp4", b"before")
        server.down()
        t0 = time.time()
        with pytest.raises(OutputWriteFailed):
            outputs.put("j/1.mp4", b"during")
        with pytest.raises(StoreUnavailable) as submit:
            outputs.put_for_submit("j/ctrl.png", b"png")
        assert submit.value.code == "STORE_UNAVAILABLE"
        for read in (outputs.size, outputs.read):
            with pytest.raises(OutputStoreUnavailable) as e:
                read("j/0.mp4")
            assert e.value.code == "OUTPUT_STORE_UNAVAILABLE"
            assert http_status(e.value) == 503 and int(http_headers(e.value)["Retry-After"]) > 0
        assert time.time() - t0 < 60  # bounded by the default timeouts, not botocore's minute of retries
    finally:
        server.stop()


def test_a_submit_with_the_object_store_down_gets_its_answer_without_the_jobs_retry_window(tmp_path, s3_server):
    server = s3_server.front()
    try:
        outputs = OutputStore(StorageConfig(outputs_dir=f"s3://{server.create_bucket()}/v",
                                            outputs_options=server.options(), write_retry_s=120))
        server.stop()
        t0 = time.time()
        with pytest.raises(StoreUnavailable):
            outputs.put_for_submit("j/ctrl.png", b"png")
        assert time.time() - t0 < 10  # one quick try, not the 120 s a job's output may wait
    finally:
        server.stop()


@pytest.mark.full  # stops its server for tens of seconds
@pytest.mark.kills
def test_an_output_write_outlasts_an_object_store_outage_within_its_retry_window(tmp_path, s3_server):
    """The store is down when the write starts and back after two failed tries: the write lands."""
    import threading

    from tests.conftest import wait_for

    server = s3_server.front()
    try:
        bucket = server.create_bucket()
        outputs = OutputStore(StorageConfig(outputs_dir=f"s3://{bucket}/v", outputs_options=server.options(),
                                            write_retry_s=120, write_attempts=50))
        failed, real_put_once = [], outputs._put_once

        def counted(key, data):  # the real write, its failures counted
            try:
                return real_put_once(key, data)
            except Exception as e:
                failed.append(e)
                raise

        outputs._put_once = counted
        server.down()
        restart = threading.Thread(target=lambda: (wait_for(lambda: len(failed) >= 2, 60, "two failed tries"),
                                                   server.up()))
        restart.start()
        outputs.put("j/0.mp4", b"after the outage")
        restart.join()
        assert len(failed) >= 2
        assert outputs.read("j/0.mp4") == b"after the outage"
    finally:
        server.stop()


def test_an_output_write_gives_up_after_its_retry_window_with_the_tries_in_the_error(tmp_path, s3_server):
    server = s3_server.front()
    try:
        outputs = OutputStore(StorageConfig(outputs_dir=f"s3://{server.create_bucket()}/v",
                                            outputs_options=server.options(), write_retry_s=3, write_attempts=50))
        server.stop()
        with pytest.raises(OutputWriteFailed) as e:
            outputs.put("j/0.mp4", b"never")
        assert e.value.code == "OUTPUT_WRITE_FAILED" and 2 <= e.value.details["attempts"] < 50
    finally:
        server.stop()
