"""The commit protocol of an output root: shard metadata files, commit markers, and the removal of leftovers.

A shard counts only once its commit marker exists (written last, after its images and metadata). Resume is one
listing of `_commits/`; leftovers of a crash (metadata or images of shards without a marker) are removed by
`remove_orphans`, so readers of `metadata/` never see a row twice. Keys are deterministic, so a retried shard
overwrites its own objects.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.output import layout
from ray_render.output.schema import STATUSES, empty_counts


def write_shard_metadata(root: str, shard_id: str, table: pa.Table, storage_options: dict | None = None) -> str:
    """Write the shard's metadata Parquet in one atomic write; returns its URL."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    url = layout.metadata_url(root, shard_id)
    storage.write_bytes(url, buffer.getvalue(), storage_options)
    return url


def read_shard_metadata(root: str, shard_id: str, storage_options: dict | None = None,
                        columns: list[str] | None = None) -> pa.Table:
    data = storage.read_bytes(layout.metadata_url(root, shard_id), storage_options)
    return pq.read_table(io.BytesIO(data), columns=columns)


def read_shard_schema(root: str, shard_id: str, storage_options: dict | None = None) -> pa.Schema:
    data = storage.read_bytes(layout.metadata_url(root, shard_id), storage_options)
    return pq.read_schema(io.BytesIO(data))


def commit_shard(root: str, shard_id: str, info: dict, storage_options: dict | None = None) -> str:
    """Mark the shard done. Call only after its images and metadata are written: the marker is the commit."""
    url = layout.commit_url(root, shard_id)
    text = storage.redact(json.dumps(info, sort_keys=True, default=str), storage_options)
    storage.write_bytes(url, text.encode(), storage_options)
    return url


def _marker_ids(names: list[str]) -> list[str]:
    # Dot-prefixed names are temp files of writes in progress (local storage), not markers.
    return [name[: -len(".json")] for name in names if name.endswith(".json") and not name.startswith(".")]


def committed_shard_ids(root: str, storage_options: dict | None = None) -> set[str]:
    """Ids of the committed shards: one listing of `_commits/`, no reads."""
    return set(_marker_ids(storage.list_names(storage.join(root, layout.COMMITS_DIR), storage_options)))


def list_commits(root: str, storage_options: dict | None = None) -> dict[str, dict]:
    """Committed shard id -> the info its marker holds (one listing, then the markers read concurrently)."""
    ids = sorted(committed_shard_ids(root, storage_options))

    def read(shard_id: str) -> dict:
        return json.loads(storage.read_bytes(layout.commit_url(root, shard_id), storage_options))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(ids, pool.map(read, ids)))


def commit_totals(commit_infos) -> tuple[dict, int, int]:
    """(rows by status, images, rows) summed over commit markers' infos: the counts of committed shards."""
    counts = empty_counts()
    images = rows = 0
    for info in commit_infos:
        for status in STATUSES:
            counts[status] += info.get("counts", {}).get(status, 0)
        images += info.get("images", 0)
        rows += info.get("rows", 0)
    return counts, images, rows


def remove_orphans(root: str, committed_ids: set[str], storage_options: dict | None = None) -> list[str]:
    """Delete the metadata files and image directories of shards without a commit marker; returns their ids.

    Leftovers of a crashed attempt: removing them keeps `metadata/` free of rows no commit vouches for. Call it
    only while no shard is being written (before submitting work, or after all of it finished).
    """
    removed: set[str] = set()
    metadata_dir = storage.join(root, layout.METADATA_DIR)
    for name in storage.list_names(metadata_dir, storage_options):
        shard_id = name[: -len(".parquet")] if name.endswith(".parquet") else None
        if layout.is_temp_name(name):  # a temp file of an interrupted local write
            storage.delete(storage.join(metadata_dir, name), storage_options)
        elif shard_id is not None and shard_id not in committed_ids:
            storage.delete(storage.join(metadata_dir, name), storage_options)
            removed.add(shard_id)
    images_dir = storage.join(root, layout.IMAGES_DIR)
    for name in storage.list_names(images_dir, storage_options):
        if name not in committed_ids:
            storage.delete_tree(storage.join(images_dir, name), storage_options)
            removed.add(name)
    return sorted(removed)


def remove_temp_files(root: str, shard_id: str, storage_options: dict | None = None) -> int:
    """Delete temp files that killed attempts left in the shard's image directory (local storage only: an object
    store has no partial writes); returns how many. Called before the shard is committed."""
    fs, _ = storage.open_fs(root, storage_options)
    if not storage.is_local(fs):
        return 0
    directory = layout.image_dir_url(root, shard_id)
    stale = [name for name in storage.list_names(directory, storage_options) if layout.is_temp_name(name)]
    for name in stale:
        storage.delete(storage.join(directory, name), storage_options)
    return len(stale)


def clear_output(root: str, storage_options: dict | None = None) -> None:
    """Remove this layout's entries for --overwrite; anything else under the root is left alone."""
    for directory in layout.OWN_DIRECTORIES:
        storage.delete_tree(storage.join(root, directory), storage_options)
    for name in layout.OWN_FILES:
        storage.delete(storage.join(root, name), storage_options)
