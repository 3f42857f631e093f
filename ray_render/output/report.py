"""The job report: a contact sheet of sample outputs with their prompts, and a small HTML page with the summary.

Both go to the output root: `contact_sheet.png` and `report.html` (which shows the sheet). The report reads the
job's `_summary.json` and `_job.json`, and at most `samples` committed shards' metadata heads and `samples`
images, so it costs the same for ten images or ten million. Shards are sampled evenly across the shard ids.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass

import pyarrow.dataset as ds
from PIL import Image, ImageDraw, ImageFont

from ray_render import storage
from ray_render.output import commits, layout, record
from ray_render.output.layout import CONTACT_SHEET, REPORT_HTML

MAX_SAMPLES = 100  # images on one sheet; more makes an unreadable sheet and a slow report
HEAD_ROWS = 256  # metadata rows read from each sampled shard
MAX_PROBLEMS = 20  # failed / invalid rows listed in the page
CAPTION_LINES = 3  # lines of caption under each image: the id, then the prompt
FONT_SIZE = 11
SAMPLE_COLUMNS = ["id", "image_index", "status", "error", "image_uri", "format", "prompt", "seed", "width", "height",
                  "quality_score"]


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


def _sample(out_root: str, samples: int, storage_options: dict | None) -> tuple[list[tuple[str, dict]], list[dict],
                                                                               int]:
    """(shard id, row) of up to `samples` ok images, up to MAX_PROBLEMS other rows, and the committed shard count."""
    shard_ids = sorted(commits.committed_shard_ids(out_root, storage_options))
    if not shard_ids or samples == 0:
        return [], [], len(shard_ids)
    count = min(samples, len(shard_ids))
    picked = [shard_ids[i * len(shard_ids) // count] for i in range(count)]  # evenly spread, distinct
    per_shard = math.ceil(samples / len(picked))
    fs, _ = storage.open_fs(out_root, storage_options)
    ok: list[tuple[str, dict]] = []
    problems: list[dict] = []
    for shard_id in picked:
        path = storage.open_fs(layout.metadata_url(out_root, shard_id), storage_options)[1]
        dataset = ds.dataset(path, format="parquet", filesystem=fs)
        columns = [name for name in SAMPLE_COLUMNS if name in dataset.schema.names]
        head = dataset.head(HEAD_ROWS, columns=columns).to_pylist()
        ok += [(shard_id, row) for row in head if row["status"] == "ok"][:per_shard]
        problems += [row for row in head if row["status"] != "ok"]
    return ok[:samples], problems[:MAX_PROBLEMS], len(shard_ids)


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
    """Nested settings as (dotted name, short text) pairs; long lists are cut so the page stays small."""
    pairs = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            pairs += _flatten(value, name + ".")
        elif isinstance(value, list) and len(value) > 5:
            pairs.append((name, json.dumps(value[:5], default=str)[:-1] + f", ... {len(value) - 5} more]"))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            pairs.append((name, text if len(text) <= 300 else text[:297] + "..."))
    return pairs


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(out_root: str, summary: dict | None, record: dict | None, samples: list[dict],
                problems: list[dict], committed_shards: int) -> str:
    """The report page: summary, settings, the contact sheet, the sampled rows and some failed or invalid ones."""
    parts = [f"<h1>ray-render report</h1><p>Output: <code>{html.escape(out_root)}</code>; "
             f"{committed_shards} committed shard(s).</p>"]
    if summary:
        parts.append("<h2>Summary</h2>" + _table(["field", "value"], [list(pair) for pair in _flatten(summary)]))
    else:
        parts.append("<h2>Summary</h2><p>No summary recorded yet: the job has not finished.</p>")
    settings = (record or {}).get("settings")
    if settings:
        parts.append("<h2>Settings</h2>" + _table(["setting", "value"], [list(pair) for pair in _flatten(settings)]))
    parts.append(f"<h2>Samples</h2><p><img src=\"{CONTACT_SHEET}\" alt=\"contact sheet\"></p>")
    parts.append(_table(["#", "id", "image", "seed", "quality", "prompt"],
                        [[n + 1, r["id"], r["image_index"], r.get("seed"),
                          None if r.get("quality_score") is None else f"{r['quality_score']:.3f}", r.get("prompt")]
                         for n, r in enumerate(samples)]))
    if problems:
        parts.append("<h2>Rows without images (sample)</h2>"
                     + _table(["id", "status", "error"], [[r["id"], r["status"], r.get("error")] for r in problems]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>ray-render report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(out_root: str, storage_options: dict | None = None, *, summary: dict | None = None,
                 samples: int = 24, columns: int = 6, thumb: int = 160) -> ReportResult:
    """Write `contact_sheet.png` and `report.html` to the output root. `summary` defaults to `_summary.json`."""
    if not 0 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be from 0 to {MAX_SAMPLES}, got {samples}")
    if summary is None:
        summary = record.read_summary(out_root, storage_options)
    job_record = record.read_job_record(out_root, storage_options)
    picked, problems, committed = _sample(out_root, samples, storage_options)
    items = [(row, _read_image(out_root, shard_id, row, storage_options)) for shard_id, row in picked]
    sheet = contact_sheet(items, columns=columns, thumb=thumb)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=True)
    sheet_url = storage.join(out_root, CONTACT_SHEET)
    storage.write_bytes(sheet_url, buffer.getvalue(), storage_options)
    page = render_html(out_root, summary, job_record, [row for row, _ in items], problems, committed)
    html_url = storage.join(out_root, REPORT_HTML)
    storage.write_bytes(html_url, page.encode(), storage_options)  # its sources hold no secret: nothing to blank
    return ReportResult(contact_sheet=sheet_url, html=html_url, samples=len(items))
