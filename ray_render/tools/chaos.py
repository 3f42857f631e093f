"""Fault injection: the injectors, the drills that use them, and the soak runner that prints their figures.

Injectors (real mechanisms, nothing mocked):

- `ActorKiller`: SIGKILLs a random render actor process (found among this process's descendants, so another Ray on
  the same machine is never touched) every few seconds, only while it is inside `render_shard`.
- `kill_driver_repeatedly`: runs `ray-render run` as a subprocess, SIGKILLs it at random moments and reruns it.
- `StorageFaultProxy`: a TCP/HTTP proxy on 127.0.0.1 in front of an S3-compatible server that answers a seeded
  fraction of requests with 500 InternalError or 503 SlowDown, resets connections (before the request reaches the
  store, or after it was applied: the client cannot tell whether a PUT happened), delays others, and can go down
  for good (`down = True`) and come back.
- `TinyOutOfMemoryAbove4`: the embedded tiny model that raises ModelOutOfMemory for model calls of more than 4
  requests; load it with `--model ray_render.tools.chaos:TinyOutOfMemoryAbove4`.
- `PlaceholderOnBrokenDevice`: the placeholder model whose every call raises in one actor (a broken GPU) and
  nowhere else.

A poison row that kills its actor every time is the placeholder model's `[placeholder:crash]` prompt directive.

Drills (`actor_chaos`, `driver_chaos`, `storage_chaos`, `poison_row`, `out_of_memory`) each run one job under one
kind of fault, check its output with `check_output` and return a `Figures` row. tools/soak.py repeats them (and the
ownership drills of tools/ownership.py) until time is up: `ray-render soak --minutes N`. The pytest group `-m chaos`
runs the same drills and asserts their figures.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.models.base import ModelInfo, ModelOutOfMemory
from ray_render.output import commits, layout, record

ACTOR_PROCESS = "ray::RenderActor"  # Ray's process title of an actor worker; ".render_shard" while it renders


# ---------------------------------------------------------------------------------------------------------------
# Injectors


class ActorKiller:
    """A thread that SIGKILLs one busy render actor process every `interval` seconds (uniform, seeded).

    Only descendants of `root_pid` (default: this process, which must have started the local Ray) are candidates,
    and only while they run `render_shard`: killing an actor that is still loading its model proves less.
    """

    def __init__(self, interval: tuple[float, float] = (2.0, 4.0), seed: int = 0, root_pid: int | None = None,
                 max_kills: int | None = None) -> None:
        self.interval = interval
        self.random = random.Random(seed)
        self.root_pid = root_pid or os.getpid()
        self.max_kills = max_kills
        self.kills: list[tuple[float, int]] = []  # (time.monotonic(), pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="actor-killer", daemon=True)

    def busy_actors(self) -> list[int]:
        import psutil

        found = []
        for process in psutil.Process(self.root_pid).children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if title.startswith(ACTOR_PROCESS + ".render_shard"):
                found.append(process.pid)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.random.uniform(*self.interval)):
            while not self._stop.is_set():
                pids = self.busy_actors()
                if pids:
                    pid = self.random.choice(pids)
                    # At a random moment of its work, not the instant it picks up a shard: the killer polls faster
                    # than a replaced actor restarts, and always striking a shard's first row is no random fault.
                    if self._stop.wait(self.random.uniform(0.0, 1.0)):
                        break
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.kills.append((time.monotonic(), pid))
                    except ProcessLookupError:
                        continue
                    break
                self._stop.wait(0.1)
            if self.max_kills is not None and len(self.kills) >= self.max_kills:
                return

    def __enter__(self) -> ActorKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


_S3_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
              503: ("SlowDown", "Please reduce your request rate.")}


class StorageFaultProxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of an S3-compatible endpoint that injects seeded faults.

    Per request: `error_rate` answers 500 or 503 (half each) without forwarding; `reset_rate` closes the connection
    without an answer (half of those after forwarding, so the store applied the request the client never hears
    about); `delay_rate` waits up to `max_delay_s` first. `down = True` resets every request (the store is gone).
    `counts` says what was injected. Use as a context manager, or `start()` / `stop()`.
    """

    daemon_threads = True

    def __init__(self, upstream_url: str, *, error_rate: float = 0.10, reset_rate: float = 0.02,
                 delay_rate: float = 0.05, max_delay_s: float = 0.5, seed: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, port = upstream_url.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.rates = (error_rate, reset_rate, delay_rate)
        self.max_delay_s = max_delay_s
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.down = False
        self.counts = {"requests": 0, "500": 0, "503": 0, "reset_before": 0, "reset_after": 0, "delayed": 0,
                       "down": 0}
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def faults(self) -> int:
        """Requests that failed or were delayed on purpose (outage resets included)."""
        return sum(value for key, value in self.counts.items() if key != "requests")

    def decide(self, method: str = "") -> tuple[str | None, float]:
        """(fault, delay) for the next request (of HTTP `method`): fault is None, "500", "503", "reset_before" or
        "reset_after"."""
        with self.lock:
            self.counts["requests"] += 1
            if self.down:
                self.counts["down"] += 1
                return "down", 0.0
            error_rate, reset_rate, delay_rate = self.rates
            draw, delay = self.random.random(), 0.0
            if self.random.random() < delay_rate:
                delay = self.random.uniform(0.0, self.max_delay_s)
                self.counts["delayed"] += 1
            if draw < error_rate:
                fault = self.random.choice(["500", "503"])
            elif draw < error_rate + reset_rate:
                fault = self.random.choice(["reset_before", "reset_after"])
            else:
                return None, delay
            self.counts[fault] += 1
            return fault, delay

    def start(self) -> StorageFaultProxy:
        self._thread = threading.Thread(target=self.serve_forever, name="storage-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> StorageFaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        self.close_connection = True
        self.connection.shutdown(2)

    def _handle(self) -> None:
        body = self._body()
        fault, delay = self.server.decide(self.command)
        if delay:
            time.sleep(delay)
        if fault in ("down", "reset_before"):
            return self._reset()
        if fault in ("500", "503"):
            code, message = _S3_ERRORS[int(fault)]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                       f"</Message><RequestId>chaos</RequestId></Error>").encode()
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer has no body, errors included
                self.wfile.write(payload)
            return None
        headers = {key: value for key, value in self.headers.items() if key.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        if fault == "reset_after":  # the store applied it; the client never hears back
            return self._reset()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                self.send_header(key, value)
        # A HEAD answer carries the object's length without its bytes.
        length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        return None

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class TinyOutOfMemoryAbove4:
    """The embedded tiny model, except that a model call of more than 4 requests raises ModelOutOfMemory, as a GPU
    does when a batch does not fit. `--model ray_render.tools.chaos:TinyOutOfMemoryAbove4`; for drills only."""

    MAX_BATCH = 4

    def __init__(self, **load_options) -> None:
        from ray_render.models import load_model

        self.inner = load_model("tiny", **load_options)
        self.info = ModelInfo(**{**self.inner.info.__dict__, "name": "ray_render.tools.chaos:TinyOutOfMemoryAbove4"})
        self.out_of_memory_calls = 0

    def __getattr__(self, name: str):  # everything but render is the wrapped model's
        return getattr(self.inner, name)

    def render(self, requests):
        if len(requests) > self.MAX_BATCH:
            raise ModelOutOfMemory(f"injected: {len(requests)} requests do not fit (at most {self.MAX_BATCH})")
        return self.inner.render(requests)


BROKEN_DEVICE_ENV = "RAY_RENDER_BROKEN_DEVICE"  # a file name: the first actor to create it has the broken device


class PlaceholderOnBrokenDevice:
    """The placeholder model, except in the one actor that creates the file named by $RAY_RENDER_BROKEN_DEVICE
    first: there every model call raises at once, as on a GPU with a driver fault, while the other actors render
    normally. `--model ray_render.tools.chaos:PlaceholderOnBrokenDevice`; for drills only."""

    def __init__(self, **load_options) -> None:
        from ray_render.models.placeholder import PlaceholderModel

        self.inner = PlaceholderModel()
        self.info = ModelInfo(**{**self.inner.info.__dict__,
                                 "name": "ray_render.tools.chaos:PlaceholderOnBrokenDevice"})
        self.broken = _claim(os.environ.get(BROKEN_DEVICE_ENV))

    def __getattr__(self, name: str):  # everything else is the placeholder's
        return getattr(self.inner, name)

    def render(self, requests):
        if self.broken:
            raise RuntimeError("injected: CUDA error: an illegal memory access was encountered (a broken device)")
        return self.inner.render(requests)


def _claim(path: str | None) -> bool:
    if not path:
        return False
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Checking an output root


@dataclass
class OutputCheck:
    """What an output root holds, compared with the ids the manifest asked for."""

    rows: int = 0  # metadata rows
    by_status: dict = field(default_factory=dict)  # input rows by status
    duplicates: int = 0  # (id, image_index) pairs that appear more than once
    lost: int = 0  # expected ids with no metadata row
    unexpected: int = 0  # ids nobody asked for
    undecodable: int = 0  # ok rows whose image is missing, does not decode or does not match its sha256
    unreferenced_images: int = 0  # image objects without an ok metadata row
    outside_root: int = 0  # image_uri values outside the output root


def check_output(out: str, expected_ids: list[str], storage_options: dict | None = None,
                 decode: bool = True) -> OutputCheck:
    """Read every metadata file, decode every image, list every image object; count what is wrong."""
    import pyarrow.dataset as ds
    from PIL import Image

    check = OutputCheck()
    fs, path = storage.open_fs(storage.join(out, layout.METADATA_DIR), storage_options)
    fs.invalidate_cache()
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["id", "image_index", "status", "image_uri", "sha256"]).to_pylist()
    check.rows = len(table)
    seen: dict[tuple, int] = {}
    status_of: dict[str, str] = {}
    for row in table:
        key = (row["id"], row["image_index"])
        seen[key] = seen.get(key, 0) + 1
        if status_of.get(row["id"]) != "failed":
            status_of[row["id"]] = row["status"]
    check.duplicates = sum(count - 1 for count in seen.values() if count > 1)
    expected = set(expected_ids)
    check.lost = len(expected - set(status_of))
    check.unexpected = len(set(status_of) - expected)
    for status in status_of.values():
        check.by_status[status] = check.by_status.get(status, 0) + 1
    root = storage.normalize_url(out).rstrip("/") + "/"
    referenced = set()
    for row in table:
        if row["status"] != "ok":
            continue
        uri = row["image_uri"]
        referenced.add(uri)
        if not uri.startswith(root):
            check.outside_root += 1
            continue
        if not decode:
            continue
        try:
            data = storage.read_bytes(uri, storage_options)
            Image.open(io.BytesIO(data)).load()
            if hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise ValueError("sha256 mismatch")
        except Exception:  # noqa: BLE001 - counted, that is the point
            check.undecodable += 1
    images_fs, images_path = storage.open_fs(storage.join(out, layout.IMAGES_DIR), storage_options)
    images_fs.invalidate_cache()
    stored = images_fs.find(images_path) if images_fs.exists(images_path) else []
    prefix = storage.join(out, layout.IMAGES_DIR)
    stored_urls = {storage.join(prefix, name[len(images_path.rstrip("/")) + 1:]) for name in stored}
    check.unreferenced_images = len(stored_urls - {storage.normalize_url(uri) for uri in referenced})
    return check


# ---------------------------------------------------------------------------------------------------------------
# Drills


@dataclass
class Figures:
    """One row of the reliability table."""

    drill: str
    faults: str  # what was injected, counted
    rows: int  # manifest rows
    ok: int
    duplicates: int
    lost: int  # rows with no metadata row, or ok rows without a good image
    wall_s: float
    details: dict = field(default_factory=dict)

    @property
    def sha_mismatches(self) -> int:
        """ok rows whose image is missing, does not decode or does not match its sha256 (part of `lost`)."""
        checks = [self.details.get("check") or {}, (self.details.get("outage") or {}).get("check") or {}]
        return sum(check.get("undecodable", 0) for check in checks)


def write_manifest(path: str, rows: list[dict], storage_options: dict | None = None) -> str:
    names = list(dict.fromkeys(key for row in rows for key in row))  # from_pylist reads the first row's keys only
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{name: row.get(name) for name in names} for row in rows]), buffer)
    storage.write_bytes(path, buffer.getvalue(), storage_options)
    return path


