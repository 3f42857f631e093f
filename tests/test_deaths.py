"""Whose fault a lost attempt is (engine/deaths.py), when an actor runs two calls at once: one on the model, the
other reading its rows or writing its metadata. The journals say which one had the model; the ledger must blame
that one's rows and nobody else. The verdicts, then the dispatcher reading real journals."""

from __future__ import annotations

from types import SimpleNamespace

from ray_render.config import JobConfig
from ray_render.engine.deaths import DeathLedger
from ray_render.engine.dispatch import Dispatcher
from ray_render.engine.journal import ShardJournal
from ray_render.engine.plan import Shard
from ray_render.engine.pool import ShardFailed
from ray_render.engine.summary import Summary


def lost(shard_id: str, attempt_id: str, *, started: bool, siblings: tuple = (), **flags) -> ShardFailed:
    return ShardFailed(Shard(shard_id, "m.parquet", 0, 10), 1, "actor 0 lost: the actor died unexpectedly",
                       actor_lost=True, started=started, attempt_id=attempt_id, siblings=siblings, **flags)


def test_the_call_on_the_model_is_blamed_even_behind_the_head_and_the_head_finishing_is_not():
    ledger = DeathLedger(retries=2, rows_total=100)
    # The head was writing its metadata; the younger call had the model and named its rows.
    younger = ledger.judge(lost("s1", "run-2", started=False), {"rendering": ["r3", "r4"], "calls_done": 2})
    head = ledger.judge(lost("s0", "run-1", started=True), {"rendering": [], "calls_done": 5}, sibling_working=True)
    assert (younger.charged, younger.inherit) == (False, ("run-2", True))
    assert "suspects" in younger.reason
    assert (head.charged, head.inherit) == (False, ("run-1", False))
    assert "another attempt's model call" in head.reason


def test_a_death_outside_every_model_call_is_charged_to_the_head_only():
    ledger = DeathLedger(retries=2, rows_total=100)
    head = ledger.judge(lost("s0", "run-1", started=True), {"rendering": []}, sibling_working=False)
    younger = ledger.judge(lost("s1", "run-2", started=False), {})
    assert head.charged and head.reason == "its actor died outside a model call"
    assert not younger.charged and younger.inherit == ("run-2", False)


def test_a_kill_at_the_heads_deadline_charges_the_head_not_the_call_beside_it():
    ledger = DeathLedger(retries=2, rows_total=100)
    head = ledger.judge(lost("s0", "run-1", started=True, killed=True), {"rendering": ["r1"]})
    beside = ledger.judge(lost("s1", "run-2", started=False, killed=True), {"rendering": ["r9"]})
    assert head.charged and head.inherit == ("run-1", False)  # a kill is the driver's: no row is blamed
    assert not beside.charged and beside.inherit == ("run-2", False)


def dispatcher(tmp_path) -> Dispatcher:
    job = JobConfig(manifests=["m.parquet"], out=str(tmp_path / "out"), model="placeholder", retries=2,
                    progress=False)
    session = SimpleNamespace(job=job, pool=SimpleNamespace(size=2), summary=Summary(out=job.out, rows_total=20))
    return Dispatcher(session, [])


def test_the_dispatcher_reads_the_other_calls_journal_to_clear_the_one_that_was_finishing(tmp_path):
    d = dispatcher(tmp_path)
    finishing = ShardJournal(d.job.out, "s0", "run-1", retries=2)
    finishing.rendering(["a1"])
    finishing.call_returned()
    finishing.done_rendering()  # its last batch is done: it passed the model on
    rendering = ShardJournal(d.job.out, "s1", "run-2", retries=2)
    rendering.rendering(["b1", "b2"])  # ... and the actor died in this call
    d._failed(lost("s0", "run-1", started=True, siblings=(("s1", "run-2"),)))
    d._failed(lost("s1", "run-2", started=False, siblings=(("s0", "run-1"),)))
    assert d.charged == {"s0": 0, "s1": 0}
    assert d.inherit == {"s0": ("run-1", False), "s1": ("run-2", True)}  # only b1, b2 become suspects
    assert d.summary.rows_suspected == 2
    assert [shard.shard_id for shard in d.pending] == ["s1", "s0"]  # both render again
