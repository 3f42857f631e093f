"""driver.run end to end on a real local Ray with declared GPUs: exit codes, resume, refusal, S3, the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from conftest import image_files

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import summary as exits
from ray_render.output import commits, record, status

REPO = Path(__file__).resolve().parents[1]


def rows_of(out: str, storage_options: dict | None = None) -> list[dict]:
    fs, path = storage.open_fs(storage.join(out, "metadata"), storage_options)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def job_for(manifest: str, out: str, **options) -> JobConfig:
    return JobConfig(manifests=[manifest], out=out, **{"model": "placeholder", "progress": False, **options})


def test_bad_rows_end_invalid_with_messages_and_the_rest_render(ray_cluster, tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a red circle {i}"} for i in range(10)]
    rows[2]["cfg"] = 0.5
    rows[4]["prompt"] = "   "
    rows[6]["id"] = "../escape"
    rows[8]["prompt"] = "a red circle [placeholder:raise]"
    job = job_for(make_manifest(rows), str(tmp_path / "out"), shard_size=4, retries=1)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_ROWS
    assert summary.rows == {"ok": 6, "invalid": 3, "failed": 1} and summary.images == 6
    table = rows_of(job.out)
    assert len(table) == 10
    errors = {row["source_row"]: row["error"] for row in table if row["status"] != "ok"}
    assert "column 'cfg'" in errors[2] and "from 1 to 100" in errors[2]
    assert "column 'prompt'" in errors[4]
    assert "column 'id'" in errors[6]
    assert "placeholder:raise" in errors[8]
    saved = record.read_summary(job.out)
    assert saved["exit_code"] == exits.EXIT_ROWS and saved["rows"]["invalid"] == 3
    job_record = record.read_job_record(job.out)
    assert job_record["plan_fingerprint"] and job_record["model"]["revision"] == "placeholder-1"


def test_all_ok_exits_0_and_a_rerun_renders_nothing(ray_cluster, tmp_path, make_manifest):
    job = job_for(make_manifest(n=12), str(tmp_path / "out"), shard_size=5, params={"num_images": 2})
    first = driver.run(job)
    assert first.exit_code == exits.EXIT_OK and first.images == 24 and first.shards_committed == 3
    assert not (tmp_path / "out" / "_journal").exists()  # every shard committed: no journal left, nor its directory
    markers = {shard_id: (info["seq"], info["attempt"]) for shard_id, info in commits.list_commits(job.out).items()}
    # What a losing straggler copy can leave when it writes its journal after the winner committed:
    stale = tmp_path / "out" / "_journal" / next(iter(markers)) / "0123456789ab-7.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"rendering": ["r0"]}')
    again = driver.run(job)
    assert again.exit_code == exits.EXIT_OK
    assert (again.shards_resumed, again.rows_this_run, again.images) == (3, 0, 24)
    assert markers == {shard_id: (info["seq"], info["attempt"])
                       for shard_id, info in commits.list_commits(job.out).items()}  # nothing committed again
    assert not (tmp_path / "out" / "_journal").exists()


def test_error_budget_aborts_the_job(ray_cluster, tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"row {i}" + (" [placeholder:raise]" if i % 3 == 0 else "")}
            for i in range(400)]
    job = job_for(make_manifest(rows), str(tmp_path / "out"), shard_size=20, retries=0, max_failed_fraction=0.1,
                  batch_size=4)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_ABORTED
    assert "--max-failed-fraction" in summary.message
    assert summary.rows_this_run < 400  # stopped early
    committed = commits.committed_shard_ids(job.out)
    assert {row["id"] for row in rows_of(job.out)} == {
        f"r{i}" for shard in committed for i in range(int(shard[-10:]), int(shard[-10:]) + 20)}


def test_rerun_with_another_plan_or_settings_is_refused_unless_overwrite(ray_cluster, tmp_path, make_manifest):
    out = str(tmp_path / "out")
    assert driver.run(job_for(make_manifest(n=6, name="a.parquet"), out)).exit_code == exits.EXIT_OK
    before = record.read_job_record(out)

    other_plan = driver.run(job_for(make_manifest(n=7, name="b.parquet"), out))
    assert other_plan.exit_code == exits.EXIT_ABORTED
    assert "holds another job" in other_plan.message and "--overwrite" in other_plan.message
    other_settings = driver.run(job_for(str(tmp_path / "manifests" / "a.parquet"), out, format="jpeg"))
    assert other_settings.exit_code == exits.EXIT_ABORTED and "format" in other_settings.message
    assert record.read_job_record(out) == before  # a refused run leaves the output alone
    assert len(rows_of(out)) == 6

    replaced = driver.run(job_for(str(tmp_path / "manifests" / "b.parquet"), out, overwrite=True))
    assert replaced.exit_code == exits.EXIT_OK
    assert sorted(row["id"] for row in rows_of(out)) == sorted(f"r{i}" for i in range(7))


def test_an_output_recorded_before_a_setting_existed_resumes_at_its_default(ray_cluster, tmp_path, make_manifest):
    out = str(tmp_path / "out")
    manifest = make_manifest(n=6, name="a.parquet")
    assert driver.run(job_for(manifest, out)).exit_code == exits.EXIT_OK
    # As an older ray-render wrote it: no `compile` setting, so another settings fingerprint.
    job_file = os.path.join(out, "_job.json")
    with open(job_file) as handle:
        old = json.load(handle)
    del old["settings"]["compile"]
    old["settings_fingerprint"] = "0" * 64
    with open(job_file, "w") as handle:
        json.dump(old, handle)
    resumed = driver.run(job_for(manifest, out))
    assert resumed.exit_code == exits.EXIT_OK and resumed.rows_this_run == 0  # every shard resumed
    other = driver.run(job_for(manifest, out, compile="on"))
    assert other.exit_code == exits.EXIT_ABORTED and "compile" in other.message


def test_unreadable_manifest_aborts_before_any_work(ray_cluster, tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    summary = driver.run(job_for(str(tmp_path / "bad.parquet"), str(tmp_path / "out")))
    assert summary.exit_code == exits.EXIT_ABORTED and "bad.parquet" in summary.message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_driver_killed_then_rerun_renders_only_uncommitted_shards(ray_cluster, tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"a red circle {i} [placeholder:sleep=0.15]"} for i in range(40)]
    path = make_manifest(rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ray_render", "run", path, "--out", str(out), "--model", "placeholder",
               "--shard-size", "4", "--batch-size", "2", "--address", ray_cluster, "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if len(commits.committed_shard_ids(str(out))) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Only the driver commits: once it is dead its actors (alive until Ray notices) can write, never commit.
    markers = {shard_id: (info["seq"], info["attempt"]) for shard_id, info in commits.list_commits(str(out)).items()}
    done_before = set(markers)
    assert 3 <= len(done_before) < 10, done_before

    rerun = subprocess.run(command + ["--config", str(_write(tmp_path / "job.yaml", "retries: 2\n"))], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = record.read_summary(str(out))
    assert summary["shards_resumed"] == len(done_before)
    assert summary["rows_this_run"] == 40 - 4 * len(done_before)
    after = commits.list_commits(str(out))
    assert {shard: (after[shard]["seq"], after[shard]["attempt"]) for shard in done_before} == markers
    ids = [row["id"] for row in rows_of(str(out))]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))  # exactly once
    stored = image_files(out)
    assert stored == sorted(f"r{i}_0.png" for i in range(40))  # no image of an uncommitted attempt is left


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_s3_manifest_and_output(ray_cluster, s3, make_manifest):
    so = s3.storage_options
    manifest_url = make_manifest([{"id": f"s{i}", "prompt": f"a blue square {i}", "tag": i} for i in range(9)],
                                 url=s3.fresh_url("manifests") + "/m.parquet", storage_options=so)
    out = s3.fresh_url("out")
    summary = driver.run(job_for(manifest_url, out, shard_size=4, storage_options=so))
    assert summary.exit_code == exits.EXIT_OK, summary.format()
    table = rows_of(out, so)
    assert sorted(row["tag"] for row in table) == list(range(9))
    assert all(row["image_uri"].startswith("s3://") for row in table)
    assert storage.read_bytes(table[0]["image_uri"], so)[:4] == b"\x89PNG"
    report = status.job_status(out, so)
    assert (report["state"], report["shards_committed"], report["rows_done"]) == ("finished", 3, 9)
    # The credentials reached the actors as arguments, and nothing written holds them.
    fs, root = storage.open_fs(out, so)
    for path in fs.find(root):
        if path.endswith((".json", ".parquet")):
            data = fs.cat_file(path)
            assert so["secret"].encode() not in data and so["key"].encode() not in data, path


@pytest.mark.slow
def test_tiny_nextstep_end_to_end(ray_cluster, tmp_path):
    job = JobConfig(manifests=[str(REPO / "jobs" / "examples" / "prompts.parquet")], out=str(tmp_path / "out"),
                    model="tiny", device="cpu", actors=1, shard_size=8, batch_size=4, progress=False)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_OK, summary.format()
    assert summary.model["family"] == "nextstep"
    table = rows_of(job.out)
    assert len(table) == 17  # 16 rows, one of them with two images
    assert {row["model"] for row in table} == {"tiny"}
    assert len({row["sha256"] for row in table}) == 17
    job_record = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job_record["model"]["family"] == "nextstep" and job_record["summary"]["images"] == 17
