"""A manifest's rows indexed without loading a model: what `ray-render refresh` compares with an output's metadata.

Each row becomes a `RowIndex`: its row number, its id, `RowTask.fingerprint` (None for an invalid row), the
fingerprint of its passthrough values and, for an invalid row, its error. The rows are read and validated by
`rows.validate_rows`, the very function a render actor runs on its shard, given the model's render defaults from
its description (`models.describe_model`: the snapshot's config and files, no weights), so the fingerprints equal
those a render writes into the metadata.

Where it runs: a manifest of up to DRIVER_ROWS rows in the driver itself (threads overlap the reads), since
starting a worker process costs more than validating that many rows (about 25 us a row); a larger one in light Ray
tasks on the driver's node that ask for no CPU. The shipped cluster files give the head no CPUs for work and scale
GPU workers from zero: a task asking for a CPU would make the autoscaler start a GPU node just to validate rows. At
most TASKS run at once, each over consecutive plan shards of about TASK_ROWS rows, and each returns only the small
index entries (or, for the rows a refresh updates in place, their passthrough values), so the rows' prompts stay
out of the driver.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from ray_render.config import JobConfig
from ray_render.engine.plan import ManifestError, Shard
from ray_render.engine.rows import RowTask, read_shard_rows, validate_rows
from ray_render.engine.summary import JobAborted

DRIVER_ROWS = 20_000  # at most this many rows are indexed in the driver: about half a second's work
DRIVER_THREADS = 8  # ... by this many threads, each reading and validating a shard
TASK_ROWS = 10_000  # rows per task: a fraction of a second of reading and validating, against a task's overhead
TASKS = max(1, min(8, os.cpu_count() or 1))  # tasks at once: worker processes on the driver's node
WAIT_S = 1.0  # a wait returns this often, so that a stop signal is handled while tasks run


class RowIndex(NamedTuple):
    """One manifest row as a refresh compares it."""

    row_index: int  # 0-based row in its manifest file
    id: str
    fingerprint: str | None  # RowTask.fingerprint; None: the row is invalid
    passthrough_fingerprint: str  # rows.passthrough_fingerprint of its passthrough values
    error: str | None  # why the row is invalid


def index_shard(shard: Shard, model_defaults: dict, job: JobConfig) -> list[RowIndex]:
    """The RowIndex of every row of `shard`, in order, validated with `model_defaults` as a render would."""
    checked = validate_rows(read_shard_rows(shard, job.storage_options), shard, model_defaults=model_defaults, job=job)
    return [RowIndex(item.row_index, item.id, item.fingerprint, item.passthrough_fingerprint, None)
            if isinstance(item, RowTask) else
            RowIndex(item.row_index, item.id, None, item.passthrough_fingerprint, item.error)
            for item in checked]


def passthrough_values(shard: Shard, model_defaults: dict, job: JobConfig) -> dict[str, tuple[dict, str]]:
    """id -> (passthrough values, their fingerprint) of the rows of `shard`."""
    rows = validate_rows(read_shard_rows(shard, job.storage_options), shard, model_defaults=model_defaults, job=job)
    return {item.id: (item.passthrough, item.passthrough_fingerprint) for item in rows}


def index_manifest(shards: list[Shard], model_defaults: dict, job: JobConfig) -> dict[str, list[RowIndex]]:
    """Shard id -> the RowIndex of each of its rows, for every shard given (see the module docstring)."""
    results = _run(shards, model_defaults, job, index_shard)
    return {shard.shard_id: result for shard, result in zip(shards, results)}


def read_passthrough(shards: list[Shard], model_defaults: dict, job: JobConfig) -> dict[str, tuple[dict, str]]:
    """id -> (passthrough values, fingerprint) of the rows of `shards` (shards holding only the rows wanted)."""
    found: dict[str, tuple[dict, str]] = {}
    for result in _run(shards, model_defaults, job, passthrough_values):
        found.update(result)
    return found


def _one_task(work: Callable, shards: list[Shard], model_defaults: dict, job: JobConfig) -> list:
    return [work(shard, model_defaults, job) for shard in shards]


def _run(shards: list[Shard], model_defaults: dict, job: JobConfig, work: Callable) -> list:
    """`work(shard, model_defaults, job)` for every shard, in the driver or in tasks (see the module docstring);
    results in order."""
    if sum(shard.num_rows for shard in shards) <= DRIVER_ROWS:
        with ThreadPoolExecutor(max_workers=DRIVER_THREADS, thread_name_prefix="index") as threads:
            return list(threads.map(lambda shard: work(shard, model_defaults, job), shards))
    return _run_in_tasks(shards, model_defaults, job, work)


def _run_in_tasks(shards: list[Shard], model_defaults: dict, job: JobConfig, work: Callable) -> list:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    task = ray.remote(_one_task).options(num_cpus=0, scheduling_strategy=here, name="ray_render.index_rows")
    groups = _groups(shards)
    results: list = [None] * len(groups)
    waiting = list(enumerate(groups))[::-1]  # popped from the end: first group first
    running: dict = {}
    try:
        while waiting or running:
            while waiting and len(running) < TASKS:
                position, group = waiting.pop()
                running[task.remote(work, group, model_defaults, job)] = position
            done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
            for ref in done:
                results[running.pop(ref)] = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
        if isinstance(cause, ManifestError):
            raise cause from None
        raise JobAborted(f"could not read the manifest rows: {type(cause).__name__}: {cause}") from None
    finally:
        for ref in running:
            ray.cancel(ref)
    return [result for group_results in results for result in group_results]


def _groups(shards: list[Shard]) -> list[list[Shard]]:
    """Consecutive shards in groups of at least TASK_ROWS rows (the last one may hold fewer); a shard is not cut."""
    groups: list[list[Shard]] = [[]]
    rows = 0
    for shard in shards:
        if rows >= TASK_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(shard)
        rows += shard.num_rows
    return [group for group in groups if group]
