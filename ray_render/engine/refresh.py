"""`ray-render refresh MANIFEST --out URI`: bring an existing output up to date with a manifest, rendering only
the rows that are new or whose render settings changed.

How a refresh works (every step is recomputed from the output itself, so a rerun after a crash finishes the job,
and a second refresh of the same manifest renders nothing):

1. Plan the manifest (Parquet footers only), take the output's lease (the session also removes what crashed
   attempts left), and start the actor pool. The model's revision and its parameter defaults come from the loaded
   model (the actors' `info()` / `defaults()`), never from rendering, so a new model snapshot counts as a change.
2. Index the output: the metadata of every committed shard, read for `id`, `status`, `row_fingerprint`,
   `model_revision`, `error` only (no image is read back). Shards of a refresh are named
   `g<generation>-<plan shard id>` (plain runs are generation 0). An id's *current* rows are those in the newest
   shard holding it; rows of the same id in older shards are stale (a crashed refresh left them) and go in step 6.
3. Index the manifest: each actor validates its shards' rows (`RenderActor.index_shard`) and returns
   (row, id, `RowTask.fingerprint`, error): the fingerprint hashes the prompt, every resolved render parameter and
   the seed, so it changes exactly when the row's images would. Ids must be unique across the manifest.
4. Compare. A row is unchanged when its current rows are all `ok` with its fingerprint and this model's revision
   (or, for a row that is invalid, `invalid` with the same error), and the job-level settings that decide pixels
   (`config.JOB_PIXEL_SETTINGS`: model, format, dtype, --min-quality ...) and the model (family, revision, dtype, device
   type) equal the job record's. Anything else in the manifest is to render: new ids, changed rows, rows that
   failed before, ids that come back after being removed. Ids in the output but not in the manifest are removed.
5. Render the rows to render as generation N = (highest generation in the output) + 1: one shard
   `gNNNN-<plan shard id>` per plan shard that has such rows, holding only those rows (`Shard.rows`). These are
   ordinary shards: attempts under their own names, committed in the commit log and then published as
   `metadata/<shard>.parquet`, retries and straggler handling as in `run`. Images of unchanged rows stay where they
   are.
6. Supersede: rewrite each older metadata file (one atomic write per file) without the rows of ids that now have
   newer rows, and with the rows of removed ids set to status `removed`. Their images are deleted first (stale
   rows), and, with --prune, the images of removed rows too (their `image_uri` becomes null); without --prune a
   removed row keeps its image and its `image_uri`. Files whose schema differs from the new one (a passthrough
   column added or dropped, quality columns turned on) are rewritten to the union schema, so `metadata/` still
   reads as one dataset. A shard that lost every row keeps an empty metadata file and its commit.
7. Write the job record (the new plan, the settings, the model, `refresh` with this generation's counts) and the
   summary. A record with `refresh` makes `ray-render run` refuse the output: its shards no longer follow one plan.

Afterwards `pyarrow.dataset.dataset(root + "/metadata")` holds exactly one current row per (id, image) of the
manifest plus the `removed` rows. While a refresh runs, readers may briefly see a changed id twice (between a
generation shard's commit and step 6) or a stale row whose image is already gone; read after it finishes.

A crash anywhere is safe: uncommitted shards are orphans removed by the next attempt; committed generation shards
are current rows (unchanged next time); an older file not yet rewritten still holds stale rows, which step 6 of
the next attempt drops (images are deleted before the file that lists them is rewritten, so no image is left
without a row that names it). Unchanged rows keep their metadata row exactly as it was written (including
`source_row` and passthrough values); change a render setting, or run with --overwrite, to rewrite them.

Costs: one read of the output's metadata (five small columns), one validation pass over the manifest on the
actors, and the model load, which a refresh with nothing to render pays too.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pyarrow as pa

from ray_render import storage
from ray_render.config import JOB_PIXEL_SETTINGS, ConfigError, JobConfig
from ray_render.engine import manifests
from ray_render.engine import plan as planning
from ray_render.engine.driver import job_record, same_model
from ray_render.engine.session import JobAborted, RunSession
from ray_render.engine.summary import Summary
from ray_render.output import commits, layout, record
from ray_render.output.schema import REMOVED, metadata_schema, reserved_columns

log = logging.getLogger("ray_render")

# Job settings that decide the pixels but are not part of a row's fingerprint: a change re-renders every row.
INDEX_COLUMNS = ["id", "image_index", "status", "error", "row_fingerprint", "model_revision", "image_uri", "format"]
IO_THREADS = 16

_GENERATION_RE = re.compile(r"g(\d+)-")


def generation_of(shard_id: str) -> int:
    """The refresh generation that wrote a shard: N for `gNNNN-...`, 0 for a plain run's shard."""
    match = _GENERATION_RE.match(shard_id)
    return int(match.group(1)) if match else 0


