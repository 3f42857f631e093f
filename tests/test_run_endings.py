"""How runs end: stop signals, a hung actor, crashes that are systematic, failed rows repaired on another actor and
retried with --retry-failed, a broken device retired, exit codes for orchestrators, damaged records, vanished
shards, and passthrough types checked before anything renders. Real Ray, real processes, real signals."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ray_render import cli
from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import plan as planning
from ray_render.engine import summary as exits
from ray_render.output import layout
from ray_render.tools import endings


def rows(n: int, prompt: str = "a red circle", **extra) -> list[dict]:
    return [{"id": f"r{i:03d}", "prompt": f"{prompt} {i}", **extra} for i in range(n)]


def metadata(out: str) -> list[dict]:
    return ds.dataset(os.path.join(out, layout.METADATA_DIR), format="parquet").to_table().to_pylist()


# -- drills: stop signals, a hung actor, systematic crashes, a broken device, --retry-failed --------------------------


@pytest.mark.chaos
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_interrupts_a_local_run_and_blames_no_row(tmp_path, signum):
    """SIGTERM (`ray job stop`, a pod deletion, `timeout`) and SIGINT (Ctrl-C) during a long model call: exit 3
    (in time for `ray job stop`'s 3 s: tests/test_job_submit.py), the summary says interrupted, the local Ray and its
    actors are gone, and the rerun renders the row that was being rendered (it killed nothing: it was stopped)."""
    figures = endings.stop_signal(str(tmp_path), signum, rerun=signum == signal.SIGTERM)
    details = figures.details
    assert details["exit_code"] == exits.EXIT_LOST, details["output"]
    summary = details["summary"]
    assert summary["state"] == "interrupted" and summary["exit_code"] == exits.EXIT_LOST
    assert f"interrupted by {signal.Signals(signum).name}" in summary["message"]
    assert details["ray_processes"] > 0 and details["left_running"] == 0, details
    if signum == signal.SIGTERM:
        assert details["rerun_exit_code"] == exits.EXIT_OK
        assert (figures.ok, figures.duplicates, figures.lost) == (4, 0, 0), figures


@pytest.mark.chaos
def test_a_frozen_actor_costs_its_deadline_not_the_job(ray_cluster, tmp_path):
    figures = endings.hung_actor(str(tmp_path))
    assert figures.details["frozen"] == 1 and figures.details["frozen_left"] == 0, figures
    assert (figures.ok, figures.duplicates, figures.lost) == (8, 0, 0), figures
    summary = figures.details["summary"]
    assert summary["exit_code"] == exits.EXIT_OK
    assert summary["actors_replaced"] + summary["stragglers_reissued"] >= 1


@pytest.mark.chaos
def test_an_actor_that_dies_on_every_call_aborts_the_job_within_8_restarts(ray_cluster, tmp_path):
    """24 rows at --retries 1 used to cost 54 model loads and end 'finished'."""
    summary = endings.systematic_crash(str(tmp_path)).details["summary"]
    assert summary["exit_code"] == exits.EXIT_ABORTED and "systematic" in summary["message"], summary
    assert summary["actors_replaced"] <= 8, summary


@pytest.mark.chaos
def test_a_broken_device_is_retired_and_its_failed_rows_repaired_on_another_actor(ray_cluster, tmp_path):
    figures = endings.broken_device(str(tmp_path))
    assert (figures.ok, figures.duplicates, figures.lost) == (48, 0, 0), figures
    assert figures.details["check"]["unreferenced_images"] == 0
    summary = figures.details["summary"]
    assert summary["exit_code"] == exits.EXIT_OK
    assert summary["actors_retired"] == 1 and summary["rows_repaired"] >= 4, summary


@pytest.mark.chaos
def test_retry_failed_renders_the_failed_rows_of_committed_shards_exactly_once(ray_cluster, tmp_path):
    figures = endings.retry_failed(str(tmp_path))
    first, again, third = figures.details["summaries"]
    # One actor on the broken device: nowhere to repair, every valid row fails.
    assert first["exit_code"] == exits.EXIT_ROWS and first["rows"] == {"ok": 0, "invalid": 1, "failed": 12}
    assert again["exit_code"] == exits.EXIT_ROWS  # the invalid row stays invalid
    assert again["rows"] == {"ok": 12, "invalid": 1, "failed": 0} and again["images"] == 12
    assert again["rows_this_run"] == 12 and again["rows_repaired"] == 12
    assert third["rows_this_run"] == 0 and third["rows"] == again["rows"]  # nothing failed is left to render
    assert (figures.ok, figures.duplicates, figures.lost) == (12, 0, 0), figures
    assert figures.details["check"]["unreferenced_images"] == 0


@pytest.mark.chaos
@pytest.mark.cluster
def test_a_node_lost_mid_run_loses_and_duplicates_nothing_and_blames_no_row(tmp_path):
    """A preempted GPU machine: its actor is unreachable at once, Ray declares the node dead seconds later. The
    calls it held are retried as lost with their node (not the rows' doing: no row is rendered alone as a suspect);
    a replacement node joins while the job runs."""
    figures = endings.node_loss(str(tmp_path))
    details, summary = figures.details, figures.details["summary"]
    assert details["exit_code"] == exits.EXIT_OK, summary
    assert (figures.ok, figures.duplicates, figures.lost, figures.sha_mismatches) == (figures.rows, 0, 0, 0), figures
    assert details["check"]["unreferenced_images"] == 0
    assert summary["node_losses"] >= 1 and summary["rows_suspected"] == 0, summary
    assert summary["actors_replaced"] >= 1 and summary["actors_peak"] == 3



# -- exit codes for orchestrators -------------------------------------------------------------------------------------


def test_the_job_entrypoint_exits_0_for_failed_rows_unless_strict(ray_cluster, tmp_path, make_manifest):
    manifest = make_manifest(rows(3) + [{"id": "bad", "prompt": "too small", "width": 17}])
    argv = [manifest, "--model", "placeholder", "--device", "cpu", "--no-progress"]
    assert cli.job_entrypoint("run", [*argv, "--out", str(tmp_path / "a")]) == exits.EXIT_OK
    assert cli.job_entrypoint("run", [*argv, "--out", str(tmp_path / "b"), "--strict"]) == exits.EXIT_ROWS
    assert cli.main(["run", *argv, "--out", str(tmp_path / "c")]) == exits.EXIT_ROWS


def test_a_damaged_job_record_aborts_with_its_name_and_no_traceback(tmp_path, make_manifest, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / layout.JOB_RECORD).write_text('{"run_id": "abc", "settings": {')  # cut short
    code = cli.main(["run", make_manifest(rows(2)), "--out", str(out), "--model", "placeholder", "--no-progress"])
    printed = capsys.readouterr()
    assert code == exits.EXIT_ABORTED
    assert "_job.json is damaged" in printed.out and "Traceback" not in printed.out + printed.err


def test_a_shard_deleted_under_a_running_job_is_an_error_and_the_rerun_renders_it(ray_cluster, tmp_path,
                                                                                  make_manifest):
    out = str(tmp_path / "out")
    job = JobConfig(manifests=[make_manifest(rows(8, "a circle [placeholder:sleep=0.4]"))], out=out,
                    model="placeholder", device="cpu", actors=1, shard_size=2, max_in_flight=1, progress=False)
    first_shard = planning.plan(job.manifests, job.shard_size).shards[0].shard_id
    deleted = []

    def delete_first_commit() -> None:  # something else cleaning the bucket while the job runs
        deadline = time.monotonic() + 120
        published = os.path.join(out, layout.METADATA_DIR, f"{first_shard}.parquet")
        while time.monotonic() < deadline and not deleted:
            if os.path.exists(published):
                for path in [published, *glob.glob(os.path.join(out, layout.ATTEMPTS_DIR, first_shard, "*"))]:
                    os.unlink(path)
                deleted.append(first_shard)
            time.sleep(0.02)

    thread = threading.Thread(target=delete_first_commit, daemon=True)
    thread.start()
    summary = driver.run(job)
    thread.join(5)
    assert deleted, os.listdir(os.path.join(out, layout.METADATA_DIR))
    assert summary.exit_code == exits.EXIT_ABORTED and first_shard in summary.message, summary.format()

    again = driver.run(job)  # the commit whose files are gone is void: the shard renders again
    assert again.exit_code == exits.EXIT_OK and again.rows_this_run == 2, again.format()
    assert sorted(row["id"] for row in metadata(out)) == [f"r{i:03d}" for i in range(8)]


# -- passthrough types ------------------------------------------------------------------------------------------------


def test_passthrough_types_the_metadata_cannot_hold_abort_before_rendering(tmp_path):
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "count": pa.array([2**63 + 5], pa.uint64())}), big)
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"prompt": ["b"], "count": pa.array([-1], pa.int64())}), small)
    job = JobConfig(manifests=[str(big), str(small)], out=str(tmp_path / "out"), model="placeholder", progress=False)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_ABORTED
    assert "'count'" in summary.message and "uint64" in summary.message and "small.parquet" in summary.message
    assert not (tmp_path / "out").exists()  # refused at planning: nothing written, no Ray started


def test_nanosecond_timestamps_pass_through_unchanged(ray_cluster, tmp_path):
    stamps = pa.array([1_700_000_000_123_456_789, 5], pa.timestamp("ns", tz="UTC"))  # sub-microsecond parts
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["one", "two"], "taken_at": stamps}), manifest)
    job = JobConfig(manifests=[str(manifest)], out=str(tmp_path / "out"), model="placeholder", device="cpu",
                    progress=False)
    assert driver.run(job).exit_code == exits.EXIT_OK
    table = ds.dataset(str(tmp_path / "out" / "metadata")).to_table().sort_by("id")
    assert table.schema.field("taken_at").type == pa.timestamp("ns", tz="UTC")
    assert table.column("taken_at").cast(pa.int64()).to_pylist() == [1_700_000_000_123_456_789, 5]
