"""The Python API: `ray_render.render` as `ray-render run` does it, and `ray_render.data.render` on real Ray Data,
whose images must be byte-identical to the command line's for the same rows and seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import ray_render
import ray_render.data
from ray_render.config import ConfigError
from ray_render.engine import summary as exits
from ray_render.output import layout, record

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"shape-{i}", "prompt": prompt, "seed": 1000 + i, "batch": "b1"}
        for i, prompt in enumerate(["a red circle on a blue background", "a small yellow square on a black background",
                                    "a green triangle at the top left on a white background",
                                    "a large purple diamond on an orange background"])]
TINY = {"model": "tiny", "device": "cpu", "num_sampling_steps": 4, "progress": False, "batch_size": 4}


def digests(out: str) -> dict[str, str]:
    table = ds.dataset(os.path.join(out, "metadata"), format="parquet").to_table(columns=["id", "status", "sha256"])
    assert set(table.column("status").to_pylist()) == {"ok"}
    return dict(zip(table.column("id").to_pylist(), table.column("sha256").to_pylist()))


def test_render_does_what_run_does_and_returns_the_summary(ray_cluster, tmp_path):
    manifest = tmp_path / "prompts.csv"
    manifest.write_text("id,prompt\nr0,a red circle\nr1,a blue square\n")
    summary = ray_render.render(str(manifest), out=str(tmp_path / "out"), model="placeholder", device="cpu",
                                width=32, height=48, progress=False)
    assert (summary.exit_code, summary.rows["ok"], summary.images) == (exits.EXIT_OK, 2, 2)
    table = ds.dataset(str(tmp_path / "out" / "metadata"), format="parquet").to_table().to_pylist()
    assert {(row["width"], row["height"]) for row in table} == {(32, 48)}
    assert record.read_summary(str(tmp_path / "out"))["exit_code"] == exits.EXIT_OK
    aborted = ray_render.render(str(tmp_path / "missing.csv"), out=str(tmp_path / "out2"), progress=False)
    assert aborted.exit_code == exits.EXIT_ABORTED and "missing.csv" in aborted.message
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        ray_render.render(str(manifest), out=str(tmp_path / "out3"), colour="red")


def test_ray_data_renders_the_same_images_as_the_command_line(ray_cluster, tmp_path):
    import ray.data

    manifest = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), manifest)
    command = [sys.executable, "-m", "ray_render", "run", str(manifest), "--out", str(tmp_path / "cli"),
               "--address", ray_cluster, "--model", "tiny", "--device", "cpu", "--steps", "4", "--batch-size", "4",
               "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    dataset = ray.data.from_items(ROWS)
    metadata = ray_render.data.render(dataset, out=str(tmp_path / "data"), **TINY)
    rows = metadata.take_all()
    assert sorted(row["id"] for row in rows) == [row["id"] for row in ROWS]
    assert {row["batch"] for row in rows} == {"b1"}  # passthrough columns come back
    # Another process, another manifest file, another path to it: the same bytes.
    assert digests(str(tmp_path / "data")) == digests(str(tmp_path / "cli"))
    assert {row["id"]: row["sha256"] for row in rows} == digests(str(tmp_path / "cli"))

    # The same rows again: the same staged manifest, so the job resumes and renders nothing.
    again = ray_render.data.render(ray.data.from_items(ROWS), out=str(tmp_path / "data"), **TINY)
    assert again.count() == len(ROWS)
    summary = record.read_summary(str(tmp_path / "data"))
    assert summary["rows_this_run"] == 0 and summary["shards_resumed"] == summary["shards_total"]
    assert len(os.listdir(tmp_path / "data" / layout.MANIFESTS_DIR)) == 1


def test_a_read_render_write_pipeline(ray_cluster, tmp_path):
    import ray.data

    (tmp_path / "captions.csv").write_text("key,caption\n" + "".join(f"k{i},shape number {i}\n" for i in range(6)))
    prompts = ray.data.read_csv(str(tmp_path / "captions.csv")).rename_columns({"caption": "prompt", "key": "id"})
    metadata = ray_render.data.render(prompts, out=str(tmp_path / "out"), model="placeholder", device="cpu",
                                      shard_size=2, progress=False)
    metadata.filter(lambda row: row["status"] == "ok").select_columns(["id", "image_uri"]).write_parquet(
        str(tmp_path / "ok"))
    written = ds.dataset(str(tmp_path / "ok"), format="parquet").to_table().to_pylist()
    assert sorted(row["id"] for row in written) == [f"k{i}" for i in range(6)]
    assert all(os.path.exists(row["image_uri"]) for row in written)


def test_a_job_that_does_not_finish_raises_with_its_summary(ray_cluster, tmp_path):
    import ray.data

    with pytest.raises(ray_render.data.RenderFailed) as failure:
        ray_render.data.render(ray.data.from_items([{"prompt": "a cat"}]), out=str(tmp_path / "out"),
                               model=str(tmp_path / "no-model"), device="cpu", progress=False)
    assert failure.value.summary.exit_code == exits.EXIT_ABORTED and "no-model" in str(failure.value)
    with pytest.raises(ValueError, match="no rows"):
        ray_render.data.render(ray.data.from_items([{"prompt": "x"}]).filter(lambda row: False),
                               out=str(tmp_path / "empty"), progress=False)


def test_version_is_the_packages():
    text = (REPO / "pyproject.toml").read_text()
    assert f'version = "{ray_render.__version__}"' in text
    result = subprocess.run([sys.executable, "-m", "ray_render", "--version"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == f"ray-render {ray_render.__version__}"


NOTEBOOK_CELL = """
import ray_render
summary = ray_render.render({manifest!r}, out={out!r}, model="placeholder", device="cpu", address={address!r},
                            shard_size=1)
print("exit code", summary.exit_code)
"""


def test_in_a_jupyter_kernel_the_progress_bar_is_a_notebook_widget(ray_cluster, tmp_path, monkeypatch):
    import jupyter_client  # a dev dependency: without it this test fails rather than pass unseen

    spec = tmp_path / "kernels" / "ray-render-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ray-render test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"shape {i}"}) + "\n" for i in range(3)))
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="ray-render-test", cwd=str(REPO))
    try:
        message_id = client.execute(NOTEBOOK_CELL.format(manifest=str(manifest), out=str(tmp_path / "out"),
                                                         address=ray_cluster))
        outputs, deadline = [], time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, outputs[-5:]
            message = client.get_iopub_msg(timeout=max(1.0, deadline - time.monotonic()))
            if message["parent_header"].get("msg_id") != message_id:
                continue
            outputs.append((message["msg_type"], message["content"]))
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    printed = "".join(content.get("text", "") for kind, content in outputs if kind == "stream")
    assert "exit code 0" in printed, outputs
    widgets = [content for kind, content in outputs if kind == "display_data"
               and "application/vnd.jupyter.widget-view+json" in content.get("data", {})]
    assert widgets, outputs  # tqdm.auto drew a widget, not a text bar or log lines
    assert "progress: " not in printed  # the log-line fallback is for terminals without a bar
