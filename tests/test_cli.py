"""The command line: options and job files, one-line errors with exit code 2, `ray-render status`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ray_render import cli
from ray_render.engine import summary as exits
from ray_render.output import commits

REPO = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return cli.job_from_args(cli.build_parser().parse_args(["run", *argv]))


def test_every_render_option_reaches_the_job():
    job = parse("m.parquet", "more/*.parquet", "--out", "s3://bucket/out", "--model", "placeholder", "--vae", "v",
                "--revision", "abc", "--preset", "draft", "--width", "32", "--height", "48", "--cfg", "2.5",
                "--cfg-img", "1.5", "--cfg-schedule", "linear", "--no-use-norm", "--shift", "3.2", "--steps", "9",
                "--negative-prompt", "blurry", "--positive-prompt", "sharp", "--num-images", "2", "--format", "jpeg",
                "--quality", "80", "--actors", "3", "--batch-size", "5", "--shard-size", "50", "--max-in-flight", "4",
                "--retries", "1", "--max-failed-fraction", "0.5", "--device", "cpu", "--dtype", "float32",
                "--noise", "reference", "--address", "ray://head:10001", "--storage-options", '{"anon": true}',
                "--limit", "10", "--no-resume", "--overwrite", "--no-progress")
    assert job.manifests == ["m.parquet", "more/*.parquet"] and job.out == "s3://bucket/out"
    assert job.params == {"width": 32, "height": 48, "cfg": 2.5, "cfg_img": 1.5, "cfg_schedule": "linear",
                          "use_norm": False, "timesteps_shift": 3.2, "num_sampling_steps": 9,
                          "negative_prompt": "blurry", "positive_prompt": "sharp", "num_images": 2}
    assert (job.model, job.vae, job.revision, job.preset) == ("placeholder", "v", "abc", "draft")
    assert (job.format, job.quality, job.actors, job.batch_size, job.shard_size, job.max_in_flight) == \
        ("jpeg", 80, 3, 5, 50, 4)
    assert (job.retries, job.max_failed_fraction, job.device, job.dtype, job.noise) == \
        (1, 0.5, "cpu", "float32", "reference")
    assert (job.address, job.storage_options, job.limit) == ("ray://head:10001", {"anon": True}, 10)
    assert (job.resume, job.overwrite, job.progress) == (False, True, False)


def test_defaults_come_from_the_job_settings(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = parse("m.parquet", "--out", "out")
    assert (job.model, job.format, job.batch_size, job.resume, job.params) == ("tiny", "png", 8, True, {})


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "manifests: [from-file.parquet]\nout: file-out\nformat: jpeg\nbatch-size: 3\nwidth: 32\n"
              "presets:\n  tiny-draft: {num_sampling_steps: 4}\npreset: tiny-draft\n"),
    (".toml", 'manifests = ["from-file.parquet"]\nout = "file-out"\nformat = "jpeg"\nbatch_size = 3\nwidth = 32\n'
              'preset = "tiny-draft"\n[presets.tiny-draft]\nnum_sampling_steps = 4\n'),
])
def test_flags_override_the_job_file(tmp_path, suffix, text):
    path = tmp_path / f"job{suffix}"
    path.write_text(text)
    from_file = parse("--config", str(path))
    assert (from_file.manifests, from_file.out, from_file.format, from_file.batch_size) == \
        (["from-file.parquet"], "file-out", "jpeg", 3)
    assert from_file.params == {"width": 32} and from_file.preset == "tiny-draft"
    overridden = parse("--config", str(path), "cli.parquet", "--format", "png", "--width", "48")
    assert (overridden.manifests, overridden.format, overridden.batch_size) == (["cli.parquet"], "png", 3)
    assert overridden.params == {"width": 48}


@pytest.mark.parametrize("argv, expected", [
    (["run", "m.parquet"], "no output given"),
    (["run", "--out", "x"], "no manifest given"),
    (["run", "m.parquet", "--out", "x", "--width", "30"], "multiple of 16"),
    (["run", "m.parquet", "--out", "x", "--batch-size", "0"], "--batch-size"),
    (["run", "m.parquet", "--out", "x", "--storage-options", "{not json"], "--storage-options"),
    (["run", "m.parquet", "--out", "x", "--preset", "nope"], "--preset must be one of"),
    (["run", "--config", "JOB", "--out", "x"], "unknown option(s) colour"),
    (["run", "--config", "BROKEN", "--out", "x"], "not a valid job file"),
    (["run", "--config", "/no/such/job.yaml", "--out", "x"], "/no/such/job.yaml"),
    (["status", "EMPTY"], "no ray-render job here"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    (tmp_path / "job.yaml").write_text("manifests: [m.parquet]\ncolour: red\n")
    (tmp_path / "broken.yaml").write_text("manifests: [m.parquet\n")
    replace = {"JOB": str(tmp_path / "job.yaml"), "BROKEN": str(tmp_path / "broken.yaml"),
               "EMPTY": str(tmp_path / "empty")}
    assert cli.main([replace.get(arg, arg) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ray-render: error:") and expected in err and "\n" not in err, err


def test_argparse_rejects_a_bad_choice_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "m.parquet", "--out", "x", "--format", "gif"])
    assert exit_info.value.code == 2
    assert "--format" in capsys.readouterr().err


def test_python_m_ray_render_is_the_same_program_and_documents_exit_codes():
    result = subprocess.run([sys.executable, "-m", "ray_render", "run", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for code in exits.EXIT_CODES:
        assert f"  {code}  " in result.stdout
    for option in ("--storage-options", "--max-failed-fraction", "--no-resume", "--shift", "--steps", "--config"):
        assert option in result.stdout


# -- running, and `status` -----------------------------------------------------------------------------------------


def test_status_follows_a_running_job_to_its_end(ray_cluster, tmp_path, make_manifest, capsys):
    rows = [{"id": f"r{i}", "prompt": f"a red circle {i} [placeholder:sleep=0.25]"} for i in range(24)]
    rows[3]["width"] = 17
    path = make_manifest(rows)
    out = str(tmp_path / "out")
    outcome = {}
    argv = ["run", path, "--out", out, "--model", "placeholder", "--shard-size", "4", "--no-progress"]
    thread = threading.Thread(target=lambda: outcome.setdefault("code", cli.main(argv)))
    thread.start()
    deadline = time.monotonic() + 60
    while not commits.committed_shard_ids(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    capsys.readouterr()
    assert cli.main(["status", out, "--json"]) == 0
    running = json.loads(capsys.readouterr().out)
    thread.join(120)
    assert running["state"] == "running"
    assert 1 <= running["shards_committed"] < 6 and running["shards_total"] == 6
    assert running["rows_total"] == 24 and running["rows_done"] == 4 * running["shards_committed"]

    assert outcome["code"] == exits.EXIT_ROWS  # row 3 is invalid
    assert cli.main(["status", out]) == 0
    text = capsys.readouterr().out
    assert f"{out}: finished" in text
    assert "6/6 committed" in text and "24/24" in text and "invalid 1" in text
    assert f"exit code {exits.EXIT_ROWS}" in text


def test_log_level_and_verbose(ray_cluster, tmp_path, make_manifest):
    manifest = make_manifest(n=2)
    base = [sys.executable, "-m", "ray_render", "run", manifest, "--model", "placeholder", "--device", "cpu",
            "--address", ray_cluster, "--no-progress"]
    quiet = subprocess.run([*base, "--out", str(tmp_path / "a"), "--log-level", "warning"], capture_output=True,
                           text=True, timeout=300, cwd=REPO)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "starting 1 render actor" not in quiet.stderr and "ray-render: finished" in quiet.stdout
    chatty = subprocess.run([*base, "--out", str(tmp_path / "b"), "-v"], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert chatty.returncode == 0 and "starting 1 render actor" in chatty.stderr
    assert cli.build_parser().parse_args(["--log-level", "error", "status", "x"]).log_level == "error"


def test_a_url_whose_filesystem_is_an_extra_says_which_extra(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ray_render", "run", "gs://bucket/prompts.csv", "--out",
                             str(tmp_path / "out"), "--model", "placeholder"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == exits.EXIT_ABORTED
    assert "pip install 'ray-render[gcs]'" in result.stdout + result.stderr
