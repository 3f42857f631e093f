"""The actor pool: a bounded queue of shards per actor, dead actors replaced, stragglers re-issued.

In the spirit of Ray's `ActorPool` (same plain names), plus what it lacks:

- backpressure: at most `max_in_flight` shards are queued on an actor; `can_submit()` is the one predicate. An
  actor runs CALLS_AT_ONCE of them at once, taking the model in turns (engine/shard.py), so the head of its queue
  (the oldest call) may wait for the model while a younger call renders: which call had the model when an actor
  died is what the calls' journals say, not their places in the queue;
- fault handling: an actor that dies (`ActorDiedError`, `ActorUnavailableError`, any `RayActorError`) is killed
  for good and replaced by a fresh one, and each shard it held comes back to the driver as a `ShardFailed`, so the
  driver decides whether to try it again;
- stragglers: once the driver has nothing left to hand out, an idle actor takes over a shard still queued behind
  another one (the queued call is cancelled), or takes a copy of one running much longer than usual; the first
  result wins and the other copy is cancelled. Each copy writes under its own attempt id, so neither touches the
  other's files, and the driver commits only the winner;
- elastic: the pool asks for its actors up front (pending ones make an autoscaler add nodes), uses each the moment
  it is ready, refuses one whose model would render other pixels (family, revision, dtype, device type against the
  job's), and once no work is left to hand out releases the actors still starting and those idle for a while, so
  an autoscaler can remove their nodes (`release_idle`);
- outliers: an actor whose rows fail far more often than the other actors' (a broken device, a bad node) is
  retired: killed and replaced by one placed on another node (Ray's `label_selector` on `ray.io/node-id`); the
  calls it held come back uncharged (`ShardFailed.retired`);
- deadlines: a call running past its deadline (a multiple of the recent time per row times its rows, within a
  floor and --call-timeout; a first call on an actor gets a generous allowance for warm-up and compilation; plus
  the deadlines of the younger calls running beside it, whose turn on the model may come first) has its actor
  killed: a wedged kernel or a hung read never holds the job. The driver counts that attempt against the
  shard, not against its rows (`ShardFailed.killed`), as it does for an actor whose node died (`node_lost`);
- lost nodes: an actor whose node vanished is first only unreachable (`ActorUnavailableError`, within a second or
  two), while Ray's GCS marks the node dead only after its health checks fail (about 13 s with Ray's defaults). So
  the calls of an unreachable actor on a node that still looks alive wait (`_Undecided`, up to NODE_DEATH_WAIT_S)
  for Ray's verdict before they come back: the node declared dead, or the actor dead by itself (its process died on
  a live node). A node's death must not be blamed on the rows it rendered. Its replacement starts at once; the
  unreachable actor is killed only once the verdict is in, since a kill would overwrite the death cause Ray keeps.

Why replacement rather than `max_restarts=-1`: Ray would restart the actor and re-run nothing (the driver sets
`max_task_retries=0` so that it sees every failure and counts the shard's attempts), so restarts would buy only
the constructor call, while replacement lets the pool see an actor that fails to start at all (a model that does
not load, a node without the GPU it promised) and stop instead of looping, and lets Ray place the new actor on
any node with room rather than pinning it to the lost one's identity.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ray_render")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
STRAGGLER_FACTOR = 2.0  # re-issue a running shard once it has run this many times the median shard's wall time
STRAGGLER_MIN_S = 5.0  # ... and at least this long: short shards are not worth a second copy
SHUTDOWN_GRACE_S = 10.0  # how long shutdown lets cancelled calls return before it kills their actors
DEADLINE_FACTOR = 5.0  # a call may take this many times the recent time per row, times its rows ...
DEADLINE_MIN_S = 60.0  # ... but never less than this (short calls have noisy times) ...
FIRST_CALL_S = 900.0  # ... and an actor's first call gets this long: caches, kernels, compilation
ROW_TIMES = 200  # recent calls whose time per row sets the deadlines
CALLS_AT_ONCE = 2  # an actor runs this many of its calls at once: one on the model, one reading or writing
RETIRE_MIN_ROWS = 8  # judge an actor's failure rate once it rendered this many rows, and the others as many
RETIRE_RATE = 0.5  # an actor whose rows fail at least this often ...
RETIRE_FACTOR = 4.0  # ... and this many times as often as the other actors' is retired
RELEASE_IDLE_S = 30.0  # with no work left to hand out, an actor idle this long is released (a straggler may need it)
# How long the calls of an unreachable actor wait for its node to be declared dead: Ray's GCS does it after 5 missed
# health checks 3 s apart (health_check_failure_threshold, health_check_period_ms), 12-13 s after a SIGKILL here.
NODE_DEATH_WAIT_S = 30.0

class PoolError(RuntimeError):
    """The pool cannot go on: no actor can be started (the model does not load, no node has room)."""


@dataclass
class ShardDone:
    """A shard finished on some actor; `result` is the actor's ShardResult (its attempt is not committed yet)."""

    shard: Any
    attempt: int
    result: Any
    attempt_id: str = ""
    actor: int | None = None  # the index of the actor that rendered it


