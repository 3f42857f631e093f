"""Ray Data in, Ray Data out: render a `ray.data.Dataset` of manifest rows and get a Dataset of metadata rows back.

    import ray
    import ray_render.data

    prompts = ray.data.read_csv("s3://bucket/captions.csv").rename_columns({"caption": "prompt"})
    metadata = ray_render.data.render(prompts, out="s3://bucket/renders/v1", width=512, height=512)
    metadata.filter(lambda row: row["status"] == "ok").write_parquet("s3://bucket/renders/v1-ok")

The dataset's rows are written once, in order, as a Parquet manifest under the output root
(`_manifests/dataset-<sha256 of the rows>.parquet`); then the ordinary job renders it: the same actors, the same
per-row determinism (a row with the same id and seed renders the same image as with `ray-render run`), the same
commits and resume. Rendering the same rows again stages the same file, so it resumes instead of rendering twice.
The metadata comes back through `ray.data.read_parquet(OUT/metadata)`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pyarrow.parquet as pq

from ray_render import storage
from ray_render.config import check_option_names, job_from_options
from ray_render.engine import driver, manifests
from ray_render.engine.summary import EXIT_OK, EXIT_ROWS, Summary
from ray_render.output import layout


class RenderFailed(RuntimeError):
    """The job did not finish (aborted, interrupted, internal error): `summary` says why; a rerun resumes."""

    def __init__(self, summary: Summary) -> None:
        super().__init__(f"ray-render {summary.state}: {summary.message} (exit code {summary.exit_code})")
        self.summary = summary


def render(dataset, out: str, **options):
    """Render every row of `dataset` (the manifest's columns: `prompt`, and optionally `id`, `seed`, `width`, ...;
    other columns pass through) into `out`; return a `ray.data.Dataset` of the output's metadata rows.

    `options` are those of `ray_render.render` (and `ray-render run`). Rows that fail still come back, with their
    `status` and `error`; a job that does not finish raises RenderFailed carrying its Summary.
    """
    check_option_names(options, "ray_render.data.render")
    so = options.get("storage_options") or {}
    manifest = stage_dataset(dataset, out, so)
    summary = driver.run(job_from_options({**options, "manifests": [manifest], "out": out}))
    if summary.exit_code not in (EXIT_OK, EXIT_ROWS):
        raise RenderFailed(summary)
    return read_metadata(out, so)


def stage_dataset(dataset, out: str, storage_options: dict | None = None) -> str:
    """Write the dataset's rows, in order, as one Parquet manifest under `out`; returns its URL. The name hashes
    the written file, so the same rows give the same manifest (and a rerun resumes)."""
    context = dataset.context.execution_options
    keep_order, context.preserve_order = context.preserve_order, True  # the same rows, the same file
    try:
        with tempfile.TemporaryDirectory(prefix="ray-render-dataset-") as scratch:
            local = os.path.join(scratch, "rows.parquet")
            rows = _write_rows(dataset, local)
            if rows == 0:
                raise ValueError("the dataset has no rows to render")
            digest = hashlib.sha256()
            with open(local, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            url = storage.join(storage.normalize_url(out), layout.MANIFESTS_DIR,
                               f"dataset-{digest.hexdigest()[:16]}.parquet")
            if not storage.exists(url, storage_options):
                storage.upload_file(local, url, storage_options)
            return url
    finally:
        context.preserve_order = keep_order


def _write_rows(dataset, path: str) -> int:
    """Stream the dataset's rows into a Parquet file at `path` (in manifests' row groups); returns the row count."""
    writer, schema, rows = None, None, 0
    try:
        for table in dataset.iter_batches(batch_size=manifests.BATCH_ROWS, batch_format="pyarrow"):
            if writer is None:
                schema = table.schema.remove_metadata()
                writer = pq.ParquetWriter(path, schema, compression="zstd")
            elif not table.schema.equals(schema, check_metadata=False):
                table = table.cast(schema)  # blocks of one dataset may type an all-null column differently
            writer.write_table(table, row_group_size=manifests.BATCH_ROWS)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def read_metadata(out: str, storage_options: dict | None = None):
    """The output's metadata (`OUT/metadata/*.parquet`) as a `ray.data.Dataset`."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.open_fs(storage.join(out, layout.METADATA_DIR), storage_options)
    if storage.is_local(fs):
        return ray.data.read_parquet(path)
    return ray.data.read_parquet(path, filesystem=PyFileSystem(FSSpecHandler(fs)))
