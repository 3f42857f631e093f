"""Whose fault a failed shard attempt is: the ledger that decides what the driver charges, and when deaths are
systematic.

A lost attempt is charged to its shard's `--retries` unless it was not the shard's doing:

- it never ran (queued behind another call when its actor died), its actor died in the model call of another
  attempt it ran at the same time (that attempt's journal names rows, this one's none), its actor died with its
  node, or the pool retired its actor for failing far more rows than the others: nobody's fault;
- its actor died by itself inside a model call or an input fetch (the attempt's journal names the rows, whatever
  the attempt's place in its actor's queue): the rows' fault. The next attempt makes them suspects
  (engine/journal.py), and the death is not charged to the shard.

A death the driver caused itself (a call killed at its deadline, a shutdown) is never the rows' fault, and the
attempt is charged (at a deadline, the call that hung: not the one beside it on the same actor). Uncharged deaths
are capped per shard (then they are charged: a shard cannot retry forever) and per job. And when render actors keep
dying in their first model call, with no model call returning anywhere in between, the crash is systematic (a
broken driver, a host out of memory, a bad model), not a row's: after SYSTEMATIC_DEATHS of them the job aborts
(`SystematicDeaths`) rather than reload the model on every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEMATIC_DEATHS = 6  # deaths in an attempt's first model call, in a row, with nothing returning in between
SHARD_CAP_FACTOR = 4  # a shard's uncharged deaths at most this many times (--retries + 2)
JOB_CAP_BASE = 50  # a job's uncharged deaths at most this many, plus one per JOB_CAP_ROWS rows
JOB_CAP_ROWS = 100


class SystematicDeaths(Exception):
    """Render actors keep dying whatever they render: the job stops (exit 2); the message says why."""


@dataclass
class Verdict:
    charged: bool  # count the attempt against the shard's --retries
    inherit: tuple[str, bool]  # what the next attempt learns: (this attempt id, blame its rows)
    reason: str  # why, in a few words, for the log


@dataclass
class DeathLedger:
    """The driver's account of lost attempts for one run; `judge` each ShardFailed as it comes."""

    retries: int
    rows_total: int
    uncharged: dict[str, int] = field(default_factory=dict)  # shard id -> uncharged deaths
    deaths_without_progress: int = 0
    uncharged_total: int = 0

    def judge(self, event, journal_entry: dict, sibling_working: bool = False) -> Verdict:
        """`event`: a pool.ShardFailed; `journal_entry`: its attempt's journal (journal.read), {} when none;
        `sibling_working`: the journal of another call its actor held names rows (that call had the model)."""
        shard_id = event.shard.shard_id
        if not event.actor_lost:  # the call raised (a storage error, a bad file): the shard's own failure
            return Verdict(True, (event.attempt_id, False), "the attempt raised")
        natural = not event.killed and not event.node_lost and not event.retired
        working = natural and bool(journal_entry.get("rendering"))
        bystander = natural and not working and sibling_working
        if working:
            if journal_entry.get("calls_done", 0) == 0:
                self.deaths_without_progress += 1
            else:
                self.deaths_without_progress = 0
            if self.deaths_without_progress >= SYSTEMATIC_DEATHS:
                raise SystematicDeaths(
                    f"{self.deaths_without_progress} render actors in a row died in their first model call, with no "
                    f"model call returning in between: the crash is systematic (the model, the device driver, the "
                    f"host's memory), not a row's; fix the cause and rerun the same command to resume")
        if event.killed and event.started:  # the head's call hung; a call behind it is not charged for it
            return Verdict(True, (event.attempt_id, False), "its call ran past its deadline")
        if not (working or bystander or not event.started or event.node_lost or event.retired):
            return Verdict(True, (event.attempt_id, False), "its actor died outside a model call")
        self.uncharged[shard_id] = self.uncharged.get(shard_id, 0) + 1
        self.uncharged_total += 1
        if self.uncharged_total > JOB_CAP_BASE + self.rows_total // JOB_CAP_ROWS:
            raise SystematicDeaths(
                f"{self.uncharged_total} render actors died in this run (more than {JOB_CAP_BASE} plus one per "
                f"{JOB_CAP_ROWS} rows): too many crashes to go on; see the logs of the actors, fix the cause and "
                f"rerun the same command to resume")
        charged = self.uncharged[shard_id] > SHARD_CAP_FACTOR * (self.retries + 2)
        reason = ("it died rendering: its rows become suspects" if working
                  else "its actor died in another attempt's model call" if bystander
                  else "its actor was killed for another call" if event.killed
                  else "it never ran" if not event.started else "its node died" if event.node_lost
                  else "its actor was retired")
        return Verdict(charged, (event.attempt_id, working), reason)

    def progress(self) -> None:
        """A shard was committed: whatever kills actors, it is not everything."""
        self.deaths_without_progress = 0
