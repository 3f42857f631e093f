"""One owner per output root, tried as users run jobs: two real drivers on one root (local and S3), a refresh over a
running job, a frozen driver taken over and fenced, shard copies that do not render bit-exactly, a root that holds
someone else's files, a manifest rewritten in place, storage options that look like paths, and default ids that
repeat across shards."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import summary as exits
from ray_render.output import record
from ray_render.tools import ownership
from ray_render.tools.chaos import check_output

pytestmark = pytest.mark.chaos


def assert_exact(figures, rows: int) -> None:
    """Every row once and ok, nothing lost, no image that does not match its sha256, no stray image."""
    check = figures.details["check"]
    assert (figures.ok, figures.duplicates, figures.lost) == (rows, 0, 0), figures
    assert (check["undecodable"], check["unreferenced_images"], check["outside_root"]) == (0, 0, 0), check


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_driver_on_a_held_output_is_refused_and_a_killed_holder_is_taken_over(ray_cluster, tmp_path, s3,
                                                                                     where):
    if where == "s3":
        figures = ownership.double_submit(str(tmp_path), ray_cluster, root=s3.fresh_url("double"),
                                          storage_options=s3.storage_options)
    else:
        figures = ownership.double_submit(str(tmp_path), ray_cluster)
    details = figures.details
    assert details["second_exit"] == exits.EXIT_ABORTED, details["second_output"]
    assert details["names_holder"] and "is in use by run" in details["second_output"]
    assert "last heartbeat" in details["second_output"] and "choose another --out" in details["second_output"]
    assert details["committed_when_refused"] >= 1
    assert details["rerun_exit"] == exits.EXIT_OK, details["rerun_output"]
    assert "taking over" in details["rerun_output"]  # the killed holder's process is gone: no wait for its ttl
    assert_exact(figures, 48)


def test_a_refresh_over_a_running_job_is_refused(ray_cluster, tmp_path):
    figures = ownership.refresh_during_run(str(tmp_path), ray_cluster)
    details = figures.details
    assert details["refresh_exit"] == exits.EXIT_ABORTED and "is in use by run" in details["refresh_output"]
    assert details["run_exit"] == exits.EXIT_OK, details["run_errors"]
    assert_exact(figures, 36)


def test_a_frozen_driver_is_taken_over_after_its_ttl_and_fenced_when_it_wakes(ray_cluster, tmp_path):
    figures = ownership.takeover_and_fence(str(tmp_path), ray_cluster, ttl_s=3.0)
    details = figures.details
    assert details["early_exit"] == exits.EXIT_ABORTED, details["early_output"]  # its lease was still live
    assert details["taker_exit"] == exits.EXIT_OK, details["taker_output"]
    assert details["zombie_exit"] == exits.EXIT_ABORTED, details["zombie_output"]
    assert "lost its lease" in details["zombie_output"]
    assert details["zombie_entries_after_takeover"] == 0  # nothing it did later became visible
    assert_exact(figures, 48)


def test_copies_that_render_different_bytes_never_overwrite_a_committed_image(ray_cluster, tmp_path):
    figures = ownership.jittered_copies(str(tmp_path))
    assert figures.details["copies"] >= 1
    assert figures.details["summary"]["exit_code"] == exits.EXIT_OK
    assert_exact(figures, 24)


def placeholder_job(manifests, out, **options) -> JobConfig:
    return JobConfig(manifests=list(manifests), out=str(out), model="placeholder", device="cpu", progress=False,
                     report=False, **options)


def test_a_root_with_someone_elses_files_is_refused_and_overwrite_deletes_only_ray_renders(ray_cluster, tmp_path,
                                                                                         make_manifest):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "holiday.png").write_bytes(b"a photo of the user's")
    (out / "metadata").mkdir()
    kept_manifest = out / "metadata" / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a kept manifest"]}), kept_manifest)
    (out / "notes.txt").write_text("the user's notes")
    manifest = make_manifest(n=6)

    refused = driver.run(placeholder_job([manifest], out))
    assert refused.exit_code == exits.EXIT_ABORTED
    assert "holds no ray-render job" in refused.message and "notes.txt" in refused.message
    # A manifest inside the output root is never read as one (its files are ray-render's to replace).
    inside = driver.run(placeholder_job([str(kept_manifest)], out, overwrite=True))
    assert inside.exit_code == exits.EXIT_ABORTED and "is inside the output root" in inside.message

    done = driver.run(placeholder_job([manifest], out, overwrite=True))
    assert done.exit_code == exits.EXIT_OK and done.images == 6
    assert (out / "images" / "holiday.png").read_bytes() == b"a photo of the user's"
    assert pq.read_table(kept_manifest).column("prompt").to_pylist() == ["a kept manifest"]
    assert (out / "notes.txt").read_text() == "the user's notes"

    again = driver.run(placeholder_job([manifest], out, overwrite=True))  # --overwrite on its own output
    assert again.exit_code == exits.EXIT_OK and again.rows_this_run == 6 and again.shards_resumed == 0
    assert (out / "images" / "holiday.png").exists() and kept_manifest.exists() and (out / "notes.txt").exists()
    assert check_output(str(out), [f"r{i}" for i in range(6)], decode=True).unreferenced_images == 1  # holiday.png


def test_overwrite_never_follows_a_symlink_out_of_the_root(ray_cluster, tmp_path, make_manifest):
    out = tmp_path / "out"
    manifest = make_manifest(n=4)
    assert driver.run(placeholder_job([manifest], out)).exit_code == exits.EXIT_OK
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "00000-manifest-0-0000000000").mkdir(parents=True)
    (elsewhere / "00000-manifest-0-0000000000" / "precious.png").write_bytes(b"keep me")
    os.rename(out / "images", tmp_path / "old-images")
    os.symlink(elsewhere, out / "images")
    assert driver.run(placeholder_job([manifest], out, overwrite=True)).exit_code == exits.EXIT_OK
    assert (elsewhere / "00000-manifest-0-0000000000" / "precious.png").read_bytes() == b"keep me"


def test_a_manifest_rewritten_at_the_same_size_is_refused_naming_it(ray_cluster, tmp_path):
    manifest = tmp_path / "m.parquet"

    def write(prompt: str) -> None:
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "prompt": [f"{prompt} {i}" for i in range(8)]}),
                       manifest, compression="none")

    write("a red cube")
    out = tmp_path / "out"
    first = driver.run(placeholder_job([str(manifest)], out, limit=4))  # interrupted, as far as the plan knows
    assert first.exit_code == exits.EXIT_OK
    size = manifest.stat().st_size
    write("a tan cube")  # the same byte size, other prompts
    assert manifest.stat().st_size == size
    refused = driver.run(placeholder_job([str(manifest)], out, limit=4))
    assert refused.exit_code == exits.EXIT_ABORTED
    assert "m.parquet was rewritten since this output was rendered" in refused.message, refused.message
    assert "--overwrite" in refused.message
    rendered = driver.run(placeholder_job([str(manifest)], out, limit=4, overwrite=True))
    assert rendered.exit_code == exits.EXIT_OK and rendered.rows_this_run == 4
    prompts = ds.dataset(str(out / "metadata")).to_table().column("prompt").to_pylist()
    assert sorted(prompts) == [f"a tan cube {i}" for i in range(4)]  # never a mix of the two manifests


def test_a_storage_option_value_in_a_path_leaves_the_record_intact(ray_cluster, s3, make_manifest):
    options = {**s3.storage_options, "client_kwargs": {"region_name": "eu-west-1"}}
    out = s3.fresh_url("renders-eu-west-1")  # the region's name occurs in the output's own path
    manifest = make_manifest(n=6, url=s3.fresh_url("in") + "/m.parquet", storage_options=options)
    job = placeholder_job([manifest], out, storage_options=options)
    assert driver.run(job).exit_code == exits.EXIT_OK
    saved = record.read_job_record(out, options)
    assert saved["settings"]["out"] == out and "eu-west-1" in json.dumps(saved)  # structure never redacted
    assert saved["settings"]["storage_options"] == sorted(options)  # names only: no value is ever written
    assert options["secret"] not in json.dumps(saved)
    again = driver.run(job)
    assert again.exit_code == exits.EXIT_OK and again.shards_resumed == again.shards_total and not again.rows_this_run


@pytest.mark.parametrize("shard_size", [2, 7])
def test_default_ids_that_repeat_across_shards_end_invalid_whatever_the_shard_size(ray_cluster, tmp_path,
                                                                                  make_manifest, shard_size):
    prompts = [f"a blue square {i % 5}" for i in range(15)]  # no id column: each prompt three times, far apart
    manifest = make_manifest({"prompt": prompts})
    out = tmp_path / f"out-{shard_size}"
    summary = driver.run(placeholder_job([manifest], out, shard_size=shard_size))
    assert summary.exit_code == exits.EXIT_ROWS
    assert (summary.rows["ok"], summary.rows["invalid"], summary.images) == (5, 10, 5)
    table = ds.dataset(str(out / "metadata")).to_table().to_pylist()
    ok = [row for row in table if row["status"] == "ok"]
    assert len({row["id"] for row in ok}) == 5 and len({row["sha256"] for row in ok}) == 5
    assert sorted(row["source_row"] for row in ok) == [0, 1, 2, 3, 4]  # the first of each, wherever it landed
    invalid = [row for row in table if row["status"] == "invalid"]
    assert all("its default id" in row["error"] and "repeats row" in row["error"] for row in invalid), invalid[0]
    assert storage.list_names(str(out / "images"))  # images exist, one directory per shard with an ok row
