"""The elastic pool on Ray's own autoscaler: GPU nodes and ready render actors over the life of one job.

    python benchmarks/elastic_timeline.py --rows 600 --max-actors 3

A head without GPUs and a GPU worker type that Ray's fake multi-node provider scales from 0 to `--max-actors` nodes
on this machine (tools/clusters.py), as the shipped cluster files are set up; then one `ray-render run` with
`--device cuda --max-actors N` and no `--actors`, as they submit it. The placeholder model sleeps `--row-s` per row
(on the CPU of a node that declares a GPU). While the job runs and until the autoscaler has removed the idle nodes,
the nodes it runs are sampled every half second; the job's own summary gives its actors' timeline. Prints both and
writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ray_render.output import record
from ray_render.tools.chaos import check_output, write_manifest
from ray_render.tools.clusters import FakeAutoscalingCluster, WorkerType

JOB_TIMEOUT_S = 600
SCALE_DOWN_TIMEOUT_S = 120


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--row-s", type=float, default=0.1)
    parser.add_argument("--max-actors", type=int, default=3)
    parser.add_argument("--json", default="bench-results/elastic_timeline.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="elastic-"))
    ids = [f"r{i:05d}" for i in range(args.rows)]
    manifest = write_manifest(str(work / "m.parquet"),
                              [{"id": i, "prompt": f"a circle {i} [placeholder:sleep={args.row_s}]"} for i in ids])
    out = str(work / "out")
    gpu_nodes = WorkerType("gpu", cpus=1, gpus=1, min_workers=0, max_workers=args.max_actors)
    nodes: list[tuple[float, int]] = []  # (seconds since the job's submission, GPU nodes running) changes
    with FakeAutoscalingCluster([gpu_nodes], idle_timeout_minutes=0.1) as cluster:
        started = time.monotonic()
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                count = cluster.autoscaled_nodes()
                if not nodes or nodes[-1][1] != count:
                    nodes.append((round(time.monotonic() - started, 1), count))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        job = subprocess.run([sys.executable, "-m", "ray_render", "run", manifest, "--out", out, "--model",
                              "placeholder", "--device", "cuda", "--max-actors", str(args.max_actors), "--address",
                              cluster.address, "--no-progress", "--no-report"], env=cluster.env,
                             capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        job_s = time.monotonic() - started
        deadline = time.monotonic() + SCALE_DOWN_TIMEOUT_S
        while time.monotonic() < deadline and cluster.autoscaled_nodes():
            time.sleep(0.5)
        stop.set()
        sampler.join()
    if job.returncode != 0:
        print(job.stdout[-3000:], job.stderr[-3000:], file=sys.stderr)
        return 1
    summary = record.read_summary(out)
    check = check_output(out, ids)
    result = {"rows": args.rows, "row_s": args.row_s, "max_actors": args.max_actors, "job_s": round(job_s, 1),
              "startup_s": summary["startup_s"], "rendering_s": summary["rendering_s"],
              "actors_timeline": summary["actors_timeline"], "actors_peak": summary["actors_peak"],
              "actors_released": summary["actors_released"], "gpu_nodes_timeline": nodes,
              "rows_ok": check.by_status.get("ok", 0), "duplicates": check.duplicates, "lost": check.lost}
    print(f"job: {args.rows} rows of {args.row_s} s, --max-actors {args.max_actors}: {result['rows_ok']} ok, "
          f"{check.duplicates} duplicated, {check.lost} lost; {job_s:.1f} s from submission to exit "
          f"({summary['startup_s']:.1f} s start-up, {summary['rendering_s']:.1f} s rendering)")
    print("actors ready (s after the pool started: actors):",
          ", ".join(f"{at:g}: {count}" for at, count in summary["actors_timeline"]))
    print("GPU nodes running (s after submission: nodes):", ", ".join(f"{at:g}: {count}" for at, count in nodes))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
