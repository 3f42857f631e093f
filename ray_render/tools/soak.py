"""The soak runner: every fault drill (tools/chaos.py), ownership drill (tools/ownership.py) and drill of how runs
end (tools/endings.py) in rounds, with a local Ray and an S3-compatible server of its own, until the time is up; the
reliability table as Markdown.

    ray-render soak --minutes 0      one round of every drill (what the README's table shows)
    python -m ray_render.tools.soak  the same
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from ray_render import storage
from ray_render.tools import endings, ownership
from ray_render.tools.chaos import (
    BROKEN_DEVICE_ENV,
    Figures,
    actor_chaos,
    driver_chaos,
    out_of_memory,
    poison_row,
    storage_chaos,
)


def figures_table(figures: list[Figures]) -> str:
    """The reliability table as Markdown: one row per drill, sums over rounds."""
    lines = ["| drill | faults injected | rows | ok | duplicates | lost rows | sha mismatches | wall time |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for figure in figures:
        lines.append(f"| {figure.drill} | {figure.faults} | {figure.rows:,} | {figure.ok:,} | {figure.duplicates} | "
                     f"{figure.lost} | {figure.sha_mismatches} | {figure.wall_s:.0f} s |")
    return "\n".join(lines)


def _combine(rounds: list[Figures]) -> Figures:
    first = rounds[0]
    if len(rounds) == 1:
        return first
    return Figures(f"{first.drill} x{len(rounds)}", "; ".join(dict.fromkeys(f.faults for f in rounds))[:200],
                   sum(f.rows for f in rounds), sum(f.ok for f in rounds), sum(f.duplicates for f in rounds),
                   sum(f.lost for f in rounds), sum(f.wall_s for f in rounds),
                   {"check": {"undecodable": sum(f.sha_mismatches for f in rounds)}})


def soak(minutes: float, *, seed: int = 0, workdir: str | None = None, actor_rows: int = 2000,
         log=print) -> list[Figures]:
    """Run every drill in rounds (new seed each round) until `minutes` have passed (at least one round).

    Starts its own local Ray (2 CPUs) and an S3-compatible server (moto, a dev dependency) on 127.0.0.1; the node
    loss drill starts a four-node cluster of its own on this machine (tools/clusters.py).
    """
    import ray
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    deadline = time.monotonic() + minutes * 60
    results: dict[str, list[Figures]] = {}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    upstream = {"key": "soak-key", "secret": "soak-secret", "endpoint_url": f"http://{host}:{port}",
                "bucket": "ray-render-soak"}
    options = {k: v for k, v in upstream.items() if k != "bucket"}
    fs, _ = storage.open_fs("s3://", options)
    fs.mkdir(upstream["bucket"])
    # The actors inherit it: where chaos.PlaceholderOnBrokenDevice claims its broken device.
    os.environ[BROKEN_DEVICE_ENV] = os.path.join(tempfile.mkdtemp(prefix="ray-render-soak-", dir=workdir),
                                                 "broken-device")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        round_index = 0
        while True:
            round_seed = seed + round_index
            with tempfile.TemporaryDirectory(prefix="ray-render-soak-", dir=workdir) as scratch:
                drills = [("actor", lambda seed=round_seed: actor_chaos(scratch, rows=actor_rows, seed=seed)),
                          ("driver", lambda seed=round_seed: driver_chaos(scratch, address, seed=seed)),
                          ("storage", lambda seed=round_seed: storage_chaos(scratch, upstream, seed=seed)),
                          ("poison", lambda seed=round_seed: poison_row(scratch, seed=seed)),
                          ("oom", lambda: out_of_memory(scratch)),
                          ("double submit", lambda: ownership.double_submit(scratch, address)),
                          ("double submit s3", lambda seed=round_seed: ownership.double_submit(
                              scratch, address, root=f"s3://{upstream['bucket']}/soak-{seed}/double",
                              storage_options=options)),
                          ("refresh over a run", lambda: ownership.refresh_during_run(scratch, address)),
                          ("takeover", lambda: ownership.takeover_and_fence(scratch, address)),
                          ("copies", lambda: ownership.jittered_copies(scratch)),
                          ("sigterm", lambda: endings.stop_signal(scratch, signal.SIGTERM)),
                          ("sigint", lambda: endings.stop_signal(scratch, signal.SIGINT, rerun=False)),
                          ("hung", lambda: endings.hung_actor(scratch)),
                          ("systematic", lambda: endings.systematic_crash(scratch)),
                          ("broken device", lambda: endings.broken_device(scratch)),
                          ("retry failed", lambda: endings.retry_failed(scratch)),
                          ("node loss", lambda: endings.node_loss(scratch))]
                for name, drill in drills:
                    figure = drill()
                    results.setdefault(name, []).append(figure)
                    log(f"round {round_index} {name}: {figure.faults}, {figure.ok}/{figure.rows} ok, "
                        f"{figure.duplicates} duplicates, {figure.lost} lost, {figure.wall_s:.0f} s")
            round_index += 1
            if time.monotonic() >= deadline:
                break
    finally:
        ray.shutdown()
        server.stop()
    return [_combine(rounds) for rounds in results.values()]


def add_soak_parser(subparsers) -> None:
    """`ray-render soak` (tools/commands.py lists it)."""
    parser = subparsers.add_parser("soak", help="fault-injection drills in rounds; prints the reliability table",
                                   description="Run the fault-injection drills (actor kills, driver kills, "
                                               "storage faults and an outage, a poison row, out-of-memory) and the "
                                               "ownership drills (two drivers on one output, a refresh over a run, "
                                               "a lease taken over and fenced, copies that render other bytes) and "
                                               "the drills of how runs end (stop signals, a frozen actor, systematic "
                                               "crashes, a broken device, --retry-failed, a lost node) in rounds until "
                                               "--minutes have passed; print the figures as Markdown. "
                                               "Starts its own local Ray and S3-compatible server on 127.0.0.1.")
    _soak_options(parser)
    parser.set_defaults(handler=cmd_soak)


def _soak_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=0.0, help="keep running rounds this long (default: 0, "
                        "one round)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round (default: 0)")
    parser.add_argument("--actor-rows", dest="actor_rows", type=int, default=2000,
                        help="rows of the actor-chaos job (default: 2000)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: the system's temp dir)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures as JSON here")


def cmd_soak(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # each job prints its summary: keep stdout for the table
        figures = soak(args.minutes, seed=args.seed, workdir=args.workdir, actor_rows=args.actor_rows,
                       log=lambda text: print(text, file=sys.stderr, flush=True))
    print(figures_table(figures))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps([f.__dict__ for f in figures], indent=2, default=str))
    return 0 if all(f.duplicates == 0 and f.lost == 0 for f in figures) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_render.tools.soak",
                                     description="Fault-injection soak runner.")
    _soak_options(parser)
    return cmd_soak(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