def generation_shard_id(generation: int, shard_id: str) -> str:
    return f"g{generation:04d}-{shard_id}"


@dataclass
class Current:
    """What the output holds for one id: its rows in the newest shard that has it."""

    shard_id: str
    statuses: set = field(default_factory=set)
    fingerprints: set = field(default_factory=set)
    revisions: set = field(default_factory=set)
    errors: set = field(default_factory=set)
    images: int = 0  # ok rows (stored images)


@dataclass
class Diff:
    """The outcome of comparing the manifest with the output (step 4)."""

    todo: dict = field(default_factory=dict)  # plan shard id -> [row index, ...] to render
    todo_ids: dict = field(default_factory=dict)  # plan shard id -> {id, ...} of those rows
    new: int = 0
    changed: int = 0
    unchanged_counts: dict = field(default_factory=lambda: {"ok": 0, "invalid": 0, "failed": 0})
    unchanged_images: int = 0
    removed: set = field(default_factory=set)  # ids to mark removed (or to prune)

    @property
    def unchanged(self) -> int:
        return sum(self.unchanged_counts.values())


# ---------------------------------------------------------------------------------------------------------------
# The whole flow


def run(job: JobConfig, prune: bool = False) -> Summary:
    """Refresh `job.out` from `job.manifests` (see the module docstring); print and return the Summary."""
    so = job.storage_options
    facts: dict = {}
    with RunSession(job, "refresh") as session:
        summary = session.summary
        if job.limit is not None:
            raise ConfigError("--limit does not apply to refresh: rows past it would count as removed")
        if job.retry_failed:
            raise ConfigError("--retry-failed does not apply to refresh: a refresh renders failed rows again anyway")
        # 1. Plan (a text manifest is staged as Parquet first, under the lease); take the output's lease (--overwrite
        # clears it); start the actors (the model says its revision)
        if manifests.needs_staging(job):
            session.acquire_output()
        manifest_files, sources = manifests.stage_manifests(job)
        plan = planning.plan(manifest_files, job.shard_size, so, out=job.out,
                             allowed_inside_out=(layout.MANIFESTS_DIR,))
        for warning in plan.warnings:
            log.warning(warning)
        session.acquire_output()
        if job.overwrite:
            session.clear_output()
        previous = record.read_job_record(job.out, so)
        committed = set(session.committed)
        old_schemas = _read_schemas(job.out, committed, so)
        plan = replace(plan, passthrough_schema=_passthrough_union(plan.passthrough_schema, old_schemas))
        pool = session.start_pool(plan)

        # 2.-4. Index the output and the manifest; compare
        current, stale = index_output(job.out, committed, so)
        rows = index_manifest(pool, plan)
        same_job = _same_job_settings(previous, job, summary.model)
        diff = compare(rows, current, summary.model["revision"], same_job)
        latest = max([generation_of(shard_id) for shard_id in committed]
                     + [int((previous or {}).get("refresh", {}).get("generation", 0))])
        generation = latest + 1 if diff.todo else latest  # a refresh that renders nothing adds no generation
        todo = [_generation_shard(generation, shard, diff.todo[shard.shard_id]) for shard in plan.shards
                if shard.shard_id in diff.todo]
        newly_removed = sum(current[row_id].statuses != {REMOVED} for row_id in diff.removed)
        facts.update(generation=generation, new=diff.new, changed=diff.changed, unchanged=diff.unchanged,
                     removed=newly_removed, pruned=0, state="rendering")
        log.info("refresh generation %d: %d new, %d changed, %d unchanged, %d removed rows", generation, diff.new,
                 diff.changed, diff.unchanged, newly_removed)
        summary.rows_total, summary.shards_total = plan.total_rows, len(todo)
        summary.add(diff.unchanged_counts, diff.unchanged_images)
        summary.rows_resumed = diff.unchanged

        # 5. Claim the output and render the rows to render as generation shards
        session.claim_output(_record(job, plan, summary, facts, sources))
        if todo:
            session.dispatch(todo)
            session.check_committed({shard.shard_id for shard in todo})
        session.stop_pool()  # from here only this driver writes to the output

        # 6. Supersede older rows, mark removed ids, prune, unify schemas
        lost = set(summary.shards_lost)
        done = {shard.shard_id for shard in todo if shard.shard_id not in lost}
        rendered_ids = set().union(*[diff.todo_ids[shard_id.split("-", 1)[1]] for shard_id in done])
        target = _target_schema(job, plan, old_schemas)
        facts["pruned"] = supersede(job.out, committed, done, stale, rendered_ids, diff.removed, target, prune, so)
        facts["state"] = "done"
        record.write_job_record(job.out, _record(job, plan, summary, facts, sources), so)
    # 7. Print what changed and the summary
    if facts:
        print(f"refresh generation {facts['generation']}: {facts['new']} new, {facts['changed']} changed, "
              f"{facts['unchanged']} unchanged, {facts['removed']} removed ({facts['pruned']} images pruned)")
    print(session.summary.format(), flush=True)
    return session.summary


