"""`ray-render bench`: throughput, driver memory, resume cost and actor efficiency, each against a goal.

Every suite is a small function returning a dict. A suite that compares contenders (ray-render, Ray Data doing
the same work, a plain loop; see baselines.py) runs them one after another in this one invocation, `--repeat`
rounds in turn (every other round in reverse order), and judges the median of the per-round ratios, so that the
load of a shared machine falls on both sides of a ratio. Each contender runs in a fresh Python process, which
connects to a local Ray the bench starts for each suite (as jobs on a standing cluster do; `--cluster per-run`
makes each contender start and stop its own). A contender's wall time covers everything from its call to its
return: connecting, starting actors, loading the model, rendering, writing, shutting down. The process's peak
RSS is taken before the bench reads the output back, so for ray-render it is the driver's own.

Outputs are deleted only when the whole bench is over. Deleting tens of thousands of files just before a timed
run slows every file that run creates: for a minute or more, ext4's inode allocator scans the inodes freed
recently (`recently_deleted` in a kernel profile), and a run writing 20,000 images on two processes spent twice
the CPU in the kernel and ran 1.5-2x slower. Each round of each contender writes into a directory of its own.

    orchestration  placeholder model, 20,000 rows of 64x64 PNG, 2 actors: ray-render vs Ray Data vs loop
    model          tiny NextStep model, 1,000 rows, 2 actors: ray-render vs Ray Data vs loop
    driver_scale   plan and dispatch 1,000,000 rows vs 10,000: the driver's peak RSS, planning time
    resume         rerun a finished 20,000-row job: its wall time against the original's
    actor          one RenderActor, tiny model, batch 1/4/16/32: images/s, share of wall time in the model
    tail           10,000 rows of 10 ms on 8 actors: default shard sizes vs 1,000-row shards, rendering
                   efficiency (each run a `ray-render run` with its own Ray, as a user runs it on one machine)
    decode         the token step eager and compiled, side by side on one model: NextStep-1-Large's depth at
                   tiny widths, batch 8 with guidance, 50 steps: host time and dispatched ops per token step
    gpu            full-size NextStep-1-Large architecture with random bf16 weights; skipped without CUDA

The terminal gets one table per suite; `--out DIR` gets `<suite>.json` for each suite and `summary.json`.
This module imports neither torch nor ray: the children do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ALL_SUITES = ("orchestration", "model", "driver_scale", "resume", "actor", "tail", "decode", "gpu")
CPU_SUITES = ALL_SUITES[:-1]
ACTOR_BATCH_SIZES = (1, 4, 16, 32)
GPU_BATCH_SIZES = (1, 8, 32)

# Sizes the issue names, and the --quick ones (a smoke run: every field, no meaningful figures).
FULL = {"orchestration": {"rows": 20_000, "shard_size": 1000, "batch_size": 8},
        "model": {"rows": 1_000, "shard_size": 64, "batch_size": 32},
        "driver_scale": {"rows": 1_000_000, "base_rows": 10_000, "shard_size": 1000},
        "resume": {"rows": 20_000, "shard_size": 1000, "batch_size": 8},
        "actor": {"rows": 128},
        "tail": {"rows": 10_000, "actors": 8, "row_s": 0.01, "batch_size": 8},
        "decode": {"layers": 48, "blocks": 12, "steps": 50, "batch": 8, "side": 256},
        "gpu": {"rows": 8, "steps": 50, "side": 512}}
QUICK = {"orchestration": {"rows": 240, "shard_size": 60, "batch_size": 8},
         "model": {"rows": 8, "shard_size": 4, "batch_size": 4},
         "driver_scale": {"rows": 2_000, "base_rows": 200, "shard_size": 100},
         "resume": {"rows": 240, "shard_size": 60, "batch_size": 8},
         "actor": {"rows": 4},
         "tail": {"rows": 160, "actors": 2, "row_s": 0.01, "batch_size": 8},
         "decode": {"layers": 2, "blocks": 1, "steps": 2, "batch": 2, "side": 32},
         "gpu": {"rows": 2, "steps": 4, "side": 256}}
GOALS = {"orchestration": "ray-render >= 1.5x Ray Data in rows/s",
         "model": "ray-render >= 3x the loop and >= 1.2x Ray Data in rows/s",
         "driver_scale": "peak driver RSS at 1,000,000 rows <= 1.3x that at 10,000 rows",
         "resume": "rerun of a finished job < 5% of the original wall time",
         "actor": ">= 90% of actor wall time in the model (encode and upload overlapped)",
         "tail": ">= 0.90 rendering efficiency with default shard sizes (8 actors, 10 ms rows)",
         "decode": "compiled token step >= 5x faster per image than eager on CPU, images within 2 levels (p99)",
         "gpu": "reported only (images/s per batch size on the full-size architecture)"}
ACTORS = 2
# Suites that measure one model in one process: no Ray for them, whose idle processes would take CPU from the
# figures.
WITHOUT_RAY = ("decode", "gpu")
# The tail's goal is the job as a user runs it on one machine: `ray-render run` with default options, which starts
# its own Ray with Ray's own worker niceness (not WORKER_NICENESS). On a standing local Ray at niceness 0 its 8
# actors start over seconds on 2 cores (BENCHMARKS.md, section 9; benchmarks/tail_cpu.py measures that case).
OWN_RAY = ("tail",)
# Ray starts its workers at niceness 15 by default. On a machine shared with other work at niceness 0, that leaves
# the actors (ray-render's and Ray Data's) a few percent of a busy core while the loop, a plain process, gets its
# full share: the bench's Ray runs its workers at the loop's priority instead, so all contenders compete alike.
WORKER_NICENESS = "0"


# ---------------------------------------------------------------------------------------------------------------
# Running a contender in its own process


def _child(kind: str, work: Path, **spec) -> dict:
    """Run `_child_main` in a fresh interpreter; returns its result dict (with the process's own wall time)."""
    work.mkdir(parents=True, exist_ok=True)
    spec_file, result_file = work / f"{kind}-spec.json", work / f"{kind}-result.json"
    log_file = work / f"{kind}.log"
    spec_file.write_text(json.dumps({"kind": kind, **spec}))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "ray_render.tools.bench", str(spec_file), str(result_file)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))
    process_s = time.monotonic() - started
    if proc.returncode != 0 or not result_file.exists():
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"bench child {kind!r} exited {proc.returncode}; last lines of {log_file}:\n{tail}")
    result = json.loads(result_file.read_text())
    result["process_s"] = round(process_s, 3)
    return result