def _prompt_rows(n: int, suffix: str = "") -> list[dict]:
    return [{"id": f"r{i:05d}", "prompt": f"a photo of object number {i}{suffix}"} for i in range(n)]


def lost_rows(check: OutputCheck) -> int:
    return check.lost + check.undecodable


def actor_chaos(workdir: str, *, rows: int = 2000, min_kills: int = 10, seed: int = 0, model: str = "tiny",
                steps: int = 2, batch_size: int = 16, shard_size: int = 32,
                interval: tuple[float, float] = (2.0, 4.0), max_kills: int | None = None) -> Figures:
    """`rows` rows on 2 actors while an ActorKiller SIGKILLs a busy actor every `interval` seconds.

    Needs a local Ray started by this process (`ray.init(...)`). The killer stops after `max_kills` (default
    `min_kills` + 2: an actor restart loads the model again, so endless kills every few seconds would outpace any
    progress on a small machine), and the drill fails loudly if the job ended before `min_kills`.
    """
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    manifest = write_manifest(os.path.join(workdir, "actor-chaos.parquet"), _prompt_rows(rows))
    out = os.path.join(workdir, "actor-chaos-out")
    job = JobConfig(manifests=[manifest], out=out, model=model, device="cpu", actors=2, batch_size=batch_size,
                    shard_size=shard_size, params={"num_sampling_steps": steps}, progress=False, overwrite=True)
    started = time.monotonic()
    with ActorKiller(interval=interval, seed=seed, max_kills=max_kills or min_kills + 2) as killer:
        summary = driver.run(job)
    wall = time.monotonic() - started
    check = check_output(out, [row["id"] for row in _prompt_rows(rows)])
    if len(killer.kills) < min_kills:
        raise RuntimeError(f"actor chaos: only {len(killer.kills)} kills before the job ended; lower the interval")
    return Figures("actor chaos (SIGKILL render actors)", f"{len(killer.kills)} actor kills", rows,
                   check.by_status.get("ok", 0), check.duplicates, lost_rows(check), wall,
                   {"summary": summary.to_dict(), "check": check.__dict__, "kills": len(killer.kills)})


