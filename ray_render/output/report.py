"""The job report: a contact sheet of sample outputs with their prompts, and report.html, a page that leads with the
outcome.

report.html, top to bottom: the headline (state, rows ok / invalid / failed, images, wall time, throughput,
GPU-hours: output/headline.py), the failures grouped by error with example rows, the timeline of which actor ran
which shard (output/timeline.py: idle GPUs show as gaps), the samples with their prompts, then the settings and
the remaining figures. Numbers are formatted for people. Both files go to the output root.

Cost: the job record, the summary, the commit markers (one small read per shard, as `ray-render status`), the
metadata heads of at most `samples` shards for the samples, and the rows without images of at most
MAX_PROBLEM_SHARDS shards whose markers report some: the same for ten images as for ten million, but for the
markers. Shards are sampled evenly across the shard ids.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime

import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageFont

from ray_render import storage
from ray_render.output import commits, headline, layout, record, timeline
from ray_render.output.layout import CONTACT_SHEET, REPORT_HTML

MAX_SAMPLES = 100  # images on one sheet; more makes an unreadable sheet and a slow report
HEAD_ROWS = 256  # metadata rows read from each sampled shard
MAX_PROBLEM_SHARDS = 20  # shards whose rows without images are read to group the failures
MAX_GROUPS = 12  # error groups shown
EXAMPLES_PER_GROUP = 3
CAPTION_LINES = 3  # lines of caption under each image: the id, then the prompt
FONT_SIZE = 11
SAMPLE_COLUMNS = ["id", "image_index", "status", "error", "image_uri", "format", "prompt", "seed", "width", "height",
                  "quality_score"]
PROBLEM_COLUMNS = ["id", "image_index", "status", "error", "source_file", "source_row"]


@dataclass
class ReportResult:
    contact_sheet: str  # URL of the PNG
    html: str  # URL of the page
    samples: int  # images on the sheet


def _font():
    # Pillow's built-in font: present in every install, no font files to ship. With FreeType it scales.
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")  # the bitmap font has Latin-1 glyphs only


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, lines: int) -> list[str]:
    """`text` in at most `lines` lines of at most `width` pixels; an ellipsis marks a cut."""
    words, out, current = text[:1000].split(), [], ""  # a cell shows a few dozen characters: cut long prompts early
    for word in words:
        if len(out) > lines:
            break
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            out.append(current)
        current = word
        while len(out) <= lines and len(current) > 1 and draw.textlength(current, font=font) > width:
            low, high = 1, len(current) - 1  # one word wider than the cell: the longest prefix that fits
            while low < high:
                middle = (low + high + 1) // 2
                if draw.textlength(current[:middle], font=font) <= width:
                    low = middle
                else:
                    high = middle - 1
            out.append(current[:low])
            current = current[low:]
    if current and len(out) <= lines:
        out.append(current)
    if len(out) > lines:
        out = out[:lines]
        last = out[-1]
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        out[-1] = last + "..."
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading a bounded sample


def _sample(out_root: str, shard_ids: list[str], samples: int, storage_options: dict | None
            ) -> list[tuple[str, dict]]:
    """(shard id, row) of up to `samples` ok images from committed shards spread evenly over their ids."""
    if not shard_ids or samples == 0:
        return []
    count = min(samples, len(shard_ids))
    picked = [shard_ids[i * len(shard_ids) // count] for i in range(count)]  # evenly spread, distinct
    per_shard = math.ceil(samples / len(picked))
    fs, _ = storage.open_fs(out_root, storage_options)
    ok: list[tuple[str, dict]] = []
    for shard_id in picked:
        path = storage.open_fs(layout.metadata_url(out_root, shard_id), storage_options)[1]
        dataset = ds.dataset(path, format="parquet", filesystem=fs)
        columns = [name for name in SAMPLE_COLUMNS if name in dataset.schema.names]
        head = dataset.head(HEAD_ROWS, columns=columns).to_pylist()
        ok += [(shard_id, row) for row in head if row["status"] == "ok"][:per_shard]
    return ok[:samples]


def _problem_rows(out_root: str, infos: dict[str, dict], storage_options: dict | None) -> tuple[list[dict], int]:
    """(rows without images, shards that may have some): the rows come from at most MAX_PROBLEM_SHARDS of those
    shards, spread evenly (a marker without counts may hide problems too)."""
    import pyarrow.compute as pc

    suspects = sorted(shard_id for shard_id, info in infos.items()
                      if "counts" not in info or info["counts"].get("invalid") or info["counts"].get("failed"))
    count = min(MAX_PROBLEM_SHARDS, len(suspects))
    picked = [suspects[i * len(suspects) // count] for i in range(count)]
    fs, _ = storage.open_fs(out_root, storage_options)
    rows: list[dict] = []
    for shard_id in picked:
        path = storage.open_fs(layout.metadata_url(out_root, shard_id), storage_options)[1]
        try:
            dataset = ds.dataset(path, format="parquet", filesystem=fs)
            columns = [name for name in PROBLEM_COLUMNS if name in dataset.schema.names]
            table = dataset.to_table(columns=columns, filter=pc.field("status").isin(["invalid", "failed"]))
        except (OSError, ValueError):  # unreadable or gone (a refresh rewrote it): a report never fails over one
            continue
        rows += [{**row, "shard_id": shard_id} for row in table.to_pylist()]
    return rows, len(suspects)


_WHERE_RE = re.compile(r"^manifest .*? row \d+(?:, line \d+)? \(id '.*?'\): ")
_KEY_RE = re.compile(r"(?<![\w.-])[A-Za-z0-9._-]+#\d+: ")  # a request key ("<row id>#<image index>: ")
_GOT_RE = re.compile(r"(, got|: got) .*$")


def error_kind(error: str | None) -> str:
    """An error message without what is particular to its row (file, row, id, the value it got): rows failing for
    the same reason share it."""
    text = _WHERE_RE.sub("", error or "(no message)")
    text = _KEY_RE.sub("", text)
    return _GOT_RE.sub(r"\1 ...", text).strip()


def group_problems(rows: list[dict]) -> list[dict]:
    """Rows without images grouped by error_kind, largest group first: kind, status, count, examples."""
    groups: dict[tuple[str, str], dict] = {}
    for row in rows:
        key = (row.get("status") or "", error_kind(row.get("error")))
        group = groups.setdefault(key, {"status": key[0], "kind": key[1], "count": 0, "examples": []})
        group["count"] += 1
        if len(group["examples"]) < EXAMPLES_PER_GROUP:
            group["examples"].append(row)
    return sorted(groups.values(), key=lambda group: (-group["count"], group["kind"]))


def _thumbnail(data: bytes | None, size: int) -> Image.Image:
    """The image scaled to fit a size x size cell; small renders are enlarged with hard pixel edges."""
    if data is None:
        return Image.new("RGB", (size, size), (200, 200, 200))
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = min(size / image.width, size / image.height)
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(target, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def _read_image(out_root: str, shard_id: str, row: dict, storage_options: dict | None) -> bytes | None:
    try:
        return storage.read_bytes(layout.row_image_url(out_root, shard_id, row), storage_options)
    except (FileNotFoundError, storage.StorageError):
        return None  # the sheet shows a grey cell; a report never fails the job over one image


# ---------------------------------------------------------------------------------------------------------------
# Drawing and writing


def contact_sheet(items: list[tuple[dict, bytes | None]], columns: int = 6, thumb: int = 160) -> Image.Image:
    """A grid of thumbnails, each captioned with its image index, quality score (if any) and row id, then its
    prompt."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(probe.textbbox((0, 0), "Hg", font=font)[3]) + 3
    pad = 8
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + CAPTION_LINES * line_height
    columns = max(1, min(columns, len(items) or 1))
    rows = max(1, math.ceil(len(items) / columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for number, (row, data) in enumerate(items):
        x, y = (number % columns) * cell_w + pad, (number // columns) * cell_h + pad
        try:
            image = _thumbnail(data, thumb)
        except OSError:  # not a decodable image
            image = _thumbnail(None, thumb)
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        # Index and score first: a long id is what gets cut at the cell's edge.
        title = f"#{row['image_index']} "
        if row.get("quality_score") is not None:
            title += f"q={row['quality_score']:.2f} "
        title += row["id"]
        lines = _wrap(draw, _drawable(title, font), font, thumb, 1)
        lines += _wrap(draw, _drawable(row.get("prompt") or "", font), font, thumb, CAPTION_LINES - 1)
        for line_number, line in enumerate(lines):
            fill = (20, 20, 20) if line_number == 0 else (80, 80, 80)
            draw.text((x, y + thumb + 4 + line_number * line_height), line, font=font, fill=fill)
    return sheet


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested settings as (dotted name, text for people) pairs; long lists are cut so the page stays small."""
    pairs = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            pairs += _flatten(value, name + ".")
        elif isinstance(value, list) and len(value) > 5:
            pairs.append((name, json.dumps(value[:5], default=str)[:-1] + f", ... {len(value) - 5} more]"))
        else:
            pairs.append((name, _human(name, value)))
    return pairs


def _human(name: str, value) -> str:
    """A value as people read it: seconds as durations, floats to 3 significant digits, long text cut."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)) and name.endswith("_s"):
        return headline.duration(float(value))
    if isinstance(value, float):
        return headline.significant(value)
    if isinstance(value, int):
        return headline.count(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def _table(headers: list[str], rows: list[list], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    css = f' class="{css}"' if css else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline_html(top: headline.Headline, out_root: str) -> str:
    tiles = "".join(f'<div class="tile"><div class="value">{html.escape(value)}</div>'
                    f'<div class="label">{html.escape(label)}</div></div>' for label, value in top.tiles())
    message = f'<p class="message">{html.escape(top.message)}</p>' if top.message else ""
    return (f'<header id="outcome" class="headline tone-{top.tone}"><h1>ray-render: {html.escape(top.title)}</h1>'
            f'<div class="tiles">{tiles}</div>{message}<p class="where">Output <code>{html.escape(out_root)}</code>'
            f'</p></header>')


def _failures_html(groups: list[dict], rows_read: int, with_problems: int, top: headline.Headline) -> str:
    total = top.rows.get("invalid", 0) + top.rows.get("failed", 0)
    if not groups:
        text = "No failed or invalid rows." if not total else "Rows failed, but none could be read back."
        return f'<section id="failures"><h2>Failures</h2><p>{text}</p></section>'
    note = (f"{headline.count(total)} rows without images; grouped here: {headline.count(rows_read)} rows of "
            f"{min(MAX_PROBLEM_SHARDS, with_problems)} of the {headline.count(with_problems)} shards that have some.")
    body = []
    for group in groups[:MAX_GROUPS]:
        examples = "".join(
            f"<li><code>{html.escape(str(row.get('id')))}</code> {html.escape(_source(row))}</li>"
            for row in group["examples"])
        first = html.escape(group["examples"][0].get("error") or "")
        body.append(f'<tr><td class="status-{html.escape(group["status"])}">{html.escape(group["status"])}</td>'
                    f'<td class="count">{headline.count(group["count"])}</td><td><div class="kind">'
                    f'{html.escape(group["kind"])}</div><div class="example">e.g. {first}</div></td>'
                    f'<td><ul>{examples}</ul></td></tr>')
    more = (f"<p>{len(groups) - MAX_GROUPS} more kinds of error: see the metadata's <code>error</code> column.</p>"
            if len(groups) > MAX_GROUPS else "")
    return (f'<section id="failures"><h2>Failures by error</h2><p>{note}</p><table class="failures"><thead><tr>'
            f'<th>status</th><th>rows</th><th>error</th><th>example rows</th></tr></thead><tbody>{"".join(body)}'
            f'</tbody></table>{more}</section>')


def _source(row: dict) -> str:
    if row.get("source_file") is None:
        return ""
    name = str(row["source_file"]).rsplit("/", 1)[-1]
    return f"({name} row {row.get('source_row')})"


def _timeline_html(infos: dict, summary: dict | None) -> str:
    started = None
    if summary and summary.get("started_at"):
        try:
            started = datetime.fromisoformat(summary["started_at"]).timestamp()
        except ValueError:
            started = None
    drawn = timeline.bars(infos, since=started)
    if not drawn:
        return ('<section id="timeline"><h2>Timeline</h2><p>No shard timings recorded (shards committed by an '
                'older ray-render carry none).</p></section>')
    legend = "".join(f'<span class="key"><i style="background:{colour}"></i>{name}</span>'
                     for name, colour in timeline.COLOURS.items())
    return (f'<section id="timeline"><h2>Timeline</h2><p>Each lane is a render actor, each bar a shard from its '
            f'start to its commit ({headline.count(len(drawn))} shards); gaps are time the actor (and its GPU) '
            f'waited. {legend}</p>{timeline.svg(drawn)}</section>')


def _samples_html(samples: list[dict]) -> str:
    if not samples:
        return '<section id="samples"><h2>Samples</h2><p>No images yet.</p></section>'
    table = _table(["#", "id", "image", "seed", "quality", "prompt"],
                   [[n + 1, r["id"], r["image_index"], r.get("seed"),
                     None if r.get("quality_score") is None else f"{r['quality_score']:.3f}", r.get("prompt")]
                    for n, r in enumerate(samples)], "samples")
    return (f'<section id="samples"><h2>Samples</h2><p><img src="{CONTACT_SHEET}" alt="contact sheet"></p>'
            f"{table}</section>")


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1d;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:0 24px 48px}
.headline{color:#fff;padding:22px 28px 16px;margin:0 0 24px}
.headline h1{margin:0 0 14px;font-size:26px;font-weight:600}
.tone-ok{background:TONE_OK}.tone-problems{background:TONE_PROBLEMS}.tone-stopped{background:TONE_STOPPED}
.tone-running{background:TONE_RUNNING}
.tiles{display:flex;flex-wrap:wrap;gap:12px}
.tile{background:rgba(255,255,255,.14);padding:10px 16px;min-width:120px;border-radius:6px}
.tile .value{font-size:22px;font-weight:600;white-space:nowrap}.tile .label{font-size:13px;opacity:.9}
.headline .message{font-size:15px;margin:14px 0 0}.headline .where{font-size:13px;opacity:.85;margin:10px 0 0}
.headline code{color:#fff}
h2{font-size:19px;margin:28px 0 8px}
table{border-collapse:collapse;margin:8px 0;background:#fff}
td,th{border:1px solid #ddd;padding:5px 9px;text-align:left;vertical-align:top;font-size:14px}
th{background:#f0f0f0}.count{text-align:right;white-space:nowrap}
.failures .kind{font-weight:600}.failures .example{color:#666;font-size:12px;margin-top:3px}
.failures ul{margin:0;padding-left:16px}.status-failed{color:#b3261e}.status-invalid{color:#8a5a00}
.key{margin-left:12px;white-space:nowrap}.key i{display:inline-block;width:12px;height:12px;margin-right:4px;
vertical-align:-1px}
img{max-width:100%}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
"""


def render_html(out_root: str, summary: dict | None, job_record: dict | None, samples: list[dict],
                problem_rows: list[dict], infos: dict, with_problems: int = 0, running: bool = False) -> str:
    """The report page (see the module docstring for its order)."""
    top = headline.headline(summary, job_record, infos, running=running)
    parts = [_headline_html(top, out_root), "<main>",
             _failures_html(group_problems(problem_rows), len(problem_rows), with_problems, top),
             _timeline_html(infos, summary if not running else None), _samples_html(samples)]
    settings = (job_record or {}).get("settings")
    parts.append('<section id="settings"><h2>Settings</h2>')
    if settings:
        parts.append(_table(["setting", "value"], [list(pair) for pair in _flatten(settings)], "settings"))
    else:
        parts.append("<p>No job record.</p>")
    if summary:
        parts.append("<details><summary>All figures of the last run</summary>"
                     + _table(["figure", "value"], [list(pair) for pair in _flatten(summary)]) + "</details>")
    else:
        parts.append("<p>No summary recorded yet: the job has not finished.</p>")
    parts.append(f"<p>{headline.count(len(infos))} committed shard(s).</p></section></main>")
    style = STYLE
    for tone, colour in headline.TONES.items():
        style = style.replace(f"TONE_{tone.upper()}", colour)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>ray-render report: {html.escape(top.title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(out_root: str, storage_options: dict | None = None, *, summary: dict | None = None,
                 samples: int = 24, columns: int = 6, thumb: int = 160) -> ReportResult:
    """Write `contact_sheet.png` and `report.html` to the output root. `summary` defaults to `_summary.json`."""
    if not 0 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be from 0 to {MAX_SAMPLES}, got {samples}")
    given = summary is not None
    if summary is None:
        summary = record.read_summary(out_root, storage_options)
    job_record = record.read_job_record(out_root, storage_options)
    # A summary of an earlier run while another runs (the record names a newer run): that job is running.
    running = not given and (summary is None or bool(job_record and job_record.get("run_id")
                                                     and summary.get("run_id") != job_record.get("run_id")))
    infos = commits.list_commits(out_root, storage_options)
    picked = _sample(out_root, sorted(infos), samples, storage_options)
    problem_rows, with_problems = _problem_rows(out_root, infos, storage_options)
    items = [(row, _read_image(out_root, shard_id, row, storage_options)) for shard_id, row in picked]
    sheet = contact_sheet(items, columns=columns, thumb=thumb)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    sheet_url = storage.join(out_root, CONTACT_SHEET)
    storage.write_bytes(sheet_url, buffer.getvalue(), storage_options)
    page = render_html(out_root, summary, job_record, [row for row, _ in items], problem_rows, infos, with_problems,
                       running=running)
    html_url = storage.join(out_root, REPORT_HTML)
    storage.write_bytes(html_url, page.encode(), storage_options)  # its sources hold no secret: nothing to blank
    return ReportResult(contact_sheet=sheet_url, html=html_url, samples=len(items))
