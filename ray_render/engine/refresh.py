"""`ray-render refresh MANIFEST --out URI`: bring an existing output up to date with a manifest, rendering only
the rows that are new or whose render settings changed, and loading the model only when some row must render.

How a refresh works (every step is recomputed from the output itself, so a rerun after a crash finishes the job,
and a second refresh of the same manifest renders nothing):

1. Plan the manifest (Parquet footers only) and take the output's lease (the session also removes what crashed
   attempts left).
2. Describe the model without loading it (`models.describe_model`, on the device the actors would use:
   `session.job_device`): its render defaults, its revision and the device type and dtype a load reports, from the
   snapshot's config and files (the tiny checkpoint, a local directory, a hub repo in this machine's cache, an
   fsspec URL read by listing and a few reads), never from rendering, so a new model snapshot counts as a change.
   A model that cannot be described that far (a plugin without `describe`, a hub repo this machine has not cached,
   a VAE from elsewhere) is loaded by the actors instead, as a render loads it, and they say the same.
3. Index the output: the metadata of every committed shard, read for `id`, `status`, `error`, `row_fingerprint`,
   `model_revision`, `passthrough_fingerprint` only (no image is read back). Shards of a refresh are named
   `g<generation>-...` (plain runs are generation 0). An id's *current* rows are those in the newest shard holding
   it; rows of the same id in older shards are stale (a crashed refresh left them) and go in step 7.
4. Index the manifest (engine/row_index.py): the driver (a small manifest) or light Ray tasks on its node that
   ask for no CPU validate every row with `rows.validate_rows` (the function the actors run) and the described
   defaults, and return (row, id, `RowTask.fingerprint`, passthrough fingerprint, error). The fingerprint hashes
   the prompt, every resolved render parameter and the seed, so it changes exactly when the row's images would.
   Ids must be unique across the manifest.
5. Compare. A row is unchanged when its current rows carry its fingerprint and this model's revision and are all
   `ok`, or all `invalid` because the model refused these settings (or, for a row invalid in the manifest,
   `invalid` with the same error), and the job-level settings that decide pixels (`config.JOB_PIXEL_SETTINGS`:
   model, format, dtype, --min-quality ...) and the model (family, revision, dtype, device type) equal the job
   record's. An unchanged row whose passthrough values changed (its `passthrough_fingerprint`) is updated in place
   in step 7. Anything else in the manifest is to render: new ids, changed rows, rows that failed before, ids that
   come back after being removed. Ids in the output but not in the manifest are removed.
6. Render, only if some row must: the actors start now, as many as the shards to render ask for, and each must
   load the model the rows were compared against (the pool refuses one that loads another). The rows render as
   generation N = (highest generation in the output) + 1, cut as a run cuts its rows (`--shard-size`, else
   `plan.auto_shard_size` over the rows to render, so that changed rows in one part of the catalogue still spread
   over every actor): shards holding only those rows (`Shard.rows`), each named like a plan shard that starts at
   its first row, `gNNNN-<file>-<stem>-<row>`. These are ordinary shards: attempts under their own names,
   committed in the commit log and then published as `metadata/<shard>.parquet`, retries and straggler handling
   as in `run`. Images of unchanged rows stay where they are.
7. Supersede: rewrite each older metadata file that changes (the index says which; the others are not read
   again), in one atomic write per file: without the rows of ids that now have newer rows, with the new
   passthrough values of the rows updated in place (read again from the manifest; their images and render columns
   untouched), and with the rows of removed ids set to status `removed`. Images of stale rows are deleted first,
   and, with --prune, those of removed rows too (their `image_uri` becomes null); without --prune a removed row
   keeps its image and its `image_uri`. Files whose schema differs from the new one (a passthrough column added or
   dropped, quality columns turned on) are rewritten to the union schema, so `metadata/` still reads as one
   dataset. A shard that lost every row keeps an empty metadata file and its commit.
8. Write the job record (the new plan, the settings, the model, `refresh` with this generation's counts) and the
   summary (`actors_started`, `rows_updated`). A record with `refresh` makes `ray-render run` refuse the output:
   its shards no longer follow one plan.

Afterwards `pyarrow.dataset.dataset(root + "/metadata")` holds exactly one current row per (id, image) of the
manifest plus the `removed` rows. While a refresh runs, readers may briefly see a changed id twice (between a
generation shard's commit and step 7) or a stale row whose image is already gone; read after it finishes.

A crash anywhere is safe: uncommitted shards are orphans removed by the next attempt; committed generation shards
are current rows (unchanged next time); an older file not yet rewritten still holds stale rows (or old passthrough
values), which step 7 of the next attempt drops (or updates); images are deleted before the file that lists them is
rewritten, so no image is left without a row that names it. Unchanged rows keep their metadata row as it was
written (including `source_row`) but for their passthrough values; change a render setting, or run with
--overwrite, to rewrite them. Rows written before passthrough fingerprints existed get them, and the manifest's
passthrough values, at their first refresh: one rewrite of each file, no rendering.

Costs: describing the model (its JSON files; the revision hashes the snapshot's small files and the first and last
MiB of each large one), one read of the output's metadata (six small columns), one validation pass over the
manifest in or next to the driver (an autoscaler starts no node for it), and the model load on the actors only
when rows render: a refresh with nothing to render starts no render actor (BENCHMARKS.md has the figures). A
passthrough-only change costs a second read of those rows' passthrough values and the rewrite of their files.
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
from ray_render.engine import manifests, row_index
from ray_render.engine import plan as planning
from ray_render.engine.driver import job_record
from ray_render.engine.session import JobAborted, RunSession
from ray_render.engine.summary import Summary
from ray_render.models import describe_model
from ray_render.models.base import same_model
from ray_render.output import commits, layout, record
from ray_render.output.schema import REMOVED, metadata_schema, reserved_columns

log = logging.getLogger("ray_render")

INDEX_COLUMNS = ["id", "status", "error", "row_fingerprint", "model_revision", "passthrough_fingerprint"]
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
    passthrough: set = field(default_factory=set)  # passthrough fingerprints; None for rows written before them
    images: int = 0  # ok rows (stored images)


@dataclass
class Diff:
    """The outcome of comparing the manifest with the output (step 5)."""

    todo: dict = field(default_factory=dict)  # plan shard id -> [row index, ...] to render
    todo_ids: dict = field(default_factory=dict)  # plan shard id -> {row index: id} of those rows
    updates: dict = field(default_factory=dict)  # plan shard id -> [row index, ...] to update in place
    new: int = 0
    changed: int = 0
    updated: int = 0  # unchanged rows whose passthrough values changed
    unchanged_counts: dict = field(default_factory=lambda: {"ok": 0, "invalid": 0, "failed": 0})
    unchanged_images: int = 0
    removed: set = field(default_factory=set)  # ids to mark removed (or to prune)

    @property
    def unchanged(self) -> int:
        return sum(self.unchanged_counts.values())


@dataclass
class ModelFacts:
    """What validating rows and comparing them needs from the model (step 2)."""

    info: dict  # ModelInfo fields as the actors report them: family, revision, device, dtype, ...
    defaults: dict  # its render defaults


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
        # clears it)
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

        # 2. The model's revision, defaults, device and dtype, from its description (no weights read, no actor)
        model = model_facts(session, plan)

        # 3.-5. Index the output and the manifest (light tasks, no model); compare
        current, stale = index_output(job.out, committed, old_schemas, so)
        rows = row_index.index_manifest(plan.shards, model.defaults, job)
        same_job = _same_job_settings(previous, job, model.info)
        diff = compare(rows, current, model.info["revision"], same_job)
        del rows
        latest = max([generation_of(shard_id) for shard_id in committed]
                     + [int((previous or {}).get("refresh", {}).get("generation", 0))])
        generation = latest + 1 if diff.todo else latest  # a refresh that renders nothing adds no generation
        todo = generation_shards(generation, plan, diff, job.shard_size)
        newly_removed = sum(current[row_id].statuses != {REMOVED} for row_id in diff.removed)
        facts.update(generation=generation, new=diff.new, changed=diff.changed, unchanged=diff.unchanged,
                     updated=diff.updated, removed=newly_removed, pruned=0, state="rendering")
        log.info("refresh generation %d: %d new, %d changed, %d unchanged (%d updated in place), %d removed rows",
                 generation, diff.new, diff.changed, diff.unchanged, diff.updated, newly_removed)
        summary.rows_total, summary.shards_total = plan.total_rows, len(todo)
        summary.add(diff.unchanged_counts, diff.unchanged_images)
        summary.rows_resumed = diff.unchanged

        # 6. Start actors only if rows must render (each must load the model the rows were compared against);
        # claim the output and render the rows to render as generation shards
        if todo and session.pool is None:
            session.start_pool(plan, len(todo), model.info)
        elif session.pool is None:  # nothing renders: the output stays the work of the model that rendered it
            summary.model = ((previous or {}).get("model") if same_job else None) or model.info
        session.claim_output(_record(job, plan, summary, facts, sources))
        if todo:
            session.dispatch([shard for shard, _ in todo])
            session.check_committed({shard.shard_id for shard, _ in todo})
        session.stop_pool()  # from here only this driver writes to the output

        # 7. Supersede older rows, update rows in place, mark removed ids, prune, unify schemas; 8. the record
        lost = set(summary.shards_lost)
        done = {shard.shard_id for shard, _ in todo if shard.shard_id not in lost}
        rendered_ids = set().union(*[ids for shard, ids in todo if shard.shard_id in done])
        updates = row_index.read_passthrough(_update_shards(plan, diff.updates), model.defaults, job)
        target = _target_schema(job, plan, old_schemas)
        touched = _files_to_rewrite(current, stale, rendered_ids | updates.keys(), diff.removed, prune, old_schemas,
                                    target)
        facts["pruned"] = supersede(job.out, touched & committed, done, stale, rendered_ids, diff.removed, target,
                                    prune, so, updates)
        summary.rows_updated = diff.updated
        facts["state"] = "done"
        record.write_job_record(job.out, _record(job, plan, summary, facts, sources), so)
    # 8. The session has written the summary and released the lease: print what changed and the summary
    if facts:
        print(f"refresh generation {facts['generation']}: {facts['new']} new, {facts['changed']} changed, "
              f"{facts['unchanged']} unchanged ({facts['updated']} updated in place), {facts['removed']} removed "
              f"({facts['pruned']} images pruned)")
    print(session.summary.format(), flush=True)
    return session.summary


def model_facts(session: RunSession, plan: planning.Plan) -> ModelFacts:
    """Step 2: the model's info and defaults from its description, for the device the actors would load it on
    (deciding it connects to Ray, which the index tasks need anyway). A model that cannot be described that far (a
    plugin without `describe`, a hub repo this machine has not cached, a VAE from elsewhere: only a load tells the
    revision) is loaded by the actors, as a render loads it."""
    job = session.job
    device = session.connect()
    try:
        described = describe_model(job.model, **{**job.model_options(), "device": device})
    except (ValueError, OSError) as exc:  # ResolveError, SnapshotError, ... are ValueErrors
        log.info("model %s cannot be described without loading it (%s)", job.model, exc)
        described = None
    info = described.expected_info() if described is not None else None
    if info is not None:
        return ModelFacts(info=info, defaults=described.defaults)
    log.info("loading the model to learn its revision and defaults before comparing")
    pool = session.start_pool(plan)
    return ModelFacts(info=session.summary.model, defaults=_actor_defaults(pool))


def _actor_defaults(pool) -> dict:
    """The render defaults of the model a ready actor holds."""
    import ray

    return ray.get(pool.ready_actors()[0].defaults.remote())


def generation_shards(generation: int, plan: planning.Plan, diff: Diff,
                      shard_size: int | None) -> list[tuple[planning.Shard, set]]:
    """The shards of generation `generation` (step 6), each with the ids of its rows: the rows to render of each
    plan shard, cut as a run cuts its rows (`--shard-size`, else `plan.auto_shard_size` over the rows to render,
    so that 800 changed rows in one part of the catalogue still keep every actor busy). A part is named like a
    plan shard that starts at its first row, `gNNNN-<file>-<stem>-<row>`; a plan shard whose rows to render fit
    in one part keeps its own id."""
    total = sum(len(rows) for rows in diff.todo.values())
    remaining = total
    shards = []
    for shard in plan.shards:
        rows = sorted(diff.todo.get(shard.shard_id, ()))
        ids = diff.todo_ids.get(shard.shard_id, {})
        parts = []
        while rows:
            size = shard_size or planning.auto_shard_size(remaining, total)
            parts.append(rows[:size])
            rows = rows[size:]
            remaining -= len(parts[-1])
        starts = [shard.row_start] + [part[0] for part in parts[1:]]
        stops = starts[1:] + [shard.row_stop]
        for part, start, stop in zip(parts, starts, stops):
            whole = len(part) == stop - start
            name = shard.shard_id if start == shard.row_start else planning.make_shard_id(shard.file_index,
                                                                                            shard.file, start)
            shards.append((replace(shard, shard_id=generation_shard_id(generation, name), row_start=start,
                                   row_stop=stop, rows=None if whole else tuple(part)),
                           {ids[row] for row in part}))
    return shards


def _update_shards(plan: planning.Plan, updates: dict[str, list[int]]) -> list[planning.Shard]:
    """The plan's shards cut down to the rows to update in place (their passthrough values are read again)."""
    return [replace(shard, rows=tuple(sorted(updates[shard.shard_id]))) for shard in plan.shards
            if shard.shard_id in updates]


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


