"""Shard journals: which rows an attempt was working on when its actor died, so a poison row can be isolated and a
systematic crash told from one.

Some rows do not raise, they kill the process: a crash in native code, the host's out-of-memory killer, a device
error that takes the whole context down. The actor cannot catch that and the driver only learns "actor lost", so
without help every attempt of the shard dies on the same row and the whole shard is lost.

The design (the smallest one that leaves the commit protocol alone):

1. Each attempt keeps its own journal, `_journal/<shard>/<attempt>.json` (a straggler copy or a stale run's actor
   never writes another attempt's). Before each model call (and each input fetch) it names the rows it works on
   (`rendering`) and how many of its model calls have returned (`calls_done`), plus what earlier attempts learned
   (`suspects`, `deaths`); an attempt that inherited suspects or deaths writes them at once, so an attempt killed
   before its first call still hands them on. After its last model call, and when it is cancelled, it writes
   `rendering: []`.
2. The driver decides what a death means. Only a death the driver saw happen by itself, inside a model call of
   that attempt, is the rows' fault: not one after a cancel or kill the driver issued (a deadline, a shutdown), not
   one of a node that died. The next attempt inherits the previous attempt's journal, and its `rendering` rows only
   when the driver blames them: the rows of a batch become `suspects`; a row that was alone gets one more death.
3. Suspects are rendered alone, fewest deaths first (so an innocent suspect's success comes before a poison row's
   crash), and the next death names exactly one row. A row that died more than `retries` times is not rendered
   again: it ends `failed` in the metadata with an error saying why, and the rest of the shard renders as usual.
4. Those deaths are charged to the rows, not to the shard's retries, within caps (engine/session.py); a death in
   an attempt's first model call, with no call returned, is a sign of a systematic crash (a bad driver, a host
   out of memory): several in a row, across shards and rows, abort the job instead of reloading the model forever.

The journal is advisory: the shard's attempts and their commits do not depend on it, so exactly-once and resume
never do; the driver deletes the journals of committed shards when the run ends.
"""

from __future__ import annotations

import json
import logging
import os

from ray_render import storage
from ray_render.output.layout import JOURNAL_DIR, journal_url

log = logging.getLogger("ray_render")


def read(root: str, shard_id: str, attempt_id: str, storage_options: dict | None = None) -> dict:
    """An attempt's journal ({} when it wrote none)."""
    try:
        return json.loads(storage.read_bytes(journal_url(root, shard_id, attempt_id), storage_options))
    except FileNotFoundError:
        return {}
    except ValueError:  # a torn local write cannot happen (atomic writes), but never fail a shard over advice
        return {}


def remove_settled(root: str, committed_ids: set[str], storage_options: dict | None = None) -> None:
    """Delete the journals of committed shards, then `_journal/` itself once it is empty (local storage: an object
    store has no empty directories), so that a finished output holds only its layout. Call this once the actors
    are stopped; the journals of unfinished shards stay for the next run."""
    directory = storage.join(root, JOURNAL_DIR)
    for name in storage.list_names(directory, storage_options):
        if name in committed_ids:
            storage.delete_tree(storage.join(directory, name), storage_options)
    storage.remove_empty_dir(directory, storage_options)


class ShardJournal:
    """One attempt's journal; see the module docstring for the protocol.

    `inherit`: (the previous attempt's id, whether the driver blames its rendering rows), or None for a first
    attempt.
    """

    def __init__(self, root: str, shard_id: str, attempt_id: str, retries: int, storage_options: dict | None = None,
                 inherit: tuple[str, bool] | None = None) -> None:
        self._fd: int | None = None  # the local journal's open file while rendering
        self.url = journal_url(root, shard_id, attempt_id)
        self.so = storage_options
        self.retries = retries
        previous = read(root, shard_id, inherit[0], storage_options) if inherit else {}
        self.suspects: set[str] = set(previous.get("suspects", []))
        self.deaths: dict[str, int] = dict(previous.get("deaths", {}))
        rendering = list(previous.get("rendering", [])) if inherit and inherit[1] else []
        if len(rendering) == 1:  # it was alone in the model call that killed the actor
            self.deaths[rendering[0]] = self.deaths.get(rendering[0], 0) + 1
        self.suspects.update(rendering)
        self.calls_done = 0
        self._written: tuple | None = None  # (rendering, calls_done) as the journal in storage says
        self._local: str | None = None  # the journal's local path, "" on an object store; None until first written
        self._size = 0
        if rendering:
            log.warning("shard %s: the last attempt died rendering %s; rendering them one at a time", shard_id,
                        ", ".join(rendering[:8]) + (" ..." if len(rendering) > 8 else ""))
        if self.suspects or self.deaths:  # carried at once: a death before this attempt's first call keeps them
            self.rendering([])

    def given_up(self, row_id: str) -> str | None:
        """Why `row_id` is not rendered again (it killed the actor more than `retries` times), or None."""
        deaths = self.deaths.get(row_id, 0)
        if deaths <= self.retries:
            return None
        return (f"the render actor died {deaths} times while rendering this row alone (a crash or an out-of-memory "
                f"kill in the model); the row is not rendered again")

    def rendering(self, row_ids: list[str]) -> None:
        """Record the rows of the model call (or fetch) about to start; durable before it, so a crash names them."""
        if (row_ids, self.calls_done) == self._written:
            return
        state = {"rendering": row_ids, "calls_done": self.calls_done, "suspects": sorted(self.suspects),
                 "deaths": self.deaths}
        data = json.dumps(state, sort_keys=True).encode()
        if self._local is None:
            fs, path = storage.open_fs(self.url, self.so)
            self._local = path if storage.is_local(fs) else ""
        if self._local:
            self._write_in_place(data)
        else:
            storage.write_bytes(self.url, data, self.so)  # an object store: one PUT
        self._written = (list(row_ids), self.calls_done)

    def _write_in_place(self, data: bytes) -> None:
        """A local journal is rewritten in place, one write per model call, padded with spaces to the longest
        state written so far (JSON ignores them): no temp file, rename or directory lookups, which cost more than
        a fast model call. A crash cannot tear it: the write is in the page cache once the call returns, and only
        a dead actor's journal is read."""
        if self._fd is None:  # kept open until rendering is done: an open costs as much as the write
            os.makedirs(os.path.dirname(self._local), exist_ok=True)
            self._fd = os.open(self._local, os.O_WRONLY | os.O_CREAT, 0o644)
        data = data.ljust(self._size)
        os.pwrite(self._fd, data, 0)
        self._size = len(data)

    def call_returned(self) -> None:
        """A model call came back (whatever it returned): the next write says so."""
        self.calls_done += 1

    def done_rendering(self) -> None:
        """No model call is running any more: a death from here on blames no row."""
        self.rendering([])
        self.close()

    def close(self) -> None:
        """Close the local journal's file (it stays where it is); a later write opens it again."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # an attempt that raised before rendering ended does not keep its file open
        self.close()
