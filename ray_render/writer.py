"""Image encoding, metadata Parquet, commit markers, the job record: everything a job leaves under its output root.

Layout under the root (a local path or any fsspec URL):

    images/<shard_id>/<row id>_<image index>.<ext>   the images
    metadata/<shard_id>.parquet                      one row per image, and one per row that produced none
    _commits/<shard_id>.json                         written last: the shard is done
    _job.json                                        resolved settings, plan fingerprint, model revision
    _summary.json                                    the final counts

A shard counts only once its commit marker exists. Resume is one listing of `_commits/`; leftovers of a crash
(metadata or images of shards without a marker) are removed by `remove_orphans`, so readers of `metadata/` never
see a row twice. Keys are deterministic, so a retried shard overwrites its own objects.
"""

from __future__ import annotations

import hashlib
import io
import json
import numbers
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ray_render import storage
from ray_render.config import IMAGE_FORMATS
from ray_render.journal import JOURNAL_DIR

if TYPE_CHECKING:
    from ray_render.manifest import InvalidRow, RowTask

IMAGES_DIR = "images"
METADATA_DIR = "metadata"
COMMITS_DIR = "_commits"
JOB_RECORD = "_job.json"
SUMMARY = "_summary.json"
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
STATUSES = ("ok", "invalid", "failed")  # what rendering a row ends in (the counts of a run)
# Set by `ray-render refresh` on the rows of ids that left the manifest; the image is kept (image_uri set) unless
# the refresh ran with --prune (image_uri null).
REMOVED = "removed"
ALL_STATUSES = STATUSES + (REMOVED,)

# Same rule as manifest.ROW_ID_PATTERN: a name that cannot climb out of its directory or hide itself.
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# One fixed Arrow type per column, so every shard's file has the same schema and `metadata/` reads as one dataset.
METADATA_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("image_index", pa.int32()),  # null for rows that produced no image
    pa.field("status", pa.string()),  # ok | invalid | failed | removed (see ALL_STATUSES)
    pa.field("error", pa.string()),
    pa.field("image_uri", pa.string()),  # full fsspec URL
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("sha256", pa.string()),  # of the encoded image bytes
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("positive_prompt", pa.string()),
    pa.field("cfg", pa.float64()),
    pa.field("cfg_img", pa.float64()),
    pa.field("cfg_schedule", pa.string()),
    pa.field("use_norm", pa.bool_()),
    pa.field("timesteps_shift", pa.float64()),
    pa.field("num_sampling_steps", pa.int32()),
    pa.field("num_images", pa.int32()),
    pa.field("seed", pa.int64()),  # the seed this image used (row seed + image index)
    pa.field("preset", pa.string()),
    pa.field("input_image", pa.string()),
    pa.field("model", pa.string()),
    pa.field("model_revision", pa.string()),
    pa.field("render_ms", pa.float64()),  # this image's share of its batch's model time
    pa.field("attempts", pa.int32()),
    pa.field("worker", pa.string()),
    pa.field("created_at", pa.timestamp("ms", tz="UTC")),
    pa.field("row_fingerprint", pa.string()),  # RowTask.fingerprint: changes iff the row's images would
    pa.field("source_file", pa.string()),
    pa.field("source_row", pa.int64()),  # 0-based row in source_file
]
METADATA_COLUMNS = [f.name for f in METADATA_FIELDS]
_RENDER_COLUMNS = ("negative_prompt", "positive_prompt", "cfg", "cfg_img", "cfg_schedule", "use_norm",
                   "timesteps_shift", "num_sampling_steps", "num_images")


def check_safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as one path segment of an object key, else raise ValueError."""
    if not isinstance(name, str) or not _SAFE_NAME_RE.fullmatch(name):
        raise ValueError(f"unsafe {what} for an output key: {name!r}")
    return name


# ---------------------------------------------------------------------------------------------------------------
# Images


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode a (height, width, 3) uint8 RGB array. PNG bytes depend only on the pixels (no timestamps)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a (height, width, 3) uint8 array, got {array.shape} {array.dtype}")
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def image_key(shard_id: str, row_id: str, image_index: int, fmt: str) -> str:
    """The image's key relative to the output root: images/<shard_id>/<row id>_<image index>.<ext>."""
    check_safe_name(shard_id, "shard id")
    check_safe_name(row_id, "row id")
    if isinstance(image_index, bool) or not isinstance(image_index, numbers.Integral) or image_index < 0:
        raise ValueError(f"image index must be a whole number >= 0, got {image_index!r}")
    if fmt not in EXTENSIONS:
        raise ValueError(f"image format must be one of {', '.join(EXTENSIONS)}, got {fmt!r}")
    return f"{IMAGES_DIR}/{shard_id}/{row_id}_{image_index}.{EXTENSIONS[fmt]}"


def image_url(root: str, shard_id: str, row_id: str, image_index: int, fmt: str) -> str:
    return storage.join(root, image_key(shard_id, row_id, image_index, fmt))


