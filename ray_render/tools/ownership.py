"""Drills of who owns an output root: real drivers (`python -m ray_render run` processes) racing for one root, a
stopped driver whose lease is taken over, and shard copies that do not render bit-exactly.

- `double_submit`: a second run of the same job while the first renders (a resubmitted `ray job submit`) is
  refused naming the holder; the first is then killed, and the rerun takes over and finishes.
- `refresh_during_run`: a `ray-render refresh` of an output a run is writing is refused the same way.
- `takeover_and_fence`: a driver frozen (SIGSTOP) past its lease's ttl; another run takes the output over and
  finishes it; the frozen one, woken, finds itself fenced and stops without committing anything.
- `jittered_copies`: a model whose pixels depend on the actor that renders them, with straggler copies of every
  slow shard: every committed image still matches its sha256.

Each returns a `chaos.Figures` row (rows ok, duplicated, lost, and the sha mismatches among the lost) with what it
observed in `details`. Drivers reach an S3 output through the RAY_RENDER_STORAGE_OPTIONS environment variable, never
through credentials on their command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from ray_render import storage
from ray_render.config import STORAGE_OPTIONS_ENV
from ray_render.models.base import ModelInfo
from ray_render.output import commits, layout
from ray_render.output.log import read_state
from ray_render.tools.chaos import Figures, _prompt_rows, check_output, lost_rows, write_manifest

DRIVER_TIMEOUT_S = 180.0


def _command(subcommand: str, manifest: str, out: str, address: str, *extra: str) -> list[str]:
    # CPU actors (half a CPU each): a frozen driver's actors keep their resources, and the next driver needs room.
    return [sys.executable, "-m", "ray_render", subcommand, manifest, "--out", out, "--model", "placeholder",
            "--address", address, "--no-progress", "--shard-size", "6", "--batch-size", "2", "--device", "cpu",
            "--actors", "1", *extra]


def _env(storage_options: dict | None) -> dict:
    """The drivers' environment: the storage options (credentials) in RAY_RENDER_STORAGE_OPTIONS, off the command
    line; the driver hands them to its actors."""
    env = dict(os.environ)
    if storage_options:
        env[STORAGE_OPTIONS_ENV] = json.dumps(storage_options)
    return env


def _wait_for(condition, what: str, timeout_s: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the driver exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.1)


def _holder(out: str, storage_options: dict | None) -> str | None:
    holder = read_state(out, storage_options).holder
    return holder["run_id"] if holder else None


def _figures(name: str, faults: str, out: str, rows: list[dict], storage_options: dict | None, wall: float,
             details: dict) -> Figures:
    check = check_output(out, [row["id"] for row in rows], storage_options)
    details.update(check=check.__dict__)
    return Figures(name, faults, len(rows), check.by_status.get("ok", 0), check.duplicates, lost_rows(check), wall,
                   details)


def double_submit(workdir: str, address: str, *, rows: int = 48, row_sleep: float = 0.15,
                  storage_options: dict | None = None, root: str | None = None) -> Figures:
    """Run A renders; run B of the same command is refused (exit 2) naming A; A is SIGKILLed mid-run; B's rerun
    takes the lease over at once (A's process is gone) and finishes. `root`: where manifest and output go (a local
    directory by default, or an s3:// prefix with its `storage_options`)."""
    base = root or workdir
    manifest_rows = _prompt_rows(rows, f" [placeholder:sleep={row_sleep}]")
    manifest = write_manifest(storage.join(base, "double-submit.parquet"), manifest_rows, storage_options)
    out = storage.join(base, "double-submit-out")
    command = _command("run", manifest, out, address)
    started = time.monotonic()
    first = subprocess.Popen(command, env=_env(storage_options), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: commits.committed_shard_ids(out, storage_options), "the first run's first commit",
                  process=first)
        holder = _holder(out, storage_options)
        second = subprocess.run(command, env=_env(storage_options), capture_output=True, text=True,
                                timeout=DRIVER_TIMEOUT_S)
        committed_when_refused = len(commits.committed_shard_ids(out, storage_options))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rerun = subprocess.run(command, env=_env(storage_options), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    details = {"second_exit": second.returncode, "second_output": (second.stdout + second.stderr)[-3000:],
               "first_holder": holder, "names_holder": bool(holder) and holder in second.stdout + second.stderr,
               "committed_when_refused": committed_when_refused, "rerun_exit": rerun.returncode,
               "rerun_output": (rerun.stdout + rerun.stderr)[-3000:]}
    where = "S3" if out.startswith("s3://") else "local disk"
    return _figures(f"double submit (a second driver on a held output, {where})",
                    "second run refused, first SIGKILLed, rerun takes over", out, manifest_rows, storage_options,
                    time.monotonic() - started, details)


def refresh_during_run(workdir: str, address: str, *, rows: int = 36, row_sleep: float = 0.15) -> Figures:
    """A refresh of an output that a run is still writing is refused (exit 2); the run finishes undisturbed."""
    manifest_rows = _prompt_rows(rows, f" [placeholder:sleep={row_sleep}]")
    manifest = write_manifest(os.path.join(workdir, "overlap.parquet"), manifest_rows)
    out = os.path.join(workdir, "overlap-out")
    started = time.monotonic()
    run = subprocess.Popen(_command("run", manifest, out, address), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _holder(out, None) is not None, "the run's lease", process=run)
    refresh = subprocess.run(_command("refresh", manifest, out, address), capture_output=True, text=True,
                             timeout=DRIVER_TIMEOUT_S)
    _, run_errors = run.communicate(timeout=DRIVER_TIMEOUT_S)
    details = {"refresh_exit": refresh.returncode, "refresh_output": (refresh.stdout + refresh.stderr)[-3000:],
               "run_exit": run.returncode, "run_errors": run_errors[-2000:]}
    return _figures("refresh while a run writes the output", "refresh refused", out, manifest_rows, None,
                    time.monotonic() - started, details)


def takeover_and_fence(workdir: str, address: str, *, rows: int = 48, row_sleep: float = 0.1,
                       ttl_s: float = 3.0) -> Figures:
    """Driver A (lease ttl `ttl_s`) is frozen with SIGSTOP mid-run. Run B is refused while A's lease is live, then
    takes the output over once it has expired and finishes the job. A, woken with SIGCONT, is fenced: it exits 2
    and no commit of its after B's takeover exists."""
    manifest_rows = _prompt_rows(rows, f" [placeholder:sleep={row_sleep}]")
    manifest = write_manifest(os.path.join(workdir, "fence.parquet"), manifest_rows)
    out = os.path.join(workdir, "fence-out")
    command = _command("run", manifest, out, address, "--lease-ttl", str(ttl_s))
    started = time.monotonic()
    zombie = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: commits.committed_shard_ids(out, None), "the first driver's first commit", process=zombie)
        zombie.send_signal(signal.SIGSTOP)
        zombie_run = _holder(out, None)
        early = subprocess.run(command, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
        time.sleep(ttl_s + 1.0)  # past the frozen driver's last heartbeat by more than its ttl
        taker = subprocess.run(command, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    finally:
        zombie.send_signal(signal.SIGCONT)
    zombie_output, _ = zombie.communicate(timeout=DRIVER_TIMEOUT_S)
    entries = _entries(out)
    takeover_seq = next(entry["seq"] for entry in entries
                        if entry["kind"] == "acquire" and entry["run_id"] != zombie_run)
    late = [entry for entry in entries if entry["run_id"] == zombie_run and entry["seq"] > takeover_seq]
    details = {"early_exit": early.returncode, "early_output": (early.stdout + early.stderr)[-2000:],
               "taker_exit": taker.returncode, "taker_output": (taker.stdout + taker.stderr)[-2000:],
               "zombie_exit": zombie.returncode, "zombie_output": zombie_output[-3000:],
               "zombie_entries_after_takeover": len(late)}
    return _figures("lease taken over from a frozen driver", f"SIGSTOP past a {ttl_s:g} s ttl, takeover, SIGCONT",
                    out, manifest_rows, None, time.monotonic() - started, details)


def _entries(out: str) -> list[dict]:
    names = sorted(name for name in storage.list_names(storage.join(out, layout.LOG_DIR)) if name.endswith(".json"))
    return [json.loads(storage.read_bytes(storage.join(out, layout.LOG_DIR, name))) for name in names]


class JitteredPlaceholder:
    """The placeholder model, but not bit-exact across actors (as bf16 on two GPU models, or a batch halved after
    an out-of-memory, can be): each actor process adds its own offset to every pixel. For drills only:
    `--model ray_render.tools.ownership:JitteredPlaceholder`."""

    def __init__(self, **options) -> None:
        from ray_render.models.placeholder import PlaceholderModel

        self.inner = PlaceholderModel()
        self.info = ModelInfo(**{**self.inner.info.__dict__, "name": "ray_render.tools.ownership:JitteredPlaceholder"})
        self.offset = os.getpid() % 7 + 1

    def __getattr__(self, name: str):  # everything but render is the wrapped model's
        return getattr(self.inner, name)

    def render(self, requests):
        return [image + self.offset for image in self.inner.render(requests)]  # uint8 arithmetic wraps: still uint8


def jittered_copies(workdir: str, *, rows: int = 24, slow: int = 2) -> Figures:
    """The last `slow` shards each hold a slow row, so idle actors take copies of them (straggler re-issue) while
    they run; the copies render different bytes (JitteredPlaceholder). First result wins; every committed image
    must still match the sha256 its metadata names. Runs in this process, on the Ray it has started."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver, pool

    # The last slow row sleeps longest: whichever way the slow shards fall on the actors, one actor is idle while
    # it runs (were they all equally slow, both actors could finish them together, leaving nothing to copy).
    manifest_rows = [{"id": f"r{i:05d}", "prompt": f"a jittered picture {i}"
                      + (f" [placeholder:sleep={3 if i == rows - 1 else 1.5}]" if i >= rows - 2 * slow and i % 2
                         else "")} for i in range(rows)]
    manifest = write_manifest(os.path.join(workdir, "jitter.parquet"), manifest_rows)
    out = os.path.join(workdir, "jitter-out")
    job = JobConfig(manifests=[manifest], out=out, model="ray_render.tools.ownership:JitteredPlaceholder",
                    device="cpu", actors=2, shard_size=2, batch_size=2, max_in_flight=1, progress=False,
                    overwrite=True)
    minimum, pool.STRAGGLER_MIN_S = pool.STRAGGLER_MIN_S, 0.5  # copy any shard running 0.5 s longer than usual
    started = time.monotonic()
    try:
        summary = driver.run(job)
    finally:
        pool.STRAGGLER_MIN_S = minimum
    details = {"summary": summary.to_dict(), "copies": summary.stragglers_reissued}
    return _figures("straggler copies that render different bytes", f"{summary.stragglers_reissued} copies",
                    out, manifest_rows, None, time.monotonic() - started, details)
