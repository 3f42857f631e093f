"""Wall time and render actors started by `ray-render refresh` of an unchanged catalogue, two checkouts side by side.

    git worktree add --detach ../base <commit>      # the code to compare against
    python benchmarks/refresh_unchanged.py --before ../base --after . --rows 5000 --rounds 3 \
        --model placeholder --model tiny
    git worktree remove ../base

One local Ray, started here and shared by every driver, as a cluster is shared by nightly jobs. For each model and
checkout, the catalogue (`--rows` rows with two passthrough columns) is rendered once by that checkout's
`ray-render run` into its own output (untimed), then refreshed, unchanged, `--rounds` times, the checkouts taking
turns (every other round in reverse order). Each refresh is its own driver process (`python -m ray_render refresh
... --address`), its code and its workers' code the checkout's (PYTHONPATH, and the job's runtime_env for the
workers, which a shared cluster would otherwise start from this process's path), timed from its start to its exit.
The render actors it started are counted in Ray's actor table (class RenderActor, new during that refresh), so the
count does not depend on what either checkout reports. Prints a table and writes the rounds as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RENDER_OPTIONS = ["--width", "16", "--height", "16", "--steps", "2", "--no-progress", "--no-report"]
DRIVER_TIMEOUT_S = 1800  # the first render of a catalogue with the tiny model takes minutes on two cores


def write_catalogue(path: Path, rows: int) -> str:
    table = pa.table({"id": [f"r{i}" for i in range(rows)],
                      "prompt": [f"a product photo of item number {i} on a white background" for i in range(rows)],
                      "sku": [f"SKU-{i:06d}" for i in range(rows)], "price": [10.0 + i / 100 for i in range(rows)]})
    pq.write_table(table, path, row_group_size=1000)
    return str(path)


def render_actors() -> set[str]:
    """Ids of every RenderActor the cluster has had, dead ones included."""
    import ray._private.state  # the GCS's own actor table: unlike ray.util.state it needs no dashboard

    return {actor_id for actor_id, actor in ray._private.state.actors().items()
            if actor.get("ActorClassName") == "RenderActor"}


def driver(checkout: str, command: str, manifest: str, out: str, model: str, address: str) -> tuple[float, int]:
    """Run `ray-render COMMAND` from `checkout` against the shared cluster: (wall seconds, render actors started)."""
    env = {**os.environ, "PYTHONPATH": checkout,
           # Workers of a shared cluster would import the package from wherever the cluster was started
           "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {"PYTHONPATH": checkout}}})}
    before = render_actors()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ray_render", command, manifest, "--out", out, "--model", model,
                             "--address", address, *RENDER_OPTIONS], env=env, cwd=checkout, capture_output=True,
                            text=True, timeout=DRIVER_TIMEOUT_S)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"{checkout}: ray-render {command} exited {result.returncode}:\n{result.stdout[-2000:]}\n"
                         f"{result.stderr[-2000:]}")
    return wall, len(render_actors() - before)


def rendered_rows(out: str) -> int:
    return json.loads((Path(out) / "_summary.json").read_text())["rows_this_run"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="checkout of the code to compare against")
    parser.add_argument("--after", default=".", help="checkout of the code measured (default: this one)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", action="append", help="placeholder (default), tiny, ...; may be repeated")
    parser.add_argument("--gpus", type=int, default=0,
                        help="GPUs the local Ray declares (none exist: for the placeholder model only), as a GPU "
                             "cluster would have")
    parser.add_argument("--out", default="bench-results/refresh_unchanged.json")
    args = parser.parse_args(argv)
    checkouts = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())}
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=args.gpus, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    figures: dict = {"rows": args.rows, "gpus": args.gpus, "rounds": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="refresh-bench-") as scratch:
            manifest = write_catalogue(Path(scratch) / "catalogue.parquet", args.rows)
            for model in args.model or ["placeholder"]:
                outs = {side: str(Path(scratch) / f"{model}-{side}") for side in checkouts}
                for side, checkout in checkouts.items():  # the catalogue as a first run rendered it
                    wall, actors = driver(checkout, "run", manifest, outs[side], model, address)
                    print(f"{model} {side}: rendered {args.rows} rows in {wall:.1f} s on {actors} actor(s)",
                          flush=True)
                rounds = figures["rounds"][model] = []
                for index in range(args.rounds):
                    order = list(checkouts) if index % 2 == 0 else list(checkouts)[::-1]
                    for side in order:
                        wall, actors = driver(checkouts[side], "refresh", manifest, outs[side], model, address)
                        rounds.append({"round": index + 1, "side": side, "wall_s": round(wall, 2),
                                       "actors_started": actors, "rows_rendered": rendered_rows(outs[side])})
                        print(f"{model} round {index + 1} {side}: {wall:.2f} s, {actors} render actor(s) started",
                              flush=True)
    finally:
        ray.shutdown()
    print(table(figures))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")
    return figures


def table(figures: dict) -> str:
    lines = ["model        side    median wall s  rounds (s)            actors started  rows rendered",
             "-----------  ------  -------------  --------------------  --------------  -------------"]
    for model, rounds in figures["rounds"].items():
        medians = {}
        for side in ("before", "after"):
            mine = [entry for entry in rounds if entry["side"] == side]
            medians[side] = statistics.median(entry["wall_s"] for entry in mine)
            walls = ", ".join(f"{entry['wall_s']:.2f}" for entry in mine)
            actors = "/".join(str(entry["actors_started"]) for entry in mine)
            rendered = "/".join(str(entry["rows_rendered"]) for entry in mine)
            lines.append(f"{model:<11}  {side:<6}  {medians[side]:>13.2f}  {walls:<20}  {actors:>14}  {rendered:>13}")
        lines.append(f"{model:<11}  after/before: {medians['after'] / medians['before']:.2f}x the wall time")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
