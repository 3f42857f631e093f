"""What a person watching the job sees: the progress bar (or log lines), the final summary, and Ray metrics.

- `Progress`: a tqdm bar on stderr (rows/s, ETA, failed and invalid counts) when stderr is a terminal; periodic
  log lines otherwise (`ray job logs`, CI), so a job log shows where it is without control characters.
- `Summary`: the job's outcome, written to the output root and printed at the end.
- `RenderMetrics`: counters and a histogram recorded inside the actors through `ray.util.metrics`; Ray exports
  them on each node's metrics endpoint, which the dashboard's Prometheus scrapes.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field

from ray_render.writer import STATUSES

log = logging.getLogger("ray_render")


def empty_counts() -> dict[str, int]:
    return {status: 0 for status in STATUSES}


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


@dataclass
class Summary:
    """The outcome of one `ray-render run`. Row counts cover the whole output, resumed shards included."""

    out: str  # the output root, as given
    state: str = "running"  # "finished", "aborted", "interrupted"
    exit_code: int | None = None
    message: str = ""  # why the job aborted or was interrupted; "" when it finished
    run_id: str = ""
    model: dict = field(default_factory=dict)  # ModelInfo of the actors, as a dict
    rows_total: int = 0  # rows in the plan
    rows: dict = field(default_factory=empty_counts)  # input rows by final status
    images: int = 0  # images written (status ok)
    shards_total: int = 0
    shards_committed: int = 0  # committed by the end of this run, resumed ones included
    shards_resumed: int = 0  # already committed when this run started (skipped)
    rows_resumed: int = 0
    shards_lost: list = field(default_factory=list)  # shard ids that failed every attempt (not committed)
    shard_retries: int = 0  # shard attempts beyond the first (actor lost, storage error, ...)
    actors_replaced: int = 0  # actors that died and were replaced
    stragglers_reissued: int = 0  # copies of slow or queued shards given to idle actors
    rows_this_run: int = 0  # rows finished by this run
    images_this_run: int = 0
    render_s: float = 0.0  # model time summed over actors
    wall_s: float = 0.0  # the whole run, Ray start-up and model loading included
    startup_s: float = 0.0  # planning, connecting to Ray and loading the model in the actors
    plan_s: float = 0.0  # of which planning: the manifests' footers, and the id column for repeated ids
    rendering_s: float = 0.0  # from the actors being ready to the last shard: the basis of the rates
    started_at: str = ""
    finished_at: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.rendering_s if self.rendering_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images_this_run / self.rendering_s if self.rendering_s > 0 else 0.0

    def add(self, counts: dict, images: int) -> None:
        for status in STATUSES:
            self.rows[status] += counts.get(status, 0)
        self.images += images

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rows_per_s"] = round(self.rows_per_s, 3)
        data["images_per_s"] = round(self.images_per_s, 3)
        return data

    def format(self) -> str:
        rows = self.rows
        lines = [
            f"ray-render: {self.state}" + (f": {self.message}" if self.message else ""),
            f"  rows      {sum(rows.values())}/{self.rows_total}  ok {rows['ok']}  invalid {rows['invalid']}"
            f"  failed {rows['failed']}",
            f"  images    {self.images}",
            f"  shards    {self.shards_committed}/{self.shards_total} committed ({self.shards_resumed} resumed, "
            f"{self.rows_resumed} rows)" + (f", lost: {', '.join(self.shards_lost)}" if self.shards_lost else ""),
            f"  faults    {self.shard_retries} shard retries, {self.actors_replaced} actors replaced, "
            f"{self.stragglers_reissued} straggler copies",
            f"  this run  {self.rows_this_run} rows, {self.images_this_run} images in {self.wall_s:.1f} s "
            f"({self.startup_s:.1f} s start-up, {self.rendering_s:.1f} s rendering: {self.rows_per_s:.1f} rows/s, "
            f"{self.images_per_s:.1f} images/s; model time {self.render_s:.1f} s)",
            f"  model     {self.model.get('name', '?')} ({self.model.get('family', '?')} "
            f"{self.model.get('revision', '?')}, {self.model.get('device', '?')} {self.model.get('dtype', '?')})",
            f"  output    {self.out}",
            f"  exit code {self.exit_code}",
        ]
        return "\n".join(lines)


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
        if enabled and getattr(self.stream, "isatty", lambda: False)():
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


class RenderMetrics:
    """Ray metrics recorded by an actor (create one per actor process: ray.util.metrics objects are per process).

    Exported as `ray_ray_render_rows_total{status=...}`, `ray_ray_render_errors_total{kind=...}` and
    `ray_ray_render_render_ms_bucket` on the node's metrics port, scraped by the dashboard's Prometheus.
    """

    def __init__(self, model: str) -> None:
        from ray.util import metrics

        tags = {"model": model}
        self.rows = metrics.Counter("ray_render_rows", description="Manifest rows finished, by final status.",
                                    tag_keys=("model", "status"))
        self.errors = metrics.Counter("ray_render_errors", description="Errors while rendering, by kind.",
                                      tag_keys=("model", "kind"))
        self.render_ms = metrics.Histogram("ray_render_render_ms", description="Model time per render call (ms).",
                                           boundaries=[5, 20, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                                                       60000, 120000], tag_keys=("model",))
        for metric in (self.rows, self.errors, self.render_ms):
            metric.set_default_tags(tags)

    def shard_done(self, counts: dict) -> None:
        for status, count in counts.items():
            if count:
                self.rows.inc(count, tags={"status": status})

    def error(self, kind: str) -> None:
        self.errors.inc(1, tags={"kind": kind})

    def render_call(self, ms: float) -> None:
        self.render_ms.observe(ms)
