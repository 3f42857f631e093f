"""The actor pool's state machine against fake actors (tests/fake_ray.py): backpressure, start-up failures, lost
actors, stragglers and shutdown, each interleaving chosen by the test. Milliseconds each; tests/test_pool.py runs
the same pool on a real Ray."""

from __future__ import annotations

import pytest
from fake_ray import FakeRuntime

from ray_render.engine import pool as pool_module
from ray_render.engine.plan import Shard
from ray_render.engine.pool import PoolError, RenderPool, ShardDone, ShardFailed
from ray_render.engine.shard import ShardResult


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(pool_module, "time", clock)
    return clock


def shard(number: int) -> Shard:
    return Shard(f"s{number}", "m.parquet", number * 10, number * 10 + 10)


def result(ref, wall_ms: float = 1000.0, failed: int = 0) -> ShardResult:
    """What an actor returns for the call `ref`: every row ok, or `failed` of them failed."""
    piece, attempt, attempt_id, *_ = ref.args
    rendered = {"ok": piece.num_rows - failed, "invalid": 0, "failed": failed}
    return ShardResult(shard_id=piece.shard_id, attempt=attempt, attempt_id=attempt_id, rows=piece.num_rows,
                       counts=dict(rendered), rendered=rendered, wall_ms=wall_ms)


def started_pool(runtime: FakeRuntime, actors: int = 2, max_in_flight: int = 2) -> RenderPool:
    pool = RenderPool(runtime.make_actor, actors, max_in_flight, runtime=runtime)
    for actor in runtime.actors:
        runtime.start(actor)
    assert pool.wait(0) == [] and pool.num_ready == actors
    return pool


def test_backpressure_bounds_each_actor_and_fills_the_least_loaded(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=2)
    submitted = 0
    while pool.can_submit():
        pool.submit(shard(submitted), 1)
        submitted += 1
    assert submitted == 4  # 2 actors x max_in_flight
    assert [len(actor.pending()) for actor in runtime.actors] == [2, 2]
    with pytest.raises(RuntimeError):
        pool.submit(shard(9), 1)

    first = runtime.actors[0].pending()[0]
    runtime.finish(first, result(first))
    (event,) = pool.wait(0)
    assert isinstance(event, ShardDone) and event.shard.shard_id == "s0"
    assert pool.can_submit()
    pool.submit(shard(4), 1)
    assert runtime.actors[0].pending()[-1].args[0].shard_id == "s4"  # the actor that had room


def test_a_model_that_loads_nowhere_stops_the_pool(clock):
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 2, 2, runtime=runtime)
    runtime.fail_start(runtime.actors[0])
    pool.wait(0)
    assert len(runtime.actors) == 3  # one failure: a replacement is started
    runtime.fail_start(runtime.actors[1])
    with pytest.raises(PoolError, match="no render actor could start: RuntimeError: the model does not load"):
        pool.wait(0)


def test_a_lost_actor_returns_its_running_and_queued_shards_and_is_replaced(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=2)
    for number in range(4):
        pool.submit(shard(number), 1)
    victim = runtime.actors[0]
    running, queued = (ref.args[0].shard_id for ref in victim.pending())
    runtime.lose_actor(victim)
    events = pool.wait(0)
    assert {(e.shard.shard_id, e.actor_lost, e.started) for e in events} == {(running, True, True),
                                                                             (queued, True, False)}
    assert all(isinstance(e, ShardFailed) for e in events)
    assert victim.killed and pool.actors_lost == 1
    assert len(runtime.actors) == 3 and pool.num_ready == 1  # the replacement is starting
    runtime.start(runtime.actors[2])
    pool.wait(0)
    assert pool.num_ready == 2


def test_the_calls_of_a_lost_actor_name_each_other_so_their_journals_can_tell_which_had_the_model(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=1, max_in_flight=3)
    for number in range(3):
        pool.submit(shard(number), 1)
    held = {ref.args[0].shard_id: ref.args[2] for ref in runtime.actors[0].pending()}  # shard id -> attempt id
    runtime.lose_actor(runtime.actors[0])
    events = {event.shard.shard_id: event for event in pool.wait(0)}
    assert set(events) == {"s0", "s1", "s2"}
    for shard_id, event in events.items():
        assert set(event.siblings) == {(other, held[other]) for other in held if other != shard_id}


