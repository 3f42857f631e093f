"""Same-work baselines for `ray-render bench`: Ray Data doing what ray-render does, and a plain one-process loop.

Both render with the steps a render actor runs (`engine.shard.ShardRenderer`: validate the rows, check, batch and
render the requests, encode and store every image, build the metadata rows), so a benchmark that runs them beside
`ray-render run` compares orchestration, not work. What they leave out is what ray-render's orchestration adds:
the shard journal, encoding and uploads overlapped with the next batch (they store inline, as a `map_batches`
function usually does), resume, and shard retries.

- `ray_data_render`: `read_parquet` -> `map_batches(RayDataRenderer, compute=ActorPoolStrategy(size=actors))` ->
  `write_parquet` of the metadata. The renderer is a class, so each actor holds one resident model. Its actors
  take `num_cpus=0.5`: on a 2-CPU machine whole-CPU actors starve Ray Data's own read and write tasks and the job
  deadlocks.
- `loop_render`: one process renders one prompt at a time, shard by shard, writing the same attempt files as the
  actors and publishing each shard's metadata as a commit does.
"""

from __future__ import annotations

import os
import socket
import uuid

import pyarrow as pa

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine.plan import Shard, plan
from ray_render.engine.shard import ShardRenderer
from ray_render.output import commits, layout
from ray_render.output.schema import metadata_schema, metadata_table

ATTEMPT_ID = "000000000000-1"  # the baselines render every shard once


def _job(manifest_spec: str | list[str], out: str, model: str, batch_size: int, fmt: str, **options) -> JobConfig:
    manifests = [manifest_spec] if isinstance(manifest_spec, str) else list(manifest_spec)
    return JobConfig(manifests=[storage.normalize_url(m) for m in manifests], out=storage.normalize_url(out),
                     model=model, batch_size=batch_size, format=fmt, progress=False, **options)


def _renderer(job: JobConfig, passthrough_schema: pa.Schema, worker: str) -> ShardRenderer:
    """A shard renderer around a freshly loaded model, storing inline and keeping no journal."""
    from ray_render.models import load_model

    model = load_model(job.model, **job.model_options())
    return ShardRenderer(model, job, metadata_schema(passthrough_schema), worker, journal=False)


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


class RayDataRenderer:
    """The `map_batches` class: one resident model per Ray Data actor; a batch of manifest rows in, metadata out."""

    def __init__(self, job: JobConfig, passthrough_schema: pa.Schema) -> None:
        self.job = job
        self.renderer = _renderer(job, passthrough_schema, f"{socket.gethostname()}/ray-data/{os.getpid()}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        # Ray Data batches have no stable identity: each gets its own image directory.
        shard = Shard(f"rd-{uuid.uuid4().hex[:16]}", self.job.manifests[0], 0, len(rows))
        work = self.renderer.prepare(shard, ATTEMPT_ID, rows)
        self.renderer.render_batches(work)
        meta, _, _ = self.renderer.build_rows(work)
        return metadata_table(meta, self.renderer.schema)


def ray_data_render(manifest_spec: str | list[str], out: str, model: str = "placeholder", actors: int = 2,
                    batch_size: int = 8, fmt: str = "png", *, num_blocks: int | None = None,
                    num_cpus: float = 0.5, count: bool = True, **options) -> dict:
    """Render the manifest with Ray Data; returns {"rows", "images"} counted from the metadata written (or {}
    without `count`).

    `num_blocks` repartitions what was read into that many blocks; give it the shard count ray-render would use:
    Ray Data reads a manifest of a few MB as one block (even with `override_num_blocks`), and one block keeps one
    actor busy while the others idle. Connects to RAY_ADDRESS, or starts a local Ray, when none is initialised.
    """
    import ray
    import ray.data

    job = _job(manifest_spec, out, model, batch_size, fmt, **options)
    planned = plan(job.manifests, job.shard_size, job.storage_options)  # the same schema checks as run
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.read_parquet(planned.files)
    if num_blocks:
        # Ray Data reads a small manifest as one block, and one block feeds one actor: split it.
        dataset = dataset.repartition(num_blocks)
    rendered = dataset.map_batches(RayDataRenderer, batch_size=batch_size, batch_format="pyarrow",
                                   compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=num_cpus,
                                   fn_constructor_kwargs={"job": job, "passthrough_schema": planned.passthrough_schema})
    rendered.write_parquet(storage.join(job.out, layout.METADATA_DIR))
    return count_output(job.out) if count else {}


# ---------------------------------------------------------------------------------------------------------------
# A plain loop


def loop_render(manifest_spec: str | list[str], out: str, model: str = "placeholder", *, shard_size: int = 1000,
                fmt: str = "png", count: bool = True, **options) -> dict:
    """Render the manifest in this process, one prompt per model call; returns {"rows", "images"} (or {} without
    `count`)."""
    job = _job(manifest_spec, out, model, 1, fmt, shard_size=shard_size, **options)
    planned = plan(job.manifests, job.shard_size, job.storage_options)
    renderer = _renderer(job, planned.passthrough_schema, f"{socket.gethostname()}/loop/{os.getpid()}")
    for shard in planned.shards:
        renderer.render_shard(shard, 1, ATTEMPT_ID)
        commits.publish(job.out, shard.shard_id, ATTEMPT_ID, job.storage_options)
    return count_output(job.out) if count else {}


def count_output(out: str) -> dict:
    """{"rows": distinct ids, "images": ok rows} of the metadata under `out`."""
    import pyarrow.dataset as ds

    fs, path = storage.open_fs(storage.join(out, layout.METADATA_DIR))
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "status"])
    images = table.column("status").to_pylist().count("ok")
    return {"rows": len(set(table.column("id").to_pylist())), "images": images}
