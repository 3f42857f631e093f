"""The elastic pool on Ray's own autoscaler: a head without GPUs, GPU nodes that the fake multi-node provider adds
on this machine when render actors wait for them, and removes once they are idle (tools/clusters.py). About a
minute: a real head, three real nodes, a real `ray-render run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ray_render.output import layout, record
from ray_render.tools.chaos import check_output, write_manifest
from ray_render.tools.clusters import FakeAutoscalingCluster, WorkerType, living_pids

pytestmark = pytest.mark.cluster


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_a_job_without_actors_grows_to_the_gpus_the_autoscaler_adds_and_leaves_them_idle_at_the_end(tmp_path):
    """What the shipped cluster files do (`--device cuda --max-actors N`, no --actors) on a cluster that starts with
    no GPU node: the job asks for N GPU actors, the autoscaler adds a node for each, the pool uses every one as it
    comes, and once the job ends the nodes are idle and go. The placeholder model renders on the CPU of a node that
    declares a GPU, as a real model would on the GPU."""
    ids = [f"r{i:03d}" for i in range(160)]
    rows = [{"id": row_id, "prompt": f"a circle {row_id} [placeholder:sleep=0.1]"} for row_id in ids]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    gpu_nodes = WorkerType("gpu", cpus=1, gpus=1, min_workers=0, max_workers=3)
    with FakeAutoscalingCluster([gpu_nodes], idle_timeout_minutes=0.1) as cluster:
        assert cluster.autoscaled_nodes() == 0
        done = subprocess.run([sys.executable, "-m", "ray_render", "run", manifest, "--out", out, "--model",
                               "placeholder", "--device", "cuda", "--max-actors", "3", "--address", cluster.address,
                               "--no-progress"], env=cluster.env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # The job ended: its actors are gone, the nodes are idle, the autoscaler removes them.
        assert wait_for(lambda: cluster.autoscaled_nodes() == 0, 60), f"{cluster.autoscaled_nodes()} nodes left"
        pids = cluster.head.pids()
    assert living_pids(pids) == []  # the cluster's exit stopped every process of it

    summary = record.read_summary(out)
    assert "3 GPU actor(s) asked for, the cluster has 0 GPU(s) now" in done.stdout + done.stderr  # it had none
    assert summary["actors_peak"] == 3, summary
    counts = [count for _, count in summary["actors_timeline"]]
    assert counts[0] == 1 and max(counts) == 3, summary["actors_timeline"]
    check = check_output(out, ids)
    assert (check.by_status, check.duplicates, check.lost, check.undecodable) == ({"ok": 160}, 0, 0, 0)
    # Every actor rendered (one per node: each node has one GPU, each actor takes one).
    assert len(set(metadata_workers(out))) == 3, set(metadata_workers(out))


def metadata_workers(out: str) -> list[str]:
    import pyarrow.dataset as ds

    return ds.dataset(os.path.join(out, layout.METADATA_DIR), format="parquet").to_table(columns=["worker"]).column(
        "worker").to_pylist()