def _orphan_shards(out: str) -> set[str]:
    """Shards with attempts but no commit: work that was in flight and will be redone."""
    committed = commits.committed_shard_ids(out)
    started = set(storage.list_names(storage.join(out, layout.IMAGES_DIR)))
    started |= set(storage.list_names(storage.join(out, layout.ATTEMPTS_DIR)))
    return started - committed


def kill_driver_repeatedly(command: list[str], out: str, *, kills: int, seed: int = 0,
                           window: tuple[float, float] = (3.0, 7.0), timeout: float = 300.0) -> dict:
    """Run `command` (a `ray-render run`), SIGKILL it `kills` times at random moments, rerunning after each; then
    let the last run finish. Returns per-kill observations and the final exit status."""
    rng = random.Random(seed)
    observations = []
    commits_before: dict[str, tuple] = {}  # shard -> (log number, attempt) of its commit
    for _ in range(kills):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(*window))
        finished = process.poll() is not None
        process.send_signal(signal.SIGKILL)
        process.wait()
        committed = commits.list_commits(out)
        for shard_id, info in committed.items():
            commits_before.setdefault(shard_id, (info["seq"], info["attempt"]))
        observations.append({"committed": len(committed), "in_flight": len(_orphan_shards(out)),
                             "finished_before_kill": finished})
    final = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    after = commits.list_commits(out)
    recommitted = sum((after[shard_id]["seq"], after[shard_id]["attempt"]) != before
                      for shard_id, before in commits_before.items())
    return {"kills": observations, "returncode": final.returncode, "stderr": final.stderr[-3000:],
            "committed_shards_recommitted": recommitted}


