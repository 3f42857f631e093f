"""run(job): plan -> job record -> resume -> actor pool -> retries -> summary. The whole flow, in numbered steps.

The driver handles shard descriptors and small per-shard results only: prompts and images stay between the
actors and storage, so its memory grows with the number of shards, not rows.

Exit codes (`Summary.exit_code`, and the process status of `ray-render run` and `jobs/render.py`):

    0  EXIT_OK        every row of the plan is `ok`
    1  EXIT_ROWS      the job finished, but some rows are `failed` or `invalid` (see the metadata's `error`)
    2  EXIT_ABORTED   aborted: bad configuration, unreadable manifest, output holding another job (without
                      --overwrite), a model that does not load, or more failed rows than --max-failed-fraction
    3  EXIT_LOST      the Ray cluster was lost or the run was interrupted (Ctrl-C, `ray job stop`); rerun to resume
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ray_render import journal, manifest, storage, writer
from ray_render.config import ConfigError, JobConfig
from ray_render.progress import Progress, Summary, commit_totals

if TYPE_CHECKING:  # the pool imports ray, which a run with nothing left to do never loads
    from ray_render.pool import RenderPool

log = logging.getLogger("ray_render")

EXIT_OK = 0
EXIT_ROWS = 1
EXIT_ABORTED = 2
EXIT_LOST = 3
EXIT_CODES = {  # what `ray-render run --help` prints
    EXIT_OK: "every row ok",
    EXIT_ROWS: "finished, but some rows are failed or invalid (see the metadata's error column)",
    EXIT_ABORTED: "aborted: bad configuration, unreadable manifest, --out holding another job (without "
                  "--overwrite), a model that does not load, or more failed rows than --max-failed-fraction",
    EXIT_LOST: "Ray cluster lost or run interrupted: rerun the same command to resume",
}

MIN_ROWS_FOR_BUDGET = 100  # judge --max-failed-fraction only after this many rows finished in this run
NO_ACTOR_TIMEOUT_S = 1800.0  # give up when no actor has been ready this long (model download, autoscaling)
WAIT_S = 1.0  # how long one wait for results may block: the loop's tick for progress and checks
_REPORT_HTML = "report.html"  # report.REPORT_HTML, named here: importing report.py costs PIL and pyarrow.dataset

# Settings that change what an image looks like; the rest (actors, batch size, retries, ...) only change how fast.
OUTPUT_SETTINGS = ("model", "vae", "revision", "preset", "params", "presets", "format", "quality", "dtype", "noise",
                   "rope_precision", "edit_input",
                   "min_quality", "quality_retries")  # the last two decide which re-render of an image is kept


class JobAborted(Exception):
    """The job cannot go on (exit code 2); the message says why and how to fix it."""


class JobLost(Exception):
    """The cluster went away or the run was interrupted (exit code 3); a rerun resumes."""


def settings_fingerprint(job: JobConfig) -> str:
    """sha256 of the settings that decide the pixels: a resumed job must not mix two sets of them."""
    settings = {name: getattr(job, name) for name in OUTPUT_SETTINGS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(job: JobConfig) -> Summary:
    """Render `job` to completion (or abort); print and return the Summary, whose `exit_code` is documented above."""
    so = job.storage_options
    summary = Summary(out=job.out, run_id=uuid.uuid4().hex[:12], started_at=_now())
    started = time.monotonic()
    owns_output = False  # the summary is written only once this run has claimed the output root
    pool = None
    ray_started_here = False
    restore_sigterm = _sigterm_raises_interrupt()
    try:
        # 1. Plan: Parquet footers only, so a bad manifest fails before any Ray or GPU time
        plan = manifest.plan(job.manifests, job.shard_size, so, job.limit)
        for warning in plan.warnings:
            log.warning(warning)
        summary.rows_total, summary.shards_total = plan.total_rows, len(plan.shards)
        summary.plan_s = time.monotonic() - started

        # 2. Job record: an output root holds one job; --overwrite clears it first
        record = writer.read_job_record(job.out, so)
        if job.overwrite:
            if record is not None or writer.committed_shard_ids(job.out, so):
                log.info("--overwrite: clearing %s", job.out)
            writer.clear_output(job.out, so)
            record = None
        elif record is not None:
            _check_same_job(record, plan, job)

        # 3. Resume: committed shards are done; leftovers of crashed attempts go
        commits = writer.list_commits(job.out, so) if job.resume else {}
        shard_ids = {shard.shard_id for shard in plan.shards}
        commits = {shard_id: info for shard_id, info in commits.items() if shard_id in shard_ids}
        counts, images, summary.rows_resumed = commit_totals(commits.values())
        summary.add(counts, images)
        summary.shards_resumed = summary.shards_committed = len(commits)
        todo = [shard for shard in plan.shards if shard.shard_id not in commits]
        if todo:  # rows repeating an id used earlier in the plan will end invalid (reads the id column only)
            ids_started = time.monotonic()
            plan = manifest.mark_repeated_ids(plan, so)
            todo = [shard for shard in plan.shards if shard.shard_id not in commits]
            summary.plan_s += time.monotonic() - ids_started
        if commits:
            log.info("resuming: %d of %d shards (%d rows) already committed", len(commits), len(plan.shards),
                     summary.rows_resumed)
        if record is not None:
            summary.model = record.get("model", {})

        if todo:
            # 4. Connect to Ray and start one actor per GPU (or --actors CPU actors)
            ray_started_here = _connect(job)
            pool = start_pool(job, plan)
            _wait_until_ready(pool)
            summary.startup_s = time.monotonic() - started
            summary.model = {key: value for key, value in pool.info.items() if key not in ("worker", "batch_size")}
            if record is not None:
                _check_same_model(record, summary.model)

            # 5. Claim the output: the job record names the plan, the settings and the model
            writer.remove_orphans(job.out, writer.committed_shard_ids(job.out, so), so)
            writer.write_job_record(job.out, _record(job, plan, summary), so)
            owns_output = True

            # 6. Dispatch shards, collect results, retry, watch the error budget
            _dispatch(job, pool, todo, summary)
        else:
            owns_output = record is not None
            log.info("nothing to do: every shard of the plan is committed")
        _finish(summary, "finished", "")
    except (ConfigError, manifest.ManifestError, JobAborted) as exc:
        _finish(summary, "aborted", str(exc))
    except storage.StorageError as exc:
        _finish(summary, "aborted", f"storage unreachable: {exc}; committed shards are kept: rerun the same "
                                    f"command to resume once the storage is back")
        owns_output = False  # writing the summary there would only wait out the retries again; a rerun cleans up
    except KeyboardInterrupt:
        _finish(summary, "interrupted", "interrupted; rerun the same command to resume")
    except JobLost as exc:
        _finish(summary, "interrupted", str(exc))
    except Exception as exc:  # noqa: BLE001 - Ray's connection errors have no common base; decide by module
        if type(exc).__module__.startswith("ray") or isinstance(exc, ConnectionError):
            _finish(summary, "interrupted", f"Ray cluster lost: {type(exc).__name__}: {exc}")
        else:
            raise
    finally:
        restore_sigterm()
        # 7. Stop the actors; then the output holds only committed shards, and the summary
        wind_down(job, summary, started, pool, ray_started_here, owns_output)
    # 8. Print the summary
    print(summary.format(), flush=True)
    return summary


def _check_same_job(record: dict, plan: manifest.Plan, job: JobConfig) -> None:
    if record.get("refresh"):
        # Its shards no longer match any one plan: a run would render rows the refresh already holds, twice.
        raise JobAborted(f"{job.out} is kept up to date by `ray-render refresh`: run `ray-render refresh` with the "
                         f"manifest, or pass --overwrite to start again, or choose another --out")
    differences = []
    if record.get("plan_fingerprint") != plan.fingerprint:
        differences.append("the plan (manifest files, their rows, --shard-size or --limit)")
    if record.get("settings_fingerprint") != settings_fingerprint(job):
        old = record.get("settings", {})
        changed = [name for name in OUTPUT_SETTINGS if old.get(name) != json.loads(json.dumps(getattr(job, name)))]
        differences.append(f"the render settings ({', '.join(changed) or 'see _job.json'})")
    if differences:
        raise JobAborted(f"{job.out} holds another job: {' and '.join(differences)} differ from this one; "
                         f"pass --overwrite to replace it, or choose another --out")


def _check_same_model(record: dict, model: dict) -> None:
    old = record.get("model") or {}
    keys = ("family", "revision", "dtype")
    same_device = str(old.get("device", "")).split(":")[0] == str(model.get("device", "")).split(":")[0]
    if any(old.get(key) != model.get(key) for key in keys) or not same_device:
        raise JobAborted(f"the output was rendered by {old.get('family')} {old.get('revision')} on "
                         f"{old.get('device')} {old.get('dtype')}, this run loads {model.get('family')} "
                         f"{model.get('revision')} on {model.get('device')} {model.get('dtype')}; images would not "
                         f"match: pass --overwrite to start again, or choose another --out")


def _record(job: JobConfig, plan: manifest.Plan, summary: Summary) -> dict:
    return {"run_id": summary.run_id, "started_at": summary.started_at, "plan_fingerprint": plan.fingerprint,
            "settings_fingerprint": settings_fingerprint(job), "settings": job.record(), "model": summary.model,
            "files": plan.files, "total_rows": plan.total_rows, "shards": len(plan.shards)}


def _connect(job: JobConfig) -> bool:
    """Connect to the cluster at job.address (or RAY_ADDRESS), else start a local Ray; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = job.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    ray.init(log_to_driver=True)  # sized to this machine: every CPU and GPU it has
    return True


