"""Shared fixtures: a real S3-compatible server on 127.0.0.1 (moto's server mode), a fault-injecting proxy in
front of it, and a manifest factory."""

from __future__ import annotations

import http.client
import io
import itertools
import os
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_render import storage


@dataclass
class S3Server:
    """A moto S3 server with one bucket. `url(prefix)` gives an s3:// URL; `storage_options` reach it via s3fs."""

    endpoint_url: str
    bucket: str
    storage_options: dict

    def url(self, prefix: str = "") -> str:
        return storage.join(f"s3://{self.bucket}", prefix)

    def fresh_url(self, name: str = "t") -> str:
        """A URL under a prefix no other test uses."""
        return self.url(f"{name}-{uuid.uuid4().hex[:12]}")

    @property
    def env(self) -> dict:
        """Environment variables that point s3fs/boto at this server (e.g. for a Ray runtime_env)."""
        return {"AWS_ACCESS_KEY_ID": self.storage_options["key"],
                "AWS_SECRET_ACCESS_KEY": self.storage_options["secret"],
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3():
    """One moto S3 server for the whole session, on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    previous = os.environ.get("AWS_EC2_METADATA_DISABLED")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never ask a cloud metadata service for credentials
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Dummy credentials that are still long enough to be recognisable if they ever leak into output.
    options = {"key": "testing-key-AKIA1234567890", "secret": "testing-secret-0f9e8d7c6b5a4321",
               "endpoint_url": endpoint}
    fs, _ = storage.open_fs("s3://", options)
    bucket = "ray-render-test"
    fs.mkdir(bucket)  # no region: moto rejects a location constraint here
    try:
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage_options=options)
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("AWS_EC2_METADATA_DISABLED", None)
        else:
            os.environ["AWS_EC2_METADATA_DISABLED"] = previous


@dataclass
class FlakyS3(S3Server):
    """The same bucket reached through an HTTP proxy that fails requests on demand, as an overloaded store does.

    `fail_next(n, mode)` makes the next `n` requests (optionally only of one HTTP `method`) fail: mode "slowdown"
    answers 503 SlowDown, "error" answers 500 InternalError, "reset" closes the connection without an answer.
    `requests` counts the requests the proxy saw.
    """

    proxy: "_FaultProxy" = field(default=None, repr=False)

    def fail_next(self, n: int, mode: str = "slowdown", method: str | None = None) -> None:
        assert mode in ("slowdown", "error", "reset")
        with self.proxy.lock:
            self.proxy.failures, self.proxy.mode, self.proxy.method = n, mode, method

    @property
    def requests(self) -> int:
        return self.proxy.requests

    @property
    def failures_left(self) -> int:
        return self.proxy.failures


class _FaultProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int]):
        super().__init__(("127.0.0.1", 0), _FaultProxyHandler)
        self.upstream = upstream
        self.lock = threading.Lock()
        self.failures, self.mode, self.method, self.requests = 0, "slowdown", None, 0

    def take_failure(self, method: str) -> str | None:
        with self.lock:
            self.requests += 1
            if self.failures > 0 and self.method in (None, method):
                self.failures -= 1
                return self.mode
        return None


_S3_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
              "error": (500, "InternalError", "We encountered an internal error. Please try again.")}


class _FaultProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]  # chunk + CRLF
                if size == 0:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        mode = self.server.take_failure(self.command)
        if mode == "reset":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if mode is not None:
            status, code, message = _S3_ERRORS[mode]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                       f"</Message><RequestId>fault</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        headers = {key: value for key, value in self.headers.items() if key.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture(scope="session")
def _fault_proxy(s3):
    host, port = s3.endpoint_url.removeprefix("http://").split(":")
    proxy = _FaultProxy((host, int(port)))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.fixture
def flaky_s3(s3, _fault_proxy):
    """The session's bucket through the fault proxy; failures are reset after each test.

    Its storage_options turn botocore's own retries off, so the failures reach s3fs's and ray-render's retries.
    """
    endpoint = f"http://127.0.0.1:{_fault_proxy.server_address[1]}"
    options = {**s3.storage_options, "endpoint_url": endpoint,
               "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    yield FlakyS3(endpoint_url=endpoint, bucket=s3.bucket, storage_options=options, proxy=_fault_proxy)
    _fault_proxy.failures = 0


def prompt_rows(n: int, start: int = 0, **columns) -> list[dict]:
    """`n` simple manifest rows with ids r<i> and prompts; extra keyword columns are repeated on every row."""
    return [{"id": f"r{i}", "prompt": f"a photo of object number {i}", **columns} for i in range(start, start + n)]


@pytest.fixture
def make_manifest(tmp_path):
    """Write a Parquet manifest and return its path or URL.

    make_manifest(rows=None, *, n=4, name=None, url=None, schema=None, row_group_size=None, storage_options=None)
    `rows` is a list of dicts or a dict of columns (or a pa.Table); default: `n` rows from prompt_rows().
    """
    counter = itertools.count()

    def make(rows=None, *, n: int = 4, name: str | None = None, url: str | None = None, schema: pa.Schema | None = None,
             row_group_size: int | None = None, storage_options: dict | None = None) -> str:
        if rows is None:
            rows = prompt_rows(n)
        if isinstance(rows, pa.Table):
            table = rows
        elif isinstance(rows, dict):
            table = pa.table(rows, schema=schema)
        else:
            # from_pylist takes its columns from the first row only: give every row every column.
            names = list(dict.fromkeys(key for row in rows for key in row))
            table = pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows], schema=schema)
        target = url or str(tmp_path / "manifests" / (name or f"manifest-{next(counter)}.parquet"))
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=row_group_size)
        storage.write_bytes(target, buffer.getvalue(), storage_options)
        return target

    return make
