"""Training-ready copies of a finished output root: WebDataset tar shards, or Parquet with the images embedded.

- `webdataset`: `train-00000-of-00012.tar` ... with three files per image: `<key>.<ext>` (the image as
  rendered), `<key>.json` (its metadata row) and `<key>.txt` (its prompt). `<key>` is `<row id>_<image index>`
  with "." written as "%2E", because WebDataset splits a file name into key and extension at the first dot.
- `parquet`: `train-00000-of-00012.parquet` ... with an `image` column in the Hugging Face `datasets` Image layout
  (struct of `bytes` and `path`, declared in the schema's "huggingface" metadata), so
  `datasets.load_dataset("parquet", data_files=...)` yields PIL images, then the metadata columns.

Only committed shards' `ok` images are exported (optionally only those with `quality_score >= min_quality`), in
shard-id order, so the same output root always gives byte-identical files under the same names. Memory stays
bounded: metadata is read in record batches, a shard's rows are held as metadata only, and images are fetched a
small window at a time. A shard file appears whole or not at all, and files of an earlier, larger export to the
same destination are removed. Every image is checked against its metadata's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.output import commits, layout

KINDS = ("webdataset", "parquet")
SUFFIXES = {"webdataset": "tar", "parquet": "parquet"}
FETCH_WINDOW = 16  # images fetched concurrently: hides object-store latency, bounds memory to 16 images
BATCH_ROWS = 256  # metadata rows per record batch read
PARQUET_ROW_GROUP = 64  # images per Parquet row group: small groups let readers stream an image dataset
HF_IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
HF_FEATURES = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}})}
DROPPED_COLUMNS = ("status", "error")  # every exported row is ok, with no error


class ExportError(RuntimeError):
    """The export cannot run as asked; the message says what to change."""


@dataclass
class ExportResult:
    """What `export` wrote."""

    kind: str
    dest: str
    files: list[str] = field(default_factory=list)  # full URLs, in order
    samples: int = 0

    @property
    def pattern(self) -> str | None:
        """The files as one brace pattern, the form `webdataset.WebDataset(...)` and similar loaders take."""
        if not self.files:
            return None
        n = len(self.files)
        return storage.join(self.dest, f"train-{{00000..{n - 1:05d}}}-of-{n:05d}.{SUFFIXES[self.kind]}")


def shard_name(index: int, count: int, kind: str) -> str:
    return f"train-{index:05d}-of-{count:05d}.{SUFFIXES[kind]}"


_SHARD_NAME_RE = re.compile(r"train-\d{5}-of-\d{5}\.(tar|parquet)")


def sample_key(row_id: str, image_index: int) -> str:
    """The WebDataset key of an image: unique per (row id, image index) and free of dots."""
    return f"{row_id.replace('.', '%2E')}_{image_index}"


# ---------------------------------------------------------------------------------------------------------------
# Reading the output root


def _committed_dataset(out_root: str, storage_options: dict | None) -> ds.Dataset:
    """The committed shards' metadata as one dataset, schemas unified."""
    shard_ids = sorted(commits.committed_shard_ids(out_root, storage_options))
    if not shard_ids:
        raise ExportError(f"{out_root}: no committed shards (no commits in {layout.LOG_DIR}/); "
                          "run or resume the job first")
    fs, _ = storage.open_fs(out_root, storage_options)
    paths = [storage.open_fs(layout.metadata_url(out_root, shard_id), storage_options)[1] for shard_id in shard_ids]
    # One footer read per shard, concurrently (object-store latency). Shards that different runs wrote into one
    # root may differ in passthrough columns; the unified schema has them all, null where a shard lacks one.
    with ThreadPoolExecutor(max_workers=FETCH_WINDOW) as pool:
        schemas = list(pool.map(lambda path: pq.read_schema(path, filesystem=fs), paths))
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    return ds.dataset(paths, schema=schema, format="parquet", filesystem=fs)


def _row_filter(schema: pa.Schema, min_quality: float | None) -> ds.Expression:
    expression = ds.field("status") == "ok"
    if min_quality is not None:
        if "quality_score" not in schema.names:
            raise ExportError("min_quality needs a quality_score column; this job ran without quality scores")
        expression &= ds.field("quality_score") >= min_quality
    return expression


