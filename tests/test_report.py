"""The job report: a contact sheet of sampled outputs with captions, and an HTML page with the summary."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from output_factory import build_output_root, picture
from PIL import Image

from ray_render import storage
from ray_render.output import headline, layout, record, report, timeline


def cells(sheet: Image.Image, count: int, columns: int, thumb: int):
    """(thumbnail box, caption box) of each cell, from the sheet's own geometry."""
    rows = -(-count // columns)
    cell_w, cell_h = sheet.width // columns, sheet.height // rows
    pad = (cell_w - thumb) // 2
    for n in range(count):
        x, y = (n % columns) * cell_w + pad, (n // columns) * cell_h + pad
        yield (x, y, x + thumb, y + thumb), (x, y + thumb + 2, x + thumb, (n // columns + 1) * cell_h)


def test_report_shows_a_sample_of_every_committed_shard(tmp_path):
    built = build_output_root(str(tmp_path / "out"), shards=3, rows_per_shard=3, uncommitted_shards=1, scores=True)
    record.write_summary(built.root, {"state": "finished", "rows": {"ok": 9, "failed": 3, "invalid": 3},
                                      "images": 18, "message": "<script>alert(1)</script>"})
    record.write_job_record(built.root, {"settings": {"model": "tiny", "params": {"cfg": 7.5},
                                                      "manifests": [f"m{i}.parquet" for i in range(50)]}})
    result = report.write_report(built.root, samples=6, columns=3, thumb=64)
    assert result.contact_sheet == os.path.join(built.root, "contact_sheet.png")
    assert result.html == os.path.join(built.root, "report.html") and result.samples == 6

    sheet = Image.open(result.contact_sheet).convert("RGB")
    assert sheet.width % 3 == 0 and sheet.width // 3 >= 64
    page = open(result.html, encoding="utf-8").read()
    # Two images from each committed shard (rows in file order), none from the uncommitted one.
    ok = {(row["id"], row["image_index"]): row for row in built.ok}
    sampled = [key for key in ok if f"<td>{key[0]}</td><td>{key[1]}</td>" in page]
    assert len(sampled) == 6 and {key[0].replace(".", "-")[:5] for key in sampled} == {"row-0", "row-1", "row-2"}
    assert "row-3" not in page and "row.3.0" not in page

    # Each cell shows its image (enlarged 2x: 32 px into 64) and dark caption text under it.
    for (thumb_box, caption_box), key in zip(cells(sheet, 6, 3, 64), sampled):
        shown = np.asarray(sheet.crop(thumb_box))
        number = built.ok.index(ok[key])
        expected = np.asarray(Image.fromarray(picture(number)).resize((64, 64), Image.Resampling.NEAREST))
        assert np.array_equal(shown, expected)
        caption = np.asarray(sheet.crop(caption_box).convert("L"))
        assert (caption < 128).sum() > 30  # text drawn
    # The page: summary and settings flattened, long lists cut, everything escaped, the sheet linked.
    assert "<td>rows.failed</td><td>3</td>" in page and "<td>params.cfg</td><td>7.5</td>" in page
    assert "45 more" in page
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert '<img src="contact_sheet.png"' in page
    assert "width must be a multiple of 16, got 30" in page  # a sample of the rows without images


def test_report_reads_only_the_sampled_shards(tmp_path):
    built = build_output_root(str(tmp_path / "out"), shards=5, rows_per_shard=2, num_images=1)
    # Two samples spread over five shards read shards s000 and s002; the others may be unreadable.
    for shard_id in ("s001", "s003", "s004"):
        os.remove(layout.metadata_url(built.root, shard_id))
    result = report.write_report(built.root, samples=2)
    page = open(result.html, encoding="utf-8").read()
    assert result.samples == 2 and "row.0.0" in page and "row.2.0" in page
    assert "No summary recorded yet" in page


def test_missing_or_broken_images_become_grey_cells(tmp_path):
    built = build_output_root(str(tmp_path / "out"), shards=1, rows_per_shard=1, num_images=2)
    first, second = built.ok
    os.remove(layout.row_image_url(built.root, "s000", first))
    with open(layout.row_image_url(built.root, "s000", second), "wb") as handle:
        handle.write(b"not an image")
    result = report.write_report(built.root, samples=2, columns=2, thumb=40)
    sheet = Image.open(result.contact_sheet).convert("RGB")
    for thumb_box, _ in cells(sheet, 2, 2, 40):
        assert np.all(np.asarray(sheet.crop(thumb_box)) == 200)


def test_report_of_an_output_with_nothing_committed(tmp_path):
    result = report.write_report(str(tmp_path / "out"))
    assert result.samples == 0
    assert "0 committed shard(s)" in open(result.html, encoding="utf-8").read()
    Image.open(result.contact_sheet).verify()


def test_sample_count_is_bounded(tmp_path):
    with pytest.raises(ValueError, match="samples must be from 0 to 100"):
        report.write_report(str(tmp_path), samples=1000)


def test_report_on_object_storage(s3):
    options = s3.storage_options
    built = build_output_root(s3.fresh_url("out"), shards=2, storage_options=options)
    result = report.write_report(built.root, options, samples=4, summary={"images": 12})
    page = storage.read_bytes(result.html, options).decode()
    assert "<td>images</td><td>12</td>" in page
    assert options["secret"] not in page and options["key"] not in page
    sheet = Image.open(io.BytesIO(storage.read_bytes(result.contact_sheet, options)))
    assert sheet.format == "PNG" and result.samples == 4


def test_numbers_are_formatted_for_people():
    assert [headline.duration(s) for s in (0.42, 16.681661306000024, 192, 7500, 200000)] == [
        "0.4 s", "16.7 s", "3 min 12 s", "2 h 05 min", "2 d 7 h"]
    assert [headline.rate(r) for r in (32.345, 0.5, 0.0005)] == ["32.3 images/s", "30 images/min", "1.8 images/h"]
    assert [headline.significant(v) for v in (7.5, 16.68166, 0.030341, 12345.6)] == ["7.5", "16.7", "0.0303",
                                                                                     "12,346"]
    assert headline.count(1234567) == "1,234,567"


def test_gpu_hours_count_the_gpus_the_actors_held():
    summary = {"state": "finished", "rows_total": 10, "rows": {"ok": 10, "invalid": 0, "failed": 0}, "images": 10,
               "wall_s": 3700.0, "plan_s": 100.0, "rows_this_run": 10, "started_at": "2026-01-01T00:00:00+00:00",
               "model": {"device": "cuda:0"}}
    infos = {f"s{i}": {"worker": f"host/n/actor{i % 2}/gpu{i % 2}", "finished_at": 1767225700.0} for i in range(4)}
    top = headline.headline(summary, {"settings": {"gpus_per_actor": 1.0}}, infos)
    assert top.gpu_hours == 2.0 and top.tone == "ok"  # two GPU actors for an hour (3,700 s less 100 s planning)
    cpu = headline.headline({**summary, "model": {"device": "cpu"}}, {}, infos)
    assert cpu.gpu_hours is None and "none (CPU run)" in cpu.line()


def test_failures_are_grouped_by_what_went_wrong_not_by_row():
    rows = [{"status": "invalid", "id": f"r{i}", "error": f"manifest a.csv row {i}, line {i + 2} (id 'r{i}'): column "
             f"'width' must be a multiple of 16 from 16 to 4096, got {100 + i}"} for i in range(4)]
    rows += [{"status": "failed", "id": "x", "error": "RuntimeError: x#0: [placeholder:raise] asked it to fail"},
             {"status": "failed", "id": "y", "error": "RuntimeError: y#1: [placeholder:raise] asked it to fail"},
             {"status": "invalid", "id": "z", "error": "manifest a.csv row 9 (id 'z'): is not valid JSON (line 1)"}]
    groups = report.group_problems(rows)
    assert [(g["status"], g["count"], g["kind"]) for g in groups] == [
        ("invalid", 4, "column 'width' must be a multiple of 16 from 16 to 4096, got ..."),
        ("failed", 2, "RuntimeError: [placeholder:raise] asked it to fail"),
        ("invalid", 1, "is not valid JSON (line 1)")]
    assert [row["id"] for row in groups[0]["examples"]] == ["r0", "r1", "r2"]


def test_the_timeline_draws_the_last_run_one_lane_per_actor():
    infos = {"old": {"worker": "h/n/actor0", "started_at": 100.0, "finished_at": 110.0, "rows": 4},
             "a": {"worker": "h/n/actor0", "started_at": 1000.0, "finished_at": 1010.0, "rows": 4,
                   "counts": {"ok": 4}},
             "b": {"worker": "h/n/actor1", "started_at": 1000.0, "finished_at": 1005.0, "rows": 4,
                   "counts": {"ok": 3, "failed": 1}},
             "c": {"worker": "h/n/actor0", "started_at": 1015.0, "finished_at": 1020.0, "rows": 4,
                   "counts": {"ok": 3, "invalid": 1}},
             "untimed": {"rows": 4}}
    drawn = timeline.bars(infos, since=900.0)
    assert [(bar.shard_id, bar.status) for bar in drawn] == [("a", "ok"), ("b", "failed"), ("c", "invalid")]
    picture = timeline.svg(drawn)
    assert picture.count('class="shard"') == 3 and picture.count('class="lane"') == 2
    assert "n/actor0 (75% busy)" in picture and "n/actor1 (25% busy)" in picture  # 15 s and 5 s of 20
    assert timeline.svg([]) == "" and len(timeline.bars(infos, since=5000.0)) == 4  # nothing newer: all of them


def test_the_timeline_draws_a_shard_while_it_had_the_model_not_while_it_waited_for_it():
    # One actor, two calls at once: b read its rows while a rendered, then rendered while a wrote its metadata.
    infos = {"a": {"worker": "h/n/actor0", "started_at": 1000.0, "finished_at": 1011.0, "rendering_from": 1000.5,
                   "rendering_until": 1010.0, "rows": 4, "counts": {"ok": 4}},
             "b": {"worker": "h/n/actor0", "started_at": 1001.0, "finished_at": 1020.5, "rendering_from": 1010.0,
                   "rendering_until": 1020.0, "rows": 4, "counts": {"ok": 4}}}
    drawn = timeline.bars(infos)
    assert [(bar.start, bar.end) for bar in drawn] == [(1000.5, 1010.0), (1010.0, 1020.0)]
    assert "n/actor0 (100% busy)" in timeline.svg(drawn)  # the bars do not overlap: the device was never idle
