"""Drills for how a run ends under what operators and clusters do to it, each returning a `chaos.Figures` row:

- `stop_signal`: SIGTERM or SIGINT to a `ray-render run` process in the middle of a long model call: it must exit 3
  within `ray job stop`'s 3 s, say "interrupted" in its summary, leave no process of its local Ray behind, and the
  rerun must render the row that was being rendered (stopped, not blamed for a death).
- `hung_actor`: one render actor frozen with SIGSTOP (a wedged kernel, a stuck read): the run must end with every
  row ok, its call killed at --call-timeout or its shard copied elsewhere.
- `systematic_crash`: every model call kills its actor: the job must abort (exit 2) within 8 restarts.
- `broken_device`: one actor on a broken device (`chaos.PlaceholderOnBrokenDevice`): its failed rows are repaired
  on another actor and it is retired; every row ends ok.
- `retry_failed`: a job whose every row failed on a broken device, then `--retry-failed` twice: the failed rows are
  rendered once, and the second time nothing renders.
- `node_loss`: a worker node of a three-node GPU cluster (tools/clusters.py) SIGKILLed mid-run, a replacement node
  joining later: nothing lost or duplicated, and no row made a suspect for a death that was its node's.

The others need a Ray of this process's own (its actors are found among this process's descendants) started with
$RAY_RENDER_BROKEN_DEVICE set for `broken_device` and `retry_failed`; `node_loss` starts its own cluster.
tools/soak.py runs them, tests/test_run_endings.py asserts them.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

from ray_render.output import layout, record
from ray_render.tools.chaos import (
    ACTOR_PROCESS,
    BROKEN_DEVICE_ENV,
    ActorKiller,
    Figures,
    check_output,
    lost_rows,
    write_manifest,
)
from ray_render.tools.clusters import LocalCluster, living_pids

BROKEN_MODEL = "ray_render.tools.chaos:PlaceholderOnBrokenDevice"


def _rows(n: int, prompt: str = "a red circle") -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"{prompt} {i}"} for i in range(n)]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _rendering(out: str, row_id: str) -> bool:
    """Whether an attempt's journal says it is rendering `row_id` now."""
    for path in glob.glob(os.path.join(out, layout.JOURNAL_DIR, "*", "*.json")):
        try:
            with open(path) as handle:
                if row_id in json.load(handle).get("rendering", []):
                    return True
        except (OSError, ValueError):  # being replaced this instant
            continue
    return False


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_signal(workdir: str, signum: int = signal.SIGTERM, rerun: bool = True) -> Figures:
    """`ray-render run` (its own local Ray, one actor) gets `signum` while a 6 s model call runs."""
    name = signal.Signals(signum).name
    manifest_rows = [{"id": "slow", "prompt": "a slow one [placeholder:sleep=6]"}, *_rows(3)]
    manifest = write_manifest(os.path.join(workdir, f"signal-{name}.parquet"), manifest_rows)
    out = os.path.join(workdir, f"signal-{name}-out")
    command = [sys.executable, "-m", "ray_render", "run", manifest, "--out", out, "--model", "placeholder",
               "--device", "cpu", "--shard-size", "1", "--actors", "1", "--max-in-flight", "1", "--no-progress"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _rendering(out, "slow"), 120, "the slow row's model call")
        ray_processes = _descendants(process.pid)
        signalled, signalled_at = time.monotonic(), time.time()
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
        wind_down_s = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    summary = record.read_summary(out) or {}
    summary_path = os.path.join(out, layout.SUMMARY)
    summary_after_s = os.path.getmtime(summary_path) - signalled_at if os.path.exists(summary_path) else None
    try:
        _wait_for(lambda: not living_pids(ray_processes), 30, "the local Ray's processes to end")
    except TimeoutError:
        pass
    left = len(living_pids(ray_processes))
    details = {"exit_code": process.returncode, "summary": summary, "wind_down_s": round(wind_down_s, 2),
               "summary_after_s": None if summary_after_s is None else round(summary_after_s, 2),
               "ray_processes": len(ray_processes), "left_running": left, "output": output[-3000:]}
    faults = (f"1 {name}: summary final {details['summary_after_s']} s later, exit {process.returncode} after "
              f"{wind_down_s:.1f} s (local Ray stopped), {left} processes left")
    if not rerun:
        return Figures(f"{name} during a model call", faults, len(manifest_rows), 0, 0, 0,
                       time.monotonic() - started, details)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    details["rerun_exit_code"] = again.returncode
    check = check_output(out, [row["id"] for row in manifest_rows])
    details["check"] = check.__dict__
    return Figures(f"{name} during a model call, then a rerun", f"{faults}; rerun exit {again.returncode}",
                   len(manifest_rows), check.by_status.get("ok", 0), check.duplicates, lost_rows(check),
                   time.monotonic() - started, details)