def driver_chaos(workdir: str, address: str, *, kills: int = 5, seed: int = 0, shards: int = 100,
                 shard_size: int = 4, row_sleep: float = 0.1, actors: int = 2, max_in_flight: int = 2) -> Figures:
    """The driver process SIGKILLed `kills` times during one job (placeholder model, slow rows), rerun after each."""
    rows = _prompt_rows(shards * shard_size, f" [placeholder:sleep={row_sleep}]")
    manifest = write_manifest(os.path.join(workdir, "driver-chaos.parquet"), rows)
    out = os.path.join(workdir, "driver-chaos-out")
    command = [sys.executable, "-m", "ray_render", "run", manifest, "--out", out, "--model", "placeholder",
               "--shard-size", str(shard_size), "--batch-size", "2", "--actors", str(actors), "--max-in-flight",
               str(max_in_flight), "--address", address, "--no-progress"]
    started = time.monotonic()
    result = kill_driver_repeatedly(command, out, kills=kills, seed=seed)
    wall = time.monotonic() - started
    if result["returncode"] != 0:
        raise RuntimeError(f"driver chaos: the final run exited {result['returncode']}: {result['stderr']}")
    check = check_output(out, [row["id"] for row in rows])
    summary = record.read_summary(out) or {}
    result.update(summary=summary, check=check.__dict__, in_flight_bound=actors * max_in_flight,
                  redone_max=max(k["in_flight"] for k in result["kills"]))
    return Figures("driver chaos (SIGKILL the driver, rerun)", f"{kills} driver kills", len(rows),
                   check.by_status.get("ok", 0), check.duplicates, lost_rows(check), wall, result)


