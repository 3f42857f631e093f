"""Shared fixtures: one local Ray for the session, a real S3-compatible server on 127.0.0.1 (moto's server mode), a
fault-injecting proxy in front of it, and a manifest factory."""

from __future__ import annotations

import io
import itertools
import os
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_render import storage
from ray_render.tools.chaos import BROKEN_DEVICE_ENV, StorageFaultProxy


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray for every test that needs one; yields its address (for subprocess drivers and `--address`).

    Two GPUs are declared (no real ones: placement tests see distinct `CUDA_VISIBLE_DEVICES`), so a job with
    `--device auto` starts one actor per declared GPU; tests that want CPU actors say `device="cpu"`. Actors' logs
    reach this process, as they reach a driver in production (the credential checks read them)."""
    import ray

    # Actors report their metrics every second (default 10 s), so the metrics tests read them soon after a job.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    # ... and inherit this: where PlaceholderOnBrokenDevice claims its broken device (tools/chaos.py).
    os.environ[BROKEN_DEVICE_ENV] = str(tmp_path_factory.mktemp("chaos") / "broken-device")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


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

    proxy: _FaultProxy = field(default=None, repr=False)

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


class _FaultProxy(StorageFaultProxy):
    """The chaos drills' proxy, with faults on demand instead of at random rates."""

    FAULTS = {"slowdown": "503", "error": "500", "reset": "reset_before"}

    def __init__(self, upstream_url: str):
        super().__init__(upstream_url)
        self.failures, self.mode, self.method, self.requests = 0, "slowdown", None, 0

    def decide(self, method: str = "") -> tuple[str | None, float]:
        with self.lock:
            self.requests += 1
            if self.failures > 0 and self.method in (None, method):
                self.failures -= 1
                return self.FAULTS[self.mode], 0.0
        return None, 0.0


@pytest.fixture(scope="session")
def _fault_proxy(s3):
    with _FaultProxy(s3.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def flaky_s3(s3, _fault_proxy):
    """The session's bucket through the fault proxy; failures are reset after each test.

    Its storage_options turn botocore's own retries off, so the failures reach s3fs's and ray-render's retries.
    """
    endpoint = _fault_proxy.endpoint_url
    options = {**s3.storage_options, "endpoint_url": endpoint,
               "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    yield FlakyS3(endpoint_url=endpoint, bucket=s3.bucket, storage_options=options, proxy=_fault_proxy)
    _fault_proxy.failures = 0


def image_files(out) -> list[str]:
    """Every stored image's file name under a local output root (images/<shard>/<attempt>/<name>)."""
    found = []
    for _, _, names in os.walk(os.path.join(str(out), "images")):
        found += [name for name in names if not name.startswith(".")]
    return sorted(found)


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