def _generation_shard(generation: int, shard: planning.Shard, rows: list[int]) -> planning.Shard:
    subset = None if len(rows) == shard.num_rows else tuple(sorted(rows))
    return replace(shard, shard_id=generation_shard_id(generation, shard.shard_id), rows=subset)


def _record(job: JobConfig, plan: planning.Plan, summary: Summary, facts: dict, sources: dict) -> dict:
    return {**job_record(job, plan, summary, sources), "refresh": dict(facts)}


def _same_job_settings(previous: dict | None, job: JobConfig, model: dict) -> bool:
    if not previous:
        return False
    settings = previous.get("settings") or {}
    if any(settings.get(name) != getattr(job, name) for name in JOB_PIXEL_SETTINGS):
        return False
    return same_model(previous.get("model") or {}, model)


# ---------------------------------------------------------------------------------------------------------------
# Indexes and the comparison


def _read_schemas(root: str, shard_ids: set[str], storage_options: dict | None) -> dict[str, pa.Schema]:
    ordered = sorted(shard_ids)
    with ThreadPoolExecutor(max_workers=IO_THREADS) as threads:
        return dict(zip(ordered, threads.map(lambda s: commits.read_shard_schema(root, s, storage_options), ordered)))


def index_output(root: str, shard_ids: set[str], storage_options: dict | None) -> tuple[dict, dict]:
    """(id -> Current, shard id -> {ids whose rows there are stale}) from the committed shards' metadata."""
    ordered = sorted(shard_ids, key=lambda shard_id: (generation_of(shard_id), shard_id))
    with ThreadPoolExecutor(max_workers=IO_THREADS) as threads:
        columns = INDEX_COLUMNS[:6]
        tables = threads.map(lambda s: commits.read_shard_metadata(root, s, storage_options, columns), ordered)
        current: dict[str, Current] = {}
        stale: dict[str, set] = defaultdict(set)
        for shard_id, table in zip(ordered, tables):  # oldest first: a newer shard takes an id over
            seen_here: set[str] = set()
            for row in table.to_pylist():
                row_id = row["id"]
                if row_id not in seen_here:
                    seen_here.add(row_id)
                    if row_id in current:
                        stale[current[row_id].shard_id].add(row_id)
                    current[row_id] = Current(shard_id)
                entry = current[row_id]
                entry.statuses.add(row["status"])
                entry.fingerprints.add(row["row_fingerprint"])
                entry.revisions.add(row["model_revision"])
                entry.errors.add(row["error"])
                entry.images += row["status"] == "ok"
    return current, dict(stale)


def index_manifest(pool, plan: planning.Plan) -> dict[str, list[tuple]]:
    """Plan shard id -> [(row index, id, fingerprint, error), ...], validated on the actors, round robin."""
    import ray

    actors = pool.ready_actors()
    refs = {shard.shard_id: actors[i % len(actors)].index_shard.remote(shard) for i, shard in enumerate(plan.shards)}
    try:
        return dict(zip(refs, ray.get(list(refs.values()))))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
        if isinstance(cause, planning.ManifestError):
            raise cause from None
        raise JobAborted(f"could not read the manifest rows: {type(cause).__name__}: {cause}") from None