def index_output(root: str, shard_ids: set[str], schemas: dict[str, pa.Schema],
                 storage_options: dict | None) -> tuple[dict, dict]:
    """(id -> Current, shard id -> {ids whose rows there are stale}) from the committed shards' metadata (the
    INDEX_COLUMNS its schema has: files written before passthrough fingerprints lack that one)."""
    ordered = sorted(shard_ids, key=lambda shard_id: (generation_of(shard_id), shard_id))

    def read(shard_id: str) -> pa.Table:
        columns = [name for name in INDEX_COLUMNS if name in schemas[shard_id].names]
        return commits.read_shard_metadata(root, shard_id, storage_options, columns)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as threads:
        current: dict[str, Current] = {}
        stale: dict[str, set] = defaultdict(set)
        for shard_id, table in zip(ordered, threads.map(read, ordered)):  # oldest first: a newer shard takes over
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
                entry.passthrough.add(row.get("passthrough_fingerprint"))
                entry.images += row["status"] == "ok"
    return current, dict(stale)


def compare(rows: dict[str, list[row_index.RowIndex]], current: dict[str, Current], revision: str,
            same_job: bool) -> Diff:
    """Step 5 of the module docstring: which rows to render, which to update in place, which ids are removed."""
    diff = Diff()
    where: dict[str, tuple[str, int]] = {}
    for shard_id, shard_rows in rows.items():
        for row in shard_rows:
            if row.id in where:
                raise JobAborted(f"refresh needs unique ids: id {row.id!r} is used by row {where[row.id][1]} "
                                 f"of shard {where[row.id][0]} and row {row.row_index} of shard {shard_id}")
            where[row.id] = (shard_id, row.row_index)
            old = current.get(row.id)
            if old is not None and same_job and _unchanged(old, row, revision):
                diff.unchanged_counts["ok" if old.statuses == {"ok"} else "invalid"] += 1
                diff.unchanged_images += old.images
                if old.passthrough != {row.passthrough_fingerprint}:
                    diff.updated += 1
                    diff.updates.setdefault(shard_id, []).append(row.row_index)
                continue
            if old is None or old.statuses == {REMOVED}:
                diff.new += 1
            else:
                diff.changed += 1
            diff.todo.setdefault(shard_id, []).append(row.row_index)
            diff.todo_ids.setdefault(shard_id, {})[row.row_index] = row.id
    diff.removed = {row_id for row_id in current if row_id not in where}
    return diff


