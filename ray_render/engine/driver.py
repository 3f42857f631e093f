"""`ray-render run`: plan -> job record -> resume -> actor pool -> retries -> summary, in numbered steps.

The driver handles shard descriptors and small per-shard results only: prompts and images stay between the
actors and storage, so its memory grows with the number of shards, not rows. The lifecycle (connecting, the pool,
claiming the output, dispatching, winding down, exit codes) is `engine.session.RunSession`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import MISSING

from ray_render.config import PIXEL_SETTINGS, JobConfig
from ray_render.engine import manifests, repairs
from ray_render.engine import plan as planning
from ray_render.engine.rows import default_row_id
from ray_render.engine.session import JobAborted, RunSession
from ray_render.engine.summary import Summary
from ray_render.models.base import same_model
from ray_render.output import layout, record
from ray_render.output.commits import commit_totals

log = logging.getLogger("ray_render")


def settings_fingerprint(job: JobConfig) -> str:
    """sha256 of the settings that decide the pixels: a resumed job must not mix two sets of them."""
    settings = {name: getattr(job, name) for name in PIXEL_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def job_record(job: JobConfig, plan: planning.Plan, summary: Summary, sources: dict | None = None) -> dict:
    """The job record a run writes when it claims its output (`_job.json`); `sources` names the source of each
    staged manifest (engine/manifests.py)."""
    record = {"run_id": summary.run_id, "started_at": summary.started_at, "plan_fingerprint": plan.fingerprint,
              "settings_fingerprint": settings_fingerprint(job), "settings": job.record(), "model": summary.model,
              "files": plan.identities, "total_rows": plan.total_rows, "shards": len(plan.shards)}
    if sources:
        record["manifest_sources"] = sources
    return record


def run(job: JobConfig, select: Callable[[planning.Plan], planning.Plan] | None = None) -> Summary:
    """Render `job` to completion (or abort); print and return the Summary (its `exit_code`: engine/summary.py).
    `select` narrows the plan to the shards (and rows) to render, with a fingerprint of its own (preview.py)."""
    so = job.storage_options
    with RunSession(job, "run") as session:
        summary = session.summary
        # 1. Plan: Parquet footers only, so a bad manifest fails before anything is written or started. A text (or
        # renamed) manifest is staged as Parquet under the output root first: that write takes the lease first.
        if manifests.needs_staging(job):
            session.acquire_output()
        manifest_files, sources = manifests.stage_manifests(job)
        plan = planning.plan(manifest_files, job.shard_size, so, job.limit, out=job.out,
                             allowed_inside_out=(layout.MANIFESTS_DIR,))
        if select is not None:
            plan = select(plan)
        for warning in plan.warnings:
            log.warning(warning)
        summary.rows_total, summary.shards_total = plan.total_rows, len(plan.shards)
        summary.plan_s = time.monotonic() - session.started

        # 2. Take the output's lease, then check the job it holds; --overwrite clears it
        session.acquire_output()
        if job.overwrite:
            session.clear_output()
            previous = None
        else:
            previous = record.read_job_record(job.out, so)
        if previous is not None:
            _check_same_job(previous, plan, job)

        # 3. Resume: committed shards are done; with --retry-failed, those holding failed rows are repaired
        shard_ids = {shard.shard_id for shard in plan.shards}
        done = {shard_id: entry["info"] for shard_id, entry in session.committed.items()
                if shard_id in shard_ids and job.resume}
        retry = {shard_id for shard_id, info in done.items() if job.retry_failed and info["counts"].get("failed")}
        counts, images, summary.rows_resumed = commit_totals(info for shard_id, info in done.items()
                                                             if shard_id not in retry)
        summary.add(counts, images)
        summary.shards_resumed = summary.shards_committed = len(done) - len(retry)
        todo = [shard for shard in plan.shards if shard.shard_id not in done]
        if todo:  # rows repeating an id used earlier in the plan will end invalid (reads the id columns only)
            ids_started = time.monotonic()
            plan = manifests.with_source_names(
                planning.mark_repeated_ids(plan, so, lambda row: default_row_id(row, job)), sources)
            todo = [shard for shard in plan.shards if shard.shard_id not in done]
            summary.plan_s += time.monotonic() - ids_started
        if done:
            log.info("resuming: %d of %d shards (%d rows) already committed", len(done), len(plan.shards),
                     summary.rows_resumed)
        if previous is not None:
            summary.model = previous.get("model", {})
        if not todo and not retry:
            session.owns_output = previous is not None
            log.info("nothing to do: every shard of the plan is committed")
        else:
            # 4. Start one actor per GPU (or --actors CPU actors); the model they load must be the output's
            session.start_pool(plan, len(todo) + len(retry), (previous or {}).get("model") or None)
            if previous is not None:
                _check_same_model(previous, summary.model)
            # 5. Claim the output: finish what a dead holder left, write the job record
            session.claim_output(job_record(job, plan, summary, sources))
            # 6. Dispatch shards (and repairs), commit results, retry, watch the error budget; then every shard of
            # the plan must be there
            to_repair = repairs.of_committed(job.out, [shard for shard in plan.shards if shard.shard_id in retry],
                                             session.committed, so)
            if to_repair:
                log.info("--retry-failed: rendering the failed rows of %d committed shard(s) again", len(to_repair))
            session.dispatch(todo, to_repair)
            session.check_committed(shard_ids)
    # 7. The session has stopped the actors, written the summary and released the lease: print it
    print(session.summary.format(), flush=True)
    return session.summary


def _default(name: str):
    """A JobConfig field's default, as a job record holds it."""
    spec = JobConfig.__dataclass_fields__[name]
    value = spec.default_factory() if spec.default_factory is not MISSING else spec.default
    return json.loads(json.dumps(value, default=str))


def _check_same_job(previous: dict, plan: planning.Plan, job: JobConfig) -> None:
    if previous.get("refresh"):
        # Its shards no longer match any one plan: a run would render rows the refresh already holds, twice.
        raise JobAborted(f"{job.out} is kept up to date by `ray-render refresh`: run `ray-render refresh` with the "
                         f"manifest, or pass --overwrite to start again, or choose another --out")
    differences = planning.changed_files(previous.get("files") or [], plan.identities)
    if not differences and previous.get("plan_fingerprint") != plan.fingerprint:
        differences.append("the shards (--shard-size or --limit)")
    if previous.get("settings_fingerprint") != settings_fingerprint(job):
        old = previous.get("settings") or {}
        # A setting the record does not name was added since it was written: the record's job rendered with what
        # is now its default.
        changed = [name for name in PIXEL_SETTINGS
                   if old.get(name, _default(name)) != json.loads(json.dumps(getattr(job, name), default=str))]
        if changed or not old:
            differences.append(f"the render settings ({', '.join(changed) or 'see _job.json'})")
    if differences:
        raise JobAborted(f"{job.out} holds another job: {'; '.join(differences)}; pass --overwrite to replace it, "
                         f"or choose another --out")


def _check_same_model(previous: dict, model: dict) -> None:
    old = previous.get("model") or {}
    if not same_model(old, model):
        raise JobAborted(f"the output was rendered by {old.get('family')} {old.get('revision')} on "
                         f"{old.get('device')} {old.get('dtype')}, this run loads {model.get('family')} "
                         f"{model.get('revision')} on {model.get('device')} {model.get('dtype')}; images would not "
                         f"match: pass --overwrite to start again, or choose another --out")