def compare(rows: dict[str, list[tuple]], current: dict[str, Current], revision: str, same_job: bool) -> Diff:
    """Step 4 of the module docstring: which rows to render, which ids are removed."""
    diff = Diff()
    where: dict[str, tuple[str, int]] = {}
    for shard_id, shard_rows in rows.items():
        for row_index, row_id, fingerprint, error in shard_rows:
            if row_id in where:
                raise JobAborted(f"refresh needs unique ids: id {row_id!r} is used by row {where[row_id][1]} "
                                        f"of shard {where[row_id][0]} and row {row_index} of shard {shard_id}")
            where[row_id] = (shard_id, row_index)
            old = current.get(row_id)
            if old is not None and same_job and _unchanged(old, fingerprint, error, revision):
                status = "invalid" if fingerprint is None else "ok"
                diff.unchanged_counts[status] += 1
                diff.unchanged_images += old.images
                continue
            if old is None or old.statuses == {REMOVED}:
                diff.new += 1
            else:
                diff.changed += 1
            diff.todo.setdefault(shard_id, []).append(row_index)
            diff.todo_ids.setdefault(shard_id, set()).add(row_id)
    diff.removed = {row_id for row_id in current if row_id not in where}
    return diff


def _unchanged(old: Current, fingerprint: str | None, error: str | None, revision: str) -> bool:
    if fingerprint is None:  # an invalid row: unchanged if it was invalid for the same reason
        return old.statuses == {"invalid"} and old.errors == {error}
    return old.statuses == {"ok"} and old.fingerprints == {fingerprint} and old.revisions == {revision}


# ---------------------------------------------------------------------------------------------------------------
# Superseding older rows


def _passthrough_union(new: pa.Schema, old_schemas: dict[str, pa.Schema]) -> pa.Schema:
    """The new plan's passthrough columns, then those only older metadata files have (kept for their rows)."""
    reserved = reserved_columns()
    fields = list(new)
    names = set(new.names)
    for schema in old_schemas.values():
        for column in schema:
            if column.name not in reserved and column.name not in names:
                fields.append(pa.field(column.name, column.type, nullable=True))
                names.add(column.name)
    return pa.schema(fields)


def _target_schema(job: JobConfig, plan: planning.Plan, old_schemas: dict[str, pa.Schema]) -> pa.Schema:
    scored = job.scores_quality or any("quality_score" in schema.names for schema in old_schemas.values())
    target = metadata_schema(plan.passthrough_schema, quality_columns=scored)
    for shard_id, schema in old_schemas.items():
        for column in schema:
            if column.name in target.names and not target.field(column.name).type.equals(column.type):
                raise JobAborted(f"column {column.name!r} is {target.field(column.name).type} now but "
                                        f"{column.type} in metadata/{shard_id}.parquet; give it its old type, or "
                                        f"pass --overwrite to start again")
    return target


def supersede(root: str, old_shards: set[str], new_shards: set[str], stale: dict[str, set], rendered_ids: set[str],
              removed: set[str], target: pa.Schema, prune: bool, storage_options: dict | None) -> int:
    """Step 6: in the older shards, drop rows of ids that have newer rows (deleting their images first) and mark
    removed ids `removed` (deleting their images with `prune`); conform every file to `target`. Rewrites only the
    files that change; returns the number of images pruned."""

    def one(shard_id: str) -> int:
        table = commits.read_shard_metadata(root, shard_id, storage_options)
        if shard_id in new_shards:
            drop, gone = set(), set()
        else:
            ids = set(table.column("id").to_pylist())
            drop = stale.get(shard_id, set()) | (rendered_ids & ids)
            gone = (removed & ids) - drop
        rows = table.to_pylist()
        doomed = [row for row in rows if row["id"] in drop and row["image_uri"]]
        pruned = [row for row in rows if prune and row["id"] in gone and row["image_uri"]]
        marked = [row for row in rows if row["id"] in gone and row["status"] != REMOVED]
        if not (drop or marked or pruned) and table.schema.equals(target, check_metadata=False):
            return 0
        for row in doomed + pruned:  # images first: after a crash here the next attempt finds these rows again
            storage.delete(layout.row_image_url(root, shard_id, row), storage_options)
        kept = []
        for row in rows:
            if row["id"] in drop:
                continue
            if row["id"] in gone:
                row = {**row, "status": REMOVED, **({"image_uri": None} if prune else {})}
            kept.append(row)
        commits.write_shard_metadata(root, shard_id, pa.Table.from_pylist(kept, schema=target), storage_options)
        return len(pruned)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as threads:
        return sum(threads.map(one, sorted(old_shards | new_shards)))