def hung_actor(workdir: str, *, rows: int = 8, call_timeout_s: float = 20.0) -> Figures:
    """One of 2 actors frozen (SIGSTOP) in its first call; the frozen process is resumed afterwards if alive."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    manifest_rows = _rows(rows, "a circle [placeholder:sleep=0.5]")
    manifest = write_manifest(os.path.join(workdir, "hung.parquet"), manifest_rows)
    out = os.path.join(workdir, "hung-out")
    job = JobConfig(manifests=[manifest], out=out, model="placeholder", device="cpu", actors=2, shard_size=1,
                    max_in_flight=1, progress=False, call_timeout_s=call_timeout_s, overwrite=True)
    frozen: list[int] = []
    killer = ActorKiller()

    def freeze() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not frozen:
            pids = killer.busy_actors()
            if pids:
                os.kill(pids[0], signal.SIGSTOP)
                frozen.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=freeze, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        summary = driver.run(job)
    finally:
        thread.join(5)
        for pid in living_pids(frozen):
            os.kill(pid, signal.SIGCONT)
    wall = time.monotonic() - started
    try:
        _wait_for(lambda: not living_pids(frozen), 30, "the frozen actor to be killed")
    except TimeoutError:
        pass
    check = check_output(out, [row["id"] for row in manifest_rows])
    return Figures("one actor frozen (SIGSTOP)", f"{len(frozen)} frozen; {summary.actors_replaced} killed and "
                   f"replaced, {summary.stragglers_reissued} copies", rows, check.by_status.get("ok", 0),
                   check.duplicates, lost_rows(check), wall,
                   {"summary": summary.to_dict(), "check": check.__dict__, "frozen": len(frozen),
                    "frozen_left": len(living_pids(frozen))})


def systematic_crash(workdir: str, *, rows: int = 24, retries: int = 1) -> Figures:
    """Every model call kills its actor (`[placeholder:crash]` on every row)."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    manifest = write_manifest(os.path.join(workdir, "crash.parquet"), _rows(rows, "boom [placeholder:crash]"))
    started = time.monotonic()
    summary = driver.run(JobConfig(manifests=[manifest], out=os.path.join(workdir, "crash-out"), model="placeholder",
                                   device="cpu", actors=1, shard_size=4, retries=retries, progress=False,
                                   overwrite=True))
    return Figures("every model call kills its actor", f"{summary.actors_replaced} restarts, then exit "
                   f"{summary.exit_code}", rows, summary.rows["ok"], 0, 0, time.monotonic() - started,
                   {"summary": summary.to_dict()})


def _fresh_broken_device() -> None:
    claim = os.environ.get(BROKEN_DEVICE_ENV)
    if not claim:
        raise RuntimeError(f"${BROKEN_DEVICE_ENV} must be set before Ray starts (the actors inherit it)")
    if os.path.exists(claim):
        os.unlink(claim)