def test_a_head_gets_the_deadline_of_the_call_beside_it_whose_turn_on_the_model_may_come_first(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=1, max_in_flight=3)
    pool.submit(shard(0), 1)
    first = runtime.actors[0].pending()[0]
    clock.now += 1.0
    runtime.finish(first, result(first, wall_ms=1000.0))  # 0.1 s a row: the floor sets the deadlines
    pool.wait(0)
    for number in (1, 2, 3):
        pool.submit(shard(number), 1)
    # s1 is the head; s2 runs beside it (CALLS_AT_ONCE) and may render first; s3 waits in Ray's queue.
    assert pool_module.CALLS_AT_ONCE == 2
    clock.now += 2 * pool_module.DEADLINE_MIN_S - 1
    assert pool.wait(0) == []
    clock.now += 2
    events = pool.wait(0)
    assert {(e.shard.shard_id, e.killed, e.started) for e in events} == {("s1", True, True), ("s2", True, False),
                                                                         ("s3", True, False)}


def test_a_shard_that_raises_fails_without_replacing_the_actor(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=1)
    pool.submit(shard(0), 1)
    (ref,) = runtime.actors[0].pending()
    runtime.finish(ref, raised="StorageError: write failed after 6 attempts")
    (event,) = pool.wait(0)
    assert isinstance(event, ShardFailed) and not event.actor_lost
    assert event.error.startswith("StorageError")
    assert pool.actors_lost == 0 and len(runtime.actors) == 1 and not pool.has_work()


def test_an_idle_actor_takes_over_a_queued_shard_and_the_first_result_wins(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=2)
    busy, idle = runtime.actors
    for number in range(3):  # s0 -> busy, s1 -> idle, s2 -> busy (queued behind s0)
        pool.submit(shard(number), 1)
    (done,) = idle.pending()
    runtime.finish(done, result(done))
    pool.wait(0)
    assert pool.reissue_stragglers() == 1
    (moved,) = idle.pending()
    queued = busy.pending()[1]
    assert moved.args[0].shard_id == queued.args[0].shard_id == "s2"
    assert queued.cancel_requested  # moved, not copied: the queued call is dropped
    runtime.finish(moved, result(moved))
    (event,) = pool.wait(0)
    assert isinstance(event, ShardDone) and event.shard.shard_id == "s2"
    queued.outcome = pool_module.Outcome("cancelled")
    assert pool.wait(0) == []


def test_a_slow_first_attempt_gets_a_copy_and_the_loser_is_cancelled(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=1)
    slow_actor, fast_actor = runtime.actors
    pool.submit(shard(0), 1)  # runs long on the first actor
    pool.submit(shard(1), 1)
    (fast,) = fast_actor.pending()
    runtime.finish(fast, result(fast, wall_ms=1000.0))
    pool.wait(0)
    assert pool.reissue_stragglers() == 0  # not yet unusually long
    clock.now += 60.0
    assert pool.reissue_stragglers() == 1
    (copy,) = fast_actor.pending()
    assert copy.args[0].shard_id == "s0"
    assert copy.args[2] != slow_actor.pending()[0].args[2]  # a copy writes under its own attempt id
    runtime.finish(copy, result(copy))
    (event,) = pool.wait(0)
    assert isinstance(event, ShardDone) and event.shard.shard_id == "s0"
    (original,) = slow_actor.pending()
    assert original.cancel_requested  # the losing copy stops at its next batch boundary
    runtime.finish(original, result(original))
    assert pool.wait(0) == []  # its result is ignored: the shard is counted once
    assert not pool.has_work()


def test_a_retried_shard_is_never_copied(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=1)
    pool.submit(shard(0), 2)  # a second attempt: it may hold a row that kills its actor
    pool.submit(shard(1), 1)
    (fast,) = runtime.actors[1].pending()
    runtime.finish(fast, result(fast))
    pool.wait(0)
    clock.now += 600.0
    assert pool.reissue_stragglers() == 0


def test_the_failure_of_one_copy_does_not_count_while_another_runs(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=1)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    (fast,) = runtime.actors[1].pending()
    runtime.finish(fast, result(fast))
    pool.wait(0)
    clock.now += 60.0
    pool.reissue_stragglers()
    runtime.lose_actor(runtime.actors[0])  # the original dies; its copy on the other actor lives on
    assert pool.wait(0) == []
    (copy,) = runtime.actors[1].pending()
    runtime.finish(copy, result(copy))
    (event,) = pool.wait(0)
    assert isinstance(event, ShardDone) and event.shard.shard_id == "s0"