def _unchanged(old: Current, row: row_index.RowIndex, revision: str) -> bool:
    if row.fingerprint is None:  # invalid in the manifest: unchanged if it was invalid for the same reason
        return old.statuses == {"invalid"} and old.errors == {row.error}
    # Rendered with these settings by this model: its images, or the model's refusal of them (`invalid` rows that
    # carry a fingerprint: the model rejected exactly these settings, and would again)
    return (old.statuses in ({"ok"}, {"invalid"}) and old.fingerprints == {row.fingerprint}
            and old.revisions == {revision})


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


def _files_to_rewrite(current: dict[str, Current], stale: dict[str, set], ids: set[str], removed: set[str],
                      prune: bool, schemas: dict[str, pa.Schema], target: pa.Schema) -> set[str]:
    """The older metadata files step 7 may change, from the index alone: those holding stale rows, current rows of
    `ids` (rendered again, or updated in place) or of removed ids still to mark (or to prune), and those whose
    schema is not `target`. The others are not read again: an unchanged refresh reads each file once."""
    files = set(stale)
    files |= {current[row_id].shard_id for row_id in ids if row_id in current}
    files |= {current[row_id].shard_id for row_id in removed if prune or current[row_id].statuses != {REMOVED}}
    files |= {shard_id for shard_id, schema in schemas.items() if not schema.equals(target, check_metadata=False)}
    return files


