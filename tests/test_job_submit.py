"""`ray job submit ... -- python jobs/render.py`: a job on a real local Ray head, as a user would run it.

The test starts its own head (own temp dir and ports), submits the example job with a small working dir, waits for
SUCCEEDED, checks the output and the actors' metrics on the node's Prometheus endpoint, and stops only the
processes of that head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from ray_render.output import record

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cluster_processes(temp_dir: str):
    """The head's processes (their command lines name its temp dir) and everything they started."""
    psutil = pytest.importorskip("psutil")
    roots = [p for p in psutil.process_iter(["cmdline"])
             if temp_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
    found = {p.pid: p for p in roots}
    for process in roots:
        try:
            found.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def stop_cluster(temp_dir: str) -> None:
    psutil = pytest.importorskip("psutil")
    processes = cluster_processes(temp_dir)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def head():
    # A short temp dir: Ray's unix socket paths must stay under about 100 characters.
    temp_dir = tempfile.mkdtemp(prefix="rr-head-", dir="/tmp")
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                                            "object-manager-port")}
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_metrics_report_interval_ms": "500"}  # export actor metrics quickly: the job is short
    env.pop("RAY_ADDRESS", None)
    command = [str(BIN / "ray"), "start", "--head", "--num-cpus=2", "--num-gpus=2", f"--temp-dir={temp_dir}",
               "--dashboard-host=127.0.0.1", "--disable-usage-stats", "--include-dashboard=true",
               *[f"--{name}={port}" for name, port in ports.items()]]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        plain = re.sub(r"\x1b\[[0-9;]*m", "", started.stdout + started.stderr)
        node_ip = re.search(r"Local node IP: ([0-9.]+)", plain).group(1)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}", "node_ip": node_ip,
               "metrics": f"http://{node_ip}:{ports['metrics-export-port']}/metrics"}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def small_working_dir(tmp_path: Path) -> Path:
    """The package and the job files only: what a job needs, without .venv, caches or outputs."""
    work = tmp_path / "work"
    shutil.copytree(REPO / "ray_render", work / "ray_render", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "jobs" / "examples").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "render.py", work / "jobs" / "render.py")
    for name in ("render.yaml", "prompts.parquet"):
        shutil.copy(REPO / "jobs" / "examples" / name, work / "jobs" / "examples" / name)
    return work


def test_ray_job_submit_renders_the_example_job(head, tmp_path):
    out = tmp_path / "out"
    work = small_working_dir(tmp_path)
    submit = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(work), "--",
              "python", "jobs/render.py", "--config", "jobs/examples/render.yaml", "--model", "placeholder",
              "--out", str(out)]
    result = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=300)
    logs = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0 and re.search(r"Job '[^']+' succeeded", result.stdout), logs

    table = ds.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()
    assert len(table) == 17 and {row["status"] for row in table} == {"ok"}  # 16 rows, one with two images
    summary = record.read_summary(str(out))
    assert summary["exit_code"] == 0 and summary["shards_committed"] == 4
    assert all("/gpu" in row["worker"] for row in table)  # the head's declared GPUs: GPU actors

    # The actors' counters reach the node's metrics endpoint, which the dashboard's Prometheus scrapes, under their
    # Prometheus names (README: Metrics).
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline and not ('status="ok"' in text and "ray_render_render_seconds_bucket" in text):
        with urllib.request.urlopen(head["metrics"], timeout=10) as response:
            text = "\n".join(line for line in response.read().decode().splitlines() if "render_" in line)
        time.sleep(1)
    assert re.search(r'^ray_render_rows_total\{.*status="ok"', text, re.M), text[-2000:]
    assert "ray_render_render_seconds_bucket" in text and "ray_ray_render" not in text


def test_a_failing_job_shows_as_failed(head, tmp_path):
    work = small_working_dir(tmp_path)
    submit = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(work), "--",
              "python", "jobs/render.py", "jobs/examples/no-such.parquet", "--model", "placeholder",
              "--out", str(tmp_path / "out")]
    result = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "no-such.parquet" in result.stdout + result.stderr


def test_a_resubmission_from_an_edited_working_dir_resumes(head, tmp_path):
    """`ray job submit --working-dir` unpacks the directory under a new path for every edit of it: the plan names
    the manifests by their paths relative to it and by their content, so the resubmitted job resumes."""
    out = tmp_path / "out"
    work = small_working_dir(tmp_path)
    submit = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir", str(work), "--",
              "python", "jobs/render.py", "--config", "jobs/examples/render.yaml", "--model", "placeholder",
              "--out", str(out)]
    first = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (work / "NOTES.txt").write_text("an edit of the working dir: a new unpack path for the next submission")
    again = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = record.read_summary(str(out))
    assert summary["shards_resumed"] == summary["shards_total"] == 4 and summary["rows_this_run"] == 0
    files = record.read_job_record(str(out))["files"]
    assert [entry["name"] for entry in files] == ["jobs/examples/prompts.parquet"]  # as given, not where unpacked
    assert files[0]["content"].startswith("sha256:")


def test_ray_job_stop_ends_the_job_interrupted_with_its_actors_stopped(head, tmp_path):
    """`ray job stop` sends the driver SIGTERM and SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S (3 s) later: the wind-down
    fits in that, so the summary says interrupted (exit 3) and no render actor outlives the job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    work = small_working_dir(tmp_path)
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(8)],
                             "prompt": [f"slow {i} [placeholder:sleep=2]" for i in range(8)]}),
                   work / "jobs" / "examples" / "slow.parquet")
    submission = f"stop-{os.getpid()}-{int(time.time())}"
    ray = str(BIN / "ray")
    submit = [ray, "job", "submit", "--address", head["dashboard"], "--working-dir", str(work), "--submission-id",
              submission, "--no-wait", "--", "python", "jobs/render.py", "jobs/examples/slow.parquet", "--model",
              "placeholder", "--shard-size", "1", "--no-progress", "--out", str(out)]
    started = subprocess.run(submit, env=head["env"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any((out / "metadata").glob("*.parquet")):
        time.sleep(0.2)
    assert any((out / "metadata").glob("*.parquet")), "no shard committed"

    stop = subprocess.run([ray, "job", "stop", "--address", head["dashboard"], submission], env=head["env"],
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout[-3000:] + stop.stderr[-3000:]
    summary = None
    while time.monotonic() < deadline and (summary is None or summary.get("state") == "running"):
        summary = record.read_summary(str(out))
        time.sleep(0.2)
    assert summary["state"] == "interrupted" and summary["exit_code"] == 3, summary
    assert "interrupted by SIGTERM" in summary["message"]

    listing = []
    while time.monotonic() < deadline:
        result = subprocess.run([ray, "list", "actors", "--address", head["dashboard"], "--filter",
                                 "class_name=RenderActor", "--filter", "state=ALIVE", "--format", "json"],
                                env=head["env"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        text = result.stdout[result.stdout.find("["):] if "[" in result.stdout else "[]"  # after any notices
        listing = json.loads(text)
        if not listing:
            break
        time.sleep(0.5)
    assert listing == [], listing
