"""`ray-render refresh` loads no model unless rows must render: the rows are validated and fingerprinted from the
model's description, a catalogue that did not change starts no render actor, and a change in passthrough columns
alone updates the metadata in place. Real local Ray, real Parquet; the placeholder model and the tiny NextStep."""

from __future__ import annotations

import dataclasses
from collections import Counter

from conftest import prompt_rows
from test_refresh import image_files, metadata, metadata_files

from ray_render.config import JobConfig
from ray_render.engine import driver, refresh, row_index
from ray_render.engine import plan as planning
from ray_render.engine import summary as exits
from ray_render.output import commits, layout, record


def job_for(manifest: str, out: str, **options) -> JobConfig:
    options = {"model": "placeholder", "progress": False, "report": False, "batch_size": 64,
               "params": {"width": 16, "height": 16}, **options}
    return JobConfig(manifests=[manifest], out=out, **options)


def catalogue(n: int) -> list[dict]:
    """`n` rows with passthrough columns, a row with a bad value and one the placeholder model refuses."""
    rows = prompt_rows(n)
    for i, row in enumerate(rows):
        row.update(sku=f"SKU-{i:05d}", price=10.0 + i)
    rows[7]["cfg"] = 0.5  # invalid in the manifest: cfg must be >= 1
    rows[8]["prompt"] += " [placeholder:invalid]"  # valid, but the model refuses it
    return rows


def test_an_unchanged_refresh_of_5000_rows_starts_no_render_actor(ray_cluster, tmp_path, make_manifest):
    manifest = make_manifest(catalogue(5000), name="catalogue.parquet")
    out = str(tmp_path / "out")
    first = refresh.run(job_for(manifest, out))  # a refresh of an empty output renders everything
    assert first.exit_code == exits.EXIT_ROWS and first.rows == {"ok": 4998, "invalid": 2, "failed": 0}
    assert first.actors_started > 0
    images, files = image_files(out), metadata_files(out)
    rendered_by = record.read_job_record(out)["model"]

    again = refresh.run(job_for(manifest, out))
    assert (again.rows, again.rows_this_run) == ({"ok": 4998, "invalid": 2, "failed": 0}, 0)
    assert again.actors_started == 0 and again.actors_peak == 0
    job_record = record.read_job_record(out)
    assert job_record["summary"]["actors_started"] == 0
    assert job_record["refresh"] == {"generation": 1, "new": 0, "changed": 0, "unchanged": 5000, "updated": 0,
                                     "removed": 0, "pruned": 0, "state": "done"}
    assert job_record["model"] == rendered_by  # the output is still the work of the model that rendered it
    assert image_files(out) == images and metadata_files(out) == files