@dataclass
class ShardFailed:
    """Every copy of a shard failed; `actor_lost` says whether its actor died (as opposed to the shard raising)."""

    shard: Any
    attempt: int
    error: str
    actor_lost: bool
    started: bool = True  # False: it was not its actor's head when the actor died (it had the model only if its
    #                       journal names rows: the actor's other call was finishing)
    attempt_id: str = ""
    killed: bool = False  # the pool killed its actor: it ran past its deadline
    node_lost: bool = False  # its actor died with its node (a preemption, a lost machine)
    retired: bool = False  # the pool retired its actor for failing far more rows than the others
    siblings: tuple = ()  # (shard id, attempt id) of the other calls its actor held when it died: one of them may
    #                       have had the model


@dataclass
class Outcome:
    """How a finished call ended, as the pool needs to know it (`RayRuntime.outcome` maps Ray's exceptions)."""

    kind: str  # "ok", "actor_lost" (its actor died or could not start), "cancelled", or "raised"
    value: Any = None  # the call's return value when "ok"
    error: str = ""  # one readable line when "actor_lost" or "raised"
    unreachable: bool = False  # "actor_lost" without Ray knowing why yet: the actor or its node stopped answering


class RayRuntime:
    """The Ray calls the pool makes. Tests give the pool a fake runtime (and fake actors) to drive its state machine
    without Ray; everything else about the pool is the same."""

    def __init__(self) -> None:
        import ray  # here, not at module level: the pool's logic runs without Ray in its unit tests

        self._ray = ray

    def wait(self, refs: list, timeout: float) -> list:
        """The refs that are done, waiting up to `timeout` for the first one."""
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # take everything else that is already done too, without waiting
            ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def wait_all(self, refs: list, timeout: float) -> list:
        """The refs still not done after waiting up to `timeout` for all of them."""
        _, running = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return running

    def outcome(self, ref: Any) -> Outcome:
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, TaskCancelledError

        try:
            return Outcome("ok", self._ray.get(ref))
        except ActorUnavailableError as exc:  # a RayActorError too: first
            return Outcome("actor_lost", error=_error_line(exc), unreachable=True)
        except RayActorError as exc:
            return Outcome("actor_lost", error=_error_line(exc))
        except TaskCancelledError:
            return Outcome("cancelled")
        except RayTaskError as exc:
            return Outcome("raised", error=_task_error_message(exc))

    def cancel(self, ref: Any) -> None:
        self._ray.cancel(ref)

    def actor_dead(self, actor: Any) -> str | None:
        """Why Ray's GCS holds `actor` dead: "node" (its node died), "process" (it died by itself), None while the
        GCS does not hold it dead, or cannot say."""
        try:
            # No public API reads an actor's death cause without the dashboard's state server.
            from ray._private.state import actors
            from ray.core.generated.common_pb2 import ActorDiedErrorContext

            info = actors(actor._actor_id.hex())
            if not info or info.get("State") != "DEAD":
                return None
            cause = info.get("DeathCause")
            if cause is not None and cause.HasField("actor_died_error_context") and \
                    ActorDiedErrorContext.Reason.Name(cause.actor_died_error_context.reason) == "NODE_DIED":
                return "node"
            return "process"
        except Exception as exc:  # noqa: BLE001 - no verdict: the pool waits for the node's instead
            log.debug("could not read the state of an actor: %s", exc)
            return None

    def node_alive(self, node_id: str | None) -> bool:
        """Whether the node an actor ran on is still alive (unknown nodes count as alive)."""
        if not node_id:
            return True
        for node in self._ray.nodes():
            if node.get("NodeID") == node_id:
                return bool(node.get("Alive"))
        return True

    def kill(self, actor: Any) -> None:
        self._ray.kill(actor, no_restart=True)


@dataclass
class _Call:
    actor: int  # index of the actor that runs it
    shard: Any
    attempt: int
    attempt_id: str  # "<run id>-<n>": the names its files go under, unique per call (a copy gets its own)
    submitted: float  # time.monotonic() at submission
    inherit: tuple | None = None  # (previous attempt id, blame it): what the attempt learns from the last one
    base: str | None = None  # a repair: the attempt it builds on (engine/repairs.py)
    running_since: float | None = None  # when it became the head of its actor's queue (it runs from then on)
    deadline_s: float | None = None  # how long it may run
    started: bool = True  # set False when its actor died while it was still queued behind another call


