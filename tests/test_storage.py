"""storage.py: URL joins, atomic writes, listings, retries of transient errors, credentials kept out of messages."""

from __future__ import annotations

import errno
import os
import shutil

import aiohttp
import botocore.exceptions
import pytest
import s3fs.errors

from ray_render import storage


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY", 0.001)


def test_join_keeps_scheme_and_single_slashes():
    assert storage.join("s3://b/x", "a/b") == "s3://b/x/a/b"
    assert storage.join("s3://b/x/", "/a/", "b.png") == "s3://b/x/a/b.png"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/tmp/out", "metadata", "s.parquet") == "/tmp/out/metadata/s.parquet"
    assert storage.join("relative/out", "") == "relative/out"


def test_local_write_creates_dirs_overwrites_and_leaves_no_temp_files(tmp_path):
    url = str(tmp_path / "a" / "b" / "file.bin")
    storage.write_bytes(url, b"first")
    storage.write_bytes(url, b"second")
    assert storage.read_bytes(url) == b"second"
    assert os.listdir(tmp_path / "a" / "b") == ["file.bin"]


def test_failed_local_write_keeps_old_content_and_cleans_up(tmp_path):
    url = str(tmp_path / "file.bin")
    storage.write_bytes(url, b"complete")
    with pytest.raises(TypeError):
        storage.write_bytes(url, "not bytes")  # fails while writing the temp file
    assert storage.read_bytes(url) == b"complete"
    assert os.listdir(tmp_path) == ["file.bin"]



def test_private_write_makes_a_removed_directory_again(tmp_path):
    """An attempt's images are written in place; a directory a cleanup removed since is made again."""
    url = str(tmp_path / "images" / "s0" / "a1" / "r0.png")
    storage.write_bytes(url, b"first", private=True)
    storage.write_bytes(url, b"second", private=True)
    assert storage.read_bytes(url) == b"second"
    shutil.rmtree(tmp_path / "images")
    storage.write_bytes(url, b"third", private=True)
    assert storage.read_bytes(url) == b"third"
    assert os.listdir(tmp_path / "images" / "s0" / "a1") == ["r0.png"]

def test_local_listing_exists_delete(tmp_path):
    root = str(tmp_path / "root")
    assert storage.list_names(root) == []
    assert not storage.exists(storage.join(root, "x"))
    for name in ("b.json", "a.json", "sub/c.json"):
        storage.write_bytes(storage.join(root, name), b"{}")
    assert storage.list_names(root) == ["a.json", "b.json", "sub"]
    assert storage.exists(storage.join(root, "a.json"))
    storage.delete(storage.join(root, "a.json"))
    storage.delete(storage.join(root, "a.json"))  # already gone: still fine
    storage.delete_tree(storage.join(root, "sub"))
    storage.delete_tree(storage.join(root, "never-existed"))
    assert storage.list_names(root) == ["b.json"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "a.json"))


def test_s3_round_trip_and_listing_sees_other_writers(s3):
    root = s3.fresh_url("storage")
    options = s3.storage_options
    storage.write_bytes(storage.join(root, "dir/one.bin"), b"1", options)
    assert storage.read_bytes(storage.join(root, "dir/one.bin"), options) == b"1"
    assert storage.list_names(storage.join(root, "dir"), options) == ["one.bin"]
    # Another process (here: another filesystem instance) writes; our cached listing must not hide it.
    other = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    other.pipe_file(storage.open_fs(root, options)[1] + "/dir/two.bin", b"2")
    assert storage.list_names(storage.join(root, "dir"), options) == ["one.bin", "two.bin"]
    assert storage.exists(storage.join(root, "dir/two.bin"), options)
    other.rm_file(storage.open_fs(root, options)[1] + "/dir/two.bin")
    assert not storage.exists(storage.join(root, "dir/two.bin"), options)
    storage.delete(storage.join(root, "dir/one.bin"), options)
    storage.delete(storage.join(root, "dir/one.bin"), options)
    storage.write_bytes(storage.join(root, "tree/a/b.bin"), b"x", options)
    storage.delete_tree(storage.join(root, "tree"), options)
    storage.delete_tree(storage.join(root, "tree"), options)
    assert storage.list_names(root, options) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "dir/one.bin"), options)


def test_filesystems_are_cached_per_protocol_and_options(s3, tmp_path):
    fs_a, _ = storage.open_fs(s3.url("a"), s3.storage_options)
    fs_b, path = storage.open_fs(s3.url("b/c"), dict(s3.storage_options))
    assert fs_a is fs_b and path == f"{s3.bucket}/b/c"
    fs_other, _ = storage.open_fs(s3.url("a"), {**s3.storage_options, "key": "another-key-000"})
    assert fs_other is not fs_a
    local, path = storage.open_fs(str(tmp_path / "x"))
    assert storage.is_local(local) and path.endswith("/x")