def test_an_unchanged_refresh_of_a_plain_run_starts_no_render_actor(ray_cluster, tmp_path, make_manifest):
    manifest = make_manifest(catalogue(300), name="m.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out, shard_size=100)).exit_code == exits.EXIT_ROWS
    images = image_files(out)
    summary = refresh.run(job_for(manifest, out, shard_size=100))
    assert summary.actors_started == 0 and summary.rows_this_run == 0
    assert summary.rows == {"ok": 298, "invalid": 2, "failed": 0}
    assert image_files(out) == images


def test_a_large_manifest_is_indexed_in_tasks_next_to_the_driver(ray_cluster, tmp_path, make_manifest, monkeypatch):
    rows = catalogue(300)
    manifest = make_manifest(rows, name="m.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out, shard_size=50)).exit_code == exits.EXIT_ROWS
    monkeypatch.setattr(row_index, "DRIVER_ROWS", 0)  # every manifest counts as large: tasks of 100 rows
    monkeypatch.setattr(row_index, "TASK_ROWS", 100)
    rows[10]["price"], rows[20]["prompt"] = 1.5, "a photo of a changed row"
    make_manifest(rows, name="m.parquet")
    summary = refresh.run(job_for(manifest, out, shard_size=50))
    assert (summary.rows_this_run, summary.rows_updated) == (1, 1)
    table = {row["id"]: row for row in metadata(out)}
    assert (table["r10"]["price"], table["r20"]["prompt"]) == (1.5, "a photo of a changed row")
    again = refresh.run(job_for(manifest, out, shard_size=50))
    assert (again.actors_started, again.rows_this_run, again.rows_updated) == (0, 0, 0)


def test_a_passthrough_only_change_updates_the_metadata_without_rendering(ray_cluster, tmp_path, make_manifest):
    rows = catalogue(400)
    manifest = make_manifest(rows, name="catalogue.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out, shard_size=100)).exit_code == exits.EXIT_ROWS
    images = image_files(out)
    before = {row["id"]: row for row in metadata(out)}

    rows[3]["price"] = 99.5  # a passthrough value changes ...
    rows[150]["sku"] = None  # ... or is cleared
    rows[7]["price"] = 1.0  # an invalid row's passthrough value changes: it stays invalid, with the new value
    rows[8]["price"] = 2.0  # so does one the model refused
    rows[200]["price"] = 5.0  # this one also changes its prompt: it renders, with its new price
    rows[200]["prompt"] = "a photo of something else"
    make_manifest(rows, name="catalogue.parquet")

    summary = refresh.run(job_for(manifest, out, shard_size=100))
    assert summary.exit_code == exits.EXIT_ROWS
    assert (summary.rows_this_run, summary.rows_updated) == (1, 4)
    job_record = record.read_job_record(out)
    assert job_record["refresh"] == {"generation": 1, "new": 0, "changed": 1, "unchanged": 399, "updated": 4,
                                     "removed": 0, "pruned": 0, "state": "done"}
    assert job_record["summary"]["rows_updated"] == 4
    after = {row["id"]: row for row in metadata(out)}
    assert len(after) == 400
    assert (after["r3"]["price"], after["r150"]["sku"], after["r7"]["price"], after["r8"]["price"]) == \
        (99.5, None, 1.0, 2.0)
    assert (after["r7"]["status"], after["r8"]["status"]) == ("invalid", "invalid")
    assert (after["r200"]["price"], after["r200"]["prompt"]) == (5.0, "a photo of something else")
    # An updated row is its old row but for the passthrough values: same image, same render columns
    for row_id in ("r3", "r150"):
        changed = {name for name in after[row_id] if after[row_id][name] != before[row_id][name]}
        assert changed <= {"price", "sku", "passthrough_fingerprint"}
    for row_id in set(after) - {"r3", "r150", "r7", "r8", "r200"}:
        assert after[row_id] == before[row_id]
    changed_image = next(path for path in images if path.endswith("/r200_0.png"))
    assert {path: mtime for path, mtime in image_files(out).items() if not path.startswith("g0001-")} == \
        {path: mtime for path, mtime in images.items() if path != changed_image}

    again = refresh.run(job_for(manifest, out, shard_size=100))  # nothing left to update
    assert (again.rows_this_run, again.rows_updated, again.actors_started) == (0, 0, 0)


def test_an_output_written_before_passthrough_fingerprints_gets_them_in_place(ray_cluster, tmp_path, make_manifest):
    rows = prompt_rows(200, sku="A")
    manifest = make_manifest(rows, name="m.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out, shard_size=100)).exit_code == exits.EXIT_OK
    for shard_id in commits.list_commits(out):  # as an earlier version wrote them: no passthrough_fingerprint
        table = commits.read_shard_metadata(out, shard_id)
        commits.write_shard_metadata(out, shard_id, table.drop_columns(["passthrough_fingerprint"]))
    images = image_files(out)
    rows[5]["sku"] = "B"
    make_manifest(rows, name="m.parquet")

    summary = refresh.run(job_for(manifest, out, shard_size=100))
    assert (summary.actors_started, summary.rows_this_run, summary.rows_updated) == (0, 0, 200)
    table = {row["id"]: row for row in metadata(out)}
    assert table["r5"]["sku"] == "B" and all(row["passthrough_fingerprint"] for row in table.values())
    assert image_files(out) == images
    again = refresh.run(job_for(manifest, out, shard_size=100))
    assert (again.actors_started, again.rows_updated) == (0, 0)


def test_changed_rows_in_one_part_of_the_catalogue_render_in_shards_for_every_actor(ray_cluster, tmp_path,
                                                                                     make_manifest):
    rows = prompt_rows(2000)
    manifest = make_manifest(rows, name="catalogue.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out, shard_size=1000)).exit_code == exits.EXIT_OK
    for row in rows[100:900]:  # 800 changed rows, all in the first plan shard
        row["seed"] = 7
    make_manifest(rows, name="catalogue.parquet")

    summary = refresh.run(job_for(manifest, out))  # default shard sizes
    assert summary.exit_code == exits.EXIT_OK and summary.rows_this_run == 800
    assert summary.actors_started > 0
    shards = [name for name in metadata_files(out) if name.startswith("g0001-")]
    assert summary.shards_total == len(shards) > 8  # cut like a run's rows, not one shard for one actor
    table = metadata(out)
    assert Counter(row["id"] for row in table).most_common(1)[0][1] == 1
    assert Counter(row["seed"] for row in table)[7] == 800


def test_generation_shards_are_cut_like_a_runs_shards():
    plan = planning.Plan(files=["/m/cat.parquet"], shards=[
        planning.Shard(planning.make_shard_id(0, "/m/cat.parquet", start), "/m/cat.parquet", start, start + 1000)
        for start in (0, 1000)], total_rows=2000, fingerprint="", passthrough_columns=[])
    first, second = (shard.shard_id for shard in plan.shards)
    diff = refresh.Diff(todo={first: list(range(100, 900)), second: [1500]},
                        todo_ids={first: {row: f"r{row}" for row in range(100, 900)}, second: {1500: "r1500"}})
    shards = refresh.generation_shards(3, plan, diff, shard_size=None)
    assert sum(len(ids) for _, ids in shards) == 801
    assert [shard.num_rows for shard, _ in shards] == [len(ids) for _, ids in shards]
    sizes = [shard.num_rows for shard, _ in shards]
    assert max(sizes) <= planning.auto_shard_size(801, 801) and len(sizes) > 8
    assert all(layout.SHARD_ID_RE.fullmatch(shard.shard_id) for shard, _ in shards)
    assert len({shard.shard_id for shard, _ in shards}) == len(shards)
    # the parts of a plan shard tile its range; the first keeps the plan shard's name
    parts = [shard for shard, _ in shards if shard.file_index == 0 and shard.row_start < 1000]
    assert parts[0].shard_id == refresh.generation_shard_id(3, first)
    assert [(a.row_stop, b.row_start) for a, b in zip(parts, parts[1:])] == [(b.row_start,) * 2 for b in parts[1:]]
    assert (parts[0].row_start, parts[-1].row_stop) == (0, 1000)
    assert sorted(row for shard in parts for row in shard.row_indices()) == list(range(100, 900))
    (last, ids), = [(shard, ids) for shard, ids in shards if shard.row_start >= 1000]
    assert (last.shard_id, last.rows, ids) == (refresh.generation_shard_id(3, second), (1500,), {"r1500"})
    assert [shard.num_rows for shard, _ in refresh.generation_shards(3, plan, diff, shard_size=500)] == [500, 300, 1]


def test_a_model_that_cannot_be_described_is_loaded_to_compare(ray_cluster, tmp_path, make_manifest, monkeypatch):
    manifest = make_manifest(catalogue(50), name="m.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out)).exit_code == exits.EXIT_ROWS

    def undescribable(name, **options):
        raise ValueError(f"model {name!r}: only loading it tells")

    monkeypatch.setattr(refresh, "describe_model", undescribable)
    summary = refresh.run(job_for(manifest, out))
    assert summary.actors_started > 0  # the actors said what the model is ...
    assert (summary.rows_this_run, summary.rows["ok"]) == (0, 48)  # ... and nothing was rendered


def test_actors_that_load_another_model_than_the_rows_were_compared_against_are_refused(ray_cluster, tmp_path,
                                                                                        make_manifest, monkeypatch):
    manifest = make_manifest(prompt_rows(20), name="m.parquet")
    out = str(tmp_path / "out")
    assert driver.run(job_for(manifest, out)).exit_code == exits.EXIT_OK
    images = image_files(out)
    real = refresh.describe_model

    def another_snapshot(name, **options):  # as if the snapshot changed between describing and loading it
        return dataclasses.replace(real(name, **options), revision="placeholder-0")

    monkeypatch.setattr(refresh, "describe_model", another_snapshot)
    summary = refresh.run(job_for(manifest, out))
    assert summary.exit_code == exits.EXIT_ABORTED and "would not match" in summary.message
    assert summary.rows_this_run == 0 and image_files(out) == images


def test_an_unchanged_refresh_of_a_tiny_nextstep_output_loads_no_model(ray_cluster, tmp_path, make_manifest):
    manifest = make_manifest(prompt_rows(12), name="m.parquet")
    out = str(tmp_path / "out")
    options = {"model": "tiny", "device": "cpu", "params": {"width": 16, "height": 16, "num_sampling_steps": 2},
               "shard_size": 6}
    assert driver.run(job_for(manifest, out, **options)).exit_code == exits.EXIT_OK
    images = image_files(out)
    summary = refresh.run(job_for(manifest, out, **options))
    assert summary.exit_code == exits.EXIT_OK
    assert (summary.actors_started, summary.rows_this_run, summary.rows["ok"]) == (0, 0, 12)
    assert image_files(out) == images
