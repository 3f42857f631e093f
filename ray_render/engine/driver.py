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

from ray_render.config import PIXEL_SETTINGS, JobConfig
from ray_render.engine import manifests
from ray_render.engine import plan as planning
from ray_render.engine.session import JobAborted, RunSession
from ray_render.engine.summary import Summary
from ray_render.output import commits, record
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
              "files": plan.files, "total_rows": plan.total_rows, "shards": len(plan.shards)}
    if sources:
        record["manifest_sources"] = sources
    return record


def run(job: JobConfig, select: Callable[[planning.Plan], planning.Plan] | None = None) -> Summary:
    """Render `job` to completion (or abort); print and return the Summary (its `exit_code`: engine/summary.py).
    `select` narrows the plan to the shards (and rows) to render, with a fingerprint of its own (preview.py)."""
    so = job.storage_options
    with RunSession(job) as session:
        summary = session.summary
        # 1. Plan: text manifests staged as Parquet once, then Parquet footers only, so a bad manifest fails before
        # any Ray or GPU time
        manifest_files, sources = manifests.stage_manifests(job)
        plan = planning.plan(manifest_files, job.shard_size, so, job.limit)
        if select is not None:
            plan = select(plan)
        for warning in plan.warnings:
            log.warning(warning)
        summary.rows_total, summary.shards_total = plan.total_rows, len(plan.shards)
        summary.plan_s = time.monotonic() - session.started

        # 2. Job record: an output root holds one job; --overwrite clears it first
        previous = record.read_job_record(job.out, so)
        if job.overwrite:
            if previous is not None or commits.committed_shard_ids(job.out, so):
                log.info("--overwrite: clearing %s", job.out)
            commits.clear_output(job.out, so)
            previous = None
        elif previous is not None:
            _check_same_job(previous, plan, job)

        # 3. Resume: committed shards are done
        done = commits.list_commits(job.out, so) if job.resume else {}
        shard_ids = {shard.shard_id for shard in plan.shards}
        done = {shard_id: info for shard_id, info in done.items() if shard_id in shard_ids}
        counts, images, summary.rows_resumed = commit_totals(done.values())
        summary.add(counts, images)
        summary.shards_resumed = summary.shards_committed = len(done)
        todo = [shard for shard in plan.shards if shard.shard_id not in done]
        if todo:  # rows repeating an id used earlier in the plan will end invalid (reads the id column only)
            ids_started = time.monotonic()
            plan = manifests.with_source_names(planning.mark_repeated_ids(plan, so), sources)
            todo = [shard for shard in plan.shards if shard.shard_id not in done]
            summary.plan_s += time.monotonic() - ids_started
        if done:
            log.info("resuming: %d of %d shards (%d rows) already committed", len(done), len(plan.shards),
                     summary.rows_resumed)
        if previous is not None:
            summary.model = previous.get("model", {})
        if not todo:
            session.owns_output = previous is not None
            log.info("nothing to do: every shard of the plan is committed")
        else:
            # 4. Start one actor per GPU (or --actors CPU actors); the model they load must be the output's
            session.start_pool(plan)
            if previous is not None:
                _check_same_model(previous, summary.model)
            # 5. Claim the output: the job record names the plan, the settings and the model
            session.claim_output(job_record(job, plan, summary, sources))
            # 6. Dispatch shards, collect results, retry, watch the error budget
            session.dispatch(todo)
    # 7. The session has stopped the actors and written the summary: print it
    print(session.summary.format(), flush=True)
    return session.summary


def _check_same_job(previous: dict, plan: planning.Plan, job: JobConfig) -> None:
    if previous.get("refresh"):
        # Its shards no longer match any one plan: a run would render rows the refresh already holds, twice.
        raise JobAborted(f"{job.out} is kept up to date by `ray-render refresh`: run `ray-render refresh` with the "
                         f"manifest, or pass --overwrite to start again, or choose another --out")
    differences = []
    if previous.get("plan_fingerprint") != plan.fingerprint:
        differences.append("the plan (manifest files, their rows, --shard-size or --limit)")
    if previous.get("settings_fingerprint") != settings_fingerprint(job):
        old = previous.get("settings", {})
        changed = [name for name in PIXEL_SETTINGS if old.get(name) != json.loads(json.dumps(getattr(job, name)))]
        differences.append(f"the render settings ({', '.join(changed) or 'see _job.json'})")
    if differences:
        raise JobAborted(f"{job.out} holds another job: {' and '.join(differences)} differ from this one; "
                         f"pass --overwrite to replace it, or choose another --out")


def _check_same_model(previous: dict, model: dict) -> None:
    old = previous.get("model") or {}
    if not same_model(old, model):
        raise JobAborted(f"the output was rendered by {old.get('family')} {old.get('revision')} on "
                         f"{old.get('device')} {old.get('dtype')}, this run loads {model.get('family')} "
                         f"{model.get('revision')} on {model.get('device')} {model.get('dtype')}; images would not "
                         f"match: pass --overwrite to start again, or choose another --out")


def same_model(old: dict, new: dict) -> bool:
    """Whether two models render the same pixels for the same request: family, revision, dtype, device type."""
    same_device = str(old.get("device", "")).split(":")[0] == str(new.get("device", "")).split(":")[0]
    return same_device and all(old.get(key) == new.get(key) for key in ("family", "revision", "dtype"))
