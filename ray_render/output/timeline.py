"""The report's timeline: when each render actor ran which shard, drawn as an SVG, so idle GPUs show as gaps.

One lane per worker (the actor and its device, as the metadata's `worker` names it), one bar per committed shard
while it had the model (the markers' `rendering_from` / `rendering_until`; an actor reads the next shard's rows
and writes the last one's metadata beside it; older markers: `started_at` / `finished_at`), coloured by how its
rows ended. Only the last run's shards are drawn (a resumed job's earlier runs would squeeze it); each lane says
how busy it was.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

MAX_BARS = 3000  # beyond this the bars are thinner than a pixel: draw an even sample of them
WIDTH, LABEL_W, LANE_H, AXIS_H = 1100, 260, 22, 28
COLOURS = {"ok": "#2e7d32", "invalid": "#f9a825", "failed": "#c62828"}


@dataclass
class Bar:
    shard_id: str
    worker: str
    start: float  # epoch seconds
    end: float
    rows: int
    status: str  # the worst status among its rows: ok, invalid or failed


def bars(commit_infos: dict, since: float | None = None) -> list[Bar]:
    """The timeline's bars from the commit markers' infos; those that finished before `since` (epoch seconds, the
    last run's start) are left out, unless that would leave none."""
    found = []
    for shard_id, info in commit_infos.items():
        start = info.get("rendering_from") or info.get("started_at")
        end = info.get("rendering_until") or info.get("finished_at")
        if not start or not end or not info.get("worker"):
            continue  # written before markers carried times
        counts = info.get("counts") or {}
        status = "failed" if counts.get("failed") else "invalid" if counts.get("invalid") else "ok"
        found.append(Bar(shard_id, str(info["worker"]), float(start), float(end), int(info.get("rows", 0)), status))
    recent = [bar for bar in found if since is None or bar.end >= since]
    chosen = sorted(recent or found, key=lambda bar: bar.start)
    if len(chosen) > MAX_BARS:
        chosen = [chosen[i * len(chosen) // MAX_BARS] for i in range(MAX_BARS)]
    return chosen


def _lane_name(worker: str) -> str:
    """host/node/actorN/gpuK -> node/actorN/gpuK: the host name is the long part, and the node id says as much."""
    parts = worker.split("/")
    return "/".join(parts[1:]) if len(parts) > 2 else worker


def _ticks(span: float) -> list[float]:
    """About six round tick positions over [0, span] seconds."""
    if span <= 0:
        return [0.0]
    raw = span / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(span // step) + 1)]


def _tick_label(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def svg(chosen: list[Bar]) -> str:
    """The timeline as an inline SVG (empty string when there is nothing to draw)."""
    if not chosen:
        return ""
    workers = sorted({bar.worker for bar in chosen})
    t0, t1 = min(bar.start for bar in chosen), max(bar.end for bar in chosen)
    span = max(t1 - t0, 1e-3)
    plot_w = WIDTH - LABEL_W - 10
    height = AXIS_H + LANE_H * len(workers) + 6

    def x(t: float) -> float:
        return LABEL_W + (t - t0) / span * plot_w

    parts = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="when each actor rendered which shard">']
    for tick in _ticks(span):
        tx = x(t0 + tick)
        parts.append(f'<line x1="{tx:.1f}" y1="{AXIS_H - 6}" x2="{tx:.1f}" y2="{height}" stroke="#ddd"/>'
                     f'<text x="{tx:.1f}" y="{AXIS_H - 10}" font-size="11" text-anchor="middle" fill="#555">'
                     f'{_tick_label(tick)}</text>')
    for lane, worker in enumerate(workers):
        y = AXIS_H + lane * LANE_H
        mine = [bar for bar in chosen if bar.worker == worker]
        busy = sum(bar.end - bar.start for bar in mine) / span
        label = html.escape(f"{_lane_name(worker)} ({min(busy, 1.0):.0%} busy)")
        parts.append(f'<rect x="{LABEL_W}" y="{y + 2}" width="{plot_w}" height="{LANE_H - 4}" fill="#f3f3f3"/>'
                     f'<text class="lane" x="{LABEL_W - 8}" y="{y + LANE_H / 2 + 4}" font-size="12" '
                     f'text-anchor="end" fill="#222">{label}</text>')
        for bar in mine:
            bx, bw = x(bar.start), max(1.0, x(bar.end) - x(bar.start))
            tip = html.escape(f"{bar.shard_id}: {bar.rows} rows, {bar.end - bar.start:.1f} s, {bar.status}")
            parts.append(f'<rect class="shard" x="{bx:.1f}" y="{y + 3}" width="{bw:.1f}" height="{LANE_H - 6}" '
                         f'fill="{COLOURS[bar.status]}" stroke="#fff" stroke-width="0.5"><title>{tip}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)