@dataclass
class _Undecided:
    """The calls of an unreachable actor whose node still looked alive: held until Ray says whether it died."""

    actor: Any  # its handle, killed once the verdict is in
    index: int
    calls: list[_Call]
    error: str
    node: str
    since: float  # time.monotonic() when the actor was found unreachable


class RenderPool:
    """Ray actors, each holding one resident model, fed shard descriptors with a bound on queued work.

    `make_actor(index, avoid_nodes)` returns a new actor handle, placed on none of the nodes `avoid_nodes` names
    (where the pool retired actors); the pool calls `info()` on it to learn when it is ready.
    Typical driver loop: `while pending and pool.can_submit(): pool.submit(shard, attempt)`, then
    `pool.reissue_stragglers()` once nothing is pending, then `for event in pool.wait(timeout)`.
    """

    def __init__(self, make_actor: Callable[[int, tuple], Any], num_actors: int, max_in_flight: int,
                 runtime: RayRuntime | None = None, run_id: str = "000000000000",
                 call_timeout_s: float = 3600.0, expected_model: dict | None = None,
                 same_model: Callable[[dict, dict], bool] | None = None) -> None:
        self._runtime = runtime or RayRuntime()
        self._expected_model = expected_model  # the model an actor must load (the job record's), else the first's
        self._same_model = same_model
        self._call_timeout_s = call_timeout_s
        self._row_s: deque[float] = deque(maxlen=ROW_TIMES)  # recent seconds per row of finished calls
        self._calls_done_by: dict[int, int] = {}  # actor index -> calls it finished
        self._compiling: set[int] = set()  # actors whose model compiles its token steps
        self._node_of: dict[int, str | None] = {}  # actor index -> the node it runs on
        self._run_id = run_id
        self._calls_made = 0
        self.attempts: list[tuple[str, str]] = []  # (shard id, attempt id) of every call made, for clean-up
        self._make_actor = make_actor
        self._num_actors = num_actors
        self._max_in_flight = max_in_flight
        self._actors: dict[int, Any] = {}  # actor index -> handle, started or starting
        self._starting: dict[Any, int] = {}  # ready ref (the first info() call) -> actor index
        self._in_flight: dict[int, list[Any]] = {}  # ready actor index -> its shard refs, in submission order
        self._future_to_actor: dict[Any, _Call] = {}  # every outstanding shard ref
        self._shard_futures: dict[str, list[Any]] = {}  # shard id -> its live refs (two once re-issued)
        self._cancelled: set[Any] = set()  # refs that lost the race: their results are ignored
        self._next_index = 0
        self._init_failures = 0
        self._shard_wall_s: deque[float] = deque(maxlen=100)  # recent shard wall times, for straggler detection
        self._rows_by: dict[int, list[int]] = {}  # actor index -> [rows rendered, of which failed], ever
        self._avoid_nodes: set[str] = set()  # nodes where an actor was retired: new actors go elsewhere
        self._undecided: list[_Undecided] = []  # calls waiting for Ray's verdict on their actor's node
        self.info: dict | None = None  # model info reported by the first actor that became ready
        self.actors_lost = 0  # actors that died and were replaced
        self.actors_retired = 0  # actors retired for failing far more rows than the others
        self.peak_ready = 0  # the most actors ready at once
        self.actors_released = 0  # actors stopped because no work was left for them
        self.actors_refused = 0  # actors whose model would render other pixels than the job's
        self._started_at = time.monotonic()
        self.ready_timeline: list[tuple[float, int]] = []  # (seconds since the pool started, actors ready) changes
        self._idle_since: dict[int, float] = {}  # ready actor index -> when its queue last became empty
        self.reissued = 0  # straggler copies handed out
        self.last_ready = time.monotonic()  # last moment at least one actor was ready
        for _ in range(num_actors):
            self._start_actor()

    # -- actors ------------------------------------------------------------------------------------------------

    def _start_actor(self) -> None:
        index = self._next_index
        self._next_index += 1
        actor = self._make_actor(index, tuple(sorted(self._avoid_nodes)))
        self._actors[index] = actor
        self._starting[actor.info.remote()] = index

    def _retire(self, index: int, head_running: bool = True, kill: bool = True) -> list[_Call]:
        """Kill an actor for good (unless not `kill`) and forget it; return the calls it still held (the first one
        was running if `head_running`, the rest were queued)."""
        actor = self._actors.pop(index, None)
        if actor is not None and kill:
            self._runtime.kill(actor)
        self._idle_since.pop(index, None)
        calls = []
        for position, ref in enumerate(self._in_flight.pop(index, [])):
            call = self._future_to_actor.pop(ref)
            call.started = position == 0 and head_running
            self._forget(ref, call)
            if ref not in self._cancelled:
                calls.append(call)
            self._cancelled.discard(ref)
        self._note_ready()
        return calls

    def _forget(self, ref: Any, call: _Call) -> None:
        refs = self._shard_futures.get(call.shard.shard_id, [])
        if ref in refs:
            refs.remove(ref)
        if not refs:
            self._shard_futures.pop(call.shard.shard_id, None)

    def _idle_actors(self) -> list[int]:
        return [index for index, refs in self._in_flight.items() if not refs]

    @property
    def num_ready(self) -> int:
        return len(self._in_flight)

    @property
    def actors_started(self) -> int:
        """Every actor this pool asked Ray for: the first ones, replacements, and those released or refused."""
        return self._next_index

    @property
    def size(self) -> int:
        """The number of actors the pool keeps (started, starting or being replaced)."""
        return self._num_actors

    def has_outstanding(self) -> bool:
        """Whether anything is in Ray's hands: an actor starting, or a call (cancelled copies included). Calls
        waiting for Ray's verdict on a node are not: `wait` returns at once while only they are left."""
        return bool(self._starting or self._future_to_actor)

    def ready_actors(self) -> list:
        """Handles of the ready actors, for calls other than render_shard (refresh's `defaults`)."""
        return [self._actors[index] for index in self._in_flight]

    # -- submitting ----------------------------------------------------------------------------------------------

    def can_submit(self, avoid: int | None = None) -> bool:
        """True when some ready actor (other than `avoid`) has fewer than `max_in_flight` shards queued: the one
        backpressure rule."""
        return any(len(refs) < self._max_in_flight for index, refs in self._in_flight.items() if index != avoid)

    def has_other_ready(self, avoid: int | None) -> bool:
        """Whether a ready actor other than `avoid` exists (one a repair can go to)."""
        return any(index != avoid for index in self._in_flight)

    def has_other(self, avoid: int | None) -> bool:
        """Whether an actor other than `avoid` is ready or starting (one a repair can wait for)."""
        return self.has_other_ready(avoid) or any(index != avoid for index in self._starting.values())

    def submit(self, shard: Any, attempt: int, inherit: tuple | None = None, *, base: str | None = None,
               avoid: int | None = None) -> None:
        """Queue `shard` on the ready actor with the least work (not `avoid`); call only when `can_submit(avoid)`.
        `inherit`: the previous attempt of the shard and whether its death is blamed on its rows
        (engine/journal.py); `base`: a repair of that attempt (engine/repairs.py)."""
        candidates = [index for index in self._in_flight if index != avoid]
        index = min(candidates, key=lambda i: len(self._in_flight[i]), default=None)
        if index is None or len(self._in_flight[index]) >= self._max_in_flight:
            raise RuntimeError("submit() called while can_submit() is false")
        self._submit_to(index, shard, attempt, inherit, base)

    def _submit_to(self, index: int, shard: Any, attempt: int, inherit: tuple | None, base: str | None = None) -> None:
        self._calls_made += 1
        attempt_id = f"{self._run_id}-{self._calls_made}"
        ref = self._actors[index].render_shard.remote(shard, attempt, attempt_id, inherit, base)
        self.attempts.append((shard.shard_id, attempt_id))
        self._in_flight[index].append(ref)
        self._idle_since.pop(index, None)
        self._future_to_actor[ref] = _Call(index, shard, attempt, attempt_id, time.monotonic(), inherit, base)
        self._shard_futures.setdefault(shard.shard_id, []).append(ref)
        self._start_head(index)

    def has_work(self) -> bool:
        """True while a shard is outstanding (running, queued, or lost with an actor whose node's fate Ray has not
        told yet). A cancelled copy is not work: its shard is settled, the driver never waits for it (shutdown kills
        its actor)."""
        return bool(self._undecided) or any(ref not in self._cancelled for ref in self._future_to_actor)

    # -- deadlines -----------------------------------------------------------------------------------------------

    def _start_head(self, index: int) -> None:
        """The first call in an actor's queue runs from now: give it its deadline."""
        refs = self._in_flight.get(index)
        if not refs:
            return
        call = self._future_to_actor[refs[0]]
        if call.running_since is None:
            call.running_since = time.monotonic()
            call.deadline_s = self._deadline(index, call)

    def _deadline(self, index: int, call: _Call) -> float:
        if not self._calls_done_by.get(index) or not self._row_s:
            allowance = FIRST_CALL_S  # its first call: the model warms up, a compiled step is captured
        else:
            # A compiled model compiles (and captures) again for each new batch or length bucket, in any call: its
            # calls keep the first call's allowance as their floor.
            floor = FIRST_CALL_S if index in self._compiling else DEADLINE_MIN_S
            allowance = max(floor, DEADLINE_FACTOR * statistics.median(self._row_s) * call.shard.num_rows)
        return min(allowance, self._call_timeout_s)

    def _expire_overdue(self) -> list[ShardDone | ShardFailed]:
        """Kill the actors whose running call is past its deadline; their calls come back as ShardFailed."""
        now = time.monotonic()
        events: list[ShardDone | ShardFailed] = []
        for index, refs in list(self._in_flight.items()):
            if not refs:
                continue
            call = self._future_to_actor[refs[0]]
            if call.running_since is None:
                continue
            beside = [self._future_to_actor[ref] for ref in refs[1:CALLS_AT_ONCE]]  # may have taken the model first
            limit = call.deadline_s + sum(self._deadline(index, other) for other in beside)
            if now - call.running_since <= limit:
                continue
            message = (f"actor {index} killed: shard {call.shard.shard_id} ran {now - call.running_since:.0f} s, "
                       f"past its deadline of {limit:.0f} s (a hung call: a wedged kernel, a stuck read)")
            log.warning("%s; replacing it", message)
            self.actors_lost += 1
            for held in self._retire(index):
                events += self._failed_unless_copied(held, message, actor_lost=True, killed=True)
            self._start_actor()
        return events

    def reissue_stragglers(self) -> int:
        """Give each idle actor a shard queued behind another (moved), or a copy of one running unusually long.

        Call only when the driver has no shard left to hand out; returns how many shards were re-issued.
        """
        idle = self._idle_actors()
        if not idle:
            return 0
        now = time.monotonic()
        threshold = None
        if self._shard_wall_s:
            threshold = max(STRAGGLER_MIN_S, STRAGGLER_FACTOR * statistics.median(self._shard_wall_s))
        candidates = []  # (priority, -age, ref): queued shards first, then the longest running
        for refs in self._in_flight.values():
            for position, ref in enumerate(refs):
                if ref in self._cancelled:
                    continue
                call = self._future_to_actor[ref]
                if len(self._shard_futures.get(call.shard.shard_id, [])) > 1 or call.base is not None:
                    continue  # already has a second copy, or a repair: it must not run twice
                age = now - (call.running_since or call.submitted)
                if position > 0:
                    candidates.append((0, -age, ref))
                elif threshold is not None and age > threshold and call.attempt == 1:
                    # Only first attempts run twice: a retried shard may hold a row that kills its actor, and a
                    # second copy would only double the deaths.
                    candidates.append((1, -age, ref))
        candidates.sort(key=lambda item: item[:2])
        issued = 0
        for index, (queued, _, ref) in zip(idle, candidates):
            call = self._future_to_actor[ref]
            log.info("re-issuing shard %s (attempt %d) to idle actor %d", call.shard.shard_id, call.attempt, index)
            self._submit_to(index, call.shard, call.attempt, call.inherit)
            if queued == 0:  # it had not started: move it rather than run it twice
                self._cancelled.add(ref)
                self._runtime.cancel(ref)
            issued += 1
        self.reissued += issued
        return issued

    # -- collecting ------------------------------------------------------------------------------------------------

    def wait(self, timeout: float) -> list[ShardDone | ShardFailed]:
        """Wait up to `timeout` seconds for something to finish; return the shard events it produced.

        Actor start-ups are handled here too. Raises PoolError when no actor can be started at all.
        """
        refs = list(self._starting) + list(self._future_to_actor)
        if not refs:
            return self._decide_undecided()
        ready = self._runtime.wait(refs, timeout)
        events: list[ShardDone | ShardFailed] = []
        for ref in ready:
            if ref in self._starting:
                self._on_started(ref)
            elif ref in self._future_to_actor:  # not taken back by an earlier event in this loop
                events += self._on_finished(ref)
        events += self._expire_overdue()
        events += self._decide_undecided()
        if self._in_flight:
            self.last_ready = time.monotonic()
        return events

    def _on_started(self, ref: Any) -> None:
        index = self._starting.pop(ref)
        outcome = self._runtime.outcome(ref)
        if outcome.kind != "ok":
            self._init_failures += 1  # in a row: a start that works resets it, so long jobs survive many losses
            self._actors.pop(index, None)
            message = outcome.error or outcome.kind
            if self.info is None and self._init_failures >= self._num_actors:
                raise PoolError(f"no render actor could start: {message}") from None
            if self._init_failures > 2 * self._num_actors + 2:
                raise PoolError(f"render actors keep failing to start ({self._init_failures} times): {message}") \
                    from None
            log.warning("render actor %d failed to start, starting another: %s", index, message)
            self._start_actor()
            return
        info = outcome.value
        refusal = self._refusal(info)
        if refusal:
            self.actors_refused += 1
            self._runtime.kill(self._actors.pop(index))
            log.error("render actor %d refused: %s", index, refusal)
            if self.info is None and self.actors_refused >= self._num_actors:
                raise PoolError(refusal)
            return
        self.info = self.info or info
        self._init_failures = 0
        self._in_flight[index] = []
        self._idle_since[index] = time.monotonic()
        self._note_ready()
        self._node_of[index] = info.get("node_id") if isinstance(info, dict) else None
        if isinstance(info, dict) and (info.get("settings") or {}).get("compile") == "on":
            self._compiling.add(index)
        log.info("render actor %d ready on %s", index, info.get("worker", "?"))

    def _refusal(self, info: Any) -> str:
        """Why an actor that just started must not render for this job ("" if it may): its model would render other
        pixels than the job record's, or than the first actor's (another GPU type, another dtype)."""
        reference = self._expected_model or self.info
        if self._same_model is None or reference is None or not isinstance(info, dict) or \
                self._same_model(reference, info):
            return ""
        return (f"{info.get('worker', '?')} loads {info.get('family')} {info.get('revision')} on "
                f"{info.get('device')} {info.get('dtype')}, the job renders with {reference.get('family')} "
                f"{reference.get('revision')} on {reference.get('device')} {reference.get('dtype')}: its images "
                f"would not match (a node of another kind?)")

    def _note_ready(self) -> None:
        self.peak_ready = max(self.peak_ready, len(self._in_flight))
        moment = round(time.monotonic() - self._started_at, 1)
        if not self.ready_timeline or self.ready_timeline[-1][1] != len(self._in_flight):
            self.ready_timeline.append((moment, len(self._in_flight)))

    def release_idle(self, idle_s: float = RELEASE_IDLE_S, keep_spare: bool = False) -> int:
        """No work is left to hand out: stop the actors still starting (their nodes need not come) and the ready
        ones idle for `idle_s`, so an autoscaler can remove their nodes. Returns how many were released.

        Not while a shard waits in an actor's queue behind another: a starting actor, or one that is idle, takes it
        over (reissue_stragglers); nor while calls wait for the verdict on a node: their shards come back to render.
        `keep_spare`: a running call may still end with failed rows, whose repair goes to another actor, so one
        actor besides the busy ones stays (an idle ready one rather than one still starting)."""
        if self._undecided or any(len(refs) > 1 for refs in self._in_flight.values()):
            return 0
        now = time.monotonic()
        idle = [index for index, refs in self._in_flight.items() if not refs]
        doomed = [index for index in idle if now - self._idle_since.get(index, now) >= idle_s]
        doomed += [index for index in self._starting.values()]
        if keep_spare and doomed and len(idle) + len(self._starting) == len(doomed):
            doomed.pop(0)  # nothing else would be left for a repair: keep the first (ready before starting)
        for ref, index in list(self._starting.items()):
            if index in doomed:
                del self._starting[ref]
        for index in doomed:
            actor = self._actors.pop(index, None)
            if actor is not None:
                _quietly(self._runtime.kill, actor)
            self._in_flight.pop(index, None)
            self._idle_since.pop(index, None)
        if doomed:
            self.actors_released += len(doomed)
            self._num_actors = max(1, self._num_actors - len(doomed))
            log.info("released %d render actor(s): no work is left for them", len(doomed))
            self._note_ready()
        return len(doomed)

    def _on_finished(self, ref: Any) -> list[ShardDone | ShardFailed]:
        call = self._future_to_actor.pop(ref)
        call.started = self._in_flight[call.actor][0] == ref  # its actor's head (the oldest call it holds)
        self._in_flight[call.actor].remove(ref)
        if not self._in_flight[call.actor]:
            self._idle_since[call.actor] = time.monotonic()
        self._forget(ref, call)
        self._calls_done_by[call.actor] = self._calls_done_by.get(call.actor, 0) + 1
        try:
            return self._outcome_of(ref, call)
        finally:  # the next call in its queue runs from now, with a deadline from the times known now
            self._start_head(call.actor)

    def _outcome_of(self, ref: Any, call: _Call) -> list[ShardDone | ShardFailed]:
        if ref in self._cancelled:  # lost the race; whatever it returned is ignored
            self._cancelled.discard(ref)
            return []
        outcome = self._runtime.outcome(ref)
        if outcome.kind == "actor_lost":
            return self._on_actor_lost(call, outcome)
        if outcome.kind == "cancelled":
            return []
        if outcome.kind == "raised":
            self._count_rows(call.actor, call.shard.num_rows, call.shard.num_rows)
            return self._failed_unless_copied(call, outcome.error, actor_lost=False) + self._retire_outliers()
        result = outcome.value
        # First result wins: cancel the other copy. A queued copy is dropped; a running one stops at its next
        # batch boundary (the actor checks for cancellation) and never commits.
        for other in self._shard_futures.get(call.shard.shard_id, []):
            self._cancelled.add(other)
            self._runtime.cancel(other)
        self._drop_undecided(call.shard.shard_id)  # a copy lost with its node: this one won
        # The time the call took, less its wait for the model while its actor's other call had it.
        own_s = (getattr(result, "wall_ms", 0.0) - getattr(result, "waited_ms", 0.0)) / 1000.0
        self._shard_wall_s.append(own_s)
        if getattr(result, "rows", 0):
            self._row_s.append(own_s / result.rows)
        rendered = getattr(result, "rendered", None) or {}
        self._count_rows(call.actor, rendered.get("ok", 0) + rendered.get("failed", 0), rendered.get("failed", 0))
        return [ShardDone(call.shard, call.attempt, result, call.attempt_id, call.actor)] + self._retire_outliers()

    # -- outliers ------------------------------------------------------------------------------------------------

    def _count_rows(self, index: int, rows: int, failed: int) -> None:
        counts = self._rows_by.setdefault(index, [0, 0])
        counts[0] += rows
        counts[1] += failed

    def _retire_outliers(self) -> list[ShardFailed]:
        events: list[ShardFailed] = []
        for index in list(self._in_flight):
            events += self._retire_if_outlier(index)
        return events

    def _retire_if_outlier(self, index: int) -> list[ShardFailed]:
        """Retire actor `index` if its rows fail far more often than every other actor's put together (each side
        with RETIRE_MIN_ROWS rows at least): its device or node is broken, not its rows. Its replacement avoids its
        node; the calls it still held come back as ShardFailed(retired=True)."""
        rows, failed = self._rows_by.get(index, (0, 0))
        other_rows = sum(counts[0] for other, counts in self._rows_by.items() if other != index)
        other_failed = sum(counts[1] for other, counts in self._rows_by.items() if other != index)
        if index not in self._in_flight or rows < RETIRE_MIN_ROWS or other_rows < RETIRE_MIN_ROWS:
            return []
        rate, other_rate = failed / rows, other_failed / other_rows
        if rate < RETIRE_RATE or rate < RETIRE_FACTOR * other_rate:
            return []
        node = self._node_of.get(index)
        message = (f"actor {index} retired: {failed} of its {rows} rows failed, {100 * other_rate:.0f}% of the "
                   f"other actors' (a broken device or node)")
        log.warning("%s; replacing it%s", message, f" on another node than {node[:8]}" if node else "")
        if node:
            self._avoid_nodes.add(node)
        self.actors_retired += 1
        events: list[ShardFailed] = []
        for held in self._retire(index, head_running=True):
            events += self._failed_unless_copied(held, message, actor_lost=True, retired=True)
        self._start_actor()
        return events

    def _on_actor_lost(self, call: _Call, outcome: Outcome) -> list[ShardDone | ShardFailed]:
        self.actors_lost += 1
        node = self._node_of.get(call.actor)
        node_lost = not self._runtime.node_alive(node)
        actor = self._actors.get(call.actor)
        undecided = outcome.unreachable and bool(node) and not node_lost and actor is not None
        calls = [call, *self._retire(call.actor, head_running=not call.started, kill=not undecided)]
        self._start_actor()
        if undecided:
            # Its node may be dying without the GCS knowing yet: wait for the verdict (see the module docstring).
            log.warning("actor %d unreachable: %s; replacing it, and waiting up to %.0f s for Ray to tell whether its "
                        "node %s died", call.actor, outcome.error, NODE_DEATH_WAIT_S, node[:8])
            self._undecided.append(_Undecided(actor, call.actor, calls, outcome.error, node, time.monotonic()))
            return self._decide_undecided()
        log.warning("actor %d lost%s: %s; replacing it", call.actor, " with its node" if node_lost else "",
                    outcome.error)
        return self._lost(calls, call.actor, outcome.error, node_lost)

    def _lost(self, calls: list[_Call], actor: int, error: str, node_lost: bool) -> list[ShardFailed]:
        message = f"actor {actor} lost{' with its node' if node_lost else ''}: {error}"
        events: list[ShardFailed] = []
        for held in calls:
            siblings = tuple((other.shard.shard_id, other.attempt_id) for other in calls if other is not held)
            events += self._failed_unless_copied(held, message, actor_lost=True, node_lost=node_lost,
                                                 siblings=siblings)
        return events

    def _decide_undecided(self) -> list[ShardFailed]:
        """The held calls whose verdict is in: their node declared dead (lost with it), their actor dead by itself,
        or NODE_DEATH_WAIT_S passed with the node alive (judged like any death)."""
        events: list[ShardFailed] = []
        now = time.monotonic()
        for entry in list(self._undecided):
            fate = "node" if not self._runtime.node_alive(entry.node) else self._runtime.actor_dead(entry.actor)
            if fate is None and now - entry.since < NODE_DEATH_WAIT_S:
                continue
            self._undecided.remove(entry)
            _quietly(self._runtime.kill, entry.actor)
            node_lost = fate == "node"
            log.info("actor %d: %s", entry.index, f"its node {entry.node[:8]} died" if node_lost else
                     "its process died" if fate else f"its node is alive {now - entry.since:.0f} s later")
            events += self._lost(entry.calls, entry.index, entry.error, node_lost)
        return events

    def _drop_undecided(self, shard_id: str) -> None:
        """Shard `shard_id` is done: its held calls need no verdict."""
        for entry in self._undecided:
            entry.calls = [held for held in entry.calls if held.shard.shard_id != shard_id]
        for entry in [entry for entry in self._undecided if not entry.calls]:
            self._undecided.remove(entry)
            _quietly(self._runtime.kill, entry.actor)

    def _failed_unless_copied(self, call: _Call, error: str, actor_lost: bool, killed: bool = False,
                              node_lost: bool = False, retired: bool = False,
                              siblings: tuple = ()) -> list[ShardFailed]:
        # Another live copy of this shard may still succeed: then this failure does not count. A copy held for the
        # verdict on its node is live too: it comes back when the verdict does.
        live = [ref for ref in self._shard_futures.get(call.shard.shard_id, []) if ref not in self._cancelled]
        held = any(other.shard.shard_id == call.shard.shard_id for entry in self._undecided for other in entry.calls
                   if other is not call)
        if live or held:
            return []
        return [ShardFailed(call.shard, call.attempt, error, actor_lost, call.started, call.attempt_id, killed,
                            node_lost, retired, siblings)]

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> set[tuple[str, str]]:
        """Stop every actor (their models go with them); return the (shard id, attempt id)s a killed actor may still
        be writing.

        Cancel first: a queued call is dropped and a running one stops at its next batch boundary without
        committing. Once a call has returned, its shard is settled: nothing writes to it any more, so the driver
        may clean up after it. Calls still running after `grace_s` (a long model call, a hung actor) are settled by
        the kill, but `ray.kill` returns before the process is gone, so their shards are reported back and the
        driver leaves their files to the next run's cleanup rather than race a dying writer.

        Best effort: after a lost cluster these calls fail too, and the job's own outcome matters more.
        """
        outstanding = {ref: (call.shard.shard_id, call.attempt_id) for ref, call in self._future_to_actor.items()}
        # Held calls: their actor is killed now, but if its node lives after all, it may still be writing.
        held = {(call.shard.shard_id, call.attempt_id) for entry in self._undecided for call in entry.calls}
        for entry in self._undecided:
            _quietly(self._runtime.kill, entry.actor)
        self._undecided.clear()
        unsettled = set(outstanding.values()) | held
        try:
            for ref in outstanding:
                if ref not in self._cancelled:  # copies that lost a race were cancelled when they lost it
                    _quietly(self._runtime.cancel, ref)
            running = self._runtime.wait_all(list(outstanding), grace_s) if outstanding else []
            unsettled = {outstanding[ref] for ref in running} | held
        except Exception as exc:  # noqa: BLE001 - every shard in flight stays unsettled
            log.debug("ignored during shutdown: %s", exc)
        finally:  # even on a second Ctrl-C: no actor outlives the driver's decision to stop
            for actor in self._actors.values():
                _quietly(self._runtime.kill, actor)
            self._actors.clear()
            self._starting.clear()
            self._in_flight.clear()
            self._future_to_actor.clear()
            self._shard_futures.clear()
            self._cancelled.clear()
        return unsettled


def _quietly(fn: Callable, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        log.debug("ignored during shutdown: %s", exc)


def _error_line(exc: BaseException) -> str:
    """One readable line from a Ray error: the exception that stopped a constructor, or what killed the actor."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    if getattr(exc, "actor_init_failed", False):
        return lines[-1][:500]  # the last traceback line: "FileNotFoundError: no model at ..."
    return (lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}")[:500]


def _task_error_message(exc: BaseException) -> str:
    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
    return f"{type(cause).__name__}: {cause}"[:2000]
