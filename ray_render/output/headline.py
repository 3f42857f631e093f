"""A job's outcome in a few numbers, for people: what report.html leads with and `ray-render status` prints first.

    finished with problems: 398 of 400 rows ok, 1 invalid, 1 failed; 398 images in 25.5 s (32.3 images/s);
    GPU-hours: none (CPU run)

The numbers come from the summary a run writes when it ends (`_summary.json`), or, while a job runs, from its
commit markers; GPU-hours count the GPUs the render actors held, from their start to the end of the run.
Formatting for people is here too: counts with thousands separators, durations in s / min / h, rates per second,
minute or hour, whichever reads best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# How an outcome looks: report.html colours its headline block with these (a test looks for them on screen).
TONES = {"ok": "#1b6e34", "problems": "#a35c00", "stopped": "#b3261e", "running": "#1f4e9c"}


def count(value: int | float | None) -> str:
    return "-" if value is None else f"{int(value):,}"


def duration(seconds: float | None) -> str:
    """16.7 s, 3 min 12 s, 2 h 05 min, 3 d 4 h."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def rate(per_second: float | None, unit: str = "images") -> str:
    """32.3 images/s, 45 images/min or 3.2 images/h: the largest unit with a rate of at least one."""
    if not per_second:
        return "-"
    for scale, suffix in ((1, "s"), (60, "min"), (3600, "h")):
        value = per_second * scale
        if value >= 1 or suffix == "h":
            return f"{significant(value)} {unit}/{suffix}"
    raise AssertionError("unreachable")


def significant(value: float | None, digits: int = 3) -> str:
    """A float for people: 7.5, 16.7, 0.0303, 1,234 (3 significant digits, thousands separated)."""
    if value is None:
        return "-"
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


@dataclass
class Headline:
    """The outcome: state, rows by status, images, time, throughput, GPU-hours."""

    state: str  # finished, aborted, interrupted, failed, running
    rows_total: int
    rows: dict = field(default_factory=dict)  # ok, invalid, failed
    images: int = 0
    wall_s: float | None = None  # the last run's wall time (None while it runs)
    images_per_s: float | None = None
    gpu_hours: float | None = None  # None on CPU
    message: str = ""  # why it stopped
    device: str = ""

    @property
    def tone(self) -> str:
        if self.state == "running":
            return "running"
        if self.state != "finished":
            return "stopped"
        return "problems" if self.rows.get("invalid") or self.rows.get("failed") else "ok"

    @property
    def title(self) -> str:
        return {"ok": "finished: every row ok", "problems": "finished with problems",
                "running": "running (or stopped without a summary: rerun to resume)"}.get(self.tone, self.state)

    def tiles(self) -> list[tuple[str, str]]:
        """(label, value) of each number in the headline block, outcome first."""
        rows = self.rows
        return [("rows ok", f"{count(rows.get('ok', 0))} of {count(self.rows_total)}"),
                ("invalid", count(rows.get("invalid", 0))), ("failed", count(rows.get("failed", 0))),
                ("images", count(self.images)), ("wall time", duration(self.wall_s)),
                ("throughput", rate(self.images_per_s)),
                ("GPU-hours", "none (CPU run)" if self.gpu_hours is None else significant(self.gpu_hours))]

    def line(self) -> str:
        """The headline as one line (`ray-render status`)."""
        rows = self.rows
        text = (f"{self.title}: {count(rows.get('ok', 0))} of {count(self.rows_total)} rows ok, "
                f"{count(rows.get('invalid', 0))} invalid, {count(rows.get('failed', 0))} failed; "
                f"{count(self.images)} images")
        if self.wall_s is not None:
            text += f" in {duration(self.wall_s)} ({rate(self.images_per_s)})"
        text += "; GPU-hours: " + ("none (CPU run)" if self.gpu_hours is None else significant(self.gpu_hours))
        return text + (f"; {self.message}" if self.message else "")


def headline(summary: dict | None, job_record: dict | None, commit_infos: dict, running: bool = False) -> Headline:
    """The Headline of an output: from the last run's summary when it has ended, else from the commit markers."""
    record = job_record or {}
    model = (summary or {}).get("model") or record.get("model") or {}
    if summary is not None and not running:
        result = Headline(state=summary.get("state", "finished"), rows_total=summary.get("rows_total", 0),
                          rows=dict(summary.get("rows") or {}), images=summary.get("images", 0),
                          wall_s=summary.get("wall_s"), images_per_s=summary.get("images_per_s"),
                          message=summary.get("message", ""), device=str(model.get("device", "")))
    else:
        rows = {"ok": 0, "invalid": 0, "failed": 0}
        for info in commit_infos.values():
            for status in rows:
                rows[status] += (info.get("counts") or {}).get(status, 0)
        result = Headline(state="running", rows_total=record.get("total_rows", 0), rows=rows,
                          images=sum(info.get("images", 0) for info in commit_infos.values()),
                          device=str(model.get("device", "")))
    if result.device.startswith("cuda") and summary is not None and not running:
        result.gpu_hours = gpu_hours(summary, record, commit_infos)
    return result


def gpu_hours(summary: dict, job_record: dict, commit_infos: dict) -> float:
    """GPUs held by the run's render actors x the time they held them: from the actors' start (after planning) to
    the end. The actors are those that committed shards in the run (replaced ones count as their own)."""
    if not summary.get("rows_this_run"):
        return 0.0  # everything was committed already: no actor started
    started = _epoch(summary.get("started_at"))
    workers = {info.get("worker") for info in commit_infos.values()
               if info.get("worker") and (started is None or info.get("finished_at", 0) >= started)}
    gpus_per_actor = float((job_record.get("settings") or {}).get("gpus_per_actor", 1.0) or 1.0)
    held_s = max(0.0, (summary.get("wall_s") or 0.0) - (summary.get("plan_s") or 0.0))
    return max(1, len(workers)) * gpus_per_actor * held_s / 3600


def _epoch(iso: str | None) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None