def write_image(root: str, shard_id: str, row_id: str, image_index: int, fmt: str, data: bytes,
                storage_options: dict | None = None) -> str:
    """Store encoded image bytes at their deterministic key; returns the image's full URL."""
    url = image_url(root, shard_id, row_id, image_index, fmt)
    storage.write_bytes(url, data, storage_options)
    return url


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Metadata rows and files


def quality_fields() -> list[pa.Field]:
    """The quality score columns (`quality.QUALITY_COLUMNS` + `RERENDER_COLUMNS`) a scoring job adds."""
    from ray_render import quality

    columns = {**quality.QUALITY_COLUMNS, **quality.RERENDER_COLUMNS}
    return [pa.field(name, pa.type_for_alias(kind)) for name, kind in columns.items()]


def metadata_schema(passthrough_schema: pa.Schema | None = None, quality_columns: bool = False) -> pa.Schema:
    """The fixed metadata columns, the quality columns when asked for, then the manifest's passthrough columns
    (their manifest types, nullable)."""
    scores = quality_fields() if quality_columns else []
    extra = [pa.field(f.name, f.type, nullable=True) for f in (passthrough_schema or pa.schema([]))]
    clashes = [f.name for f in extra if f.name in METADATA_COLUMNS or f.name in {s.name for s in scores}]
    if clashes:
        raise ValueError(f"passthrough column(s) {', '.join(clashes)} clash with metadata columns")
    return pa.schema(METADATA_FIELDS + scores + extra)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _task_columns(task: "RowTask") -> dict:
    row = {name: task.params.get(name) for name in _RENDER_COLUMNS}
    row.update(id=task.id, prompt=task.prompt, width=task.params.get("width"), height=task.params.get("height"),
               preset=task.preset, input_image=task.input_image, row_fingerprint=task.fingerprint,
               source_file=task.source_file, source_row=task.row_index)
    return row


def ok_row(task: "RowTask", image_index: int, *, image_uri: str, sha256: str, width: int, height: int, fmt: str,
           model: str, model_revision: str, render_ms: float | None, attempts: int, worker: str,
           created_at: datetime | None = None, seed: int | None = None) -> dict:
    """The metadata row of one stored image; `seed` is the seed actually used (default: row seed + image index;
    a --min-quality re-render uses another)."""
    row = _task_columns(task)
    seed = task.seed + image_index if seed is None else seed
    row.update(image_index=image_index, status="ok", error=None, image_uri=image_uri, width=width, height=height,
               format=fmt, sha256=sha256, seed=seed, model=model, model_revision=model_revision,
               render_ms=render_ms, attempts=attempts, worker=worker, created_at=created_at or _now())
    row.update(task.passthrough)
    return row


def failed_row(task: "RowTask", error: str, attempts: int, *, image_index: int | None = None, model: str = "",
               model_revision: str = "", worker: str = "", render_ms: float | None = None,
               created_at: datetime | None = None) -> dict:
    """The metadata row of a valid row (or one image of it, given `image_index`) that could not be rendered."""
    row = _task_columns(task)
    row.update(image_index=image_index, status="failed", error=error, image_uri=None, format=None, sha256=None,
               seed=task.seed + (image_index or 0), model=model, model_revision=model_revision, render_ms=render_ms,
               attempts=attempts, worker=worker, created_at=created_at or _now())
    row.update(task.passthrough)
    return row


def invalid_row(invalid: "InvalidRow", *, model: str = "", model_revision: str = "", worker: str = "",
                created_at: datetime | None = None) -> dict:
    """The metadata row of a manifest row with a bad value: render settings null, the error says why."""
    row = {"id": invalid.id, "image_index": None, "status": "invalid", "error": invalid.error,
           "prompt": invalid.prompt, "model": model, "model_revision": model_revision, "attempts": 0,
           "worker": worker, "created_at": created_at or _now(), "source_file": invalid.source_file,
           "source_row": invalid.row_index}
    row.update(invalid.passthrough)
    return row


def metadata_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts from ok_row / failed_row / invalid_row) as a table of exactly `schema`; missing keys are null."""
    unknown = sorted({key for row in rows for key in row} - set(schema.names))
    if unknown:
        raise ValueError(f"metadata rows carry column(s) not in the schema: {', '.join(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)


def metadata_url(root: str, shard_id: str) -> str:
    return storage.join(root, METADATA_DIR, f"{check_safe_name(shard_id, 'shard id')}.parquet")


def write_shard_metadata(root: str, shard_id: str, table: pa.Table, storage_options: dict | None = None) -> str:
    """Write the shard's metadata Parquet in one atomic write; returns its URL."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    url = metadata_url(root, shard_id)
    storage.write_bytes(url, buffer.getvalue(), storage_options)
    return url


# ---------------------------------------------------------------------------------------------------------------
# Commit markers


