"""The tools' subcommands of `ray-render` (eval, bench, soak, doctor); `ray_render/__main__.py` adds them to
cli.py's.

Each registers its parser here and imports its module only when it runs, so `ray-render run` never loads them.
"""

from __future__ import annotations

import argparse

from ray_render.cli import parse_storage_options


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
    from ray_render.tools import soak  # fault and ownership drills: `ray-render soak --minutes N`

    soak.add_soak_parser(subparsers)


def add_doctor_parser(subparsers) -> None:
    from ray_render.tools import doctor  # torch-free at import: the checks import it when they run

    parser = subparsers.add_parser("doctor", help="check this machine, a cluster, an output root and a model "
                                   "before a big run", description=doctor.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_arguments(parser)
    parser.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from ray_render.tools import doctor

    return doctor.run(args.address, args.local_ray, args.out, args.model, parse_storage_options(args.storage_options),
                      args.json)


SUBCOMMANDS = [add_eval_parser, add_bench_parser, add_soak_parser, add_doctor_parser]
FORWARDED = {"eval": run_eval}  # subcommands that parse their own arguments
