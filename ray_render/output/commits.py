"""Shard attempts and their commits: who owns which file under an output root, when it becomes visible, and who may
delete it.

- A shard attempt (id "<run id>-<n>", one per call, straggler copies included) writes only under its own names:
  images/<shard>/<attempt>/... and _attempts/<shard>/<attempt>.parquet. Nobody else writes there, so a losing copy
  or a zombie can never overwrite another attempt's objects.
- The lease holder commits an attempt with a `commit` entry in the commit log (output/log.py); from that moment the
  attempt is the shard's. Then it publishes the attempt's metadata as metadata/<shard>.parquet, so
  `pyarrow.dataset.dataset(root + "/metadata")` reads exactly the committed rows. A holder that dies between the
  two steps leaves the publication to the next holder (`roll_forward`).
- Only the lease holder deletes, and only attempts that are neither committed nor in flight in its own run: the
  ones it started (at its wind-down) and, after a holder that did not release, whatever a scan finds uncommitted.
  Deletes stay inside ray-render's names (layout.SHARD_ID_RE, layout.ATTEMPT_ID_RE) and never follow a symbolic
  link out of the root.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.output import layout
from ray_render.output.log import read_state
from ray_render.output.schema import STATUSES, empty_counts

log = logging.getLogger("ray_render")

IO_THREADS = 16


# ---------------------------------------------------------------------------------------------------------------
# Writing an attempt, publishing a commit


def write_attempt_metadata(root: str, shard_id: str, attempt_id: str, table: pa.Table,
                           storage_options: dict | None = None) -> str:
    """Write an attempt's metadata Parquet (one atomic write) under its own name; returns its URL."""
    url = layout.attempt_metadata_url(root, shard_id, attempt_id)
    storage.write_bytes(url, encode_metadata(table), storage_options)
    return url


def encode_metadata(table: pa.Table) -> bytes:
    """A metadata table as the bytes of a Parquet file."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def publish(root: str, shard_id: str, attempt_id: str, storage_options: dict | None = None) -> str:
    """Make a committed attempt's metadata the shard's: a copy to metadata/<shard>.parquet."""
    target = layout.metadata_url(root, shard_id)
    storage.copy(layout.attempt_metadata_url(root, shard_id, attempt_id), target, storage_options)
    return target


def write_shard_metadata(root: str, shard_id: str, table: pa.Table, storage_options: dict | None = None) -> str:
    """Replace a committed shard's published metadata (a refresh rewriting superseded rows); one atomic write."""
    url = layout.metadata_url(root, shard_id)
    storage.write_bytes(url, encode_metadata(table), storage_options)
    return url


def read_attempt_metadata(root: str, shard_id: str, attempt_id: str, storage_options: dict | None = None) -> pa.Table:
    """An attempt's metadata as its actor wrote it (a repair builds on it: engine/repairs.py)."""
    data = storage.read_bytes(layout.attempt_metadata_url(root, shard_id, attempt_id), storage_options)
    return pq.read_table(io.BytesIO(data))


def read_shard_metadata(root: str, shard_id: str, storage_options: dict | None = None,
                        columns: list[str] | None = None) -> pa.Table:
    data = storage.read_bytes(layout.metadata_url(root, shard_id), storage_options)
    return pq.read_table(io.BytesIO(data), columns=columns)