def storage_chaos(workdir: str, upstream: dict, *, seed: int = 0, rows: int = 300, error_rate: float = 0.10,
                  reset_rate: float = 0.02, delay_rate: float = 0.05) -> Figures:
    """A job whose manifest and output live behind a StorageFaultProxy (10% 500/503, resets, delays); then an
    outage during a second job (it must abort with a clear message) and its rerun once storage is back.

    `upstream`: storage options of the S3-compatible server (key, secret, endpoint_url).
    """
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    bucket_prefix = f"s3://{upstream.get('bucket', 'ray-render-test')}/chaos-{seed}-{int(time.time() * 1000)}"
    with StorageFaultProxy(upstream["endpoint_url"], error_rate=error_rate, reset_rate=reset_rate,
                           delay_rate=delay_rate, seed=seed) as proxy:
        so = {key: value for key, value in upstream.items() if key != "bucket"}
        so.update(endpoint_url=proxy.endpoint_url, config_kwargs={"retries": {"total_max_attempts": 1}})
        clean = {key: value for key, value in upstream.items() if key != "bucket"}
        manifest_rows = _prompt_rows(rows)
        manifest = write_manifest(f"{bucket_prefix}/manifest.parquet", manifest_rows, clean)
        out = f"{bucket_prefix}/out"
        started = time.monotonic()
        flaky = driver.run(JobConfig(manifests=[manifest], out=out, model="placeholder", shard_size=20,
                                     batch_size=8, actors=2, storage_options=so, progress=False))
        wall = time.monotonic() - started
        flaky_counts = dict(proxy.counts)
        check = check_output(out, [row["id"] for row in manifest_rows], clean)

        # The storage goes away for good in the middle of a job, then comes back.
        slow_rows = _prompt_rows(rows, " [placeholder:sleep=0.05]")
        outage_manifest = write_manifest(f"{bucket_prefix}/outage.parquet", slow_rows, clean)
        outage_out = f"{bucket_prefix}/outage-out"
        outage_job = JobConfig(manifests=[outage_manifest], out=outage_out, model="placeholder", shard_size=20,
                               batch_size=8, actors=2, storage_options=so, progress=False)
        proxy.rates = (0.0, 0.0, 0.0)

        def pull_the_plug() -> None:
            deadline = time.monotonic() + 120  # past it the storage goes anyway: the drill must end
            while len(commits.committed_shard_ids(outage_out, clean)) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            proxy.down = True

        plug = threading.Thread(target=pull_the_plug, daemon=True)
        plug.start()
        outage_started = time.monotonic()
        aborted = driver.run(outage_job)
        abort_s = time.monotonic() - outage_started
        plug.join()
        committed_during_outage = len(commits.committed_shard_ids(outage_out, clean))
        proxy.down = False
        resumed = driver.run(outage_job)
        outage_check = check_output(outage_out, [row["id"] for row in slow_rows], clean)
        faults = flaky_counts
    details = {"flaky_summary": flaky.to_dict(), "check": check.__dict__, "proxy": faults,
               "outage": {"exit_code": aborted.exit_code, "message": aborted.message,
                          "committed": committed_during_outage, "abort_s": round(abort_s, 1),
                          "outage_requests": proxy.counts["down"], "resumed_exit_code": resumed.exit_code,
                          "shards_resumed": resumed.shards_resumed, "check": outage_check.__dict__}}
    injected = faults["500"] + faults["503"] + faults["reset_before"] + faults["reset_after"]
    return Figures("storage faults (10% 500/503, resets, delays)",
                   f"{injected} failed + {faults['delayed']} delayed of {faults['requests']} requests; 1 outage",
                   rows, check.by_status.get("ok", 0), check.duplicates + outage_check.duplicates,
                   lost_rows(check) + lost_rows(outage_check), wall, details)


