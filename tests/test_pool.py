"""The render actor (in process, then as Ray actors) and the pool: batching, faults, placement, stragglers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import ray
from conftest import image_files
from PIL import Image

from ray_render.config import JobConfig
from ray_render.engine import driver, journal
from ray_render.engine import plan as planning
from ray_render.engine import summary as exits
from ray_render.engine.actor import RenderActor
from ray_render.engine.pool import RenderPool, ShardDone
from ray_render.engine.session import RunSession
from ray_render.engine.shard import ShardCancelled
from ray_render.models.placeholder import PlaceholderModel
from ray_render.output import commits, layout


def metadata(out: str):
    return ds.dataset(f"{out}/metadata", format="parquet").to_table().to_pylist()


def render_all(job: JobConfig):
    plan = planning.plan(job.manifests, job.shard_size, job.storage_options)
    actor = RenderActor(job, 0, plan.passthrough_schema)
    results = []
    for number, shard in enumerate(plan.shards, 1):  # as the driver does: an attempt, then its commit
        result = actor.render_shard(shard, 1, f"000000000000-{number}")
        commits.publish(job.out, shard.shard_id, result.attempt_id)
        results.append(result)
    return actor, results


# -- the actor in this process -------------------------------------------------------------------------------------


def test_actor_isolates_a_raising_row_and_fails_it_after_retries(tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a red circle {i}" + (" [placeholder:raise]" if i == 5 else "")}
            for i in range(8)]
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", batch_size=8,
                    retries=2)
    _, (result,) = render_all(job)
    assert result.counts == {"ok": 7, "invalid": 0, "failed": 1}
    by_id = {row["id"]: row for row in metadata(job.out)}
    assert len(by_id) == 8
    failed = by_id["r5"]
    assert failed["status"] == "failed" and "placeholder:raise" in failed["error"]
    # Bisection 8 -> 4 -> 2 -> 1 puts it in 4 calls, then 2 retries alone.
    assert failed["attempts"] == 4 + 2
    assert not os.path.exists(layout.image_url(job.out, result.shard_id, result.attempt_id, "r5", 0, "png"))
    for row_id in ("r0", "r4", "r6", "r7"):
        assert by_id[row_id]["status"] == "ok" and os.path.exists(by_id[row_id]["image_uri"])


def test_actor_halves_its_batch_size_on_out_of_memory(tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a blue square {i}" + (" [placeholder:oom]" if i == 2 else "")}
            for i in range(8)]
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", batch_size=8)
    actor, (result,) = render_all(job)
    assert result.counts["ok"] == 8  # nothing lost: the batch was split, not failed
    assert actor.renderer.batch_size == 1 and result.batch_size == 1  # 8 -> 4 -> 2 -> 1, kept for the actor's life


class PlannedPlaceholder(PlaceholderModel):
    """The placeholder model with a memory planner that allows 3 requests of any shape per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def max_batch(self, request) -> int:
        return 3

    def render(self, requests):
        self.calls.append(len(requests))
        return super().render(requests)


