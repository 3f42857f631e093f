"""The lease on an output root: one run owns a root at a time, and a run that has lost it can no longer commit.

A run takes the lease with an `acquire` entry in the commit log (output/log.py), renews it with a heartbeat
(`_lease/<run id>.json`, rewritten every ttl/4 by a thread of the driver) and gives it back with a `release` entry.
A second run finds the lease held and stops at once (`LeaseHeld`, exit 2) unless the holder's last heartbeat is
older than its ttl: then the holder is presumed dead (a killed driver, a lost node) and the lease is taken over
with an `acquire` entry of its own. The old holder, should it wake up, is fenced: the log number it would write
next is taken, so its commits fail (`log.Fenced`) and it stops; its heartbeat thread notices the same within ttl/4.

Clocks: expiry compares the holder's heartbeat time with the newcomer's clock, so hosts must agree on the time to
well within the ttl (NTP does; the default ttl is a minute). A holder on the newcomer's own host whose process is
gone is dead at once: rerunning a killed driver does not wait for its ttl.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone

from ray_render import storage
from ray_render.output import layout
from ray_render.output.log import CommitLog, Fenced, LogState, read_state

log = logging.getLogger("ray_render")

DEFAULT_TTL_S = 60.0
ACQUIRE_TRIES = 5  # an acquire raced by another run's acquire re-reads the log and decides again
_HELD_HERE: set[str] = set()  # run ids whose lease this process holds now (a notebook may run several jobs)


class LeaseHeld(Exception):
    """Another live run holds the output root; the message names it and says what to do."""


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def read_heartbeat(root: str, run_id: str, storage_options: dict | None = None) -> dict | None:
    try:
        return json.loads(storage.read_bytes(layout.heartbeat_url(root, run_id), storage_options))
    except FileNotFoundError:
        return None


def holder_status(root: str, state: LogState, storage_options: dict | None = None,
                  now: float | None = None) -> dict | None:
    """The run holding the root and whether its lease is live, or None when nobody holds it."""
    holder = state.holder
    if holder is None:
        return None
    beat = read_heartbeat(root, holder["run_id"], storage_options) or {}
    last = float(beat.get("heartbeat_epoch") or holder.get("started_epoch") or 0.0)
    ttl = float(holder.get("ttl_s") or DEFAULT_TTL_S)
    age = (time.time() if now is None else now) - last
    # A holder on this very host whose process is gone is dead now, not only after its ttl (a killed driver rerun),
    # and so is one of this very process that no longer holds it (a run that ended without its release).
    here = holder.get("host") == socket.gethostname()
    gone = here and (not _process_alive(holder.get("pid"))
                     or (holder.get("pid") == os.getpid() and holder["run_id"] not in _HELD_HERE))
    return {"run_id": holder["run_id"], "host": holder.get("host"), "pid": holder.get("pid"),
            "command": holder.get("command"), "started_at": holder.get("started_at"),
            "last_heartbeat": _iso(last) if last else None, "heartbeat_age_s": round(age, 1), "ttl_s": ttl,
            "live": age < ttl and not gone}


def _process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that number: alive
        return True
    return True


class Lease:
    """This run's lease on `root`: `acquire`, then `commit` shard attempts, then `release`."""

    def __init__(self, root: str, run_id: str, storage_options: dict | None = None, *,
                 ttl_s: float = DEFAULT_TTL_S, command: str = "run") -> None:
        self.root = root
        self.run_id = run_id
        self.so = storage_options
        self.ttl_s = ttl_s
        self.command = command
        self.log: CommitLog | None = None
        self.fenced: str | None = None  # why this run lost the lease, once it has
        self.previous: dict | None = None  # how the last holder ended: released, or taken over after it expired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ----------------------------------------------------------------------------------

    def acquire(self) -> LogState:
        """Take the lease; returns the log as it stood. Raises LeaseHeld when a live run holds it."""
        for _ in range(ACQUIRE_TRIES):
            state = read_state(self.root, self.so)
            holder = holder_status(self.root, state, self.so)
            if holder is not None and holder["live"]:
                raise LeaseHeld(self._held_message(holder))
            if holder is not None:
                self.previous = {**holder, "how": "expired"}
                log.warning("taking over %s from run %s on %s: its last heartbeat is %.0f s old (ttl %.0f s)",
                            self.root, holder["run_id"], holder["host"], holder["heartbeat_age_s"], holder["ttl_s"])
            else:
                self.previous = {**state.last_release, "how": "released"} if state.last_release else None
            commit_log = CommitLog(self.root, self.run_id, self.so, next_seq=state.last_seq + 1)
            now = time.time()
            try:
                commit_log.append("acquire", host=socket.gethostname(), pid=os.getpid(), command=self.command,
                                  started_at=_iso(now), started_epoch=now, ttl_s=self.ttl_s,
                                  previous=self.previous)
            except Fenced:
                continue  # another run acquired between our read and our append: look again
            self.log = commit_log
            _HELD_HERE.add(self.run_id)
            self._beat()
            self._thread = threading.Thread(target=self._heartbeats, name="lease-heartbeat", daemon=True)
            self._thread.start()
            return state
        raise LeaseHeld(f"{self.root}: other runs keep taking the output root; try again, or choose another --out")

    def release(self, **fields) -> None:
        """Give the lease back (a `release` entry naming `fields`, e.g. leftovers). A fenced lease is not ours."""
        self._stop_heartbeats()
        if self.log is None or self.fenced:
            return
        try:
            self.log.append("release", **fields)
        except Fenced as exc:
            self.fenced = str(exc)
            return
        storage.delete(layout.heartbeat_url(self.root, self.run_id), self.so)
        storage.remove_empty_dir(storage.join(self.root, layout.LEASE_DIR), self.so)

    def abandon(self) -> None:
        """Stop renewing without a release (the lease expires on its own): after a storage outage, for one."""
        self._stop_heartbeats()

    # -- while holding it ----------------------------------------------------------------------------------------

    def append(self, kind: str, **fields) -> int:
        """Append a log entry as the holder; raises Fenced when the lease was taken over."""
        if self.fenced:
            raise Fenced(self.fenced)
        try:
            return self.log.append(kind, **fields)
        except Fenced as exc:
            self.fenced = str(exc)
            raise

    def _beat(self) -> None:
        now = time.time()
        beat = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat_epoch": now,
                "heartbeat_at": _iso(now), "ttl_s": self.ttl_s}
        storage.write_bytes(layout.heartbeat_url(self.root, self.run_id), json.dumps(beat).encode(), self.so)

    def _heartbeats(self) -> None:
        interval = max(0.5, self.ttl_s / 4)
        while not self._stop.wait(interval):
            try:
                self.log.check()
                self._beat()
            except Fenced as exc:
                self.fenced = str(exc)
                log.error("lost the lease on %s: %s", self.root, exc)
                return
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried next time; expiry is the safety net
                log.warning("lease heartbeat on %s failed: %s", self.root, storage.redact(str(exc), self.so))

    def _stop_heartbeats(self) -> None:
        _HELD_HERE.discard(self.run_id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _held_message(self, holder: dict) -> str:
        return (f"{self.root} is in use by run {holder['run_id']} ({holder.get('command') or 'run'} on "
                f"{holder['host']}, pid {holder['pid']}), started {holder['started_at']}, last heartbeat "
                f"{holder['last_heartbeat']} ({holder['heartbeat_age_s']:.0f} s ago). Two runs never write one "
                f"output: wait for it to end (`ray-render status {self.root}`), stop it, or choose another --out; "
                f"if it died, its lease expires {holder['ttl_s']:.0f} s after its last heartbeat and the next run "
                f"takes over")
