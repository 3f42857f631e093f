"""Same-work baselines for `ray-render bench`: Ray Data doing what ray-render does, and a plain one-process loop.

Both use the parts a render actor uses: `manifest.validate_rows` for the rows, the model's `check`, `batch_key` and
`render`, `writer.encode_image` and `writer.write_image` for every image, and the metadata schema and row helpers
for the Parquet they write. So a benchmark that runs them beside `ray-render run` compares orchestration, not work.

- `ray_data_render`: `read_parquet` -> `map_batches(RayDataRenderer, compute=ActorPoolStrategy(size=actors))` ->
  `write_parquet` of the metadata. The renderer is a class, so each actor holds one resident model; it renders,
  encodes and writes inline, as a `map_batches` function usually does. Its actors take `num_cpus=0.5`: on a
  2-CPU machine whole-CPU actors starve Ray Data's own read and write tasks and the job deadlocks.
- `loop_render`: one process renders one prompt at a time, then encodes and writes it, shard by shard, writing
  the same metadata files and commit markers as the actors.

Neither retries, resumes or isolates a failing row within a batch: a render error fails the rows of that call.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import pyarrow as pa

from ray_render import manifest, storage, writer
from ray_render.config import JobConfig
from ray_render.manifest import InvalidRow, RowTask, Shard


def _job(manifest_spec: str | list[str], out: str, model: str, batch_size: int, fmt: str, **options) -> JobConfig:
    manifests = [manifest_spec] if isinstance(manifest_spec, str) else list(manifest_spec)
    return JobConfig(manifests=[storage.normalize_url(m) for m in manifests], out=storage.normalize_url(out),
                     model=model, batch_size=batch_size, format=fmt, progress=False, **options)


def _load(job: JobConfig):
    from ray_render.models import load_model

    return load_model(job.model, vae=job.vae, revision=job.revision, device=job.device, dtype=job.dtype,
                      noise=job.noise, storage_options=job.storage_options, rope_precision=job.rope_precision,
                      edit_input=job.edit_input)


def render_rows(model, job: JobConfig, shard: Shard, rows: list[dict], batch_size: int, worker: str) -> list[dict]:
    """Validate `rows`, render them `batch_size` requests per model call, store every image; the metadata rows.

    The same steps as `RenderActor.render_shard` without its safety nets (retries, batch splitting, cancellation).
    """
    common = {"model": model.info.name, "model_revision": model.info.revision, "worker": worker}
    checked = manifest.validate_rows(rows, shard, model_defaults=model.defaults(), job=job)
    groups: dict = {}
    for position, task in enumerate(checked):
        if isinstance(task, RowTask):
            for k, request in enumerate(task.requests()):
                request = model.check(request)
                groups.setdefault(model.batch_key(request), []).append((position, k, request))
    stored: dict[tuple[int, int], dict] = {}
    errors: dict[int, str] = {}
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            began = time.monotonic()
            try:
                arrays = model.render([request for _, _, request in batch])
            except Exception as exc:  # noqa: BLE001 - the rows of this call fail; the baseline goes on
                for position, _, _ in batch:
                    errors[position] = f"{type(exc).__name__}: {exc}"
                continue
            render_ms = (time.monotonic() - began) * 1000.0 / len(batch)
            for (position, k, _), array in zip(batch, arrays):
                task = checked[position]
                data = writer.encode_image(array, job.format, job.quality)
                url = writer.write_image(job.out, shard.shard_id, task.id, k, job.format, data, job.storage_options)
                stored[(position, k)] = writer.ok_row(
                    task, k, image_uri=url, sha256=writer.sha256_hex(data), width=int(array.shape[1]),
                    height=int(array.shape[0]), fmt=job.format, render_ms=render_ms, attempts=1, **common)
    meta = []
    for position, task in enumerate(checked):
        if isinstance(task, InvalidRow):
            meta.append(writer.invalid_row(task, **common))
        elif position in errors:
            meta.append(writer.failed_row(task, errors[position], 1, **common))
        else:
            meta += [stored[(position, k)] for k in range(task.params["num_images"])]
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Ray Data


class RayDataRenderer:
    """The `map_batches` class: one resident model per Ray Data actor; a batch of manifest rows in, metadata out."""

    def __init__(self, job: JobConfig, passthrough_schema: pa.Schema) -> None:
        self.job = job
        self.model = _load(job)
        self.schema = writer.metadata_schema(passthrough_schema)
        self.worker = f"{socket.gethostname()}/ray-data/{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        # Ray Data batches have no stable identity: each gets its own image directory.
        shard = Shard(f"rd-{uuid.uuid4().hex[:16]}", self.job.manifests[0], 0, len(rows))
        meta = render_rows(self.model, self.job, shard, rows, self.job.batch_size, self.worker)
        return writer.metadata_table(meta, self.schema)


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
    plan = manifest.plan(job.manifests, job.shard_size, job.storage_options)  # the same schema checks as run
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    dataset = ray.data.read_parquet(plan.files)
    if num_blocks:
        # Ray Data reads a small manifest as one block, and one block feeds one actor: split it.
        dataset = dataset.repartition(num_blocks)
    rendered = dataset.map_batches(RayDataRenderer, batch_size=batch_size, batch_format="pyarrow",
                                   compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=num_cpus,
                                   fn_constructor_kwargs={"job": job, "passthrough_schema": plan.passthrough_schema})
    rendered.write_parquet(storage.join(job.out, writer.METADATA_DIR))
    return count_output(job.out) if count else {}


# ---------------------------------------------------------------------------------------------------------------
# A plain loop


def loop_render(manifest_spec: str | list[str], out: str, model: str = "placeholder", *, shard_size: int = 1000,
                fmt: str = "png", count: bool = True, **options) -> dict:
    """Render the manifest in this process, one prompt per model call; returns {"rows", "images"} (or {} without
    `count`)."""
    job = _job(manifest_spec, out, model, 1, fmt, shard_size=shard_size, **options)
    plan = manifest.plan(job.manifests, job.shard_size, job.storage_options)
    loaded = _load(job)
    schema = writer.metadata_schema(plan.passthrough_schema)
    worker = f"{socket.gethostname()}/loop/{os.getpid()}"
    for shard in plan.shards:
        rows = manifest.read_shard_rows(shard, job.storage_options)
        meta = render_rows(loaded, job, shard, rows, 1, worker)
        writer.write_shard_metadata(job.out, shard.shard_id, writer.metadata_table(meta, schema),
                                    job.storage_options)
        writer.commit_shard(job.out, shard.shard_id, {"rows": len(rows)}, job.storage_options)
    return count_output(job.out) if count else {}


def count_output(out: str) -> dict:
    """{"rows": distinct ids, "images": ok rows} of the metadata under `out`."""
    import pyarrow.dataset as ds

    fs, path = storage.open_fs(storage.join(out, writer.METADATA_DIR))
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=["id", "status"])
    images = table.column("status").to_pylist().count("ok")
    return {"rows": len(set(table.column("id").to_pylist())), "images": images}