def _child_main(spec_file: str, result_file: str) -> None:
    """Entry point of a contender process: do one piece of work, write what was measured as JSON."""
    import resource

    spec = json.loads(Path(spec_file).read_text())
    kind = spec.pop("kind")
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ray_render").setLevel(logging.INFO)  # the driver's steps, timestamped, in the child's log
    load_before = _load_average()
    started, started_epoch = time.monotonic(), time.time()
    result = _CHILD_WORK[kind.split(":")[0]](**spec)
    wall_s = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)  # before the bench reads any output back: the contender's own
    peak_rss_mib = _peak_rss_mib(usage)
    ray_imported = "ray" in sys.modules
    if spec.get("out") and kind.split(":")[0] in ("ray-render", "ray-data", "loop"):
        result.update(_image_times(spec["out"], started_epoch))
        if "rows" not in result:
            from ray_render.tools.baselines import count_output

            result.update(count_output(spec["out"]))
            result["rows_ok"] = result["images"]
    result.update(wall_s=round(wall_s, 3), peak_rss_mib=peak_rss_mib,
                  process_cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
                  load_average_before=load_before, load_average_after=_load_average(),
                  ray_imported=ray_imported)
    if result.get("rows") and wall_s > 0:
        result["rows_per_s"] = round(result["rows"] / wall_s, 2)
    Path(result_file).write_text(json.dumps(result, default=str))


