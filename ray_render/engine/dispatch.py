"""Dispatcher: the loop of one run that hands shards to the actor pool and decides what each result means.

    submit     keep every actor's queue full (the pool's backpressure), repairs on an actor other than the base's
    done       a finished attempt: commit it, or first repair its failed rows on another actor (engine/repairs.py)
    failed     a lost attempt: engine/deaths.py says whether it is charged to the shard's --retries; retry it or
               give up on the shard (its rows count failed, a rerun tries again)
    checks     the error budget (--max-failed-fraction), the lease (fenced: stop), actors (none for too long: lost)

The session (engine/session.py) owns the lifecycle around it and commits; the dispatcher only decides.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from ray_render import storage
from ray_render.engine import journal, repairs
from ray_render.engine.deaths import DeathLedger, SystematicDeaths
from ray_render.engine.plan import Shard
from ray_render.engine.progress import Progress
from ray_render.engine.repairs import Repair
from ray_render.engine.summary import JobAborted, JobLost
from ray_render.output import commits
from ray_render.output.log import Fenced

log = logging.getLogger("ray_render")

MIN_ROWS_FOR_BUDGET = 100  # judge --max-failed-fraction only after this many rows finished in this run
NO_ACTOR_TIMEOUT_S = 1800.0  # give up when no actor has been ready this long (model download, autoscaling)
REPAIR_WAIT_S = 300.0  # a repair waits this long for an actor other than its base's, then the base is kept
WAIT_S = 1.0  # how long one wait for results may block: the loop's tick for progress and checks


class Dispatcher:
    """One run's dispatch loop over `shards` (and `repairs_todo`: --retry-failed's repairs of committed shards)."""

    def __init__(self, session, shards: list[Shard], repairs_todo: list[Repair] = ()) -> None:
        self.session = session
        self.job, self.pool, self.summary = session.job, session.pool, session.summary
        self.pending = deque(shards)
        self.waiting: deque[tuple[Repair, float]] = deque((repair, time.monotonic()) for repair in repairs_todo)
        self.repairing: dict[str, Repair] = {}  # shard id -> its repair, submitted
        self.attempts: dict[str, int] = {}  # shard id -> attempts made (repairs included)
        self.charged: dict[str, int] = {}  # attempts counted against the shard's --retries
        self.inherit: dict[str, tuple[str, bool]] = {}  # what the next attempt of a shard learns from the last
        self.ledger = DeathLedger(self.job.retries, self.summary.rows_total)
        self.progress = Progress(self.summary.rows_total, self.summary.rows_resumed, enabled=self.job.progress)
        # Repairs need a second actor; with one, a failed row would only fail again where it failed.
        self.repairs_on = self.job.retries > 0 and self.pool.size > 1

    def run(self) -> None:
        from ray_render.engine.pool import PoolError, ShardDone

        pool, summary = self.pool, self.summary
        started = time.monotonic()
        try:
            while self.pending or self.waiting or pool.has_work():
                self._submit()
                try:
                    events = pool.wait(WAIT_S)
                except PoolError as exc:
                    raise JobLost(str(exc)) from None
                if not events and not pool.has_outstanding():
                    time.sleep(WAIT_S)  # only repairs waiting for an actor: nothing to wait on in Ray
                for event in events:
                    if isinstance(event, ShardDone):
                        self._done(event)
                    elif event.shard.shard_id in self.repairing:
                        self._repair_failed(event)
                    else:
                        self._failed(event)
                self._checks()
        except SystematicDeaths as exc:
            raise JobAborted(str(exc)) from None
        finally:
            self.progress.close()
            summary.rendering_s = time.monotonic() - started
            summary.actors_replaced = pool.actors_lost
            summary.actors_retired = pool.actors_retired
            summary.actors_peak = max(summary.actors_peak, pool.peak_ready)
            summary.actors_released = pool.actors_released
            summary.actors_timeline = pool.ready_timeline
            summary.stragglers_reissued = pool.reissued

    # -- submit --------------------------------------------------------------------------------------------------

    def _submit(self) -> None:
        pool = self.pool
        while self.pending and pool.can_submit():
            shard = self.pending.popleft()
            pool.submit(shard, self._next_attempt(shard.shard_id), self.inherit.get(shard.shard_id))
        for _ in range(len(self.waiting)):
            repair, since = self.waiting.popleft()
            alone = not pool.has_other(repair.avoid)  # no other actor is ready or coming
            if pool.can_submit(repair.avoid):
                pool.submit(repair.shard_for_repair(), self._next_attempt(repair.shard.shard_id), base=repair.base,
                            avoid=repair.avoid)
                self.repairing[repair.shard.shard_id] = repair
            elif alone or (not pool.has_other_ready(repair.avoid) and time.monotonic() - since > REPAIR_WAIT_S):
                log.warning("shard %s: no actor but the one that rendered it %s: its %d failed rows stay failed",
                            repair.shard.shard_id, "is left" if alone else f"for {REPAIR_WAIT_S:.0f} s",
                            len(repair.rows))
                self._keep_base(repair)
            else:
                self.waiting.append((repair, since))
        if not self.pending and not self.waiting:
            pool.reissue_stragglers()
            # What is left has an actor: the others' nodes can go, but for one that a repair of a call still
            # running may need.
            pool.release_idle(keep_spare=self.repairs_on and pool.has_work())

    def _next_attempt(self, shard_id: str) -> int:
        self.attempts[shard_id] = self.attempts.get(shard_id, 0) + 1
        return self.attempts[shard_id]

    # -- done ----------------------------------------------------------------------------------------------------

    def _done(self, event) -> None:
        result, shard = event.result, event.shard
        repair = self.repairing.pop(shard.shard_id, None)
        if repair is not None:  # a repair's metadata is the whole shard's: commit it, keeping the base's images
            base = repair.base_result
            self.session.commit(repair.shard, result, keeps=(repair.base, *repair.keeps))
            self.summary.rows_repaired += result.rendered.get("ok", 0)
            if base is not None:  # repaired within this run: the shard's rows are all this run's
                self._count(result, result.rows, base.rendered_images + result.rendered_images,
                            base.render_ms + result.render_ms)
            else:  # --retry-failed: this run rendered the repaired rows only
                self._count(result, sum(result.rendered.values()), result.rendered_images, result.render_ms)
            log.info("shard %s: %d of %d failed rows repaired on another actor", shard.shard_id,
                     result.rendered.get("ok", 0), len(repair.rows))
            return
        if self.repairs_on and repairs.needs_repair(result):
            log.info("shard %s: %d rows failed on %s; rendering them again on another actor", shard.shard_id,
                     len(result.failed_rows), result.worker)
            repair = Repair(shard, tuple(result.failed_rows), result.attempt_id, (), result, event.actor)
            self.waiting.append((repair, time.monotonic()))
            return
        self.session.commit(shard, result)
        self._count(result, result.rows, result.rendered_images, result.render_ms)

    def _repair_failed(self, event) -> None:
        repair = self.repairing.pop(event.shard.shard_id)
        log.warning("shard %s: the repair of its failed rows was lost (%s): they stay failed", event.shard.shard_id,
                    storage.redact(event.error, self.job.storage_options))
        self._keep_base(repair)

    def _keep_base(self, repair: Repair) -> None:
        """No repair: in a run the base is committed as it is; a committed base (--retry-failed) stays."""
        base = repair.base_result
        if base is not None:
            self.session.commit(repair.shard, base)
            self._count(base, base.rows, base.rendered_images, base.render_ms)
            return
        info = repair.base_info
        summary = self.summary
        summary.add(info.get("counts", {}), info.get("images", 0))
        summary.shards_committed += 1
        self.progress.update(info.get("rows", 0), info.get("counts", {}))

    def _count(self, result, rows_rendered: int, images_rendered: int, render_ms: float) -> None:
        """A shard committed: its counts join the output's, what this run rendered joins this run's."""
        summary = self.summary
        summary.add(result.counts, result.images)
        summary.shards_committed += 1
        summary.rows_this_run += rows_rendered
        summary.images_this_run += images_rendered
        summary.render_s += render_ms / 1000.0
        self.progress.update(result.rows, result.counts)
        self.ledger.progress()

    # -- failed --------------------------------------------------------------------------------------------------

    def _failed(self, event) -> None:
        job, summary = self.job, self.summary
        shard_id = event.shard.shard_id
        if not event.actor_lost and event.error.startswith("StorageError"):
            commits.committed_shard_ids(job.out, job.storage_options)  # raises if the storage is gone
        entry = journal.read(job.out, shard_id, event.attempt_id, job.storage_options) if event.actor_lost else {}
        sibling_working = event.actor_lost and not entry.get("rendering") and any(  # another call had the model
            journal.read(job.out, shard, attempt, job.storage_options).get("rendering")
            for shard, attempt in event.siblings)
        verdict = self.ledger.judge(event, entry, sibling_working)
        if entry or not event.actor_lost or shard_id not in self.inherit:
            self.inherit[shard_id] = verdict.inherit
        # else the attempt died before writing a journal: the next one learns what this one was to learn
        summary.node_losses += event.node_lost
        if verdict.inherit[1]:
            summary.rows_suspected += len(entry.get("rendering", []))
        self.charged[shard_id] = self.charged.get(shard_id, 0) + verdict.charged
        error = storage.redact(event.error, job.storage_options)
        if self.charged[shard_id] <= job.retries:
            summary.shard_retries += 1
            log.warning("shard %s attempt %d failed (%s), trying again: %s", shard_id, event.attempt, verdict.reason,
                        error)
            self.pending.appendleft(event.shard)
            return
        log.error("shard %s failed %d times, giving up on it (a rerun tries again): %s", shard_id, event.attempt,
                  error)
        summary.shards_lost.append(shard_id)
        summary.add({"failed": event.shard.num_rows}, 0)
        summary.rows_this_run += event.shard.num_rows
        self.progress.update(event.shard.num_rows, {"failed": event.shard.num_rows})

    # -- checks --------------------------------------------------------------------------------------------------

    def _checks(self) -> None:
        job, pool = self.job, self.pool
        finished = sum(self.progress.counts.values())
        failed = self.progress.counts["failed"]
        if finished >= MIN_ROWS_FOR_BUDGET and failed > job.max_failed_fraction * finished:
            raise JobAborted(f"{failed} of {finished} rows failed in this run, more than --max-failed-fraction "
                             f"{job.max_failed_fraction:g}; see the 'error' column of {job.out}/metadata")
        if self.session.lease.fenced:
            raise Fenced(self.session.lease.fenced)
        if pool.num_ready == 0 and time.monotonic() - pool.last_ready > NO_ACTOR_TIMEOUT_S:
            raise JobLost(f"no render actor for {NO_ACTOR_TIMEOUT_S:.0f} s: the cluster lost its nodes")
