"""The job report: a contact sheet of sampled outputs with captions, and an HTML page with the summary."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from output_factory import build_output_root, picture
from PIL import Image

from ray_render import storage
from ray_render.output import layout, record, report


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
