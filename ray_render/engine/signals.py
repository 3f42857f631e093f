"""SIGTERM and SIGINT stop a run the documented way: interrupted (exit 3), actors stopped, summary written.

`ray job stop`, a pod's deletion and `timeout` send SIGTERM; Ctrl-C sends SIGINT. Both raise KeyboardInterrupt in
the driver's main thread, which the run lifecycle (engine/session.py) turns into an interrupted run and a quick
wind-down. Two traps: `ray.init` replaces a SIGTERM handler installed before it (with `sys.exit`, or a kill of
every process when it started the local Ray), so the handlers are installed again once Ray is up (`reinstall`);
and a second signal during the wind-down must not abort the clean-up, so it is only logged.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("ray_render")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The run's handlers for STOP_SIGNALS; `received` names the first one caught (None if none was)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.winding_down = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a run in another thread is stopped by its caller
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def reinstall(self) -> None:
        """After `ray.init`, which put its own SIGTERM handler in place of ours."""
        if self._previous:
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None or self.winding_down:
            log.warning("%s received while stopping: the run is already winding down", name)
            return
        self.received = name
        raise KeyboardInterrupt(name)
