"""The commit log of an output root: who owns the root, and which shard attempts are committed.

`_log/<seq>.json` holds numbered entries, each created with a conditional create (storage.create_bytes: S3
`If-None-Match: *`, O_EXCL-style locally), so two writers can never write the same number:

    acquire   a run takes the output root (its lease; the holder's heartbeat is in _lease/<run id>.json)
    commit    a shard attempt is committed: its images and metadata are the shard's from now on
    clear     --overwrite: every commit before this entry is void
    release   the holder is done (and names what it could not clean up)

Only the holder appends, and it numbers its entries itself, one after the other. An owner whose lease expired and
was taken over finds the next number taken by the new owner's `acquire` the moment it tries to append: it is
fenced out, and nothing it writes afterwards can become committed (`Fenced`). Readers (resume, status, export,
report, refresh) see exactly the shards whose attempts the log commits. Entries are never deleted: the numbering
is what fences, and a deleted number could be taken again by a stale writer.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ray_render import storage
from ray_render.output import layout

ENTRY_KINDS = ("acquire", "commit", "clear", "release")


class Fenced(Exception):
    """Another run appended to the log: this run no longer owns the output root and must stop writing."""


@dataclass
class LogState:
    """What the log says, replayed in order."""

    last_seq: int = 0
    committed: dict[str, dict] = field(default_factory=dict)  # shard id -> its commit entry
    holder: dict | None = None  # the last `acquire` not followed by a `release`
    last_release: dict | None = None  # the release entry after the last acquire, if it was released
    entries: int = 0

    def apply(self, entry: dict) -> None:
        kind = entry.get("kind")
        self.last_seq = max(self.last_seq, int(entry.get("seq", 0)))
        self.entries += 1
        if kind == "acquire":
            self.holder, self.last_release = entry, None
        elif kind == "release":
            if self.holder is not None and self.holder.get("run_id") == entry.get("run_id"):
                self.holder, self.last_release = None, entry
        elif kind == "clear":
            self.committed.clear()
        elif kind == "commit":
            self.committed[entry["shard"]] = entry


def _seq_of(name: str) -> int | None:
    if name.endswith(".json") and name[:-5].isdigit():
        return int(name[:-5])
    return None


def read_state(root: str, storage_options: dict | None = None, after: int = 0) -> LogState:
    """Replay the log (one listing, then the entries read concurrently, applied in order)."""
    directory = storage.join(root, layout.LOG_DIR)
    seqs = sorted(seq for seq in map(_seq_of, storage.list_names(directory, storage_options)) if seq is not None)
    seqs = [seq for seq in seqs if seq > after]

    def read(seq: int) -> dict:
        return json.loads(storage.read_bytes(layout.log_entry_url(root, seq), storage_options))

    state = LogState()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for entry in pool.map(read, seqs):
            state.apply(entry)
    return state


def last_seq(root: str, storage_options: dict | None = None) -> int:
    names = storage.list_names(storage.join(root, layout.LOG_DIR), storage_options)
    return max((seq for seq in map(_seq_of, names) if seq is not None), default=0)


class CommitLog:
    """The holder's side of the log: appends numbered entries and notices when someone else did."""

    def __init__(self, root: str, run_id: str, storage_options: dict | None = None, next_seq: int = 1) -> None:
        self.root = root
        self.run_id = run_id
        self.so = storage_options
        self.next_seq = next_seq
        self._lock = threading.Lock()  # the dispatch loop commits while the heartbeat thread checks

    def append(self, kind: str, **fields) -> int:
        """Create the next entry; raises Fenced if that number is already taken by another writer."""
        if kind not in ENTRY_KINDS:
            raise ValueError(f"log entry kind must be one of {', '.join(ENTRY_KINDS)}, got {kind!r}")
        with self._lock:
            seq = self.next_seq
            entry = {"seq": seq, "kind": kind, "run_id": self.run_id, **fields}
            data = json.dumps(entry, sort_keys=True, default=str).encode()
            if not storage.create_bytes(layout.log_entry_url(self.root, seq), data, self.so):
                raise Fenced(self._who_took(seq))
            self.next_seq = seq + 1
            return seq

    def check(self) -> None:
        """Raise Fenced if an entry beyond the ones this holder wrote exists (someone took the root over)."""
        with self._lock:
            newest = last_seq(self.root, self.so)
            if newest >= self.next_seq:
                raise Fenced(self._who_took(self.next_seq))

    def _who_took(self, seq: int) -> str:
        try:
            entry = json.loads(storage.read_bytes(layout.log_entry_url(self.root, seq), self.so))
        except Exception:  # noqa: BLE001 - the message is informational; the fence holds regardless
            entry = {}
        if entry.get("kind") == "acquire":
            return (f"run {entry.get('run_id')} on {entry.get('host')} took this output over at "
                    f"{entry.get('started_at')} (this run's lease had expired)")
        return f"another writer appended entry {seq} ({entry.get('kind', '?')} by run {entry.get('run_id', '?')})"
