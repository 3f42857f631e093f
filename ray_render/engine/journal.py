"""Shard journals: which rows an attempt was rendering when its actor died, so a poison row can be isolated.

Some rows do not raise, they kill the process: a crash in native code, the host's out-of-memory killer, a device
error that takes the whole context down. The actor cannot catch that and the driver only learns "actor lost", so
without help every attempt of the shard dies on the same row and the whole shard is lost.

The design (the smallest one that leaves the commit protocol alone):

1. Before each model call the actor writes `_journal/<shard_id>.json` naming the rows of the batch it is about to
   render (`rendering`), plus what earlier attempts learned (`suspects`, `deaths`). After its last model call, and
   when it is cancelled, it writes `rendering: []`, so a death while uploading or committing blames no row, nor
   does a clean stop.
2. The next attempt of the shard reads the journal first. A non-empty `rendering` means the last attempt died inside
   a model call: the rows of a batch become `suspects`; a row that was being rendered alone gets one more death.
3. Suspects are rendered alone, so the next death names exactly one row. A row that died more than `retries` times
   is not rendered again: it ends `failed` in the metadata with an error saying why, and the rest of the shard
   renders and commits as usual.
4. The driver charges a lost attempt whose journal still says `rendering` to the rows, not to the shard's retries
   (`died_rendering`). That stays bounded: each such death either moves at least one row of a batch into the
   suspects or adds a death to one suspect, so a shard of n rows costs at most n * (retries + 2) of them.

The journal is advisory. The shard's attempts and their commits do not depend on it, so exactly-once and resume
never do; the driver deletes the journals of committed shards when the run ends, and a leftover one is harmless
because committed shards are not rendered again. Two copies of one shard (a straggler re-issue) share the journal; the
worst that can do is make an innocent row a suspect, which costs speed, not images.
"""

from __future__ import annotations

import json
import logging
import os

from ray_render import storage
from ray_render.output.layout import JOURNAL_DIR, journal_url

log = logging.getLogger("ray_render")


def remove_settled(root: str, committed_ids: set[str], storage_options: dict | None = None) -> None:
    """Delete the journals of committed shards, then `_journal/` itself once it is empty (local storage only: an
    object store has no empty directories), so that a finished output holds only its layout.

    A committed shard's own attempt deletes its journal, but a losing straggler copy may write one more entry
    before its cancellation lands; call this once the actors are stopped. Journals of unfinished shards stay."""
    directory = storage.join(root, JOURNAL_DIR)
    for name in storage.list_names(directory, storage_options):
        if name.endswith(".json") and name[: -len(".json")] in committed_ids:
            storage.delete(storage.join(directory, name), storage_options)
    fs, path = storage.open_fs(directory, storage_options)
    if storage.is_local(fs):
        try:
            os.rmdir(path)
        except OSError:  # not empty, or not there
            pass


def _read(root: str, shard_id: str, storage_options: dict | None) -> dict:
    try:
        return json.loads(storage.read_bytes(journal_url(root, shard_id), storage_options))
    except FileNotFoundError:
        return {}
    except ValueError:  # a torn local write cannot happen (atomic writes), but never fail a shard over advice
        return {}


def died_rendering(root: str, shard_id: str, storage_options: dict | None = None) -> bool:
    """True when the shard's last attempt died inside a model call (its journal still names rows in `rendering`)."""
    return bool(_read(root, shard_id, storage_options).get("rendering"))


class ShardJournal:
    """One attempt's view of its shard's journal; see the module docstring for the protocol."""

    def __init__(self, root: str, shard_id: str, retries: int, storage_options: dict | None = None) -> None:
        self.url = journal_url(root, shard_id)
        self.so = storage_options
        self.retries = retries
        state = _read(root, shard_id, storage_options)
        self.suspects: set[str] = set(state.get("suspects", []))
        self.deaths: dict[str, int] = dict(state.get("deaths", {}))
        rendering = list(state.get("rendering", []))
        if len(rendering) == 1:  # it was alone in the model call that killed the actor
            self.deaths[rendering[0]] = self.deaths.get(rendering[0], 0) + 1
        self.suspects.update(rendering)
        self._written: list[str] | None = [] if not state else None  # what the journal in storage says is rendering
        if rendering:
            log.warning("shard %s: the last attempt died rendering %s; rendering them one at a time", shard_id,
                        ", ".join(rendering[:8]) + (" ..." if len(rendering) > 8 else ""))

    def given_up(self, row_id: str) -> str | None:
        """Why `row_id` is not rendered again (it killed the actor more than `retries` times), or None."""
        deaths = self.deaths.get(row_id, 0)
        if deaths <= self.retries:
            return None
        return (f"the render actor died {deaths} times while rendering this row alone (a crash or an out-of-memory "
                f"kill in the model); the row is not rendered again")

    def rendering(self, row_ids: list[str]) -> None:
        """Record the rows of the model call about to start; durable before the call, so a crash names them."""
        if row_ids == self._written:
            return
        state = {"rendering": row_ids, "suspects": sorted(self.suspects), "deaths": self.deaths}
        storage.write_bytes(self.url, json.dumps(state, sort_keys=True).encode(), self.so)
        self._written = list(row_ids)

    def done_rendering(self) -> None:
        """No model call is running any more: a death from here on blames no row."""
        self.rendering([])

    def delete(self) -> None:
        """After the commit: the journal has served. Best effort; a leftover journal is harmless."""
        try:
            storage.delete(self.url, self.so)
        except Exception as exc:  # noqa: BLE001 - the shard is committed; advice left behind changes nothing
            log.warning("could not delete %s: %s", self.url, storage.redact(str(exc), self.so))