def test_shutdown_cancels_everything_kills_every_actor_and_names_the_unsettled_shards(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=2)
    for number in range(3):
        pool.submit(shard(number), 1)
    stopping = runtime.actors[1].pending()[0]  # this one returns within the grace period
    runtime.finish(stopping, raised="ShardCancelled: shard s1 cancelled")
    unsettled = pool.shutdown(grace_s=0.0)
    assert {shard_id for shard_id, _ in unsettled} == {"s0", "s2"}  # still running when the grace ran out
    assert all(ref.cancel_requested for actor in runtime.actors for ref in actor.calls if ref.method == "render_shard")
    assert all(actor.killed for actor in runtime.actors)
    assert not pool.has_work()


def test_a_call_past_its_deadline_has_its_actor_killed_and_comes_back_counted(clock):
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 1, 2, runtime=runtime, call_timeout_s=3600.0)
    runtime.start(runtime.actors[0])
    pool.wait(0)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    first = runtime.actors[0].pending()[0]
    clock.now += 30.0
    runtime.finish(first, result(first, wall_ms=1000.0))  # 10 rows in 1 s: 0.1 s a row
    assert [type(event) for event in pool.wait(0)] == [ShardDone]
    clock.now += pool_module.DEADLINE_MIN_S - 1  # 5 x 0.1 s x 10 rows = 5 s, but never less than the floor
    assert pool.wait(0) == []
    clock.now += 2.0
    (event,) = pool.wait(0)
    assert isinstance(event, ShardFailed) and event.killed and event.started and event.shard.shard_id == "s1"
    assert "past its deadline of 60 s" in event.error
    assert runtime.actors[0].killed and len(runtime.actors) == 2  # replaced


def test_an_actors_first_call_gets_the_warm_up_allowance_within_the_call_timeout(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=1)
    pool.submit(shard(0), 1)
    clock.now += pool_module.FIRST_CALL_S - 1
    assert pool.wait(0) == []  # compiling, loading caches: not hung yet
    clock.now += 2
    (event,) = pool.wait(0)
    assert event.killed
    short = RenderPool(runtime.make_actor, 1, 1, runtime=runtime, call_timeout_s=5.0)
    runtime.start(runtime.actors[-1])
    short.wait(0)
    short.submit(shard(1), 1)
    clock.now += 6
    (event,) = short.wait(0)
    assert event.killed and "deadline of 5 s" in event.error  # --call-timeout caps every deadline


def test_every_call_of_an_actor_that_compiles_keeps_the_warm_up_allowance(clock):
    # A compiled model compiles again for each new batch or length bucket, in any call, not in the first only.
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 1, 2, runtime=runtime, call_timeout_s=3600.0)
    runtime.start(runtime.actors[0], {"worker": "w0", "batch_size": 8, "settings": {"compile": "on"}})
    pool.wait(0)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    first = runtime.actors[0].pending()[0]
    runtime.finish(first, result(first, wall_ms=1000.0))  # 0.1 s a row: 5 s for the next shard, eager
    assert [type(event) for event in pool.wait(0)] == [ShardDone]
    clock.now += pool_module.FIRST_CALL_S - 1
    assert pool.wait(0) == []  # compiling a new bucket, not hung
    clock.now += 2
    (event,) = pool.wait(0)
    assert event.killed and f"deadline of {pool_module.FIRST_CALL_S:.0f} s" in event.error


def test_an_actor_that_died_with_its_node_is_not_the_rows_fault(clock):
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 2, 1, runtime=runtime)
    for number, actor in enumerate(runtime.actors):
        runtime.start(actor, {"name": "fake", "worker": f"w{number}", "node_id": f"node{number}", "batch_size": 8})
    pool.wait(0)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    runtime.dead_nodes.add("node0")
    runtime.lose_actor(runtime.actors[0], "the actor died because its node died")
    runtime.lose_actor(runtime.actors[1], "the actor process crashed")
    events = {event.shard.shard_id: event for event in pool.wait(0)}
    assert events["s0"].node_lost and not events["s1"].node_lost


def on_nodes(runtime: FakeRuntime, actors: int, max_in_flight: int) -> RenderPool:
    """A pool whose actor i runs on node i."""
    pool = RenderPool(runtime.make_actor, actors, max_in_flight, runtime=runtime)
    for number, actor in enumerate(runtime.actors):
        runtime.start(actor, {"name": "fake", "worker": f"w{number}", "node_id": f"node{number}", "batch_size": 8})
    pool.wait(0)
    return pool


