"""Repairs: a shard's failed rows rendered again on another actor, as an attempt that builds on the one it repairs.

A row ends `failed` when the model raised on it on its own and `--retries` more times on the same actor (the
renderer's own isolation, engine/shard.py). What is left are failures of that actor or its device (a flaky GPU, a
driver fault, a node that fails everything) as often as of the row. So the driver does not commit such an attempt
at once: it hands the failed rows to a different actor as a *repair*, an ordinary attempt of the same shard (its
own id, its own files) restricted to those rows (`Shard.rows`) and naming the attempt it builds on, its `base`.
The repairing actor renders only the failed images and writes its metadata as the base's with those rows replaced
(`merge`), so a repair's metadata is the whole shard's. The driver commits it with `keeps` naming the base (and
whatever the base kept): their images stay the shard's (output/commits.py, `committed_attempts`).

`ray-render run --retry-failed` repairs committed shards the same way (`failed_rows`), once per run: the base is the
shard's committed attempt, and the repair's commit replaces it.

A repair is never repaired again nor copied as a straggler, so a failed row is rendered at most once more per run;
a repair that fails leaves its base as it was (in a run, the driver then commits the base).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pyarrow as pa

from ray_render.engine.plan import Shard
from ray_render.output import commits
from ray_render.output.schema import empty_counts

IO_THREADS = 16


@dataclass
class Repair:
    """A repair the driver has decided on, from the decision to its commit."""

    shard: Shard  # the whole shard: what the repair's commit is the shard's attempt for
    rows: tuple[int, ...]  # the failed rows (0-based rows of shard.file), ascending
    base: str  # the attempt it builds on
    keeps: tuple[str, ...]  # the attempts whose images the base's metadata names besides its own
    base_result: object | None = None  # in a run: the base's ShardResult, committed if the repair fails
    avoid: int | None = None  # the actor that rendered the base: the repair goes to another one
    base_info: dict | None = None  # --retry-failed: the base's commit info (its counts stay if the repair fails)

    def shard_for_repair(self) -> Shard:
        """The shard restricted to the failed rows: what the repairing actor reads and renders."""
        wanted = set(self.rows)
        return replace(self.shard, rows=self.rows,
                       repeated_ids=tuple(pair for pair in self.shard.repeated_ids if pair[0] in wanted))


def failed_images(table: pa.Table) -> dict[int, set[int] | None]:
    """source row -> the image indices that failed, or None when the whole row failed (an error before any image:
    an input that could not be fetched, a row that killed its actor): the images a repair renders."""
    failed: dict[int, set[int] | None] = {}
    columns = table.select(["source_row", "image_index", "status"]).to_pydict()
    for row, index, status in zip(columns["source_row"], columns["image_index"], columns["status"]):
        if status != "failed":
            continue
        if index is None:
            failed[row] = None
        elif row not in failed or failed[row] is not None:
            failed.setdefault(row, set()).add(index)
    return failed


def failed_rows(table: pa.Table) -> tuple[int, ...]:
    """The source rows with a failed image (or failed as a whole), ascending."""
    return tuple(sorted(failed_images(table)))


def merge(base: pa.Table, repaired: pa.Table, only: dict[int, set[int] | None]) -> pa.Table:
    """The base attempt's metadata with the repaired images' rows replaced by the repair's, in manifest order.

    `only`: what the repair rendered (failed_images of the base). A repaired row that ends with a row-level outcome
    (invalid, or failed before any image) replaces every row of it in the base."""
    row_level = {row for row, index in zip(repaired.column("source_row").to_pylist(),
                                           repaired.column("image_index").to_pylist()) if index is None}

    def replaced(row: int, index: int | None) -> bool:
        if row not in only:
            return False
        wanted = only[row]
        return row in row_level or wanted is None or index is None or index in wanted

    keep = [not replaced(row, index) for row, index in zip(base.column("source_row").to_pylist(),
                                                             base.column("image_index").to_pylist())]
    kept = base.filter(pa.array(keep, pa.bool_()))
    merged = pa.concat_tables([kept, repaired.cast(base.schema)])
    return merged.sort_by([("source_row", "ascending"), ("image_index", "ascending")])


def row_counts(table: pa.Table) -> tuple[dict, int, int]:
    """(input rows by status, images, input rows) of a shard's metadata: a row is invalid or failed if any of its
    entries is, else ok."""
    by_row: dict[int, set[str]] = {}
    columns = table.select(["source_row", "status"]).to_pydict()
    for row, status in zip(columns["source_row"], columns["status"]):
        by_row.setdefault(row, set()).add(status)
    counts = empty_counts()
    for statuses in by_row.values():
        counts["invalid" if "invalid" in statuses else "failed" if "failed" in statuses else "ok"] += 1
    images = sum(status == "ok" for status in columns["status"])
    return counts, images, len(by_row)


def of_committed(root: str, shards: list[Shard], committed: dict[str, dict],
                 storage_options: dict | None = None) -> list[Repair]:
    """--retry-failed: a repair of each of these committed shards, for the rows its published metadata has failed
    (read concurrently: source_row, image_index and status only)."""
    def one(shard: Shard) -> Repair | None:
        entry = committed[shard.shard_id]
        table = commits.read_shard_metadata(root, shard.shard_id, storage_options,
                                            columns=["source_row", "image_index", "status"])
        rows = failed_rows(table)
        if not rows:
            return None
        return Repair(shard, rows, entry["attempt"], tuple(entry.get("keeps", ())), base_info=entry.get("info", {}))

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        return [repair for repair in pool.map(one, shards) if repair is not None]


def needs_repair(result) -> bool:
    """Whether a finished attempt (a ShardResult) has failed rows to repair and is not a repair itself."""
    return bool(result.failed_rows) and not result.base
