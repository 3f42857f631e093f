"""`ray-render preview MANIFEST... --out DIR --sample N`: render N rows sampled across the whole manifest, with the
job's settings, into DIR (contact sheet and report included): does it look right before the big run?

The sample is stratified: rows are grouped by their resolved size and their preset (and the invalid rows apart),
each group gets a share of N in proportion to its rows (at least one each, largest groups first when N is smaller
than the number of groups), and a group's rows are picked evenly spaced through the manifest. The same manifest and
N always pick the same rows. They render as ordinary shards that hold only the sampled rows (`Shard.rows`, as a
refresh's generation shards do), so `source_file` and `source_row` in the metadata name the rows sampled, and the
job resumes like any other (a different sample into the same DIR is another job).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import plan as planning
from ray_render.engine.forecast import row_settings
from ray_render.engine.summary import Summary
from ray_render.models import describe_model
from ray_render.models.base import ModelDescription


def run(job: JobConfig, sample: int) -> Summary:
    """Render a stratified sample of `sample` rows of `job`'s manifests into `job.out`; returns the Summary."""
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"--sample must be a whole number >= 1, got {sample!r}")
    return driver.run(job, select=lambda plan: sample_plan(plan, job, sample))


def sample_plan(plan: planning.Plan, job: JobConfig, sample: int) -> planning.Plan:
    """`plan` cut down to the sampled rows: the shards that hold any, each with only those rows."""
    model = _describe(job)
    groups: dict[tuple, list[tuple[int, int]]] = {}  # stratum -> [(shard position, row), ...] in plan order
    for position, row, params, preset in row_settings(plan, job, model):
        key = ("invalid",) if params is None else (params["width"], params["height"], preset)
        groups.setdefault(key, []).append((position, row))
    picked: dict[int, list[int]] = {}
    for key, count in allocate({key: len(rows) for key, rows in groups.items()}, sample).items():
        rows = groups[key]
        for k in range(count):
            position, row = rows[(2 * k + 1) * len(rows) // (2 * count)]  # evenly spaced, centred in each stretch
            picked.setdefault(position, []).append(row)
    shards = [replace(shard, rows=tuple(sorted(picked[position])))
              for position, shard in enumerate(plan.shards) if position in picked]
    digest = hashlib.sha256(json.dumps({"plan": plan.fingerprint, "sample": sample}).encode()).hexdigest()
    return replace(plan, shards=shards, total_rows=sum(shard.num_rows for shard in shards), fingerprint=digest)


def allocate(sizes: dict, total: int) -> dict:
    """How many rows each group gives to a sample of `total` (at most all rows): in proportion to its size, by
    largest remainder, at least one for every group while there are enough, the largest groups first."""
    total = min(total, sum(sizes.values()))
    order = sorted(sizes, key=lambda key: (-sizes[key], str(key)))
    if total < len(order):
        return {key: 1 for key in order[:total]}
    rows = sum(sizes.values())
    share = {key: max(1, sizes[key] * total // rows) for key in order}
    while sum(share.values()) > total:  # the minimum of one pushed it over: take back from the largest
        largest = max((key for key in order if share[key] > 1), key=lambda key: share[key])
        share[largest] -= 1
    remainders = sorted(order, key=lambda key: -(sizes[key] * total / rows - share[key]))
    while sum(share.values()) < total:  # ends: total is at most all rows
        for key in remainders:
            if sum(share.values()) < total and share[key] < sizes[key]:
                share[key] += 1
    return share


def _describe(job: JobConfig) -> ModelDescription:
    """The model's defaults, to resolve each row's size; a plugin that cannot say groups rows by their own columns."""
    try:
        return describe_model(job.model, **job.model_options())
    except ValueError:
        return ModelDescription(name=job.model, family="unknown", revision=None, defaults={}, down_factor=16,
                                context_length=None, source="the manifest's own columns")
