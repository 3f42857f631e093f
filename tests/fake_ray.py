"""A fake of the Ray calls the pool makes (engine.pool.RayRuntime), to drive its state machine in milliseconds.

Fake actors record every call as a `FakeRef`; a test decides how and when each ends (`finish`, `lose_actor`) and
then lets the pool see it with `pool.wait(0)`. Nothing runs by itself: every interleaving is the test's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray_render.engine.pool import Outcome


@dataclass(eq=False)
class FakeRef:
    actor: FakeActor
    method: str
    args: tuple
    outcome: Outcome | None = None  # set once the call has ended
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.outcome is not None


class _Method:
    def __init__(self, actor: FakeActor, name: str) -> None:
        self.actor, self.name = actor, name

    def remote(self, *args) -> FakeRef:
        ref = FakeRef(self.actor, self.name, args)
        self.actor.calls.append(ref)
        return ref


@dataclass(eq=False)
class FakeActor:
    index: int
    calls: list[FakeRef] = field(default_factory=list)
    killed: bool = False
    avoid_nodes: tuple[str, ...] = ()  # the nodes the pool asked it not to be placed on

    def __post_init__(self) -> None:
        self.info = _Method(self, "info")
        self.render_shard = _Method(self, "render_shard")

    def pending(self, method: str = "render_shard") -> list[FakeRef]:
        return [ref for ref in self.calls if ref.method == method and not ref.done]


class FakeRuntime:
    """engine.pool.RayRuntime without Ray: refs end when the test says so, or when their actor is killed."""

    def __init__(self) -> None:
        self.actors: list[FakeActor] = []
        self.dead_nodes: set[str] = set()
        self.death_causes: dict[int, str] = {}  # actor index -> what Ray's GCS says killed it: "node", "process"

    def make_actor(self, index: int, avoid_nodes: tuple[str, ...] = ()) -> FakeActor:
        actor = FakeActor(index, avoid_nodes=avoid_nodes)
        self.actors.append(actor)
        return actor

    # -- what the test does --------------------------------------------------------------------------------------

    def start(self, actor: FakeActor, info: dict | None = None) -> None:
        """The actor's constructor finished: its info() call returns."""
        (ref,) = actor.pending("info")
        ref.outcome = Outcome("ok", info or {"name": "fake", "worker": f"w{actor.index}", "batch_size": 8})

    def fail_start(self, actor: FakeActor, error: str = "RuntimeError: the model does not load") -> None:
        (ref,) = actor.pending("info")
        ref.outcome = Outcome("actor_lost", error=error)

    def finish(self, ref: FakeRef, result: Any = None, *, raised: str | None = None) -> None:
        ref.outcome = Outcome("raised", error=raised) if raised else Outcome("ok", result)

    def lose_actor(self, actor: FakeActor, error: str = "the actor died unexpectedly", *,
                   unreachable: bool = False) -> None:
        """The actor's process died: every call it holds ends with actor_lost. `unreachable`: Ray cannot tell why
        yet (ActorUnavailableError), as when its node vanished a moment ago."""
        for ref in actor.calls:
            if not ref.done:
                ref.outcome = Outcome("actor_lost", error=error, unreachable=unreachable)

    # -- RayRuntime --------------------------------------------------------------------------------------------

    def wait(self, refs: list, timeout: float) -> list:
        return [ref for ref in refs if ref.done]

    def wait_all(self, refs: list, timeout: float) -> list:
        return [ref for ref in refs if not ref.done]

    def outcome(self, ref: FakeRef) -> Outcome:
        assert ref.done, "the pool asked for the outcome of a call that has not ended"
        return ref.outcome

    def cancel(self, ref: FakeRef) -> None:
        ref.cancel_requested = True

    def actor_dead(self, actor: FakeActor) -> str | None:
        return self.death_causes.get(actor.index)

    def node_alive(self, node_id: str | None) -> bool:
        return node_id not in self.dead_nodes

    def kill(self, actor: FakeActor) -> None:
        actor.killed = True
        self.lose_actor(actor, "killed by the pool")
