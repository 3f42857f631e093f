"""`ray-render doctor` on this machine for real: the report's shape, exit 0 when all is well, non-zero naming what
is not, an output root on the moto S3 server, credentials never printed."""

from __future__ import annotations

import json
import subprocess
import sys

from ray_render.__main__ import main as program
from ray_render.tools import doctor


def run_doctor(capsys, *argv: str) -> tuple[int, str]:
    code = program(["doctor", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def by_name(report: dict) -> dict:
    return {check["name"]: check for check in report["checks"]}


def test_healthy_machine_exits_0_with_every_check_in_the_json(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, text = run_doctor(capsys, "--json")
    report = json.loads(text)
    assert code == 0 and report["ok"] is True
    checks = by_name(report)
    assert list(checks) == ["python", *doctor.PACKAGES, "cuda", "rope", "cluster", "output", "model"]
    assert all(set(c) == {"name", "status", "detail", "data"} and c["status"] in doctor.STATUSES
               for c in report["checks"])
    # The installed stack is inside the ranges pyproject.toml declares, and the embedded model passes the RoPE
    # self-check in both precisions.
    assert checks["transformers"]["status"] == "ok" and "<6" in checks["transformers"]["data"]["tested"]
    assert checks["rope"]["status"] == "ok" and "cpu float32 bf16" in checks["rope"]["data"]["loaded"]
    assert 4 < checks["rope"]["data"]["bf16_phase_drift_rad_at_4196"] < 6  # the official bf16 drift, ~4.9 rad
    assert [checks[name]["status"] for name in ("cluster", "output", "model")] == ["skip", "skip", "skip"]


def test_output_root_and_model_are_checked_and_credentials_never_printed(s3, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    options = json.dumps(s3.storage_options)
    code, text = run_doctor(capsys, "--out", s3.fresh_url("doctor"), "--model", "tiny", "--storage-options", options)
    assert code == 0, text
    assert "ok    output" in text and "write, list, read back and delete work" in text and "all checks passed" in text
    assert "ok    model" in text and "NextStep-1" in text
    # A bucket that does not exist: exit 1, the report names the output root and what failed.
    code = program(["doctor", "--json", "--out", "s3://no-such-bucket-here/out", "--storage-options", options])
    captured = capsys.readouterr()  # stdout: the report; stderr: the warning about credentials on a command line
    report, bad = json.loads(captured.out), captured.out + captured.err
    assert "--storage-options holds credentials on the command line" in captured.err
    assert code == 1 and report["ok"] is False
    output = by_name(report)["output"]
    assert output["status"] == "fail" and "s3://no-such-bucket-here/out: cannot write" in output["detail"]
    for secret in (s3.storage_options["key"], s3.storage_options["secret"]):
        assert secret not in text and secret not in bad


def test_failures_are_named_in_the_text_report(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setattr(doctor, "_tested_ranges", lambda: {"torch": ">=99"})  # as if torch were too old
    code, text = run_doctor(capsys, "--out", str(tmp_path / "a-file" / "out"), "--model", str(tmp_path / "none"))
    assert code == 1
    last = text.strip().splitlines()[-1]
    assert last.startswith("3 failed: ") and "torch (" in last and "output (" in last and "model (" in last
    assert "is outside the tested range >=99; pip install 'torch>=99'" in text
    assert "cannot write (NotADirectoryError" in text


def test_command_line_stays_free_of_torch_until_doctor_runs():
    code = ("import sys; from ray_render import cli; from ray_render.tools import commands; "
            "cli.build_parser(cli.SUBCOMMANDS + commands.SUBCOMMANDS).parse_args(['doctor', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_local_ray_is_started_checked_and_shut_down(monkeypatch):
    # In its own process, as a user runs it: the Ray it starts must not outlive the command.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    done = subprocess.run([sys.executable, "-m", "ray_render", "doctor", "--json", "--local-ray"],
                          capture_output=True, text=True, timeout=180, check=False)
    ray_check = by_name(json.loads(done.stdout))["cluster"]
    assert done.returncode == 0, done.stderr
    assert ray_check["status"] == "ok" and ray_check["data"]["nodes"] == 1 and ray_check["data"]["cpus"] == 1