def read_shard_schema(root: str, shard_id: str, storage_options: dict | None = None) -> pa.Schema:
    data = storage.read_bytes(layout.metadata_url(root, shard_id), storage_options)
    return pq.read_schema(io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------------------
# Reading what is committed


def committed_attempts(entry: dict) -> set[str]:
    """The attempts a commit entry makes the shard's: the committed one, and those whose images its metadata still
    names (`keeps`: the attempts a repair of failed rows built on, engine/repairs.py)."""
    return {entry["attempt"], *entry.get("keeps", ())}


def list_commits(root: str, storage_options: dict | None = None) -> dict[str, dict]:
    """Committed shard id -> what its commit says (the ShardResult fields, `attempt`, file and row range)."""
    state = read_state(root, storage_options)
    return {shard_id: {**entry.get("info", {}), "attempt": entry["attempt"], "keeps": entry.get("keeps", []),
                       "seq": entry["seq"]}
            for shard_id, entry in state.committed.items()}


def committed_shard_ids(root: str, storage_options: dict | None = None) -> set[str]:
    return set(read_state(root, storage_options).committed)


def commit_totals(commit_infos) -> tuple[dict, int, int]:
    """(rows by status, images, rows) summed over commits' infos: the counts of committed shards."""
    counts = empty_counts()
    images = rows = 0
    for info in commit_infos:
        for status in STATUSES:
            counts[status] += info.get("counts", {}).get(status, 0)
        images += info.get("images", 0)
        rows += info.get("rows", 0)
    return counts, images, rows


# ---------------------------------------------------------------------------------------------------------------
# Recovery and clean-up (the lease holder only)


@dataclass
class RollForward:
    published: list[str]  # committed shards whose metadata was published now (a holder died before it could)
    vanished: list[str]  # committed shards whose attempt's metadata is gone too: their commit is void


def roll_forward(root: str, committed: dict[str, dict], storage_options: dict | None = None) -> RollForward:
    """Publish the committed attempts whose metadata a dead holder did not publish. A committed shard with neither
    its published metadata nor its attempt's (something else deleted them) is `vanished`: the caller renders it
    again."""
    published = {name[: -len(".parquet")] for name in storage.list_names(storage.join(root, layout.METADATA_DIR),
                                                                         storage_options)
                 if name.endswith(".parquet")}
    missing = sorted(shard_id for shard_id in committed if shard_id not in published)

    def publish_one(shard_id: str) -> bool:
        try:
            publish(root, shard_id, committed[shard_id]["attempt"], storage_options)
            return True
        except FileNotFoundError:
            return False

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        done = list(pool.map(publish_one, missing))
    outcome = RollForward([s for s, ok in zip(missing, done) if ok], [s for s, ok in zip(missing, done) if not ok])
    if outcome.published:
        log.info("published the metadata of %d committed shard(s) an earlier run left unpublished",
                 len(outcome.published))
    return outcome


def remove_attempts(root: str, attempts: Iterable[tuple[str, str]], storage_options: dict | None = None) -> int:
    """Delete these (shard id, attempt id)s' images and metadata; returns how many."""
    attempts = sorted(set(attempts))

    def remove(pair: tuple[str, str]) -> None:
        shard_id, attempt_id = pair
        storage.delete(layout.attempt_metadata_url(root, shard_id, attempt_id), storage_options)
        storage.delete_tree(layout.attempt_images_url(root, shard_id, attempt_id), storage_options)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        list(pool.map(remove, attempts))
    for shard_id in {shard_id for shard_id, _ in attempts}:  # a local shard directory left empty goes too
        storage.remove_empty_dir(layout.shard_images_url(root, shard_id), storage_options)
        storage.remove_empty_dir(storage.join(root, layout.ATTEMPTS_DIR, shard_id), storage_options)
    return len(attempts)


def uncommitted_attempts(root: str, committed: dict[str, dict], storage_options: dict | None = None
                         ) -> set[tuple[str, str]]:
    """Every (shard id, attempt id) under images/ and _attempts/ that the log does not commit: one listing per
    shard directory, for recovery after a holder that did not release. Names of other patterns are not ours."""
    found: set[tuple[str, str]] = set()
    for top, strip in ((layout.IMAGES_DIR, ""), (layout.ATTEMPTS_DIR, ".parquet")):
        directory = storage.join(root, top)
        if storage.is_link(directory, storage_options):
            log.warning("%s is a symbolic link: its target is not ray-render's to clean", directory)
            continue
        shards = [name for name in storage.list_names(directory, storage_options) if layout.SHARD_ID_RE.fullmatch(name)]

        def attempts_of(shard_id: str, directory=directory, strip=strip) -> set[tuple[str, str]]:
            names = storage.list_names(storage.join(directory, shard_id), storage_options)
            ids = {name[: len(name) - len(strip)] if strip and name.endswith(strip) else name for name in names}
            return {(shard_id, attempt_id) for attempt_id in ids if layout.ATTEMPT_ID_RE.fullmatch(attempt_id)}

        with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
            for pairs in pool.map(attempts_of, shards):
                found |= pairs
    return {(shard_id, attempt_id) for shard_id, attempt_id in found
            if shard_id not in committed or attempt_id not in committed_attempts(committed[shard_id])}


def remove_unpublished(root: str, committed: dict[str, dict], storage_options: dict | None = None) -> list[str]:
    """Delete metadata/<shard>.parquet files of shards the log does not commit (published by an attempt whose
    commit was voided by --overwrite); names of other patterns are left alone. Returns their shard ids."""
    directory = storage.join(root, layout.METADATA_DIR)
    stale = [name[: -len(".parquet")] for name in storage.list_names(directory, storage_options)
             if name.endswith(".parquet") and layout.SHARD_ID_RE.fullmatch(name[: -len(".parquet")])
             and name[: -len(".parquet")] not in committed]
    for shard_id in stale:
        storage.delete(layout.metadata_url(root, shard_id), storage_options)
    return stale


def clear_output(root: str, storage_options: dict | None = None) -> None:
    """--overwrite, after the log's `clear` entry has voided every commit: delete what ray-render wrote (its own
    directories and files, shard-named metadata files and shard directories under images/); anything else under
    the root is left alone, and no symbolic link is followed out of it."""
    for directory in layout.OWN_DIRECTORIES:
        storage.delete_tree(storage.join(root, directory), storage_options)
    remove_unpublished(root, {}, storage_options)
    images = storage.join(root, layout.IMAGES_DIR)
    if storage.is_link(images, storage_options):
        log.warning("%s is a symbolic link: its target is not ray-render's to clear", images)
    else:
        for name in storage.list_names(images, storage_options):
            if layout.SHARD_ID_RE.fullmatch(name):
                storage.delete_tree(storage.join(images, name), storage_options)
    for name in layout.OWN_FILES:
        storage.delete(storage.join(root, name), storage_options)
