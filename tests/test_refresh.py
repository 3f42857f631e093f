"""`ray-render refresh` on a real local Ray with the placeholder model: only new and changed rows render, removed
rows are marked (and pruned on request), a second refresh renders nothing, and the result reads as one dataset."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
from conftest import prompt_rows

from ray_render import cli
from ray_render.config import JobConfig
from ray_render.engine import driver, refresh
from ray_render.engine import summary as exits
from ray_render.output import commits, record, status


def job_for(manifest: str, out: str, **options) -> JobConfig:
    options = {"model": "placeholder", "progress": False, "report": False, "shard_size": 250, "batch_size": 32,
               "params": {"width": 16, "height": 16}, **options}
    return JobConfig(manifests=[manifest], out=out, **options)


def metadata(out: str) -> list[dict]:
    return ds.dataset(str(Path(out) / "metadata"), format="parquet").to_table().to_pylist()


def image_files(out: str) -> dict[str, int]:
    """Relative path -> mtime_ns of every stored image."""
    root = Path(out) / "images"
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*.png")}


def metadata_files(out: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (Path(out) / "metadata").iterdir()}


def rendered_by_generation(out: str, generation: int) -> int:
    """Images the generation's shards rendered, from their commits (what the actors report)."""
    prefix = refresh.generation_shard_id(generation, "")
    return sum(info["images"] for shard_id, info in commits.list_commits(out).items() if shard_id.startswith(prefix))


def test_refresh_renders_exactly_the_new_and_changed_rows(ray_cluster, tmp_path, make_manifest):
    rows = prompt_rows(1000)
    manifest = make_manifest(rows, name="catalogue.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out)).exit_code == exits.EXIT_OK
    before = image_files(out)
    assert len(before) == 1000

    # 3 rows change (prompt, a render parameter, the seed), 5 are added, 2 leave the manifest
    rows[10]["prompt"] = "a photo of something else entirely"
    rows[500]["cfg"] = 3.0
    rows[900]["seed"] = 1234
    rows = [row for row in rows if row["id"] not in ("r20", "r700")] + prompt_rows(5, start=1000)
    make_manifest(rows, name="catalogue.parquet")

    summary = refresh.run(job_for(manifest, out))
    assert summary.exit_code == exits.EXIT_OK
    assert (summary.rows_this_run, summary.images_this_run) == (8, 8)
    assert rendered_by_generation(out, 1) == 8
    after = image_files(out)
    new_images = {path for path in after if path.startswith("g0001-")}
    assert sorted(path.split("/")[-1] for path in new_images) == sorted(
        f"{row_id}_0.png" for row_id in ("r10", "r500", "r900", "r1000", "r1001", "r1002", "r1003", "r1004"))
    changed_old = {path for path in before if path.split("/")[-1] in ("r10_0.png", "r500_0.png", "r900_0.png")}
    # Unchanged and removed rows' images are untouched; the changed rows' old images are gone.
    assert {path: after[path] for path in before if path not in changed_old} == \
        {path: mtime for path, mtime in before.items() if path not in changed_old}
    assert not changed_old & set(after)

    table = metadata(out)
    assert Counter(row["status"] for row in table) == {"ok": 1003, "removed": 2}
    assert Counter(row["id"] for row in table).most_common(1)[0][1] == 1  # one current row per id
    by_id = {row["id"]: row for row in table}
    assert by_id["r10"]["prompt"] == "a photo of something else entirely"
    assert by_id["r500"]["cfg"] == 3.0 and by_id["r900"]["seed"] == 1234
    for row_id in ("r20", "r700"):
        assert by_id[row_id]["status"] == "removed" and Path(by_id[row_id]["image_uri"]).exists()
    for row in table:
        if row["status"] == "ok":
            assert Path(row["image_uri"]).exists()
    files_after = metadata_files(out)
    job_record = record.read_job_record(out)
    assert job_record["refresh"] == {"generation": 1, "new": 5, "changed": 3, "unchanged": 995, "updated": 0,
                                     "removed": 2, "pruned": 0, "state": "done"}

    # `ray-render status` counts the current rows, not the superseded ones the old commits still hold
    report = status.job_status(out)
    assert (report["state"], report["rows_done"], report["rows_total"]) == ("finished", 1003, 1003)
    assert report["rows"] == {"ok": 1003, "invalid": 0, "failed": 0, "removed": 2}
    assert report["images"] == 1003

    # Idempotent: the same refresh again renders nothing and changes nothing
    again = refresh.run(job_for(manifest, out))
    assert again.exit_code == exits.EXIT_OK and (again.rows_this_run, again.images_this_run) == (0, 0)
    assert image_files(out) == after
    assert metadata_files(out) == files_after

    # A plain run would render the refreshed rows a second time: it refuses the output
    refused = driver.run(job_for(manifest, out))
    assert refused.exit_code == exits.EXIT_ABORTED and "ray-render refresh" in refused.message

    # --prune deletes the removed rows' images and clears their image_uri; still nothing renders
    assert cli.main(["refresh", manifest, "--out", out, "--model", "placeholder", "--shard-size", "250",
                     "--width", "16", "--height", "16", "--no-progress", "--no-report", "--prune"]) == 0
    pruned = {row["id"]: row for row in metadata(out)}
    for row_id in ("r20", "r700"):
        assert pruned[row_id]["status"] == "removed" and pruned[row_id]["image_uri"] is None
        assert not Path(by_id[row_id]["image_uri"]).exists()
    assert image_files(out) == {path: mtime for path, mtime in after.items()
                                if path.split("/")[-1] not in ("r20_0.png", "r700_0.png")}
    assert record.read_job_record(out)["refresh"] == {"generation": 1, "new": 0, "changed": 0, "unchanged": 1003,
                                                      "updated": 0, "removed": 0, "pruned": 2, "state": "done"}


def test_a_refresh_interrupted_before_superseding_finishes_on_the_next_run(ray_cluster, tmp_path, make_manifest,
                                                                          monkeypatch):
    rows = prompt_rows(40)
    manifest = make_manifest(rows, name="m.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out, shard_size=10)).exit_code == exits.EXIT_OK
    rows[3]["prompt"] = "changed"
    rows = rows[:-1]  # r39 leaves
    make_manifest(rows, name="m.parquet")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refresh, "supersede", crash)  # the generation's shards are committed, nothing superseded
    assert refresh.run(job_for(manifest, out, shard_size=10)).exit_code == exits.EXIT_LOST
    monkeypatch.undo()
    assert Counter(row["id"] for row in metadata(out))["r3"] == 2  # the old row and the new one, for now

    resumed = refresh.run(job_for(manifest, out, shard_size=10))
    assert resumed.exit_code == exits.EXIT_OK and resumed.images_this_run == 0
    table = metadata(out)
    assert Counter(row["id"] for row in table).most_common(1)[0][1] == 1
    by_id = {row["id"]: row for row in table}
    assert by_id["r3"]["prompt"] == "changed" and by_id["r3"]["image_uri"].split("/")[-3].startswith("g0001-")
    assert by_id["r39"]["status"] == "removed"
    (attempt,) = os.listdir(Path(out) / "images" / "00000-m-0000000000")
    assert sorted(os.listdir(Path(out) / "images" / "00000-m-0000000000" / attempt)) == [
        f"r{i}_0.png" for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]
