"""RunSession: the lifecycle every run shares, `ray-render run` and `ray-render refresh` alike.

    with RunSession(job) as session:
        ...                               plan, read the output (the caller's own steps)
        session.start_pool(plan)          connect to Ray (or start a local one), start the actors, wait for one
        session.claim_output(record)      remove leftovers of crashed attempts, write the job record
        session.dispatch(shards)          hand out shards with backpressure, collect results, retry, error budget
        session.stop_pool()               optional: stop the actors now (wind-down does it otherwise)
    session.summary                       the outcome, with its exit code (engine/summary.py)

Leaving the `with` block winds the run down whatever ended it: the actors are stopped (and the Ray this run
started), then, if this run claimed the output, leftovers of unfinished attempts are removed and the summary and
report are written there. Every exception becomes an outcome there too (`_OUTCOMES`): the caller gets a Summary,
never a traceback. Storage calls on this path are guarded: a storage that fails now loses the written summary,
not the printed one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING

from ray_render import storage
from ray_render.config import ConfigError, JobConfig
from ray_render.engine import journal
from ray_render.engine.plan import ManifestError, Plan, Shard
from ray_render.engine.progress import Progress
from ray_render.engine.summary import Summary, now_iso
from ray_render.output import commits, layout, record

if TYPE_CHECKING:  # the pool imports ray, which a run with nothing left to do never loads
    from ray_render.engine.pool import RenderPool

log = logging.getLogger("ray_render")

MIN_ROWS_FOR_BUDGET = 100  # judge --max-failed-fraction only after this many rows finished in this run
NO_ACTOR_TIMEOUT_S = 1800.0  # give up when no actor has been ready this long (model download, autoscaling)
WAIT_S = 1.0  # how long one wait for results may block: the loop's tick for progress and checks
STORAGE_GONE = ("storage unreachable: {error}; committed shards are kept: rerun the same command to resume once "
                "the storage is back")


class JobAborted(Exception):
    """The job cannot go on (exit code 2); the message says why and how to fix it."""


class JobLost(Exception):
    """The cluster went away or the run was interrupted (exit code 3); a rerun resumes."""


def is_ray_error(exc: BaseException) -> bool:
    """An error from Ray itself (its connection errors have no common base): the cluster is lost, not a bug here."""
    module = type(exc).__module__ or ""
    return module == "ray" or module.startswith("ray.") or isinstance(exc, ConnectionError)


class RunSession:
    """One run from connecting to Ray to its exit code; see the module docstring for the order of the steps."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.summary = Summary(out=job.out, run_id=uuid.uuid4().hex[:12], started_at=now_iso())
        self.started = time.monotonic()
        self.pool: RenderPool | None = None
        self.owns_output = False  # the output is cleaned and the summary written there only once this run claimed it
        self._ray_started_here = False
        self._unsettled: set[str] = set()  # shards a stopped actor may still be writing
        self._restore_sigterm = lambda: None

    # -- the lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> RunSession:
        self._restore_sigterm = _sigterm_raises_interrupt()
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        handled = True
        try:
            if exc is None:
                self.summary.finish("finished")
            else:
                handled = self._record_failure(exc)
        finally:
            self._restore_sigterm()
            self.wind_down()
        return handled

    def _record_failure(self, exc: BaseException) -> bool:
        """Turn the exception that ended the run into its outcome; False for the ones to re-raise (SystemExit)."""
        if isinstance(exc, (ConfigError, ManifestError, JobAborted, storage.FilesystemMissing)):
            self.summary.finish("aborted", str(exc))
        elif isinstance(exc, storage.StorageError):
            self.summary.finish("aborted", STORAGE_GONE.format(error=exc))
            self.owns_output = False  # writing the summary there would only wait out the retries again
        elif isinstance(exc, KeyboardInterrupt):
            self.summary.finish("interrupted", "interrupted; rerun the same command to resume")
        elif isinstance(exc, JobLost):
            self.summary.finish("interrupted", str(exc))
        elif isinstance(exc, Exception) and is_ray_error(exc):
            self.summary.finish("interrupted", f"Ray cluster lost: {type(exc).__name__}: {exc}")
        elif isinstance(exc, Exception):
            log.debug("internal error", exc_info=exc)  # the traceback, shown with --verbose
            self.summary.finish("failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            return False
        return True

    def start_pool(self, plan: Plan) -> RenderPool:
        """Connect to Ray, start the render actors and wait until one is ready (its model loaded)."""
        self._ray_started_here = _connect(self.job)
        self.pool = _start_pool(self.job, plan)
        _wait_until_ready(self.pool)
        self.summary.startup_s = time.monotonic() - self.started
        self.summary.model = {key: value for key, value in self.pool.info.items()
                              if key not in ("worker", "batch_size")}
        return self.pool

    def claim_output(self, job_record: dict) -> None:
        """Remove what crashed attempts left (no actor writes yet) and write the job record: the output is ours."""
        so = self.job.storage_options
        commits.remove_orphans(self.job.out, commits.committed_shard_ids(self.job.out, so), so)
        record.write_job_record(self.job.out, job_record, so)
        self.owns_output = True

    def dispatch(self, shards: list[Shard]) -> None:
        """Keep every actor's queue full, count results, retry failed shards, stop when the error budget is spent."""
        from ray_render.engine.pool import PoolError, ShardDone

        job, pool, summary = self.job, self.pool, self.summary
        pending = deque(shards)
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
                        self._count_done(event.result, progress)
                        continue
                    shard_id = event.shard.shard_id
                    if event.actor_lost and (not event.started or journal.died_rendering(job.out, shard_id,
                                                                                         job.storage_options)):
                        # It never ran (queued on the lost actor), or it died in a model call: see journal.py.
                        uncharged[shard_id] = uncharged.get(shard_id, 0) + 1
                    elif not event.actor_lost and event.error.startswith("StorageError"):
                        commits.committed_shard_ids(job.out, job.storage_options)  # raises if the storage is gone
                    error = storage.redact(event.error, job.storage_options)
                    if attempts[shard_id] - uncharged.get(shard_id, 0) <= job.retries:
                        summary.shard_retries += 1
                        log.warning("shard %s attempt %d failed, trying again: %s", shard_id, event.attempt, error)
                        pending.appendleft(event.shard)
                    else:
                        log.error("shard %s failed %d times, giving up on it (a rerun tries again): %s", shard_id,
                                  event.attempt, error)
                        summary.shards_lost.append(shard_id)
                        summary.add({"failed": event.shard.num_rows}, 0)
                        summary.rows_this_run += event.shard.num_rows
                        progress.update(event.shard.num_rows, {"failed": event.shard.num_rows})
                self._check_budget(progress)
                if pool.num_ready == 0 and time.monotonic() - pool.last_ready > NO_ACTOR_TIMEOUT_S:
                    raise JobLost(f"no render actor for {NO_ACTOR_TIMEOUT_S:.0f} s: the cluster lost its nodes")
        finally:
            progress.close()
            summary.rendering_s = time.monotonic() - started
            summary.actors_replaced = pool.actors_lost
            summary.stragglers_reissued = pool.reissued

    def stop_pool(self) -> None:
        """Stop the actors now; afterwards nothing writes to the output but this driver."""
        if self.pool is not None:
            self._unsettled |= self.pool.shutdown()
            self.pool = None

    def wind_down(self) -> None:
        """The end of every run, whatever ended it: stop the actors (and the Ray this run started), then clean the
        output and write the summary there if this run claimed it."""
        self.stop_pool()
        if self._ray_started_here:
            import ray

            ray.shutdown()
            self._ray_started_here = False
        self.summary.wall_s = time.monotonic() - self.started
        self.summary.message = storage.redact(self.summary.message, self.job.storage_options)
        if self.owns_output:
            self._close_output()

    # -- helpers -------------------------------------------------------------------------------------------------

    def _count_done(self, result, progress: Progress) -> None:
        summary = self.summary
        summary.add(result.counts, result.images)
        summary.shards_committed += 1
        summary.rows_this_run += result.rows
        summary.images_this_run += result.images
        summary.render_s += result.render_ms / 1000.0
        progress.update(result.rows, result.counts)

    def _check_budget(self, progress: Progress) -> None:
        finished = sum(progress.counts.values())
        failed = progress.counts["failed"]
        if finished >= MIN_ROWS_FOR_BUDGET and failed > self.job.max_failed_fraction * finished:
            raise JobAborted(f"{failed} of {finished} rows failed in this run, more than --max-failed-fraction "
                             f"{self.job.max_failed_fraction:g}; see the 'error' column of {self.job.out}/metadata")

    def _close_output(self) -> None:
        """Remove orphans of unfinished attempts (the actors are stopped now); write the summary, the record's
        summary and the report.

        Unsettled shards may still be written by an actor that is being killed: their files are left for the next
        run to clean, since removing a metadata file that a dying copy commits a moment later would lose its rows."""
        job, so, summary = self.job, self.job.storage_options, self.summary
        try:
            committed = commits.committed_shard_ids(job.out, so)
            commits.remove_orphans(job.out, committed | self._unsettled, so)
            journal.remove_settled(job.out, committed, so)
            record.write_summary(job.out, summary.to_dict(), so)
            job_record = record.read_job_record(job.out, so) or {}
            job_record["summary"] = summary.to_dict()
            record.write_job_record(job.out, job_record, so)
            # A run that rendered nothing leaves the output as it found it: its report stands (a rerun stays cheap).
            wants_report = job.report and (summary.rows_this_run
                                           or not storage.exists(storage.join(job.out, layout.REPORT_HTML), so))
        except Exception as exc:  # noqa: BLE001 - the printed summary still tells the outcome
            log.error("could not write the summary to %s: %s", job.out, storage.redact(str(exc), so))
            return
        if wants_report:
            _write_report(job, summary)


def _connect(job: JobConfig) -> bool:
    """Connect to the cluster at job.address (or RAY_ADDRESS), else start a local Ray; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = job.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # "local": a Ray of our own, sized to this machine, even when a `ray start` cluster runs here too.
    ray.init(address="local", log_to_driver=True)
    return True


def _start_pool(job: JobConfig, plan: Plan) -> RenderPool:
    """A RenderPool sized to the cluster: one actor per GPU (num_gpus each) when the device resolves to cuda,
    else `--actors` CPU actors (default 1) with `cpus_per_actor` each."""
    import ray

    from ray_render.engine.actor import RenderActor
    from ray_render.engine.pool import RenderPool

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


def _wait_until_ready(pool: RenderPool) -> None:
    from ray_render.engine.pool import PoolError

    try:
        while pool.info is None:
            pool.wait(WAIT_S)
            if time.monotonic() - pool.last_ready > NO_ACTOR_TIMEOUT_S:
                raise JobLost(f"no render actor started within {NO_ACTOR_TIMEOUT_S:.0f} s: the cluster has no room "
                              f"for them (GPUs, CPUs, memory)")
    except PoolError as exc:
        raise JobAborted(str(exc)) from None


def _write_report(job: JobConfig, summary: Summary) -> None:
    """contact_sheet.png + report.html under the output root; a report that cannot be written only logs."""
    from ray_render.output import report

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