def supersede(root: str, old_shards: set[str], new_shards: set[str], stale: dict[str, set], rendered_ids: set[str],
              removed: set[str], target: pa.Schema, prune: bool, storage_options: dict | None,
              updates: dict[str, tuple[dict, str]] | None = None) -> int:
    """Step 7: in the older shards, drop rows of ids that have newer rows (deleting their images first), give the
    rows of ids in `updates` (id -> (passthrough values, their fingerprint)) those values, and mark removed ids
    `removed` (deleting their images with `prune`); conform every file to `target`. Rewrites only the files that
    change, each in one atomic write; returns the number of images pruned."""
    updates = updates or {}
    passthrough_columns = [name for name in target.names if name not in reserved_columns()]

    def one(shard_id: str) -> int:
        table = commits.read_shard_metadata(root, shard_id, storage_options)
        if shard_id in new_shards:
            drop, gone, updated = set(), set(), set()
        else:
            ids = set(table.column("id").to_pylist())
            drop = stale.get(shard_id, set()) | (rendered_ids & ids)
            gone = (removed & ids) - drop
            updated = (updates.keys() & ids) - drop - gone
        rows = table.to_pylist()
        doomed = [row for row in rows if row["id"] in drop and row["image_uri"]]
        pruned = [row for row in rows if prune and row["id"] in gone and row["image_uri"]]
        marked = [row for row in rows if row["id"] in gone and row["status"] != REMOVED]
        if not (drop or marked or pruned or updated) and table.schema.equals(target, check_metadata=False):
            return 0
        for row in doomed + pruned:  # images first: after a crash here the next attempt finds these rows again
            storage.delete(layout.row_image_url(root, shard_id, row), storage_options)
        kept = []
        for row in rows:
            if row["id"] in drop:
                continue
            if row["id"] in gone:
                row = {**row, "status": REMOVED, **({"image_uri": None} if prune else {})}
            elif row["id"] in updated:  # the row a render would write now, but for the render itself
                values, fingerprint = updates[row["id"]]
                row = {**row, **dict.fromkeys(passthrough_columns), **values, "passthrough_fingerprint": fingerprint}
            kept.append(row)
        commits.write_shard_metadata(root, shard_id, pa.Table.from_pylist(kept, schema=target), storage_options)
        return len(pruned)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as threads:
        return sum(threads.map(one, sorted(old_shards | new_shards)))
