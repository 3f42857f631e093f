"""`ray-render bench --quick`: every suite runs on tiny sizes and leaves the fields the README and BENCHMARKS.md
quote, in its own JSON file and in summary.json. Timings are not asserted: speed is measured by the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_render.__main__ import main as program
from ray_render.tools import bench

REPO = Path(__file__).resolve().parents[1]

CONTENDER_FIELDS = {"rows", "images", "wall_s", "rows_per_s", "peak_rss_mib", "process_s", "rows_ok"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("bench-out"), tmp_path_factory.mktemp("work")
    (work / "model-loop-1-out").mkdir()  # a leftover of an earlier bench in the same work directory
    # Its own process: the bench starts and stops local Rays of its own, which must not meet the session's.
    result = subprocess.run([sys.executable, "-m", "ray_render", "bench", "--quick", "--out", str(out), "--work-dir",
                             str(work)], capture_output=True, text=True, timeout=900, cwd=REPO)
    print(result.stdout[-4000:], result.stderr[-4000:])
    return result.returncode, out, work


def test_quick_run_writes_every_cpu_suite_and_a_summary(quick_run):
    code, out, work = quick_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["suites"]) == set(bench.CPU_SUITES)
    assert summary["machine"]["cpus"] >= 1 and summary["date"] and summary["command"].startswith("ray-render")
    for name in bench.CPU_SUITES:
        result = json.loads((out / f"{name}.json").read_text())
        assert result == summary["suites"][name]
        assert "error" not in result, result.get("error")
        assert result["goal"] == bench.GOALS[name] and isinstance(result["goal_met"], bool)
    # Outputs go when the bench is over (not between timed runs); the manifests stay for the next bench.
    assert [p.name for p in work.iterdir() if p.is_dir()] == []
    assert {p.suffix for p in work.iterdir()} == {".parquet", ".json", ".log"}  # manifests; each run's spec and log


@pytest.mark.parametrize("name", ["orchestration", "model"])
def test_comparisons_have_every_contender_and_the_ratios(quick_run, name):
    result = json.loads((quick_run[1] / f"{name}.json").read_text())
    rows = result["params"]["rows"]
    assert set(result["contenders"]) == {"ray-render", "ray-data", "loop"}
    for contender, figures in result["contenders"].items():
        assert CONTENDER_FIELDS <= set(figures), contender
        assert figures["rows"] == rows and figures["rows_ok"] == rows and figures["images"] == rows
    assert set(result["ratios"]) == {"ray-render/ray-data", "ray-render/loop"}
    assert all(ratio > 0 for ratio in result["ratios"].values())
    assert result["contenders"]["ray-render"]["own_ray"] is False  # the Ray the bench started for the suite


def test_driver_scale_reports_rss_of_both_runs_and_planning_time(quick_run):
    result = json.loads((quick_run[1] / "driver_scale.json").read_text())
    base, large = result["runs"]["base"], result["runs"]["large"]
    assert (base["rows"], large["rows"]) == (bench.QUICK["driver_scale"]["base_rows"],
                                             bench.QUICK["driver_scale"]["rows"])
    assert large["shards"] == 10 * base["shards"]
    for run in (base, large):
        assert run["peak_rss_mib"] > 0 and run["plan_s"] >= 0 and run["plan_s_source"] == "driver summary"
    assert result["ratios"]["peak_rss large/base"] == pytest.approx(large["peak_rss_mib"] / base["peak_rss_mib"],
                                                                    abs=1e-3)


def test_resume_rerun_renders_nothing_and_starts_no_ray(quick_run):
    result = json.loads((quick_run[1] / "resume.json").read_text())
    assert result["first"]["rows_this_run"] == result["params"]["rows"]
    assert result["rerun"]["rows_this_run"] == 0
    assert result["rerun"]["shards_resumed"] == result["first"]["shards_total"]
    assert result["rerun_started_ray"] is False
    assert 0 < result["ratios"]["rerun/first wall"] < 1


def test_actor_reports_every_batch_size(quick_run):
    result = json.loads((quick_run[1] / "actor.json").read_text())
    assert [r["batch_size"] for r in result["results"]] == list(bench.ACTOR_BATCH_SIZES)
    for r in result["results"]:
        assert r["images"] >= r["batch_size"] and r["images_per_s"] > 0 and r["bare_images_per_s"] > 0
        assert 0 < r["model_share"] <= 1


def test_gpu_suite_runs_only_with_cuda_and_says_so(tmp_path):
    import torch

    result = bench.suite_gpu(tmp_path, bench.QUICK["gpu"])
    assert result["skipped"] is (not torch.cuda.is_available())
    if result["skipped"]:
        assert "CUDA" in result["reason"]
        assert "SKIPPED" in bench.format_suite("gpu", result)
    else:
        assert [r["batch_size"] for r in result["results"]] == list(bench.GPU_BATCH_SIZES)


def test_unknown_suite_is_a_clear_error(tmp_path, capsys):
    assert program(["bench", "--suite", "orchestration,nope", "--out", str(tmp_path)]) == 2
    assert "--suite must be" in capsys.readouterr().err


def test_decode_compares_eager_and_compiled_on_the_same_images(quick_run):
    result = json.loads((quick_run[1] / "decode.json").read_text())
    eager, compiled = result["eager"], result["compiled"]
    for figures in (eager, compiled):
        assert figures["ms_per_token_step"] > 0 and figures["s_per_image"] > 0 and figures["tokens"] == 4
    # The compiled step runs its arithmetic in generated code: far fewer calls into torch's dispatcher.
    assert 0 < compiled["ops_per_token_step"] < eager["ops_per_token_step"] / 2
    assert compiled["first_call_s"] > eager["first_call_s"]  # the compile, once
    assert result["image_diff"]["p99"] <= 2 and set(result["ratios"]) == {"token step", "per image"}


def test_tail_compares_default_shard_sizes_with_fixed_ones(quick_run):
    result = json.loads((quick_run[1] / "tail.json").read_text())
    contenders = result["contenders"]
    assert set(contenders) == {"default", "fixed-1000"}
    assert contenders["fixed-1000"]["shards_total"] == 1  # the quick run's rows fit one fixed shard
    assert contenders["default"]["shards_total"] > result["params"]["actors"]  # several shards per actor
    for figures in contenders.values():
        assert figures["rows_ok"] == result["params"]["rows"] and 0 < figures["efficiency"] <= 1.0
        assert figures["ready_spread_s"] >= 0  # the table says how long the actors took to become ready
        # The job as a user runs it on one machine: its own Ray, Ray's worker niceness (the others share one).
        assert figures["own_ray"] and figures["worker_niceness"] != bench.WORKER_NICENESS
    assert result["ratios"]["efficiency default"] == contenders["default"]["efficiency"]