def _rows(dataset: ds.Dataset, expression: ds.Expression) -> Iterator[tuple[str, dict]]:
    """(shard id, metadata row) for every exported image, shard by shard in id order, rows in file order."""
    fragments = {os.path.basename(fragment.path)[: -len(".parquet")]: fragment
                 for fragment in dataset.get_fragments()}
    for shard_id, fragment in sorted(fragments.items()):
        for batch in fragment.to_batches(schema=dataset.schema, filter=expression, batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield shard_id, row


def _chunks(rows: Iterator[tuple[str, dict]], size: int) -> Iterator[list[tuple[str, dict]]]:
    chunk: list[tuple[str, dict]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fetch(out_root: str, shard_id: str, row: dict, storage_options: dict | None) -> bytes:
    url = layout.row_image_url(out_root, shard_id, row)
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise ExportError(f"{url}: image of row {row['id']!r} (image {row['image_index']}) is missing, though its "
                          "shard is committed") from None
    if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise ExportError(f"{url}: content does not match the sha256 in the metadata of row {row['id']!r}")
    return data


def _with_images(out_root: str, rows: list[tuple[str, dict]], storage_options: dict | None,
                 pool: ThreadPoolExecutor) -> Iterator[tuple[dict, bytes]]:
    """(row, image bytes) in order, at most FETCH_WINDOW images in memory at once."""
    for window in _chunks(iter(rows), FETCH_WINDOW):
        images = pool.map(lambda item: _fetch(out_root, item[0], item[1], storage_options), window)
        yield from zip((row for _, row in window), images)


# ---------------------------------------------------------------------------------------------------------------
# Writing files


@contextlib.contextmanager
def _open_atomic(url: str, storage_options: dict | None):
    """A binary file that appears at `url` only if the block completes: local temp file + rename, or an object
    store upload that is committed at the end and aborted on error."""
    fs, path = storage.open_fs(url, storage_options)
    if storage.is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    handle = fs.open(path, "wb", autocommit=False)
    try:
        yield handle
        handle.close()
        handle.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            handle.discard()
        raise


def _json_value(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed owner and time: the same root gives byte-identical shards
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))


def _write_tar(url: str, samples: Iterator[tuple[dict, bytes]], storage_options: dict | None) -> int:
    count = 0
    with _open_atomic(url, storage_options) as handle:
        with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as archive:
            for row, image in samples:
                key = sample_key(row["id"], row["image_index"])
                _tar_member(archive, f"{key}.{layout.EXTENSIONS[row['format']]}", image)
                text = json.dumps(row, sort_keys=True, default=_json_value, ensure_ascii=False)
                _tar_member(archive, f"{key}.json", text.encode())
                _tar_member(archive, f"{key}.txt", (row.get("prompt") or "").encode())
                count += 1
    return count


def _parquet_schema(metadata_schema: pa.Schema) -> pa.Schema:
    kept = [f for f in metadata_schema if f.name not in DROPPED_COLUMNS and f.name != "image"]
    return pa.schema([pa.field("image", HF_IMAGE_TYPE), *kept], metadata=HF_FEATURES)


def _write_parquet(url: str, samples: Iterator[tuple[dict, bytes]], schema: pa.Schema,
                   storage_options: dict | None) -> int:
    count = 0
    with _open_atomic(url, storage_options) as handle:
        with pq.ParquetWriter(handle, schema, compression="zstd") as parquet:
            for group in _chunks(samples, PARQUET_ROW_GROUP):
                rows = [{**row, "image": {"bytes": image, "path": os.path.basename(row["image_uri"] or "")}}
                        for row, image in group]
                parquet.write_table(pa.Table.from_pylist(rows, schema=schema))
                count += len(rows)
    return count


def _remove_stale(dest: str, kind: str, kept: set[str], storage_options: dict | None) -> None:
    """Delete `kind` shard files an earlier export left that this one did not write (it had more shards)."""
    for name in storage.list_names(dest, storage_options):
        if _SHARD_NAME_RE.fullmatch(name) and name.endswith("." + SUFFIXES[kind]) and name not in kept:
            storage.delete(storage.join(dest, name), storage_options)


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def export(out_root: str, kind: str, dest: str, storage_options: dict | None = None, samples_per_shard: int = 1000,
           *, dest_storage_options: dict | None = None, min_quality: float | None = None) -> ExportResult:
    """Write the committed `ok` images of `out_root` to `dest` as `kind` ("webdataset" or "parquet") shards of at
    most `samples_per_shard` images each. `dest_storage_options` default to `storage_options`."""
    if kind not in KINDS:
        raise ExportError(f"export kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ExportError(f"samples_per_shard must be a whole number >= 1, got {samples_per_shard!r}")
    if min_quality is not None and not 0.0 <= min_quality <= 1.0:
        raise ExportError(f"min_quality must be from 0 to 1, got {min_quality}")
    for directory in (layout.METADATA_DIR, layout.IMAGES_DIR, layout.LOG_DIR, layout.ATTEMPTS_DIR):
        inside = storage.join(out_root, directory)
        if dest.rstrip("/") == inside or dest.startswith(inside + "/"):
            raise ExportError(f"export destination {dest} is inside the output's {directory}/; choose another one")
    dest_options = storage_options if dest_storage_options is None else dest_storage_options

    dataset = _committed_dataset(out_root, storage_options)
    expression = _row_filter(dataset.schema, min_quality)
    total = dataset.count_rows(filter=expression)
    count = -(-total // samples_per_shard)
    parquet_schema = _parquet_schema(dataset.schema)
    result = ExportResult(kind=kind, dest=dest)
    with ThreadPoolExecutor(max_workers=FETCH_WINDOW) as pool:
        rows = _rows(dataset, expression)
        for index, shard_rows in enumerate(_chunks(rows, samples_per_shard)):
            url = storage.join(dest, shard_name(index, count, kind))

            def write_shard(shard_rows=shard_rows, url=url) -> int:
                samples = _with_images(out_root, shard_rows, storage_options, pool)
                if kind == "webdataset":
                    return _write_tar(url, samples, dest_options)
                return _write_parquet(url, samples, parquet_schema, dest_options)

            # A transient store error mid-shard re-writes the whole shard: its rows are still here, as metadata.
            result.samples += storage.with_retries(write_shard, attempts=3, what=f"write {url}")
            result.files.append(url)
    if result.samples != total:
        raise ExportError(f"{out_root}: counted {total} images to export but wrote {result.samples}; "
                          "the output root changed during the export")
    _remove_stale(dest, kind, {url.rsplit("/", 1)[-1] for url in result.files}, dest_options)
    return result