def test_the_calls_of_an_unreachable_actor_wait_for_its_node_to_be_declared_dead(clock):
    """A vanished node's actors are unreachable at once, its death is known seconds later: its calls wait for that,
    and come back as lost with their node, not as their rows' doing."""
    runtime = FakeRuntime()
    pool = on_nodes(runtime, actors=2, max_in_flight=2)
    for number in range(3):  # s0 and s2 on the first actor (s2 queued), s1 on the second
        pool.submit(shard(number), 1)
    victim = runtime.actors[0]
    runtime.lose_actor(victim, "the actor is unavailable: Socket closed", unreachable=True)
    assert pool.wait(0) == []  # node0 still looks alive
    assert pool.has_work() and len(runtime.actors) == 3  # the replacement starts at once ...
    assert pool.release_idle(idle_s=0.0) == 0  # ... and stays: the held shards come back to render
    clock.now += 12.0
    assert pool.wait(0) == [] and not victim.killed  # a kill now would hide the death cause Ray records
    runtime.dead_nodes.add("node0")
    events = {event.shard.shard_id: event for event in pool.wait(0)}
    assert {(key, e.node_lost, e.started) for key, e in events.items()} == {("s0", True, True), ("s2", True, False)}
    assert pool.actors_lost == 1 and victim.killed


def test_an_unreachable_actor_that_ray_holds_dead_by_itself_is_judged_at_once(clock):
    runtime = FakeRuntime()
    pool = on_nodes(runtime, actors=1, max_in_flight=1)
    pool.submit(shard(0), 1)
    runtime.death_causes[0] = "process"  # its process died on a live node (a poison row, an OOM kill)
    runtime.lose_actor(runtime.actors[0], "the actor is unavailable: Socket closed", unreachable=True)
    (event,) = pool.wait(0)
    assert event.actor_lost and not event.node_lost and event.started


def test_an_unreachable_actor_whose_node_lives_on_is_judged_like_any_death(clock):
    runtime = FakeRuntime()
    pool = on_nodes(runtime, actors=1, max_in_flight=1)
    pool.submit(shard(0), 1)
    runtime.lose_actor(runtime.actors[0], "the actor is unavailable: Socket closed", unreachable=True)
    assert pool.wait(0) == []
    clock.now += pool_module.NODE_DEATH_WAIT_S
    (event,) = pool.wait(0)
    assert event.actor_lost and not event.node_lost and event.started


def test_a_copy_that_wins_while_its_twin_waits_for_a_verdict_on_its_node_settles_the_shard(clock):
    runtime = FakeRuntime()
    pool = on_nodes(runtime, actors=2, max_in_flight=1)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    (fast,) = runtime.actors[1].pending()
    runtime.finish(fast, result(fast))
    pool.wait(0)
    clock.now += 60.0
    assert pool.reissue_stragglers() == 1  # s0 gets a copy on the second actor
    runtime.lose_actor(runtime.actors[0], "Socket closed", unreachable=True)
    assert pool.wait(0) == []
    (copy,) = runtime.actors[1].pending()
    runtime.finish(copy, result(copy))
    (event,) = pool.wait(0)
    assert isinstance(event, ShardDone) and event.shard.shard_id == "s0"
    runtime.dead_nodes.add("node0")
    assert pool.wait(0) == [] and not pool.has_work()  # no failure comes back for a shard already done


def test_the_driver_never_waits_for_a_cancelled_copy(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=1)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    (fast,) = runtime.actors[1].pending()
    runtime.finish(fast, result(fast))
    pool.wait(0)
    clock.now += 60.0
    pool.reissue_stragglers()
    (copy,) = runtime.actors[1].pending()
    runtime.finish(copy, result(copy))
    pool.wait(0)
    # The original still runs (a hung actor): its shard is settled, so there is no work left to wait for.
    assert not pool.has_work()
    unsettled = pool.shutdown(grace_s=0.0)  # still running after the grace: its files are left to the next run
    assert {shard_id for shard_id, _ in unsettled} == {"s0"} and runtime.actors[0].killed


def test_a_repair_goes_to_another_actor_and_is_never_copied(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=1)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    (base,) = runtime.actors[0].pending()
    runtime.finish(base, result(base, failed=3))
    (done,) = pool.wait(0)
    assert done.actor == 0 and done.result.rendered["failed"] == 3
    assert pool.can_submit() and not pool.can_submit(avoid=0)  # only the actor that failed them has room
    (other,) = runtime.actors[1].pending()
    runtime.finish(other, result(other))
    pool.wait(0)
    pool.submit(shard(0), 2, base=done.attempt_id, avoid=0)
    (repair,) = runtime.actors[1].pending()
    assert repair.args[4] == done.attempt_id  # render_shard(shard, attempt, attempt_id, inherit, base)
    clock.now += 600.0
    assert pool.reissue_stragglers() == 0  # however long it runs, a repair runs once


