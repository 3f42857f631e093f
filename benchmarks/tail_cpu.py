"""Where the CPU goes in the tail benchmark's job (BENCHMARKS.md, section 9): cores used by each kind of process.

    python benchmarks/tail_cpu.py --rows 10000 --actors 8

A standing local Ray, as a job on a cluster finds one: started here as `ray-render bench` starts the Ray its
suites share (no dashboard; workers at the bench's niceness 0, or with `--niceness ray` at Ray's own; the tail
suite itself gives each run its own Ray). Then one `ray-render run` of the tail suite's job (its manifest, batch
size and CPU share per actor: `--rows` rows of 10 ms on the placeholder model, 64x64 PNG, default shard sizes)
connected to it, while every process's CPU ticks are read from /proc twice a second. The commits say when each
actor's first call started (the moment it was ready), when each call had the model (an actor's two calls take it
in turns) and how much of that was in the model, and how long no call of an actor had it; with the pool's
timeline from the run's summary, the cores are reported for the start-up (pool started to last actor ready) and
the rest of the rendering, by kind of process.
Then one RenderActor in this process renders up to 2,000 rows with no sleep: its CPU per row (every thread: model,
encode, write, journal, metadata), what 8 actors at 100 rows/s each ask of the machine. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAMPLE_S = 0.5
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
RAY = "Ray (raylet, GCS, agents)"
# Command-line needles, first match wins: Ray names a worker process after what it runs (ray::RenderActor...).
KINDS = (("RenderActor", "render actors"), ("ray::IDLE", "idle Ray workers"), ("ray_render run", "driver"),
         ("raylet", RAY), ("gcs_server", RAY), ("ray::", RAY), ("ray/", RAY))


def _kind(cmdline: str) -> str:
    for needle, kind in KINDS:
        if needle in cmdline:
            return kind
    return "other"


def _snapshot() -> dict[str, tuple[int, str]]:
    """pid -> (user + system ticks, kind) of every process readable now."""
    snap = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 0, utime 11, stime 12
        snap[pid] = (int(fields[11]) + int(fields[12]), _kind(cmdline))
    return snap


def _sample(samples: list, stop: threading.Event) -> None:
    while not stop.is_set():
        samples.append((time.time(), _snapshot()))
        stop.wait(SAMPLE_S)


def _cores(samples: list, start: float, end: float) -> dict[str, float]:
    """Cores used by each kind of process between `start` and `end` (epoch seconds), from the samples nearest."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return {}
    (t0, first), (t1, last) = inside[0], inside[-1]
    used = collections.Counter()
    for pid, (ticks, kind) in last.items():
        used[kind] += ticks - first.get(pid, (0, kind))[0]  # a process started in between counts from 0
    return {kind: round(ticks * TICK_S / (t1 - t0), 2) for kind, ticks in used.most_common()}


def _calls(out: Path) -> dict[str, list[dict]]:
    """The committed calls of each actor, in order (each commit carries its call's start, end, wall and model time,
    stamped by the actor)."""
    from ray_render.output.log import read_state

    calls = collections.defaultdict(list)
    for entry in read_state(str(out)).committed.values():
        calls[entry["info"]["worker"]].append(entry["info"])
    for infos in calls.values():
        infos.sort(key=lambda info: info["started_at"])
    return calls


def call_shares(calls: dict[str, list[dict]]) -> dict:
    """The model's share of the turns (an actor's two calls take its model in turns: each commit says when its call
    had it), and the share of the actors' time, from each one's first turn to its last, that no call had it."""
    model = turns = spans = 0.0
    for infos in calls.values():
        model += sum(info["render_ms"] for info in infos) / 1e3
        turns += sum(info["rendering_until"] - info["rendering_from"] for info in infos)
        spans += max(info["rendering_until"] for info in infos) - min(info["rendering_from"] for info in infos)
    return {"model share of the turns": round(model / turns, 3),
            "share of actor time without a turn": round(1 - turns / spans, 3)}


def run_job(work: Path, rows: int, actors: int) -> dict:
    from ray_render.tools.bench import FULL, TAIL_CPUS_PER_ACTOR, tail_manifest

    sizes = FULL["tail"]
    manifest = tail_manifest(work, rows, sizes["row_s"])
    out = work / "out"
    samples: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(samples, stop), daemon=True)
    sampler.start()
    subprocess.run([sys.executable, "-m", "ray_render", "run", manifest, "--out", str(out), "--model", "placeholder",
                    "--actors", str(actors), "--batch-size", str(sizes["batch_size"]),
                    "--cpus-per-actor", str(TAIL_CPUS_PER_ACTOR), "--device", "cpu",
                    "--no-progress", "--no-report"], check=True, stdout=subprocess.DEVNULL)
    stop.set()
    sampler.join()
    summary = json.loads((out / "_summary.json").read_text())
    timeline = summary["actors_timeline"]  # (seconds since the pool started, actors ready)
    # An actor's first call starts the moment it is ready (a shard waits for it), on the actor's own clock.
    calls = _calls(out)
    first_calls = sorted(infos[0]["started_at"] for infos in calls.values())
    first_ready, last_ready = first_calls[0], first_calls[-1]
    end = max(infos[-1]["finished_at"] for infos in calls.values())
    pool_started = first_ready - timeline[0][0]
    return {"ready_s": [at for at, _ in timeline], "rendering_s": round(summary["rendering_s"], 1),
            "cores while actors start": _cores(samples, pool_started, last_ready),
            "cores after all are ready": _cores(samples, last_ready, end),
            "cores during rendering": _cores(samples, first_ready, end),
            "efficiency": round(summary["render_s"] / (actors * summary["rendering_s"]), 3), **call_shares(calls)}


def cpu_per_row(work: Path, rows: int) -> float:
    """Milliseconds of CPU (every thread of this process) per row of one RenderActor, the model not sleeping."""
    from ray_render.config import JobConfig
    from ray_render.engine.actor import RenderActor
    from ray_render.engine.plan import plan as make_plan
    from ray_render.tools.bench import make_manifest

    manifest = make_manifest(work / "fast.parquet", rows + 100)
    plan = make_plan([manifest], rows)
    job = JobConfig(manifests=[manifest], out=str(work / "out-alone"), model="placeholder", device="cpu",
                    progress=False, batch_size=8)
    actor = RenderActor(job, 0, plan.passthrough_schema, [])
    actor.render_shard(plan.shards[1], 1, "warm-1")  # the 100-row remainder: first-call costs
    before = time.process_time()
    actor.render_shard(plan.shards[0], 1, "timed-1")
    return round((time.process_time() - before) / rows * 1e3, 2)


def main() -> None:
    from ray_render.tools.bench import FULL, WORKER_NICENESS, _start_shared_cluster, _stop_shared_cluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=FULL["tail"]["rows"])
    parser.add_argument("--actors", type=int, default=FULL["tail"]["actors"])
    parser.add_argument("--niceness", default=WORKER_NICENESS,
                        help=f"of the Ray's workers (default {WORKER_NICENESS}, the bench's; 'ray': Ray's own)")
    args = parser.parse_args()
    if args.niceness != "ray":
        os.environ["RAY_worker_niceness"] = args.niceness  # read by the Ray started below

    with tempfile.TemporaryDirectory(prefix="tail-cpu-") as tmp:
        _start_shared_cluster()  # sets RAY_ADDRESS for the run
        try:
            figures = run_job(Path(tmp), args.rows, args.actors)
        finally:
            _stop_shared_cluster()
        figures["cpu ms per row, one actor alone"] = cpu_per_row(Path(tmp), min(args.rows, 2000))
    figures["machine cores"] = os.cpu_count()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