def poison_row(workdir: str, *, rows: int = 200, seed: int = 0, retries: int = 2) -> Figures:
    """One row (chosen by `seed`) kills its actor process every time it renders; the rest must finish."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    poison = random.Random(seed).randrange(rows)
    manifest_rows = _prompt_rows(rows)
    manifest_rows[poison]["prompt"] += " [placeholder:crash]"
    manifest = write_manifest(os.path.join(workdir, "poison.parquet"), manifest_rows)
    out = os.path.join(workdir, "poison-out")
    started = time.monotonic()
    summary = driver.run(JobConfig(manifests=[manifest], out=out, model="placeholder", shard_size=25, batch_size=8,
                                   actors=2, retries=retries, progress=False, overwrite=True))
    wall = time.monotonic() - started
    check = check_output(out, [row["id"] for row in manifest_rows])
    return Figures("poison row (kills its actor every time)", f"{summary.actors_replaced} actor deaths", rows,
                   check.by_status.get("ok", 0), check.duplicates, lost_rows(check), wall,
                   {"summary": summary.to_dict(), "check": check.__dict__, "poison_id": manifest_rows[poison]["id"]})


def out_of_memory(workdir: str, *, rows: int = 48, batch_size: int = 16, steps: int = 2) -> Figures:
    """The tiny model out of memory above 4 requests a call, asked for batches of `batch_size`."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    manifest_rows = _prompt_rows(rows)
    manifest = write_manifest(os.path.join(workdir, "oom.parquet"), manifest_rows)
    out = os.path.join(workdir, "oom-out")
    started = time.monotonic()
    summary = driver.run(JobConfig(manifests=[manifest], out=out, model="ray_render.tools.chaos:TinyOutOfMemoryAbove4",
                                   device="cpu", shard_size=rows, batch_size=batch_size, actors=1,
                                   params={"num_sampling_steps": steps}, progress=False, overwrite=True))
    wall = time.monotonic() - started
    check = check_output(out, [row["id"] for row in manifest_rows])
    markers = commits.list_commits(out)
    return Figures("out of memory at batch > 4 (tiny model)", f"batch {batch_size} -> "
                   f"{min(info['batch_size'] for info in markers.values())}", rows, check.by_status.get("ok", 0),
                   check.duplicates, lost_rows(check), wall,
                   {"summary": summary.to_dict(), "check": check.__dict__,
                    "batch_sizes": sorted(info["batch_size"] for info in markers.values())})