def _aiohttp_status(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(request_info=None, history=(), status=status, message="answer")


def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": code},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize("make_error", [
    lambda: _client_error("SlowDown", 503),
    lambda: _client_error("InternalError", 500),
    lambda: _client_error("Whatever", 502),
    lambda: _client_error("TooManyRequests", 429),
    lambda: s3fs.errors.translate_boto_error(_client_error("SlowDown", 503)),
    lambda: s3fs.errors.translate_boto_error(_client_error("ServiceUnavailable", 503)),
    lambda: botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    lambda: botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    lambda: ConnectionResetError(errno.ECONNRESET, "reset by peer"),
    lambda: TimeoutError("timed out"),
    lambda: OSError(errno.EAGAIN, "try again"),
    lambda: aiohttp.ServerDisconnectedError(),
    lambda: _aiohttp_status(503),
], ids=["slowdown", "500", "502", "429", "s3fs-slowdown", "s3fs-unavailable", "endpoint", "read-timeout",
        "reset", "timeout", "eagain", "disconnected", "http-503"])
def test_transient_errors_are_recognised(make_error):
    assert storage.is_transient(make_error())


@pytest.mark.parametrize("make_error", [
    lambda: s3fs.errors.translate_boto_error(_client_error("NoSuchKey", 404)),
    lambda: s3fs.errors.translate_boto_error(_client_error("AccessDenied", 403)),
    lambda: s3fs.errors.translate_boto_error(_client_error("InvalidArgument", 400)),
    lambda: _client_error("InvalidArgument", 400),
    lambda: FileNotFoundError("nope"),
    lambda: PermissionError("nope"),
    lambda: ValueError("bad value"),
    lambda: _aiohttp_status(403),
], ids=["nosuchkey", "accessdenied", "s3fs-invalid", "invalid", "notfound", "permission", "value", "http-403"])
def test_permanent_errors_are_not_transient(make_error):
    assert not storage.is_transient(make_error())


def test_with_retries_retries_transient_errors_until_success(fast_retries):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise s3fs.errors.translate_boto_error(_client_error("SlowDown", 503))
        return "done"

    assert storage.with_retries(flaky, what="write s3://b/k") == "done"
    assert len(calls) == 3


def test_with_retries_raises_permanent_errors_at_once(fast_retries):
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://b/missing")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing)
    assert len(calls) == 1


def test_with_retries_gives_up_with_storage_error_naming_the_url_not_the_secret(fast_retries):
    options = {"key": "id-123456", "secret": "very-secret-value"}
    calls = []

    def always_busy():
        calls.append(1)
        raise ConnectionResetError(f"connection reset while signing with {options['secret']}")

    with pytest.raises(storage.StorageError) as info:
        storage.with_retries(always_busy, attempts=4, what="write s3://bucket/key.png", storage_options=options)
    assert len(calls) == 4
    assert "s3://bucket/key.png" in str(info.value)
    assert "very-secret-value" not in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_unreachable_endpoint_fails_after_retries_without_credentials(s3, fast_retries, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    options = {**s3.storage_options, "endpoint_url": "http://127.0.0.1:9",  # discard port: nothing listens
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    url = s3.url("unreachable/key.bin")
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(url, b"x", options)
    message = str(info.value)
    assert url in message
    assert options["secret"] not in message and options["key"] not in message


def test_redact_blanks_nested_credentials():
    options = {"key": "AKIAEXAMPLE", "secret": "s3cr3t-value", "client_kwargs": {"aws_session_token": "tok-abcdef"},
               "anon": False}
    text = "failed with key AKIAEXAMPLE secret s3cr3t-value token tok-abcdef"
    assert storage.redact(text, options) == "failed with key *** secret *** token ***"
    assert storage.redact("nothing here", None) == "nothing here"


# s3fs retries SlowDown and dropped connections 5 times on its own, and a 500 not at all: each burst is longer
# than s3fs's patience, so only ray-render's retry layer gets through.
@pytest.mark.parametrize("mode, method, burst", [("slowdown", "PUT", 7), ("error", "PUT", 4), ("reset", "GET", 7)])
def test_writes_and_reads_survive_a_burst_of_store_failures(flaky_s3, fast_retries, mode, method, burst):
    options = flaky_s3.storage_options
    url = flaky_s3.fresh_url("flaky") + "/object.bin"
    flaky_s3.fail_next(burst, mode, method=method)
    storage.write_bytes(url, b"payload", options)
    assert storage.read_bytes(url, options) == b"payload"
    assert flaky_s3.failures_left == 0


def test_a_store_that_keeps_failing_ends_in_storage_error(flaky_s3, fast_retries, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)
    url = flaky_s3.fresh_url("down") + "/object.bin"
    flaky_s3.fail_next(10_000, "slowdown")
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(url, b"x", flaky_s3.storage_options)
    assert url in str(info.value) and "after 2 attempts" in str(info.value)
    assert flaky_s3.storage_options["secret"] not in str(info.value)


def test_local_paths_are_made_absolute_for_workers_urls_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize_url("out/demo") == str(tmp_path / "out" / "demo")
    assert storage.normalize_url("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert storage.normalize_url("s3://bucket/out") == "s3://bucket/out"
    assert storage.normalize_url("file:///data/out") == "file:///data/out"