def _peak_rss_mib(usage) -> float:
    """This process's peak resident memory. Linux's ru_maxrss survives exec: a child forked from a big parent
    would report the parent's size, so read the high-water mark of this process image (VmHWM) where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(usage.ru_maxrss / 1024, 1)


def _image_times(out: str, started_epoch: float) -> dict:
    """When the first and last ok metadata rows were created (`created_at`; an actor stamps a shard's rows when it
    finishes rendering it, Ray Data each batch's): a view of start-up, and the steady rate in between."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from ray_render import storage
    from ray_render.output import layout

    fs, path = storage.open_fs(storage.join(out, layout.METADATA_DIR))
    if not fs.exists(path):
        return {}
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=["status", "created_at", "worker"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    if table.num_rows < 2:
        return {}
    spans = {}  # worker -> (first, last, images): each actor's own steady rate, free of start-up and tail
    for worker, created in zip(table.column("worker").to_pylist(), table.column("created_at").to_pylist()):
        first, last, count = spans.get(worker, (created, created, 0))
        spans[worker] = (min(first, created), max(last, created), count + 1)
    first = min(span[0] for span in spans.values()).timestamp()
    last = max(span[1] for span in spans.values()).timestamp()
    per_worker = [(count - 1) / (b - a).total_seconds() for a, b, count in spans.values() if b > a]
    return {"first_row_s": round(first - started_epoch, 3), "last_row_s": round(last - started_epoch, 3),
            "steady_rows_per_s": round((table.num_rows - 1) / (last - first), 2) if last > first else None,
            "workers": len(spans), "sum_worker_rows_per_s": round(sum(per_worker), 2)}


def _work_ray_render(manifest: str, out: str, model: str, actors: int, batch_size: int, shard_size: int,
                     **options) -> dict:
    from ray_render.config import JobConfig
    from ray_render.engine import driver

    job = JobConfig(manifests=[manifest], out=out, model=model, actors=actors, batch_size=batch_size,
                    shard_size=shard_size, progress=False, device="cpu", **options)
    summary = driver.run(job).to_dict()
    keep = ("exit_code", "state", "message", "rows_total", "rows", "images", "shards_total", "shards_resumed",
            "rows_this_run", "images_this_run", "startup_s", "render_s", "rendering_s", "plan_s", "actors_peak",
            "actors_timeline")
    result = {key: summary[key] for key in keep if key in summary}
    result["rows_ok"] = summary["rows"]["ok"]
    result["rows"] = summary["rows_this_run"]
    result["driver_wall_s"] = summary["wall_s"]
    result["own_ray"] = "RAY_ADDRESS" not in os.environ and not job.address  # it started a Ray of its own
    result["worker_niceness"] = os.environ.get("RAY_worker_niceness", "Ray's own")
    return result


def _work_ray_data(manifest: str, out: str, model: str, actors: int, batch_size: int, num_blocks: int,
                   **options) -> dict:
    from ray_render.tools import baselines

    baselines.ray_data_render(manifest, out, model, actors, batch_size, "png", num_blocks=num_blocks, device="cpu",
                              count=False, **options)
    import ray

    ray.shutdown()
    return {}


def _work_loop(manifest: str, out: str, model: str, shard_size: int, **options) -> dict:
    from ray_render.tools import baselines

    baselines.loop_render(manifest, out, model, shard_size=shard_size, device="cpu", count=False, **options)
    return {}


def _work_plan(manifest: str, shard_size: int) -> dict:
    from ray_render.engine.plan import plan as make_plan

    started = time.monotonic()
    plan = make_plan([manifest], shard_size)
    return {"plan_s": round(time.monotonic() - started, 4), "shards": len(plan.shards), "rows": plan.total_rows}


def _work_actor(manifest: str, out: str, model: str, batch_sizes: list[int], rows: int) -> dict:
    """One RenderActor in this process: a shard per batch size, then the bare model on the same requests."""
    from ray_render.config import JobConfig
    from ray_render.engine.actor import RenderActor
    from ray_render.engine.plan import plan as make_plan
    from ray_render.engine.rows import read_shard_rows, validate_rows

    job = JobConfig(manifests=[manifest], out=out, model=model, progress=False, device="cpu")
    plan = make_plan(job.manifests, rows)
    shards = plan.shards
    actor = RenderActor(job, 0, plan.passthrough_schema)
    actor.renderer.batch_size = max(batch_sizes)
    actor.render_shard(shards[-1], 1, "000000000000-0")  # warm-up: first calls allocate caches and load kernels
    measured = []
    for index, batch_size in enumerate(batch_sizes):
        shard = shards[index % (len(shards) - 1)]
        actor.renderer.batch_size = batch_size
        result = actor.render_shard(shard, 1, f"000000000000-{index + 1}")
        # The same requests through model.render alone: what the actor would do with free encoding and storage.
        rows_read = read_shard_rows(shard)
        tasks = validate_rows(rows_read, shard, model_defaults=actor.model.defaults(), job=job)
        requests = [request for task in tasks for request in task.requests()]
        bare = time.monotonic()
        for start in range(0, len(requests), batch_size):
            actor.model.render(requests[start:start + batch_size])
        bare_s = time.monotonic() - bare
        wall_s = result.wall_ms / 1000.0
        measured.append({
            "batch_size": batch_size, "images": result.images, "actor_wall_s": round(wall_s, 3),
            "images_per_s": round(result.images / wall_s, 2), "model_s": round(result.render_ms / 1000.0, 3),
            "model_share": round(result.render_ms / result.wall_ms, 4), "bare_model_s": round(bare_s, 3),
            "bare_images_per_s": round(len(requests) / bare_s, 2),
            "bare_model_share": round(bare_s / wall_s, 4)})
    return {"model_info": actor.info(), "results": measured, "rows": rows}


def _work_gpu(batch_sizes: list[int], rows: int, steps: int, side: int) -> dict:
    from ray_render.models.nextstep.bench import cuda_available, measure_batching

    if not cuda_available():
        return {"skipped": True, "reason": "no CUDA device: torch.cuda.is_available() is False on this machine"}

    result = measure_batching(batch_sizes, rows=rows, steps=steps, model="large-random", device="cuda",
                              width=side, height=side)
    return {"skipped": False, **result}


def _work_decode(layers: int, blocks: int, steps: int, batch: int, side: int, repeat: int) -> dict:
    from ray_render.models.nextstep.bench import measure_decode

    return measure_decode(layers=layers, blocks=blocks, steps=steps, batch=batch, side=side, repeat=repeat)


_CHILD_WORK = {"ray-render": _work_ray_render, "ray-data": _work_ray_data, "loop": _work_loop, "plan": _work_plan,
               "actor": _work_actor, "decode": _work_decode, "gpu": _work_gpu}


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def make_manifest(path: Path, rows: int, *, prompt: str = "a {} on a plain background, variation {}",
                  row_group_size: int = 1000) -> str:
    """A one-file manifest of `rows` distinct prompts with ids r0, r1, ...; reused when it already exists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    things = ["red cube", "blue sphere", "green cone", "yellow star", "white cat", "black dog", "tall tree"]
    ids = [f"r{i}" for i in range(rows)]
    prompts = [prompt.format(things[i % len(things)], i) for i in range(rows)]
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)
    return str(path)


TRASH_DIR = "_trash"  # under the work directory: outputs to delete when the bench is over (see the docstring)


def _fresh(path: Path) -> str:
    """An empty output directory at `path`; a leftover there (an earlier bench in the same --work-dir) is moved
    aside, not deleted now."""
    if path.exists():
        trash = path.parent / TRASH_DIR
        trash.mkdir(exist_ok=True)
        path.rename(trash / f"{path.name}-{time.time_ns()}")
    return str(path)


def _remove_outputs(work: Path) -> None:
    """Delete every output the suites wrote under `work` (the manifests stay, for the next bench to reuse)."""
    for path in [*work.glob("*-out"), work / TRASH_DIR]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Suites


def _compare(work: Path, name: str, contenders: dict[str, dict], repeat: int, rows: int) -> dict:
    """Run each contender `repeat` times, in turn; per contender the median figures, per round the ratios."""
    rounds = []
    for round_index in range(repeat):
        figures = {}
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))  # cancels load trends
        for contender in order:
            spec = dict(contenders[contender])
            kind = spec.pop("work", contender)  # which _CHILD_WORK runs it: the contender's name unless given
            out = _fresh(work / f"{name}-{contender}-{round_index + 1}-out")
            result = _child(f"{kind}:{name}" if kind == contender else f"{kind}:{name}-{contender}", work, out=out,
                            **spec)
            if result.get("rows_ok") != rows:
                raise RuntimeError(f"{name}: {contender} rendered {result.get('rows_ok')} of {rows} rows ok; see "
                                   f"{work}/{contender}:{name}.log")
            figures[contender] = result
        rounds.append(figures)
    merged = {}
    for contender in contenders:
        runs = [r[contender] for r in rounds]
        median_run = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run, whole
        merged[contender] = {**median_run, "wall_s_runs": [r["wall_s"] for r in runs]}
    return {"rounds": rounds, "contenders": merged}


def _ratio(rounds: list[dict], a: str, b: str) -> float:
    return round(statistics.median(r[a]["rows_per_s"] / r[b]["rows_per_s"] for r in rounds), 3)


def _three_way(work: Path, suite: str, model: str, sizes: dict, repeat: int) -> dict:
    """ray-render, Ray Data and the one-process loop on the same manifest and model; ratios are ray-render's rows/s
    over each of the others'."""
    rows, shard_size, batch_size = sizes["rows"], sizes["shard_size"], sizes["batch_size"]
    manifest = make_manifest(work / f"prompts-{rows}.parquet", rows, row_group_size=shard_size)
    shards = -(-rows // shard_size)
    common = {"manifest": manifest, "model": model}
    contenders = {"ray-render": {**common, "actors": ACTORS, "batch_size": batch_size, "shard_size": shard_size,
                                 "report": False},  # the same work as the others: images and metadata
                  "ray-data": {**common, "actors": ACTORS, "batch_size": batch_size, "num_blocks": shards},
                  "loop": {**common, "shard_size": shard_size}}
    compared = _compare(work, suite, contenders, repeat, rows)
    ratios = {"ray-render/ray-data": _ratio(compared["rounds"], "ray-render", "ray-data"),
              "ray-render/loop": _ratio(compared["rounds"], "ray-render", "loop")}
    return {"params": {"rows": rows, "model": model, "size": "64x64", "format": "png", "actors": ACTORS,
                       "batch_size": batch_size, "shard_size": shard_size, "ray_data_blocks": shards,
                       "output": "local disk", "repeat": repeat},
            **compared, "ratios": ratios}


def suite_orchestration(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """Placeholder model, 64x64 PNG, 2 actors, local output: ray-render vs Ray Data vs a one-process loop."""
    result = _three_way(work, "orchestration", "placeholder", sizes, repeat)
    return {**result, "goal_met": result["ratios"]["ray-render/ray-data"] >= 1.5}


def suite_model(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """Tiny NextStep model, 2 actors: ray-render vs Ray Data (same model code) vs one prompt at a time."""
    result = _three_way(work, "model", "tiny", sizes, repeat)
    ratios = result["ratios"]
    return {**result, "goal_met": ratios["ray-render/loop"] >= 3.0 and ratios["ray-render/ray-data"] >= 1.2}


def suite_driver_scale(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """Plan and dispatch N rows with the real driver, pool and actors; compare the driver's peak RSS with a run of
    `base_rows`. Every prompt carries `[placeholder:invalid]`, so each row is read, validated and turned into a
    request, which the placeholder model declines (`check` raises RowError): the row ends `invalid` in its
    shard's metadata and no image is drawn or stored. The driver's work (plan, dispatch, results, commits) is the
    same as for rendered rows; the actors' is validation and metadata only."""
    rows, base_rows, shard_size = sizes["rows"], sizes["base_rows"], sizes["shard_size"]
    prompt = "[placeholder:invalid] a {} on a plain background, variation {}"
    runs = {}
    for label, count in (("base", base_rows), ("large", rows)):
        manifest = make_manifest(work / f"declined-{count}.parquet", count, prompt=prompt, row_group_size=shard_size)
        planned = _child(f"plan:{label}", work, manifest=manifest, shard_size=shard_size)
        out = _fresh(work / f"driver-scale-{label}-out")
        result = _child(f"ray-render:driver-scale-{label}", work, manifest=manifest, out=out, model="placeholder",
                        actors=ACTORS, batch_size=64, shard_size=shard_size)
        if result["rows_this_run"] != count or result["rows"] != count:
            raise RuntimeError(f"driver_scale: the {count}-row run finished {result['rows_this_run']} rows")
        runs[label] = {"rows": count, "shards": planned["shards"], "peak_rss_mib": result["peak_rss_mib"],
                       "plan_s": result.get("plan_s", planned["plan_s"]), "plan_only_s": planned["plan_s"],
                       "plan_only_peak_rss_mib": planned["peak_rss_mib"], "wall_s": result["wall_s"],
                       "rows_per_s": result["rows_per_s"], "startup_s": result["startup_s"],
                       "plan_s_source": "driver summary" if "plan_s" in result else "manifest.plan() timed alone"}
    ratio = round(runs["large"]["peak_rss_mib"] / runs["base"]["peak_rss_mib"], 3)
    return {"params": {"rows": rows, "base_rows": base_rows, "shard_size": shard_size, "actors": ACTORS,
                       "model": "placeholder, every row declined ([placeholder:invalid]): no images"},
            "runs": runs, "ratios": {"peak_rss large/base": ratio}, "goal_met": ratio <= 1.3}


def suite_resume(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """Render a job, then run the same command again: the rerun must find every shard committed and stop."""
    rows, shard_size, batch_size = sizes["rows"], sizes["shard_size"], sizes["batch_size"]
    manifest = make_manifest(work / f"prompts-{rows}.parquet", rows, row_group_size=shard_size)
    out = _fresh(work / "resume-out")
    spec = {"manifest": manifest, "out": out, "model": "placeholder", "actors": ACTORS, "batch_size": batch_size,
            "shard_size": shard_size}
    first = _child("ray-render:resume-first", work, **spec)
    again = _child("ray-render:resume-again", work, **spec)
    if first["rows_ok"] != rows or again["shards_resumed"] != first["shards_total"] or again["rows_this_run"]:
        raise RuntimeError(f"resume: the rerun did not resume every shard: {again}")
    ratio = round(again["wall_s"] / first["wall_s"], 4)
    return {"params": {**{k: v for k, v in spec.items() if k not in ("manifest", "out")}, "rows": rows},
            "first": first, "rerun": again,
            "ratios": {"rerun/first wall": ratio,
                       "rerun/first process": round(again["process_s"] / first["process_s"], 4)},
            "rerun_started_ray": again["ray_imported"], "goal_met": ratio < 0.05 and not again["ray_imported"]}


def suite_actor(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """One RenderActor (in a process of its own, no Ray) renders a shard at each batch size with the tiny model;
    encoding and storage run on its upload threads while the model renders the next batch."""
    rows = max(sizes["rows"], max(ACTOR_BATCH_SIZES))
    manifest = make_manifest(work / f"prompts-actor-{rows}x{len(ACTOR_BATCH_SIZES) + 1}.parquet",
                             rows * (len(ACTOR_BATCH_SIZES) + 1), row_group_size=rows)
    out = _fresh(work / "actor-out")
    result = _child("actor", work, manifest=manifest, out=out, model="tiny", batch_sizes=list(ACTOR_BATCH_SIZES),
                    rows=rows)
    worst = min(r["model_share"] for r in result["results"])
    return {"params": {"model": "tiny", "rows_per_batch_size": rows, "batch_sizes": list(ACTOR_BATCH_SIZES),
                       "device": "cpu"},
            "results": result["results"], "model_info": result["model_info"],
            "ratios": {"min model share": worst}, "goal_met": worst >= 0.9}


def suite_decode(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """One process builds the same random deep-narrow model twice, eager and compiled, renders the same batch
    with each, in turn, and reports both (a compile happens once, before the timed rounds)."""
    result = _child("decode", work, **sizes, repeat=max(3, repeat))
    met = result["ratios"]["per image"] >= 5.0 and result["image_diff"]["p99"] <= 2
    return {"params": {**sizes, "model": "random, NextStep-1-Large depth at tiny widths", "device": "cpu"},
            **result, "goal_met": met}


def suite_gpu(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """The full-size architecture (random bf16 weights) at several batch sizes, when a CUDA device is present."""
    result = _child("gpu", work, batch_sizes=list(GPU_BATCH_SIZES), rows=sizes["rows"], steps=sizes["steps"],
                    side=sizes["side"])
    return {"params": {"model": "large-random (NextStep-1-Large sizes, random bf16 weights)",
                       "batch_sizes": list(GPU_BATCH_SIZES), "rows": sizes["rows"], "steps": sizes["steps"],
                       "size": f"{sizes['side']}x{sizes['side']}"},
            **result, "goal_met": None}


def _ready_actor_s(figures: dict) -> float:
    """Actor-seconds of ready actors during the rendering phase, from the pool's timeline of ready actors (seconds
    since the pool started: actors ready). Rendering starts with the first ready actor."""
    timeline = figures["actors_timeline"]
    end = timeline[0][0] + figures["rendering_s"]
    moments = [min(at, end) for at, _ in timeline[1:]] + [end]
    return sum(count * (until - at) for (at, count), until in zip(timeline, moments))


# The tail's actors sleep rather than compute: a CPU share small enough that all of them fit on any machine.
TAIL_CPUS_PER_ACTOR = 0.1


def tail_manifest(work: Path, rows: int, row_s: float) -> str:
    """The tail suite's manifest (also benchmarks/tail_cpu.py's): `rows` placeholder rows that sleep `row_s` each."""
    prompt = f"[placeholder:sleep={row_s}] a {{}} on a plain background, variation {{}}"
    return make_manifest(work / f"slow-rows-{rows}.parquet", rows, prompt=prompt, row_group_size=1000)


def suite_tail(work: Path, sizes: dict, repeat: int = 1) -> dict:
    """Rows that each take `row_s` in the model, on `actors` actors: the default shard sizes against fixed shards
    of 1,000 rows, each run a `ray-render run` with its own Ray and Ray's worker niceness (OWN_RAY). Efficiency is
    the model time summed over actors over (actors x the rendering phase): 1.0 when every actor renders from the
    first ready actor to the last row, lower for every actor-second spent idle in the tail or on overhead. The ready
    utilisation leaves out the actors still loading their model: model time over the actor-seconds of ready actors,
    what an idle GPU costs."""
    rows, actors = sizes["rows"], sizes["actors"]
    manifest = tail_manifest(work, rows, sizes["row_s"])
    common = {"work": "ray-render", "manifest": manifest, "model": "placeholder", "actors": actors,
              "batch_size": sizes["batch_size"], "cpus_per_actor": TAIL_CPUS_PER_ACTOR, "report": False}
    contenders = {"default": {**common, "shard_size": None}, "fixed-1000": {**common, "shard_size": 1000}}
    compared = _compare(work, "tail", contenders, repeat, rows)
    for figures in [*(r for round_ in compared["rounds"] for r in round_.values()),
                    *compared["contenders"].values()]:
        figures["efficiency"] = round(figures["render_s"] / (actors * figures["rendering_s"]), 3)
        figures["ready_utilisation"] = round(figures["render_s"] / _ready_actor_s(figures), 3)
        timeline = figures["actors_timeline"]  # what the efficiency loses that the utilisation does not
        figures["ready_spread_s"] = round(timeline[-1][0] - timeline[0][0], 1)
    efficiency = {name: statistics.median(r[name]["efficiency"] for r in compared["rounds"]) for name in contenders}
    utilisation = {name: statistics.median(r[name]["ready_utilisation"] for r in compared["rounds"])
                   for name in contenders}
    return {"params": {"rows": rows, "actors": actors, "row_s": sizes["row_s"], "batch_size": sizes["batch_size"],
                       "model": "placeholder", "repeat": repeat},
            **compared, "ratios": {**{f"efficiency {name}": value for name, value in efficiency.items()},
                                   **{f"ready utilisation {name}": value for name, value in utilisation.items()}},
            "goal_met": efficiency["default"] >= 0.9}


SUITES = {"orchestration": suite_orchestration, "model": suite_model, "driver_scale": suite_driver_scale,
          "resume": suite_resume, "actor": suite_actor, "tail": suite_tail, "decode": suite_decode,
          "gpu": suite_gpu}


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(v) if not isinstance(v, str) else v for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_suite(name: str, result: dict) -> str:
    """A suite's result as a plain-text table, the goal and whether it was met."""
    if "error" in result:
        body = f"error: {result['error']}"
    elif name in ("orchestration", "model"):
        body = _table(["contender", "rows", "wall s", "rows/s", "peak RSS MiB", "ratio"],
                      [[c, r["rows"], r["wall_s"], r["rows_per_s"], r["peak_rss_mib"],
                        "1.00x" if c == "ray-render" else f"{result['ratios'][f'ray-render/{c}']:.2f}x"]
                       for c, r in result["contenders"].items()])
        body += "\n(ratio: ray-render's rows/s over the contender's, median of rounds)"
    elif name == "driver_scale":
        body = _table(["run", "rows", "shards", "plan s", "wall s", "peak RSS MiB"],
                      [[label, r["rows"], r["shards"], f"{r['plan_s']:.3f}", r["wall_s"], r["peak_rss_mib"]]
                       for label, r in result["runs"].items()])
        body += f"\npeak RSS large/base: {result['ratios']['peak_rss large/base']:.3f}x"
    elif name == "resume":
        body = _table(["run", "rows rendered", "wall s", "process s", "Ray started"],
                      [["first", result["first"]["rows_this_run"], result["first"]["wall_s"],
                        result["first"]["process_s"], "yes"],
                       ["rerun", result["rerun"]["rows_this_run"], result["rerun"]["wall_s"],
                        result["rerun"]["process_s"], "yes" if result["rerun_started_ray"] else "no"]])
        body += f"\nrerun/first: {100 * result['ratios']['rerun/first wall']:.2f}% of the wall time"
    elif name == "actor":
        body = _table(["batch", "images", "actor s", "images/s", "model share", "bare model images/s",
                       "bare-model share"],
                      [[r["batch_size"], r["images"], r["actor_wall_s"], r["images_per_s"],
                        f"{100 * r['model_share']:.1f}%", r["bare_images_per_s"],
                        f"{100 * r['bare_model_share']:.1f}%"] for r in result["results"]])
        body += ("\n(model share: time inside model.render / actor wall time; bare-model share: the same requests "
                 "rendered by the model alone / actor wall time)")
    elif name == "decode":
        modes = [(mode, result[mode]) for mode in ("eager", "compiled")]
        body = _table(["mode", "ms/token step", "cpu ms/step", "ops/step", "s/image", "first call s"],
                      [[mode, f"{r['ms_per_token_step']:.2f}", f"{r['cpu_ms_per_token_step']:.2f}",
                        r["ops_per_token_step"], f"{r['s_per_image']:.3f}", r["first_call_s"]] for mode, r in modes])
        diff = result["image_diff"]
        ratios = result["ratios"]
        body += (f"\ncompiled/eager: {ratios['per image']:.2f}x per image, {ratios['token step']:.2f}x per token "
                 f"step; images differ by at most {diff['max']} (p99 {diff['p99']:.0f})")
    elif name == "tail":
        body = _table(["shard sizes", "shards", "actors peak", "rendering s", "model s (sum)", "efficiency",
                       "ready utilisation", "actors ready over s"],
                      [[c, r["shards_total"], r.get("actors_peak"), r["rendering_s"], r["render_s"],
                        f"{r['efficiency']:.2f}", f"{r['ready_utilisation']:.2f}", r.get("ready_spread_s")]
                       for c, r in result["contenders"].items()])
        body += ("\n(efficiency: model time summed over actors / (actors x rendering phase); ready utilisation: "
                 "model time / actor-seconds of ready actors; actors ready over: from the first ready to the last)")
    elif name == "gpu":
        if result.get("skipped"):
            body = f"SKIPPED: {result['reason']}"
        else:
            body = _table(["batch", "images", "seconds", "images/s", "speedup"],
                          [[r["batch_size"], r["images"], r["seconds"], r["images_per_s"], f"{r['speedup']:.2f}x"]
                           for r in result["results"]])
    else:
        body = json.dumps(result, indent=2, default=str)
    met = result.get("goal_met")
    verdict = "n/a" if met is None else ("MET" if met else "MISSED")
    return f"== {name}: goal {GOALS[name]}: {verdict}\n{body}\n"


def machine() -> dict:
    """What the figures were measured on."""
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": memory, "platform": platform.platform(),
            "python": platform.python_version(), "ray": version("ray"), "torch": version("torch"),
            "pyarrow": version("pyarrow"), "ray_render": version("ray-render"), "git_commit": commit,
            "load_average": _load_average()}


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    """Add the `bench` subcommand to ray-render's command line."""
    parser = subparsers.add_parser(
        "bench", help="measure throughput, driver memory, resume cost and actor efficiency",
        description="Run benchmark suites side by side against their baselines; print tables, write JSON.",
        epilog="suites: " + ", ".join(f"{name} ({GOALS[name]})" for name in ALL_SUITES))
    parser.add_argument("--suite", default=",".join(CPU_SUITES),
                        help=f"comma-separated suites out of {', '.join(ALL_SUITES)} (default: every CPU suite; "
                             f"'all' adds gpu)")
    parser.add_argument("--out", default="bench-results", help="directory for <suite>.json and summary.json "
                        "(default: bench-results)")
    parser.add_argument("--rows", type=int, help="rows of each suite's main run instead of the issue's sizes")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, figures mean nothing")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of each comparison; ratios are the median of "
                        "the rounds' ratios (default: 1)")
    parser.add_argument("--work-dir", dest="work_dir", help="where manifests and outputs go (default: a temporary "
                        "directory, removed afterwards)")
    parser.add_argument("--cluster", choices=("shared", "per-run"), default="shared",
                        help="shared (default): one local Ray started by the bench, every contender connects to it "
                             "as `ray job submit` jobs do; per-run: each contender starts and stops its own local "
                             "Ray, so its wall time includes Ray's start-up")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.set_defaults(handler=main)


def _start_shared_cluster() -> str:
    """Start a local Ray for one suite (no dashboard: it would only take CPU from the contenders); children
    reach it through RAY_ADDRESS, as jobs on a standing cluster do. Returns its address."""
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    return address


def _stop_shared_cluster() -> None:
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _suites(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(ALL_SUITES)
    unknown = [name for name in names if name not in ALL_SUITES]
    if unknown or not names:
        raise ValueError(f"--suite must be a comma-separated list of {', '.join(ALL_SUITES)} (or 'all'), "
                         f"got {text!r}")
    return names


def main(args: argparse.Namespace) -> int:
    """Run the chosen suites; print a table per suite; write the JSON files. Exit 0, or 1 on an error (or, with
    --check, a missed goal)."""
    try:
        names = _suites(args.suite)
    except ValueError as exc:
        print(f"ray-render bench: error: {exc}", file=sys.stderr)
        return 2
    if args.repeat < 1 or (args.rows is not None and args.rows < 1):
        print("ray-render bench: error: --repeat and --rows must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    niceness_before = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = WORKER_NICENESS  # read by every Ray the bench or its children start
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ray-render-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes_table = QUICK if args.quick else FULL
    summary = {"command": shlex.join(["ray-render"] + sys.argv[1:]),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
               "repeat": args.repeat, "machine": machine(), "goals": {n: GOALS[n] for n in names}, "suites": {}}
    failed = missed = False
    summary["cluster"] = args.cluster
    summary["ray_worker_niceness"] = int(WORKER_NICENESS)
    try:
        for name in names:
            sizes = dict(sizes_table[name])
            if args.rows is not None:
                sizes["rows"] = args.rows
            print(f"-- {name}: {', '.join(f'{k} {v:,}' for k, v in sizes.items())} ...", flush=True)
            started = time.monotonic()
            try:
                if name in OWN_RAY:  # the niceness this machine's runs get
                    _set_env("RAY_worker_niceness", niceness_before)
                elif args.cluster == "shared" and name not in WITHOUT_RAY:
                    # A fresh one per suite: what earlier suites left in the cluster must not weigh on this one.
                    _start_shared_cluster()
                result = SUITES[name](work, sizes, args.repeat)
            except Exception as exc:  # noqa: BLE001 - one broken suite must not hide the others' figures
                failed = True
                result = {"error": f"{type(exc).__name__}: {exc}", "goal_met": False}
            finally:
                if name in OWN_RAY:
                    os.environ["RAY_worker_niceness"] = WORKER_NICENESS
                elif args.cluster == "shared" and name not in WITHOUT_RAY:
                    _stop_shared_cluster()
            result = {"suite": name, "goal": GOALS[name], "sizes": sizes,
                      "suite_s": round(time.monotonic() - started, 1), **result}
            missed |= result.get("goal_met") is False
            summary["suites"][name] = result
            (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
            print(format_suite(name, result), flush=True)
    finally:
        _set_env("RAY_worker_niceness", niceness_before)
        summary["machine"]["load_average_end"] = _load_average()
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _remove_outputs(work)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"results: {out}/summary.json and one JSON per suite")
    if failed:
        return 1
    return 1 if args.check and missed else 0


if __name__ == "__main__":  # a contender process started by _child
    _child_main(sys.argv[1], sys.argv[2])