def commit_shard(root: str, shard_id: str, info: dict, storage_options: dict | None = None) -> str:
    """Mark the shard done. Call only after its images and metadata are written: the marker is the commit."""
    url = storage.join(root, COMMITS_DIR, f"{check_safe_name(shard_id, 'shard id')}.json")
    text = storage.redact(json.dumps(info, sort_keys=True, default=str), storage_options)
    storage.write_bytes(url, text.encode(), storage_options)
    return url


def _marker_ids(names: list[str]) -> list[str]:
    # Dot-prefixed names are temp files of writes in progress (local storage), not markers.
    return [name[: -len(".json")] for name in names if name.endswith(".json") and not name.startswith(".")]


def committed_shard_ids(root: str, storage_options: dict | None = None) -> set[str]:
    """Ids of the committed shards: one listing of `_commits/`, no reads."""
    return set(_marker_ids(storage.list_names(storage.join(root, COMMITS_DIR), storage_options)))


def list_commits(root: str, storage_options: dict | None = None) -> dict[str, dict]:
    """Committed shard id -> the info its marker holds (one listing, then the markers read concurrently)."""
    ids = sorted(committed_shard_ids(root, storage_options))

    def read(shard_id: str) -> dict:
        url = storage.join(root, COMMITS_DIR, f"{shard_id}.json")
        return json.loads(storage.read_bytes(url, storage_options))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(ids, pool.map(read, ids)))


def remove_orphans(root: str, committed_ids: set[str], storage_options: dict | None = None) -> list[str]:
    """Delete the metadata files and image directories of shards without a commit marker; returns their ids.

    Leftovers of a crashed attempt: removing them keeps `metadata/` free of rows no commit vouches for. Call it
    only while no shard is being written (before submitting work, or after all of it finished).
    """
    removed: set[str] = set()
    metadata_dir = storage.join(root, METADATA_DIR)
    for name in storage.list_names(metadata_dir, storage_options):
        shard_id = name[: -len(".parquet")] if name.endswith(".parquet") else None
        if name.startswith(".") and name.endswith(".tmp"):  # a temp file of an interrupted local write
            storage.delete(storage.join(metadata_dir, name), storage_options)
        elif shard_id is not None and shard_id not in committed_ids:
            storage.delete(storage.join(metadata_dir, name), storage_options)
            removed.add(shard_id)
    images_dir = storage.join(root, IMAGES_DIR)
    for name in storage.list_names(images_dir, storage_options):
        if name not in committed_ids:
            storage.delete_tree(storage.join(images_dir, name), storage_options)
            removed.add(name)
    return sorted(removed)


def remove_temp_files(root: str, shard_id: str, storage_options: dict | None = None) -> int:
    """Delete temp files that killed attempts left in the shard's image directory (local storage only: an object
    store has no partial writes); returns how many. The actor calls it before committing the shard."""
    fs, _ = storage.open_fs(root, storage_options)
    if not storage.is_local(fs):
        return 0
    directory = storage.join(root, IMAGES_DIR, shard_id)
    stale = [name for name in storage.list_names(directory, storage_options)
             if name.startswith(".") and name.endswith(".tmp")]
    for name in stale:
        storage.delete(storage.join(directory, name), storage_options)
    return len(stale)


def clear_output(root: str, storage_options: dict | None = None) -> None:
    """Remove this layout's entries for --overwrite; anything else under the root is left alone."""
    # Markers first: if this is interrupted, no half-deleted shard still counts as committed.
    for directory in (COMMITS_DIR, METADATA_DIR, IMAGES_DIR, JOURNAL_DIR):
        storage.delete_tree(storage.join(root, directory), storage_options)
    from ray_render import report  # the job report names its own files

    for name in (JOB_RECORD, SUMMARY, report.CONTACT_SHEET, report.REPORT_HTML):
        storage.delete(storage.join(root, name), storage_options)


# ---------------------------------------------------------------------------------------------------------------
# Job record and summary


def _write_json(root: str, name: str, record: dict, storage_options: dict | None) -> str:
    record = dict(record)
    if isinstance(record.get("storage_options"), dict):  # keep the option names only: the values may be secrets
        record["storage_options"] = sorted(record["storage_options"])
    text = storage.redact(json.dumps(record, indent=2, sort_keys=True, default=str), storage_options)
    url = storage.join(root, name)
    storage.write_bytes(url, text.encode(), storage_options)
    return url


def _read_json(root: str, name: str, storage_options: dict | None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(storage.join(root, name), storage_options))
    except FileNotFoundError:
        return None


def write_job_record(root: str, record: dict, storage_options: dict | None = None) -> str:
    """Write `_job.json` (settings, plan fingerprint, model revision ...); credentials are never written."""
    return _write_json(root, JOB_RECORD, record, storage_options)


def read_job_record(root: str, storage_options: dict | None = None) -> dict | None:
    return _read_json(root, JOB_RECORD, storage_options)


def write_summary(root: str, summary: dict, storage_options: dict | None = None) -> str:
    return _write_json(root, SUMMARY, summary, storage_options)


def read_summary(root: str, storage_options: dict | None = None) -> dict | None:
    return _read_json(root, SUMMARY, storage_options)