def broken_device(workdir: str, *, rows: int = 48) -> Figures:
    """2 actors, one on a broken device (every call raises at once)."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    _fresh_broken_device()
    manifest_rows = _rows(rows, "a circle [placeholder:sleep=0.05]")
    manifest = write_manifest(os.path.join(workdir, "broken.parquet"), manifest_rows)
    out = os.path.join(workdir, "broken-out")
    started = time.monotonic()
    summary = driver.run(JobConfig(manifests=[manifest], out=out, model=BROKEN_MODEL, device="cpu", actors=2,
                                   shard_size=4, max_in_flight=1, progress=False, overwrite=True))
    wall = time.monotonic() - started
    check = check_output(out, [row["id"] for row in manifest_rows])
    return Figures("one actor on a broken device", f"{summary.rows_repaired} failed rows repaired elsewhere, "
                   f"{summary.actors_retired} actor retired", rows, check.by_status.get("ok", 0), check.duplicates,
                   lost_rows(check), wall, {"summary": summary.to_dict(), "check": check.__dict__})


def retry_failed(workdir: str, *, rows: int = 12) -> Figures:
    """A job rendered on one actor with a broken device (every valid row fails; one row is invalid), then
    `--retry-failed` twice on a working device."""
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    _fresh_broken_device()
    manifest_rows = [*_rows(rows), {"id": "bad", "prompt": "too small", "width": 17}]
    manifest = write_manifest(os.path.join(workdir, "retry.parquet"), manifest_rows)
    out = os.path.join(workdir, "retry-out")
    job = JobConfig(manifests=[manifest], out=out, model=BROKEN_MODEL, device="cpu", actors=1, shard_size=4,
                    progress=False, overwrite=True)
    started = time.monotonic()
    runs = [driver.run(job)]
    job = replace(job, overwrite=False, retry_failed=True)
    runs += [driver.run(job), driver.run(job)]
    wall = time.monotonic() - started
    check = check_output(out, [row["id"] for row in manifest_rows])
    rendered = [run.rows_this_run for run in runs]
    return Figures("every row failed, then --retry-failed twice", f"{runs[0].rows['failed']} failed rows; "
                   f"rows rendered per run {rendered}", len(manifest_rows), check.by_status.get("ok", 0),
                   check.duplicates, lost_rows(check), wall,
                   {"summaries": [run.to_dict() for run in runs], "check": check.__dict__})


def node_loss(workdir: str, *, rows: int = 360, row_s: float = 0.1, workers: int = 3) -> Figures:
    """`ray-render run --device cuda` on a head and `workers` one-GPU nodes; once an actor renders, its whole node is
    SIGKILLed (raylet first: a preempted machine) and a replacement node is started."""

    manifest_rows = _rows(rows, f"a circle [placeholder:sleep={row_s:g}]")
    manifest = write_manifest(os.path.join(workdir, "node-loss.parquet"), manifest_rows)
    out = os.path.join(workdir, "node-loss-out")
    started = time.monotonic()
    with LocalCluster(workers=workers) as cluster:
        command = [sys.executable, "-m", "ray_render", "run", manifest, "--out", out, "--model", "placeholder",
                   "--device", "cuda", "--max-actors", str(workers), "--address", cluster.address, "--no-progress"]
        with open(os.path.join(workdir, "node-loss-driver.log"), "w") as log:
            process = subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
            try:
                # Every node's actor renders before one is lost: the loss is mid-run, with work left for the rest.
                busy = _wait_for(lambda: _all_rendering(cluster.workers), 180, "every node's actor to render")
                victim = busy[0]
                time.sleep(0.5)  # into its shard, not at its first row
                killed = cluster.kill_worker(victim)
                lost_at = time.monotonic() - started
                replacement = cluster.add_worker()
                process.wait(timeout=300)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    wall = time.monotonic() - started
    summary = record.read_summary(out) or {}
    check = check_output(out, [row["id"] for row in manifest_rows])
    by_node = _rows_by_node(out)
    details = {"exit_code": process.returncode, "summary": summary, "check": check.__dict__,
               "killed_processes": len(killed), "lost_at_s": round(lost_at, 1), "rows_by_node": by_node,
               "victim": victim.node_id, "replacement": replacement.node_id,
               "replacement_rows": by_node.get(replacement.node_id[:8], 0)}
    faults = (f"1 of {workers} GPU nodes SIGKILLed mid-run ({len(killed)} processes), a replacement added; "
              f"{summary.get('node_losses', '?')} attempts lost with it, {summary.get('rows_suspected', '?')} rows "
              f"suspected")
    return Figures("a worker node lost mid-run", faults, rows, check.by_status.get("ok", 0), check.duplicates,
                   lost_rows(check), wall, details)


def _all_rendering(nodes: list) -> list:
    """The nodes, the first of them rendering now, once every one has an actor in `render_shard`; else []."""
    busy = [node for node in nodes if node.running(ACTOR_PROCESS + ".render_shard")]
    return busy + [node for node in nodes if node not in busy] if len(busy) == len(nodes) else []


def _rows_by_node(out: str) -> dict[str, int]:
    """Metadata rows per node (the 8-character node id prefix in the `worker` column: host/node/actor/gpu)."""
    import pyarrow.dataset as ds

    workers = ds.dataset(os.path.join(out, layout.METADATA_DIR), format="parquet").to_table(
        columns=["worker"]).column("worker").to_pylist()
    counts: dict[str, int] = {}
    for worker in workers:
        node = (worker or "").split("/")[1] if (worker or "").count("/") >= 2 else "?"
        counts[node] = counts.get(node, 0) + 1
    return counts
