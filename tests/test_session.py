"""The run lifecycle's outcomes: every way a run can end becomes a state and an exit code, and the wind-down writes
the summary only into an output the run claimed."""

from __future__ import annotations

import json

import pytest
import ray

from ray_render.config import ConfigError, JobConfig
from ray_render.engine import summary as exits
from ray_render.engine.plan import ManifestError
from ray_render.engine.session import JobAborted, JobLost, RunSession, is_ray_error
from ray_render.models.base import RowError
from ray_render.output import record


def ended(tmp_path, exc: BaseException) -> RunSession:
    job = JobConfig(manifests=["m.parquet"], out=str(tmp_path / "out"), model="placeholder", progress=False)
    with RunSession(job) as session:
        raise exc
    return session


@pytest.mark.parametrize("exc,state,code", [
    (ConfigError("--batch-size must be >= 1"), "aborted", exits.EXIT_ABORTED),
    (ManifestError("manifest m.parquet: no 'prompt' column"), "aborted", exits.EXIT_ABORTED),
    (JobAborted("the error budget is spent"), "aborted", exits.EXIT_ABORTED),
    (KeyboardInterrupt(), "interrupted", exits.EXIT_LOST),
    (JobLost("no render actor for 1800 s"), "interrupted", exits.EXIT_LOST),
    (ray.exceptions.RaySystemError("the GCS went away"), "interrupted", exits.EXIT_LOST),
    (ConnectionError("connection refused"), "interrupted", exits.EXIT_LOST),
    # An exception of ray_render's own (its module starts with "ray" too) is a bug here, not a lost cluster.
    (RowError("a bug let a row error escape"), "failed", exits.EXIT_INTERNAL),
    (KeyError("boom"), "failed", exits.EXIT_INTERNAL),
])
def test_every_ending_has_its_state_and_exit_code(tmp_path, exc, state, code):
    session = ended(tmp_path, exc)
    assert (session.summary.state, session.summary.exit_code) == (state, code)
    if state == "failed":
        assert session.summary.message.startswith(f"internal error: {type(exc).__name__}")
        assert "\n" not in session.summary.message


def test_ray_errors_are_told_apart_from_ray_renders_own():
    assert is_ray_error(ray.exceptions.RayActorError())
    assert is_ray_error(ConnectionResetError())
    assert not is_ray_error(RowError("x"))
    assert not is_ray_error(JobAborted("x"))


def test_system_exit_is_not_swallowed(tmp_path):
    with pytest.raises(SystemExit):
        ended(tmp_path, SystemExit(3))


def test_a_run_that_never_claimed_the_output_writes_nothing_there(tmp_path):
    session = ended(tmp_path, ManifestError("manifest m.parquet: no such file"))
    assert not (tmp_path / "out").exists()
    assert session.summary.wall_s > 0 and session.summary.finished_at


def test_a_claimed_output_gets_the_summary_even_when_the_run_fails(tmp_path):
    job = JobConfig(manifests=["m.parquet"], out=str(tmp_path / "out"), model="placeholder", progress=False,
                    report=False)
    with RunSession(job) as session:
        session.acquire_output()
        session.claim_output({"run_id": session.summary.run_id})
        raise KeyError("boom")
    saved = record.read_summary(job.out)
    assert saved["state"] == "failed" and saved["exit_code"] == exits.EXIT_INTERNAL
    assert record.read_job_record(job.out)["summary"]["run_id"] == session.summary.run_id
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["message"].startswith("internal error")