def test_an_actor_whose_rows_fail_far_more_than_the_others_is_retired_away_from_its_node(clock):
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 2, 2, runtime=runtime)
    for number, actor in enumerate(runtime.actors):
        runtime.start(actor, {"name": "fake", "worker": f"w{number}", "node_id": f"node{number}", "batch_size": 8})
    pool.wait(0)
    for number in range(4):
        pool.submit(shard(number), 1)
    broken, healthy = runtime.actors
    good = healthy.pending()[0]
    runtime.finish(good, result(good))  # 10 rows, all ok
    assert [type(event) for event in pool.wait(0)] == [ShardDone]
    bad = broken.pending()[0]
    runtime.finish(bad, result(bad, failed=10))  # every row failed: 100% against 0% elsewhere
    events = pool.wait(0)
    assert isinstance(events[0], ShardDone) and events[0].result.rendered["failed"] == 10  # repaired elsewhere
    held = [event for event in events[1:]]
    assert len(held) == 1 and held[0].retired and held[0].actor_lost  # its queued shard comes back uncharged
    assert broken.killed and pool.actors_retired == 1 and pool.actors_lost == 0
    assert runtime.actors[-1].avoid_nodes == ("node0",)  # its replacement is placed elsewhere


def test_equal_failure_rates_retire_nobody(clock):
    runtime = FakeRuntime()
    pool = started_pool(runtime, actors=2, max_in_flight=1)
    for number in range(2):
        pool.submit(shard(number), 1)
    for actor in runtime.actors:  # a manifest whose rows fail everywhere: not a device's fault
        (ref,) = actor.pending()
        runtime.finish(ref, result(ref, failed=10))
    assert [type(event) for event in pool.wait(0)] == [ShardDone, ShardDone]
    assert pool.actors_retired == 0 and not any(actor.killed for actor in runtime.actors)


def test_the_elastic_pool_uses_actors_as_they_come_and_releases_them_when_no_work_is_left(clock):
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 3, 1, runtime=runtime)
    first, second, third = runtime.actors
    runtime.start(first)
    pool.wait(0)
    pool.submit(shard(0), 1)  # the first ready actor works while the others are still starting
    assert not pool.can_submit()
    runtime.start(second)
    pool.wait(0)
    pool.submit(shard(1), 1)
    # Nothing left to hand out: the actor still starting goes at once (its node need not come) ...
    assert pool.release_idle(idle_s=30.0) == 1 and third.killed and pool.size == 2
    (ref,) = first.pending()
    runtime.finish(ref, result(ref))
    pool.wait(0)
    assert pool.release_idle(idle_s=30.0) == 0  # ... an idle one only after a while: a straggler may need it
    clock.now += 31.0
    assert pool.release_idle(idle_s=30.0) == 1 and first.killed and not second.killed
    assert pool.actors_released == 2 and pool.peak_ready == 2
    assert [count for _, count in pool.ready_timeline] == [1, 2, 1]


def test_an_actor_whose_model_differs_from_the_jobs_is_refused(clock):
    from ray_render.models.base import same_model

    runtime = FakeRuntime()
    expected = {"family": "nextstep", "revision": "abc", "dtype": "bfloat16", "device": "cuda:0"}
    pool = RenderPool(runtime.make_actor, 2, 1, runtime=runtime, expected_model=expected, same_model=same_model)
    good, other = runtime.actors
    runtime.start(good, {**expected, "device": "cuda:1", "worker": "w0"})  # another GPU of the same kind: fine
    runtime.start(other, {**expected, "dtype": "float32", "worker": "w1"})  # another dtype: other pixels
    pool.wait(0)
    assert pool.num_ready == 1 and other.killed and pool.actors_refused == 1


def test_while_calls_run_that_may_need_a_repair_one_spare_actor_stays(clock):
    runtime = FakeRuntime()
    pool = RenderPool(runtime.make_actor, 4, 1, runtime=runtime)
    first, second, third, fourth = runtime.actors
    for actor in (first, second, third):
        runtime.start(actor)
    pool.wait(0)
    pool.submit(shard(0), 1)
    pool.submit(shard(1), 1)
    clock.now += 31.0  # the third has been idle long enough, the fourth is still starting
    # A repair of shard 0 or 1 would go to another actor: the idle ready one stays, the starting one goes.
    assert pool.release_idle(idle_s=30.0, keep_spare=True) == 1 and fourth.killed and not third.killed
    assert pool.has_other(0) and pool.release_idle(idle_s=30.0, keep_spare=True) == 0
    for actor in (first, second):
        (ref,) = actor.pending()
        runtime.finish(ref, result(ref))
    pool.wait(0)
    clock.now += 31.0
    assert pool.release_idle(idle_s=30.0) == 3 and third.killed  # nothing runs: no repair can come
