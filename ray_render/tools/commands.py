"""The tools' subcommands of `ray-render` (eval, bench, soak); `ray_render/__main__.py` adds them to cli.py's.

Each registers its parser here and imports its module only when it runs, so `ray-render run` never loads them.
"""

from __future__ import annotations


def add_eval_parser(subparsers) -> None:
    # Listed for `ray-render --help`; the program hands everything after `eval` to adherence.main unparsed.
    subparsers.add_parser("eval", add_help=False, help="prompt adherence of a model on held-out shape prompts "
                          "(`ray-render eval --help` for its options)")


def run_eval(argv: list[str]) -> int:
    from ray_render.tools import adherence

    return adherence.main(argv)


def add_bench_parser(subparsers) -> None:
    from ray_render.tools import bench

    bench.register(subparsers)


def add_soak_parser(subparsers) -> None:
    from ray_render.tools import chaos  # fault-injection drills: `ray-render soak --minutes N`

    chaos.add_soak_parser(subparsers)


SUBCOMMANDS = [add_eval_parser, add_bench_parser, add_soak_parser]
FORWARDED = {"eval": run_eval}  # subcommands that parse their own arguments
