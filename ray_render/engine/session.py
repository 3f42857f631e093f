"""RunSession: the lifecycle every run shares, `ray-render run` and `ray-render refresh` alike.

    with RunSession(job, "run") as session:
        ...                               plan (the caller's own step: nothing is written before the lease)
        session.acquire_output()          refuse a foreign root, take the output's lease: the committed shards
        session.clear_output()            optional (--overwrite): void every commit, delete ray-render's files
        session.connect()                 optional: connect to Ray (or start a local one) before any actor
        session.start_pool(plan)          connect to Ray, start the actors, wait for one
        session.claim_output(record)      finish what a dead holder left (publish, remove), write the job record
        session.dispatch(shards)          hand out shards with backpressure, commit results, retry, error budget
        session.stop_pool()               optional: stop the actors now (wind-down does it otherwise)
    session.summary                       the outcome, with its exit code (engine/summary.py)

Leaving the `with` block winds the run down whatever ended it: the actors are stopped (and the Ray this run
started); if this run claimed the output, the attempts it started that were not committed are removed and the
summary and report are written there; then the lease is released. Every exception becomes an outcome there too
(`_record_failure`): the caller gets a Summary, never a traceback. Storage calls on this path are guarded: a
storage that fails now loses the written summary, not the printed one.

The driver is the only committer (output/commits.py has the protocol): actors write attempts, the lease holder
commits them, so an attempt that loses a race or outlives its run never becomes visible.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING

from ray_render import storage
from ray_render.config import ConfigError, JobConfig
from ray_render.engine import journal
from ray_render.engine.dispatch import NO_ACTOR_TIMEOUT_S, WAIT_S, Dispatcher
from ray_render.engine.plan import ManifestError, Plan, Shard
from ray_render.engine.repairs import Repair
from ray_render.engine.signals import StopSignals
from ray_render.engine.summary import JobAborted, JobLost, Summary, now_iso
from ray_render.output import commits, layout, record
from ray_render.output.lease import Lease, LeaseHeld
from ray_render.output.log import Fenced, LogState, read_state
from ray_render.output.record import RecordDamaged

if TYPE_CHECKING:  # the pool imports ray, which a run with nothing left to do never loads
    from ray_render.engine.pool import RenderPool

log = logging.getLogger("ray_render")

SHUTDOWN_GRACE_S = 10.0  # how long stopping lets cancelled calls return before it kills their actors
SIGNAL_GRACE_S = 1.0  # ... after SIGTERM or Ctrl-C: the whole wind-down must fit in `ray job stop`'s 3 s
STORAGE_GONE = ("storage unreachable: {error}; committed shards are kept: rerun the same command to resume once "
                "the storage is back")


def is_ray_error(exc: BaseException) -> bool:
    """An error from Ray itself (its connection errors have no common base): the cluster is lost, not a bug here."""
    module = type(exc).__module__ or ""
    return module == "ray" or module.startswith("ray.") or isinstance(exc, ConnectionError)


class RunSession:
    """One run from connecting to Ray to its exit code; see the module docstring for the order of the steps."""

    def __init__(self, job: JobConfig, command: str = "run") -> None:
        self.job = job
        self.command = command
        self.summary = Summary(out=job.out, run_id=uuid.uuid4().hex[:12], started_at=now_iso())
        self.started = time.monotonic()
        self.pool: RenderPool | None = None
        self.lease: Lease | None = None
        self._log_state: LogState | None = None
        self.committed: dict[str, dict] = {}  # shard id -> its commit entry: the log's, then this run's
        self.owns_output = False  # the output is cleaned and the summary written there only once this run claimed it
        self._ray_started_here = False
        self._connected = False  # connect() has run
        self._attempts: set[tuple[str, str]] = set()  # (shard, attempt) this run started, from the pools it stopped
        self._unsettled: set[tuple[str, str]] = set()  # attempts a stopped actor may still be writing
        self.signals = StopSignals()

    # -- the lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> RunSession:
        self.signals.install()
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        handled = True
        try:
            if exc is None:
                self.summary.finish("finished")
            else:
                handled = self._record_failure(exc)
        finally:
            self.signals.winding_down = True  # a second signal now must not cut the clean-up short
            try:
                self.wind_down()
            finally:
                self.signals.restore()
        return handled

    def _record_failure(self, exc: BaseException) -> bool:
        """Turn the exception that ended the run into its outcome; False for the ones to re-raise (SystemExit)."""
        if isinstance(exc, (ConfigError, ManifestError, JobAborted, LeaseHeld, RecordDamaged,
                            storage.FilesystemMissing)):
            self.summary.finish("aborted", str(exc))
        elif isinstance(exc, Fenced):
            self.summary.finish("aborted", f"this run lost its lease on {self.job.out}: {exc}; it stopped without "
                                           f"committing more, the run that holds the output goes on")
            self.owns_output = False  # the output is another run's now
        elif isinstance(exc, storage.StorageError):
            self.summary.finish("aborted", STORAGE_GONE.format(error=exc))
            self.owns_output = False  # writing the summary there would only wait out the retries again
        elif isinstance(exc, KeyboardInterrupt):
            how = f" by {self.signals.received}" if self.signals.received else ""
            self.summary.finish("interrupted", f"interrupted{how}; rerun the same command to resume")
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

    def acquire_output(self) -> LogState:
        """Refuse an output root that holds something other than a ray-render job (unless --overwrite), then take
        its lease; returns the commit log as it stood (LeaseHeld when another live run holds it). Once per run: a
        second call returns the same state."""
        if self._log_state is not None:
            return self._log_state
        so = self.job.storage_options
        names = set(storage.list_names(self.job.out, so))
        ours = {layout.JOB_RECORD, layout.LOG_DIR, layout.MANIFESTS_DIR} & names  # staged manifests: a job to come
        if names and not ours and not self.job.overwrite:
            shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
            raise JobAborted(f"{self.job.out} is not empty ({shown}) and holds no ray-render job: choose an empty "
                             f"or new --out, or pass --overwrite to render into it (only ray-render's own files are "
                             f"ever deleted there)")
        if layout.OLD_COMMITS_DIR in names and layout.LOG_DIR not in names and not self.job.overwrite:
            raise JobAborted(f"{self.job.out} was written by an earlier version of ray-render (commit markers in "
                             f"{layout.OLD_COMMITS_DIR}/): pass --overwrite to render it again, or choose another "
                             f"--out")
        self.lease = Lease(self.job.out, self.summary.run_id, so, ttl_s=self.job.lease_ttl_s, command=self.command)
        state = self.lease.acquire()
        self.committed = dict(state.committed)
        # Readers of metadata/ from here on see every commit; a commit whose files something else deleted is void.
        for shard_id in commits.roll_forward(self.job.out, self.committed, so).vanished:
            log.warning("shard %s is committed but its files are gone from %s: rendering it again", shard_id,
                        self.job.out)
            del self.committed[shard_id]
        self._log_state = state
        return state

    def clear_output(self) -> None:
        """--overwrite: a `clear` entry voids every commit, then ray-render's own files go (nothing else)."""
        log.info("--overwrite: clearing %s", self.job.out)
        self.lease.append("clear")
        self.committed = {}
        commits.clear_output(self.job.out, self.job.storage_options)

    def connect(self) -> str:
        """Connect to the cluster at --address (or RAY_ADDRESS), else start a local Ray; returns the device the
        job's actors load their model on (`job_device`). Once per run: later calls only return the device."""
        if not self._connected:
            self._ray_started_here = _connect(self.job)
            self.signals.reinstall()  # ray.init replaced our SIGTERM handler with its own
            self._connected = True
        return job_device(self.job)

    def start_pool(self, plan: Plan, shards: int | None = None, expected_model: dict | None = None) -> RenderPool:
        """Connect to Ray, start the render actors and wait until one is ready (its model loaded). `shards`: how
        many shards are left (the elastic pool asks for no more actors); `expected_model`: the model the output was
        rendered with (its job record's), which every actor must match."""
        self.connect()
        shards = len(plan.shards) if shards is None else shards
        self.pool = _start_pool(self.job, plan, self.summary.run_id, max(1, shards), expected_model)
        _wait_until_ready(self.pool)
        self.summary.startup_s = time.monotonic() - self.started
        self.summary.model = {key: value for key, value in self.pool.info.items()
                              if key not in ("worker", "node_id", "batch_size")}
        return self.pool

    def claim_output(self, job_record: dict) -> None:
        """Remove what the previous holder left uncommitted while no actor of this run writes yet, and write the job
        record: the output is this run's."""
        out, so = self.job.out, self.job.storage_options
        previous = self.lease.previous
        if previous is None:
            stale = set()  # a new log: nothing was written before it
        elif previous["how"] == "released":
            stale = {(shard_id, attempt_id) for shard_id, attempt_id in previous.get("leftovers", [])}
        else:  # the holder died or was fenced: whatever it started may be anywhere
            stale = commits.uncommitted_attempts(out, self.committed, so)
        stale = self._uncommitted(stale)
        if stale:
            log.info("removing %d uncommitted attempt(s) an earlier run left", len(stale))
        commits.remove_attempts(out, stale, so)
        commits.remove_unpublished(out, self.committed, so)
        record.write_job_record(out, {**job_record, "layout_version": layout.LAYOUT_VERSION}, so)
        self.owns_output = True

    def commit(self, shard: Shard, result, keeps: tuple[str, ...] = ()) -> None:
        """Commit a finished attempt (a log entry: from now on it is the shard's, with the attempts it `keeps`: a
        repair's base), then publish its metadata."""
        info = {**asdict(result), "file": shard.file, "row_start": shard.row_start, "row_stop": shard.row_stop}
        info.pop("failed_rows", None)  # the metadata has them; a commit entry stays small
        fields = {"keeps": list(keeps)} if keeps else {}
        seq = self.lease.append("commit", shard=shard.shard_id, attempt=result.attempt_id, info=info, **fields)
        entry = {"seq": seq, "shard": shard.shard_id, "attempt": result.attempt_id, "info": info, **fields}
        replaced = self.committed.get(shard.shard_id)
        if replaced is not None:  # --no-resume rendered it again: what it no longer keeps is removed at the end
            self._attempts |= {(shard.shard_id, attempt) for attempt in commits.committed_attempts(replaced)
                               - commits.committed_attempts(entry)}
        self.committed[shard.shard_id] = entry
        commits.publish(self.job.out, shard.shard_id, result.attempt_id, self.job.storage_options)

    def dispatch(self, shards: list[Shard], repairs: list[Repair] = ()) -> None:
        """Hand out shards with backpressure, commit results, retry lost attempts, repair failed rows on another
        actor, stop when the error budget is spent (engine/dispatch.py decides, `commit` commits)."""
        Dispatcher(self, shards, repairs).run()

    def check_committed(self, shard_ids: set[str]) -> None:
        """The end of a run that rendered: every shard of the plan is committed (or given up on: its rows counted
        failed), and published. One that vanished (something else deletes files under the root) is an error,
        never exit 0; the next run renders it again."""
        out, so = self.job.out, self.job.storage_options
        committed = read_state(out, so).committed
        published = {name[: -len(".parquet")] for name in storage.list_names(storage.join(out, layout.METADATA_DIR),
                                                                             so)}
        lost = set(self.summary.shards_lost)
        missing = sorted(shard_id for shard_id in shard_ids
                         if shard_id not in lost and (shard_id not in committed or shard_id not in published))
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise JobAborted(f"{len(missing)} shard(s) committed by this run are gone from {out} ({shown}): "
                             f"something else deletes files there; rerun the same command to render them again")

    def stop_pool(self) -> None:
        """Stop the actors now; afterwards nothing writes to the output but this driver. After a stop signal the
        calls get a short grace: `ray job stop` SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S (3) seconds later."""
        if self.pool is not None:
            grace = SIGNAL_GRACE_S if self.signals.received else SHUTDOWN_GRACE_S
            self.summary.actors_started += self.pool.actors_started
            self._unsettled |= self.pool.shutdown(grace)
            self._attempts |= set(self.pool.attempts)
            self.pool = None

    def wind_down(self) -> None:
        """The end of every run, whatever ended it: stop the actors, clean the output and write the summary there if
        this run claimed it, release the lease; then stop the Ray this run started (last: after a stop signal the
        output's state is final before `ray job stop`'s SIGKILL can come)."""
        self.stop_pool()
        self.summary.wall_s = time.monotonic() - self.started
        self.summary.message = storage.redact(self.summary.message, self.job.storage_options)
        try:
            if self.lease is not None and self.lease.fenced:
                self._remove_own_attempts()  # the output is another run's; this run's leftovers it may still remove
            elif self.owns_output:
                self._close_output()
            if self.lease is not None:
                if self.summary.message.startswith("storage unreachable"):
                    self.lease.abandon()  # a release would only wait out the retries; a rerun on this host takes over
                else:
                    self._release()
        finally:
            if self._ray_started_here:
                import ray

                ray.shutdown()
                self._ray_started_here = False

    # -- helpers -------------------------------------------------------------------------------------------------

    def _close_output(self) -> None:
        """Remove orphans of unfinished attempts (the actors are stopped now); write the summary, the record's
        summary and the report.

        Unsettled shards may still be written by an actor that is being killed: their files are left for the next
        run to clean, since removing a metadata file that a dying copy commits a moment later would lose its rows."""
        job, so, summary = self.job, self.job.storage_options, self.summary
        try:
            commits.remove_attempts(job.out, self._uncommitted(self._attempts - self._unsettled), so)
            journal.remove_settled(job.out, set(self.committed), so)
            record.write_summary(job.out, summary.to_dict(), so)
            job_record = record.read_job_record(job.out, so) or {}
            job_record["summary"] = summary.to_dict()
            record.write_job_record(job.out, job_record, so)
            # A run that rendered nothing leaves the output as it found it: its report stands (a rerun stays cheap).
            # After a stop signal there is no time for one: `ray job stop` kills the driver 3 s after its SIGTERM.
            wants_report = job.report and not self.signals.received and (
                summary.rows_this_run or not storage.exists(storage.join(job.out, layout.REPORT_HTML), so))
        except Exception as exc:  # noqa: BLE001 - the printed summary still tells the outcome
            log.error("could not write the summary to %s: %s", job.out, storage.redact(str(exc), so))
            return
        if wants_report:
            _write_report(job, summary)

    def _remove_own_attempts(self) -> None:
        """Delete the attempts this run started and did not commit (no other run can commit them: their ids are
        this run's), once no actor of it writes them any more."""
        try:
            commits.remove_attempts(self.job.out, self._uncommitted(self._attempts - self._unsettled),
                                    self.job.storage_options)
        except Exception as exc:  # noqa: BLE001 - leftovers of a fenced run are invisible; the holder's scan finds them
            log.warning("could not remove this run's attempts from %s: %s", self.job.out,
                        storage.redact(str(exc), self.job.storage_options))

    def _uncommitted(self, attempts: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (shard, attempt)s that are not among their shard's committed attempts."""
        committed = self.committed
        return {(shard_id, attempt) for shard_id, attempt in attempts
                if shard_id not in committed or attempt not in commits.committed_attempts(committed[shard_id])}

    def _release(self) -> None:
        """Give the lease back, naming the attempts a killed actor may still write: the next holder removes them."""
        leftovers = sorted(self._uncommitted(self._unsettled))
        try:
            self.lease.release(leftovers=leftovers)
        except Exception as exc:  # noqa: BLE001 - an unreleased lease expires by itself; the next run takes over
            self.lease.abandon()
            log.error("could not release the lease on %s: %s", self.job.out,
                      storage.redact(str(exc), self.job.storage_options))


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


def _start_pool(job: JobConfig, plan: Plan, run_id: str, shards: int, expected_model: dict | None) -> RenderPool:
    """The render actors: on GPUs (when the device resolves to cuda) an elastic pool of up to --max-actors (default:
    one per shard left), each asking for `gpus_per_actor` GPUs so that an autoscaler adds nodes for the ones that
    wait; --actors N makes it N; on CPU, --actors (default 1) with `cpus_per_actor` each. The device decided here is
    the one every actor loads its model on."""
    import ray

    from ray_render.engine.actor import RenderActor
    from ray_render.engine.pool import CALLS_AT_ONCE, RenderPool
    from ray_render.models.base import same_model

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    device = job_device(job)
    use_gpus = device == "cuda"
    if use_gpus:
        num_actors = job.actors or min(job.max_actors or shards, shards)
        if num_actors * job.gpus_per_actor > cluster_gpus:
            log.info("%d GPU actor(s) asked for, the cluster has %g GPU(s) now: the others wait for room (an "
                     "autoscaler adds nodes for them)", num_actors, cluster_gpus)
    else:
        num_actors = job.actors or 1
    options = {"num_cpus": job.cpus_per_actor, "num_gpus": job.gpus_per_actor if use_gpus else 0,
               # The driver sees every failure and decides: no restarts behind its back, no silent re-runs.
               "max_restarts": 0, "max_task_retries": 0, "max_concurrency": CALLS_AT_ONCE}
    actor_class = ray.remote(RenderActor)
    actor_job = dataclasses.replace(job, device=device)  # never "auto" in an actor: no GPU Ray did not reserve
    log.info("starting %d render actor(s) (%s, model %s)", num_actors,
             f"{options['num_gpus']:g} GPU each" if use_gpus else f"{job.cpus_per_actor:g} CPU each", job.model)
    roots = input_roots(job, plan)
    log_level = log.getEffectiveLevel()  # the actors log at the driver's level (--log-level)

    def make_actor(index: int, avoid_nodes: tuple[str, ...]):
        # Ray's label selector: placed on none of the nodes where the pool retired an actor (engine/pool.py).
        where = {"label_selector": {"ray.io/node-id": f"!in({','.join(avoid_nodes)})"}} if avoid_nodes else {}
        return actor_class.options(**options, **where).remote(actor_job, index, plan.passthrough_schema, roots,
                                                              log_level)

    return RenderPool(make_actor, num_actors, job.max_in_flight, run_id=run_id, call_timeout_s=job.call_timeout_s,
                      expected_model=expected_model, same_model=same_model)


def job_device(job: JobConfig) -> str:
    """The device every render actor of the job loads its model on: --device, or for "auto" cuda when the cluster
    has GPUs and the CPU otherwise. Decided once, in the driver (needs a connection to Ray)."""
    import ray

    if job.device != "auto":
        return job.device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def input_roots(job: JobConfig, plan: Plan) -> list[str]:
    """Where edit rows' input images may come from by default: the directories of the job's manifests (the actors
    add --input-roots)."""
    return sorted({url.rsplit("/", 1)[0] for url in plan.files})


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