def test_actor_batches_no_more_than_the_model_plans(tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a red square {i}"} for i in range(8)]
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", batch_size=8)
    plan = planning.plan(job.manifests, job.shard_size, job.storage_options)
    actor = RenderActor(job, 0, plan.passthrough_schema)
    actor.renderer.model = planned = PlannedPlaceholder()
    (result,) = [actor.render_shard(shard, 1, f"000000000000-{n}") for n, shard in enumerate(plan.shards, 1)]
    assert result.counts["ok"] == 8
    assert planned.calls == [3, 3, 2]  # the planner's 3, not the job's 8
    job.batch_size = 2
    small = RenderActor(job, 0, plan.passthrough_schema)
    small.renderer.model = capped = PlannedPlaceholder()
    small.render_shard(plan.shards[0], 1, "000000000000-9")
    assert capped.calls == [2, 2, 2, 2]  # --batch-size stays a cap below the planner's


class TurnWatcher(PlaceholderModel):
    """Records which thread (call) each model call came from, and whether two calls were ever inside at once."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[str] = []
        self.inside = 0
        self.overlapped = False
        self.second_call_rendering = threading.Event()
        self._lock = threading.Lock()

    def render(self, requests):
        caller = threading.current_thread().name
        with self._lock:
            self.inside += 1
            self.overlapped |= self.inside > 1
            self.callers.append(caller)
        if caller == "second":
            self.second_call_rendering.set()
        try:
            return super().render(requests)
        finally:
            with self._lock:
                self.inside -= 1


def test_an_actors_two_calls_take_the_model_in_turns_and_one_writes_while_the_other_renders(tmp_path,
                                                                                          make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a red square {i}" + (" [placeholder:sleep=0.05]" if i < 16 else "")}
            for i in range(32)]  # the first shard renders long enough for the second to prepare meanwhile
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", batch_size=4,
                    shard_size=16)
    plan = planning.plan(job.manifests, job.shard_size, job.storage_options)
    actor = RenderActor(job, 0, plan.passthrough_schema)
    actor.renderer.model = watcher = TurnWatcher()
    finish = actor.renderer.finish
    overlapped_write = []

    def finish_once_the_other_renders(work, *args):
        if work.attempt_id == "000000000000-1":  # the first call's metadata waits for the second call's model
            overlapped_write.append(watcher.second_call_rendering.wait(timeout=30))
        return finish(work, *args)

    actor.renderer.finish = finish_once_the_other_renders
    results = {}

    def call(name: str, number: int) -> None:
        results[name] = actor.render_shard(plan.shards[number], 1, f"000000000000-{number + 1}")

    first = threading.Thread(target=call, args=("first", 0), name="first")
    first.start()
    deadline = time.monotonic() + 30
    while "first" not in watcher.callers and time.monotonic() < deadline:  # the first call has the model
        time.sleep(0.01)
    second = threading.Thread(target=call, args=("second", 1), name="second")
    second.start()
    for thread in (first, second):
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert overlapped_write == [True]  # the first call wrote its metadata while the second one rendered
    assert not watcher.overlapped  # never two model calls at once ...
    assert watcher.callers == ["first"] * 4 + ["second"] * 4  # ... and one shard's batches at a time
    assert [results[name].counts["ok"] for name in ("first", "second")] == [16, 16]
    one, two = results["first"], results["second"]
    assert one.rendering_until <= two.rendering_from < one.finished_at  # the second took the model as it was passed
    assert two.waited_ms > 0 and two.started_at < one.rendering_until  # ... after preparing beside the first
    for name, number in (("first", 0), ("second", 1)):
        commits.publish(job.out, plan.shards[number].shard_id, results[name].attempt_id)
    assert sorted(row["id"] for row in metadata(job.out)) == sorted(row["id"] for row in rows)


def test_a_call_cancelled_while_it_waits_for_the_model_stops_without_rendering(tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a red square {i} [placeholder:sleep=0.2]"} for i in range(16)]
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", batch_size=4,
                    shard_size=8)
    plan = planning.plan(job.manifests, job.shard_size, job.storage_options)
    actor = RenderActor(job, 0, plan.passthrough_schema)
    actor.renderer.model = watcher = TurnWatcher()
    cancelled = threading.Event()
    actor.renderer._cancelled = lambda: cancelled.is_set() and threading.current_thread().name == "second"
    outcome = {}

    def call(name: str, number: int) -> None:
        try:
            outcome[name] = actor.render_shard(plan.shards[number], 1, f"000000000000-{number + 1}")
        except ShardCancelled as exc:
            outcome[name] = exc

    first = threading.Thread(target=call, args=("first", 0), name="first")
    first.start()
    deadline = time.monotonic() + 30
    while "first" not in watcher.callers and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=call, args=("second", 1), name="second")
    second.start()
    cancelled.set()  # the pool moved it to another actor while it waited for the turn
    second.join(timeout=30)
    assert first.is_alive()  # it stopped waiting at once, not when the first call passed the model on
    first.join(timeout=30)
    assert isinstance(outcome["second"], ShardCancelled) and "second" not in watcher.callers
    assert outcome["first"].counts["ok"] == 8


START_AN_ACTOR = """
import sys
from ray_render.config import JobConfig
from ray_render.engine.actor import RenderActor
RenderActor(JobConfig(manifests=["m.parquet"], out=sys.argv[1], model="placeholder"), 0, log_level=int(sys.argv[2]))
"""


def test_an_actor_logs_its_model_at_the_drivers_level(tmp_path):
    # In its own process, as a Ray actor is: what it logs reaches stderr, which Ray forwards to the driver.
    for level, shown in ((logging.INFO, True), (logging.WARNING, False)):
        started = subprocess.run([sys.executable, "-c", START_AN_ACTOR, str(tmp_path / "out"), str(level)],
                                 capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
        assert started.returncode == 0, started.stderr[-2000:]
        assert ("actor0: model placeholder loaded on" in started.stderr) == shown, started.stderr


def test_actor_writes_every_row_once_with_its_settings(tmp_path, make_manifest):
    (tmp_path / "inputs").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "inputs" / "a.png")
    rows = [
        {"id": "plain", "prompt": "a red circle", "num_images": 3, "seed": 100, "group": "g1"},
        {"id": "bad-width", "prompt": "a red circle", "width": 30, "group": "g2"},
        {"id": "rejected", "prompt": "a square [placeholder:invalid]", "group": "g3"},
        {"id": "edit", "prompt": "<image> make it blue", "input_image": str(tmp_path / "inputs" / "a.png")},
        {"id": "edit-missing", "prompt": "<image> make it blue", "input_image": str(tmp_path / "nope.png")},
        {"id": "wide", "prompt": "a green triangle", "width": 128, "height": 32},
    ]
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", format="webp",
                    quality=80, input_roots=[str(tmp_path / "inputs")])
    _, (result,) = render_all(job)
    assert result.counts == {"ok": 3, "invalid": 3, "failed": 0}
    assert result.images == 5
    table = metadata(job.out)
    plain = sorted((row for row in table if row["id"] == "plain"), key=lambda row: row["image_index"])
    assert [row["seed"] for row in plain] == [100, 101, 102]
    assert all(row["format"] == "webp" and row["image_uri"].endswith(".webp") for row in plain)
    assert [row["group"] for row in plain] == ["g1"] * 3  # passthrough column kept
    assert len({row["sha256"] for row in plain}) == 3
    errors = {row["id"]: row["error"] for row in table if row["status"] == "invalid"}
    assert "width" in errors["bad-width"] and "multiple of 16" in errors["bad-width"]
    assert "placeholder:invalid" in errors["rejected"]
    assert "nope.png" in errors["edit-missing"]
    wide = next(row for row in table if row["id"] == "wide")
    assert Image.open(wide["image_uri"]).size == (128, 32)
    assert (wide["width"], wide["height"]) == (128, 32)


# -- Ray actors and the pool -----------------------------------------------------------------------------------------


def wait_until_ready(pool: RenderPool, actors: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.num_ready < actors:
        assert time.monotonic() < deadline, f"{pool.num_ready} of {actors} actors ready after {timeout_s:.0f} s"
        pool.wait(1.0)


def slow_rows(n: int, seconds: float, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"a red circle {i} [placeholder:sleep={seconds}]"}
            for i in range(start, start + n)]


def test_gpu_actors_one_per_shard_left_each_on_its_own_declared_gpu(ray_cluster, tmp_path, make_manifest):
    job = JobConfig(manifests=[make_manifest(n=40)], out=str(tmp_path / "out"), model="placeholder")  # device auto
    session = RunSession(job)
    plan = planning.plan(job.manifests, job.shard_size)
    assert len(plan.shards) == 2  # 16 and 24 rows
    pool = session.start_pool(plan)
    assert pool.size == 2  # the elastic pool asks for no more actors than there are shards
    try:
        wait_until_ready(pool, 2)
        workers = [info["worker"] for info in ray.get([actor.info.remote() for actor in pool.ready_actors()])]
    finally:
        pool.shutdown()
    assert sorted(worker.rsplit("/", 1)[-1] for worker in workers) == ["gpu0", "gpu1"], workers


def test_an_actor_killed_mid_shard_is_replaced_and_every_row_lands_once(ray_cluster, tmp_path, make_manifest):
    psutil = pytest.importorskip("psutil")
    job = JobConfig(manifests=[make_manifest(slow_rows(24, 0.1))], out=str(tmp_path / "out"), model="placeholder",
                    shard_size=3, batch_size=1, device="cpu", actors=2, progress=False)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", driver.run(job)))
    thread.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        # Only this test's Ray (our own descendants): never another process's actors on the same machine.
        for process in psutil.Process().children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if "ray::RenderActor.render_shard" in title:
                os.kill(process.pid, signal.SIGKILL)
                killed = process.pid
                break
        time.sleep(0.05)
    thread.join(120)
    assert killed is not None, "no actor was seen rendering"
    summary = outcome["summary"]
    assert summary.exit_code == exits.EXIT_OK, summary.format()
    assert summary.actors_replaced >= 1 and summary.shard_retries >= 1
    ids = [row["id"] for row in metadata(job.out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(24))  # every row exactly once
    assert len(image_files(job.out)) == 24  # the killed attempt's images are gone with it


def test_idle_actor_takes_a_copy_of_a_queued_shard_and_the_first_result_wins(ray_cluster, tmp_path, make_manifest):
    path = make_manifest(slow_rows(1, 3.0) + [{"id": f"f{i}", "prompt": f"fast {i}"} for i in range(3)])
    job = JobConfig(manifests=[path], out=str(tmp_path / "out"), model="placeholder", shard_size=1, device="cpu",
                    actors=2, max_in_flight=2)
    plan = planning.plan(job.manifests, job.shard_size)
    remote = ray.remote(RenderActor).options(num_cpus=0.5, max_restarts=0, max_task_retries=0)
    pool = RenderPool(lambda index, avoid: remote.remote(job, index, plan.passthrough_schema), 2, job.max_in_flight)
    try:
        wait_until_ready(pool, 2)
        pending = list(plan.shards)  # the slow shard first: whoever takes it holds a queued shard behind it
        done: list[ShardDone] = []
        deadline = time.monotonic() + 60
        while (pending or pool.has_work()) and time.monotonic() < deadline:
            while pending and pool.can_submit():
                pool.submit(pending.pop(0), 1)
            if not pending:
                pool.reissue_stragglers()
            for event in pool.wait(0.2):
                if isinstance(event, ShardDone):  # as the driver does: the first result is committed
                    commits.publish(job.out, event.shard.shard_id, event.attempt_id)
                    done.append(event)
    finally:
        pool.shutdown()
    assert pool.reissued >= 1
    assert sorted(event.shard.shard_id for event in done) == sorted(shard.shard_id for shard in plan.shards)
    assert len(metadata(job.out)) == 4


def test_shutdown_lets_cancelled_calls_return_and_names_the_shards_still_running(ray_cluster, tmp_path,
                                                                                 make_manifest):
    path = make_manifest(slow_rows(4, 0.5) + slow_rows(1, 60.0, start=4))
    job = JobConfig(manifests=[path], out=str(tmp_path / "out"), model="placeholder", shard_size=4, device="cpu",
                    actors=2, max_in_flight=1, batch_size=1)
    plan = planning.plan(job.manifests, job.shard_size)
    stoppable, stuck = plan.shards  # 4 model calls of 0.5 s; one model call of 60 s
    remote = ray.remote(RenderActor).options(num_cpus=0.5, max_restarts=0, max_task_retries=0)
    pool = RenderPool(lambda index, avoid: remote.remote(job, index, plan.passthrough_schema), 2, job.max_in_flight)
    wait_until_ready(pool, 2)
    for shard in plan.shards:
        pool.submit(shard, 1)
    deadline = time.monotonic() + 60
    while not all(os.path.exists(layout.journal_url(job.out, *pair)) for pair in pool.attempts):
        assert time.monotonic() < deadline, "the calls never reached the model"
        time.sleep(0.05)  # each call writes its shard's journal right before its first model call
    started = time.monotonic()
    unsettled = pool.shutdown(grace_s=3.0)
    assert {shard_id for shard_id, _ in unsettled} == {stuck.shard_id}  # the stoppable call returned in time
    assert time.monotonic() - started < 10
    (stopped,) = [pair for pair in pool.attempts if pair[0] == stoppable.shard_id]
    # A cancelled call stops before it finishes its attempt: no metadata for the driver to commit.
    assert not os.path.exists(layout.attempt_metadata_url(job.out, *stopped))
    assert journal.read(job.out, *stopped)["rendering"] == []  # it stopped cleanly: no row is blamed


def test_a_model_that_does_not_load_aborts_the_job(ray_cluster, tmp_path, make_manifest):
    job = JobConfig(manifests=[make_manifest()], out=str(tmp_path / "out"), model=str(tmp_path / "no-such-model"),
                    device="cpu", progress=False)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_ABORTED
    assert "no render actor could start" in summary.message
