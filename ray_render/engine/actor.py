"""RenderActor: one resident model on one device, turning shard descriptors into committed shards.

A plain class; the pool wraps it with `ray.remote`, and tests may call it directly. The actor reads its own rows,
so prompts and images never travel through the driver: it receives an `engine.plan.Shard` and returns a small
`ShardResult`. The work itself is `engine.shard.ShardRenderer`'s.

The pool starts it with Ray's `max_concurrency` at engine.pool.CALLS_AT_ONCE: its two queued calls run in threads
of their own and take the model in turns (engine/shard.py), so one call's row reads and metadata writes overlap
the other's model calls.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pyarrow as pa

from ray_render.config import JobConfig
from ray_render.engine.plan import Shard
from ray_render.engine.progress import RenderMetrics
from ray_render.engine.shard import ShardRenderer, ShardResult
from ray_render.models import load_model
from ray_render.output.schema import metadata_schema

UPLOAD_THREADS = 8  # encode + upload run here while the model renders the next batch
CANCEL_CHECK_S = 0.1  # how late a cancelled copy may notice; a batch on a GPU takes longer

log = logging.getLogger("ray_render")


def _log_to_stderr(level: int) -> None:
    """ray_render's log lines of this process on stderr at `level`. A Ray worker process configures no logging, so
    only warnings would reach its stderr (Python's last-resort handler), which Ray forwards to the driver's console;
    with this the actor's info lines (its model loaded, the memory planner's batches) reach it too."""
    logger = logging.getLogger("ray_render")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - informational: the pool treats an unknown node as alive
        return None


def _worker_name(index: int) -> str:
    """hostname/node id prefix/actor index (+ GPU ids): enough to find the machine and device that rendered."""
    name = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            name += f"/{context.get_node_id()[:8]}"
            gpus = context.get_accelerator_ids().get("GPU", [])
            if gpus:
                return f"{name}/actor{index}/gpu{','.join(str(g) for g in gpus)}"
    except Exception:  # noqa: BLE001 - the name is informational; never fail a job over it
        pass
    return f"{name}/actor{index}"


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001
        return False


class RenderActor:
    """One resident model on one device; `render_shard` does a whole shard from reading rows to the commit."""

    def __init__(self, job: JobConfig, index: int = 0, passthrough_schema: pa.Schema | None = None,
                 input_roots: list[str] = (), log_level: int | None = None) -> None:
        """`passthrough_schema` is the plan's (all manifest files): every shard then writes the same columns.
        `input_roots`: where edit rows' input images may come from (engine/inputs.py). `log_level`: the driver's,
        for an actor in a process of its own (see _log_to_stderr); None leaves this process's logging as it is."""
        if log_level is not None:
            _log_to_stderr(log_level)
        self.job = job
        self.index = index
        self.model = load_model(job.model, **job.model_options())
        self.worker = _worker_name(index)
        info = self.model.info
        steps = {"on": ", compiled token steps", "off": ", eager token steps"}.get(info.settings.get("compile"), "")
        log.info("%s: model %s loaded on %s (%s)%s", self.worker, job.model, info.device, info.dtype, steps)
        self._in_ray = _in_ray_actor()
        self._cancel_checked = threading.local()  # per call's thread: monotonic time of Ray's last "not cancelled"
        schema = metadata_schema(passthrough_schema, quality_columns=job.scores_quality)
        self.renderer = ShardRenderer(
            self.model, job, schema, self.worker, input_roots=input_roots,
            uploads=ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="upload"),
            metrics=RenderMetrics(job.model) if self._in_ray else None, cancelled=self._cancelled)
        self.renderer.warm_up()

    def ping(self) -> str:
        return self.worker

    def info(self) -> dict:
        """The model's info plus this actor's worker name, node and current batch size."""
        return {**asdict(self.model.info), "worker": self.worker, "node_id": _node_id(),
                "batch_size": self.renderer.batch_size}

    def defaults(self) -> dict:
        return self.model.defaults()

    def render_shard(self, shard: Shard, attempt: int, attempt_id: str, inherit: tuple[str, bool] | None = None,
                     base: str | None = None) -> ShardResult:
        """Render every row of `shard` as attempt `attempt_id` (files under its own names) and write its metadata;
        returns the counts. The driver commits it. `inherit`, `base`: see ShardRenderer.render_shard."""
        return self.renderer.render_shard(shard, attempt, attempt_id, inherit, base)

    def _cancelled(self) -> bool:
        """Whether the driver cancelled the running call (a straggler copy whose twin finished). Asked of Ray at
        most every CANCEL_CHECK_S: the renderer asks before every batch, and Ray's answer costs as much CPU as
        a small image's encode."""
        if not self._in_ray:
            return False
        now = time.monotonic()
        if now - getattr(self._cancel_checked, "at", float("-inf")) < CANCEL_CHECK_S:
            return False
        import ray

        cancelled = ray.get_runtime_context().is_canceled()  # of the task this thread runs
        if not cancelled:  # a yes is never cached: it belongs to this call, and the next call is another task
            self._cancel_checked.at = now
        return cancelled
