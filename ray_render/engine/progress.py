"""What a person watching the job sees while it runs: the progress bar (or log lines), and Ray metrics.

- `Progress`: a tqdm bar on stderr (rows/s, ETA, failed and invalid counts) when stderr is a terminal, a notebook
  bar (tqdm.auto) under Jupyter/IPython; periodic log lines otherwise (`ray job logs`, CI), so a job log shows where
  it is without control characters.
- `RenderMetrics`: counters and a histogram recorded inside the actors through `ray.util.metrics`; Ray exports
  them on each node's metrics endpoint, which the dashboard's Prometheus scrapes.
"""

from __future__ import annotations

import logging
import sys
import time

from ray_render.output.schema import STATUSES, empty_counts

log = logging.getLogger("ray_render")


def in_notebook() -> bool:
    """True inside a Jupyter (or other IPython kernel) session, where stderr is no terminal but a bar still shows."""
    shell = sys.modules.get("IPython")
    try:
        ipython = shell.get_ipython() if shell is not None else None
    except Exception:  # noqa: BLE001 - an IPython too old or too odd to ask: no notebook bar
        return False
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


class Progress:
    """Rows finished out of the plan, with failed/invalid counts; a bar on a terminal, log lines elsewhere."""

    def __init__(self, total_rows: int, done_rows: int = 0, *, enabled: bool = True, interval_s: float = 10.0,
                 stream=None) -> None:
        self.total = total_rows
        self.done = done_rows
        self.counts = empty_counts()
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self._start = time.monotonic()
        self._start_done = done_rows
        self._last_log = self._start
        self._bar = None
        if enabled and in_notebook():
            from tqdm.auto import tqdm  # a widget where ipywidgets is installed, text in the cell otherwise

            self._bar = tqdm(total=total_rows, initial=done_rows, unit="row", smoothing=0.1)
        elif enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total_rows, initial=done_rows, unit="row", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    def update(self, rows: int, counts: dict) -> None:
        self.done += rows
        for status in STATUSES:
            self.counts[status] += counts.get(status, 0)
        if self._bar is not None:
            self._bar.set_postfix(failed=self.counts["failed"], invalid=self.counts["invalid"], refresh=False)
            self._bar.update(rows)
        elif self.enabled and time.monotonic() - self._last_log >= self.interval_s:
            self._log_line()

    def _log_line(self) -> None:
        self._last_log = time.monotonic()
        elapsed = self._last_log - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        log.info("progress: %d/%d rows (%.1f%%), %.1f rows/s, ETA %s, failed %d, invalid %d", self.done, self.total,
                 100.0 * self.done / max(self.total, 1), rate, eta, self.counts["failed"], self.counts["invalid"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._log_line()


# Ray exports a custom metric as "ray_" + its name, and a counter with "_total" appended: these names come out as
# ray_render_rows_total, ray_render_errors_total and ray_render_render_seconds_{bucket,sum,count}.
ROWS_METRIC = "render_rows"
ERRORS_METRIC = "render_errors"
RENDER_SECONDS_METRIC = "render_render_seconds"
RENDER_SECONDS_BUCKETS = [0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


class RenderMetrics:
    """Ray metrics recorded by an actor (create one per actor process: ray.util.metrics objects are per process).

    Exported on the node's metrics port, scraped by the dashboard's Prometheus (cluster/grafana-dashboard.json
    charts them): `ray_render_rows_total{model, status}` (manifest rows finished), `ray_render_errors_total{model,
    kind}` (failed render calls: render, out_of_memory) and `ray_render_render_seconds` (a histogram of model time
    per render call, in seconds).
    """

    def __init__(self, model: str) -> None:
        from ray.util import metrics

        tags = {"model": model}
        self.rows = metrics.Counter(ROWS_METRIC, description="Manifest rows finished, by final status.",
                                    tag_keys=("model", "status"))
        self.errors = metrics.Counter(ERRORS_METRIC, description="Failed render calls, by kind.",
                                      tag_keys=("model", "kind"))
        self.render_seconds = metrics.Histogram(RENDER_SECONDS_METRIC, description="Model time per render call.",
                                                boundaries=RENDER_SECONDS_BUCKETS, tag_keys=("model",))
        for metric in (self.rows, self.errors, self.render_seconds):
            metric.set_default_tags(tags)

    def shard_done(self, counts: dict) -> None:
        for status, count in counts.items():
            if count:
                self.rows.inc(count, tags={"status": status})

    def error(self, kind: str) -> None:
        self.errors.inc(1, tags={"kind": kind})

    def render_call(self, ms: float) -> None:
        self.render_seconds.observe(ms / 1000.0)