def start_pool(job: JobConfig, plan: manifest.Plan):
    """A RenderPool sized to the cluster: one actor per GPU (num_gpus each) when the device resolves to cuda,
    else `--actors` CPU actors (default 1) with `cpus_per_actor` each."""
    import ray

    from ray_render.actor import RenderActor
    from ray_render.pool import RenderPool

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    use_gpus = job.device == "cuda" or (job.device == "auto" and cluster_gpus > 0)
    if use_gpus:
        if cluster_gpus == 0 and job.actors is None:
            raise JobAborted("--device cuda, but the Ray cluster has no GPUs; use --device cpu, or pass --actors N "
                             "to wait for GPU nodes an autoscaler will add")
        num_actors = job.actors or max(1, int(cluster_gpus // job.gpus_per_actor))
        if job.actors and job.actors * job.gpus_per_actor > cluster_gpus:
            log.warning("%d actors need %g GPUs, the cluster has %g now: the others wait for room", job.actors,
                        job.actors * job.gpus_per_actor, cluster_gpus)
    else:
        num_actors = job.actors or 1
    options = {"num_cpus": job.cpus_per_actor, "num_gpus": job.gpus_per_actor if use_gpus else 0,
               # The driver sees every failure and decides: no restarts behind its back, no silent re-runs.
               "max_restarts": 0, "max_task_retries": 0}
    remote_actor = ray.remote(RenderActor).options(**options)
    log.info("starting %d render actor(s) (%s, model %s)", num_actors,
             f"{options['num_gpus']:g} GPU each" if use_gpus else f"{job.cpus_per_actor:g} CPU each", job.model)
    return RenderPool(lambda index: remote_actor.remote(job, index, plan.passthrough_schema), num_actors,
                      job.max_in_flight)


def _wait_until_ready(pool) -> None:
    from ray_render.pool import PoolError

    try:
        while pool.info is None:
            pool.wait(WAIT_S)
            if time.monotonic() - pool.last_ready > NO_ACTOR_TIMEOUT_S:
                raise JobLost(f"no render actor started within {NO_ACTOR_TIMEOUT_S:.0f} s: the cluster has no room "
                              f"for them (GPUs, CPUs, memory)")
    except PoolError as exc:
        raise JobAborted(str(exc)) from None


def _dispatch(job: JobConfig, pool, todo: list, summary: Summary) -> None:
    """Keep every actor's queue full, count results, retry failed shards, stop when the error budget is spent."""
    from ray_render.pool import PoolError, ShardDone

    pending = deque(todo)
    attempts: dict[str, int] = {}
    uncharged: dict[str, int] = {}  # lost attempts that never ran, or died in a model call (journal.py blames rows)
    started = time.monotonic()
    progress = Progress(summary.rows_total, summary.rows_resumed, enabled=job.progress)
    try:
        while pending or pool.has_work():
            while pending and pool.can_submit():
                shard = pending.popleft()
                attempts[shard.shard_id] = attempts.get(shard.shard_id, 0) + 1
                pool.submit(shard, attempts[shard.shard_id])
            if not pending:
                pool.reissue_stragglers()
            try:
                events = pool.wait(WAIT_S)
            except PoolError as exc:
                raise JobLost(str(exc)) from None
            for event in events:
                if isinstance(event, ShardDone):
                    result = event.result
                    summary.add(result.counts, result.images)
                    summary.shards_committed += 1
                    summary.rows_this_run += result.rows
                    summary.images_this_run += result.images
                    summary.render_s += result.render_ms / 1000.0
                    progress.update(result.rows, result.counts)
                    continue
                if event.actor_lost and (not event.started or journal.died_rendering(job.out, event.shard.shard_id,
                                                                                     job.storage_options)):
                    # It never ran (queued on the lost actor), or it died in a model call: see journal.py.
                    uncharged[event.shard.shard_id] = uncharged.get(event.shard.shard_id, 0) + 1
                elif not event.actor_lost and event.error.startswith("StorageError"):
                    _check_storage(job)  # the actor's retries are spent: is the storage itself gone?
                if attempts[event.shard.shard_id] - uncharged.get(event.shard.shard_id, 0) <= job.retries:
                    summary.shard_retries += 1
                    log.warning("shard %s attempt %d failed, trying again: %s", event.shard.shard_id, event.attempt,
                                storage.redact(event.error, job.storage_options))
                    pending.appendleft(event.shard)
                else:
                    log.error("shard %s failed %d times, giving up on it (a rerun tries again): %s",
                              event.shard.shard_id, event.attempt, storage.redact(event.error, job.storage_options))
                    summary.shards_lost.append(event.shard.shard_id)
                    summary.add({"failed": event.shard.num_rows}, 0)
                    summary.rows_this_run += event.shard.num_rows
                    progress.update(event.shard.num_rows, {"failed": event.shard.num_rows})
            _check_budget(job, summary, progress)
            if pool.num_ready == 0 and time.monotonic() - pool.last_ready > NO_ACTOR_TIMEOUT_S:
                raise JobLost(f"no render actor for {NO_ACTOR_TIMEOUT_S:.0f} s: the cluster lost its nodes")
    finally:
        progress.close()
        summary.rendering_s = time.monotonic() - started
        summary.actors_replaced = pool.actors_lost
        summary.stragglers_reissued = pool.reissued


def _check_storage(job: JobConfig) -> None:
    """Raise StorageError when the output root cannot be reached even after retries (the storage is gone)."""
    writer.committed_shard_ids(job.out, job.storage_options)


def _check_budget(job: JobConfig, summary: Summary, progress: Progress) -> None:
    finished = sum(progress.counts.values())
    failed = progress.counts["failed"]
    if finished >= MIN_ROWS_FOR_BUDGET and failed > job.max_failed_fraction * finished:
        raise JobAborted(f"{failed} of {finished} rows failed in this run, more than --max-failed-fraction "
                         f"{job.max_failed_fraction:g}; see the 'error' column of {job.out}/metadata")


def _finish(summary: Summary, state: str, message: str) -> None:
    summary.state = state
    summary.message = message
    summary.finished_at = _now()
    if state == "aborted":
        summary.exit_code = EXIT_ABORTED
    elif state == "interrupted":
        summary.exit_code = EXIT_LOST
    elif summary.rows["failed"] or summary.rows["invalid"]:
        summary.exit_code = EXIT_ROWS
    else:
        summary.exit_code = EXIT_OK


def wind_down(job: JobConfig, summary: Summary, started: float, pool: RenderPool | None, ray_started_here: bool,
              owns_output: bool, unsettled: set[str] = frozenset()) -> None:
    """The end of every run, whatever ended it: stop the actors (and the Ray this run started), then clean the
    output and write the summary there if this run claimed it. `unsettled`: shards an earlier shutdown left."""
    if pool is not None:
        unsettled = set(unsettled) | pool.shutdown()
    if ray_started_here:
        import ray

        ray.shutdown()
    summary.wall_s = time.monotonic() - started
    summary.message = storage.redact(summary.message, job.storage_options)
    if owns_output:
        _close_output(job, summary, unsettled)


def _close_output(job: JobConfig, summary: Summary, unsettled: set[str]) -> None:
    """Remove orphans of unfinished attempts (the actors are stopped now); write the summary and the record.

    `unsettled` shards may still be written by an actor that is being killed: their files are left for the next
    run to clean, since removing a metadata file that a dying copy commits a moment later would lose its rows."""
    so = job.storage_options
    try:
        committed = writer.committed_shard_ids(job.out, so)
        writer.remove_orphans(job.out, committed | unsettled, so)
        journal.remove_settled(job.out, committed, so)
        writer.write_summary(job.out, summary.to_dict(), so)
        record = writer.read_job_record(job.out, so) or {}
        record["summary"] = summary.to_dict()
        writer.write_job_record(job.out, record, so)
    except Exception as exc:  # noqa: BLE001 - the printed summary still tells the outcome
        log.error("could not write the summary to %s: %s", job.out, storage.redact(str(exc), so))
    # A run that rendered nothing leaves the output as it found it: its report stands (a rerun stays cheap).
    if job.report and (summary.rows_this_run or not storage.exists(storage.join(job.out, _REPORT_HTML), so)):
        write_report(job, summary)


def write_report(job: JobConfig, summary: Summary) -> None:
    """contact_sheet.png + report.html under the output root; a report that cannot be written only logs."""
    from ray_render import report

    try:
        report.write_report(job.out, job.storage_options, summary=summary.to_dict())
    except Exception as exc:  # noqa: BLE001 - a report must never fail a job
        log.warning("could not write the job report to %s: %s", job.out,
                    storage.redact(f"{type(exc).__name__}: {exc}", job.storage_options))


def _sigterm_raises_interrupt():
    """`ray job stop` and schedulers send SIGTERM: treat it as Ctrl-C so the run stops its actors and reports."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
