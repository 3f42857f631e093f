"""The `ray-render` command line: argument parsing only; the work happens in driver.run and friends.

A subcommand is a small `cmd_<name>(args) -> exit code` function plus a `add_<name>_parser(subparsers)` that
registers its options; list the latter in SUBCOMMANDS. Errors print one line (no traceback) and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap

from ray_render import driver
from ray_render.config import (CFG_SCHEDULES, DEVICES, DTYPES, IMAGE_FORMATS, NOISE_MODES, ConfigError, JobConfig,
                               job_from_options, load_config_file)

PROG = "ray-render"

EXIT_CODES_HELP = "exit status:\n" + "\n".join(
    textwrap.fill(meaning, width=100, initial_indent=f"  {code}  ", subsequent_indent="     ")
    for code, meaning in driver.EXIT_CODES.items())


class CliError(Exception):
    """A bad command line or job file: printed as one line, exit code 2."""


def _defaults() -> JobConfig:
    return JobConfig(manifests=["-"], out="-")


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Every option of a render job (shared by `run` and jobs/render.py); unset options stay out of the namespace."""
    d = _defaults()
    parser.add_argument("manifests", nargs="*", metavar="MANIFEST",
                        help="Parquet files, directories, globs or fsspec URLs (s3://, gs://, ...)")
    parser.add_argument("--out", metavar="URI", help="output root: a local path or fsspec URL")
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML job file with the same options "
                        "(dashes or underscores); command-line flags override it")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"'tiny' (embedded), 'placeholder' (no model: dry run), a snapshot "
                       f"directory, a Hugging Face repo id or an fsspec URL (default: {d.model})")
    model.add_argument("--vae", help="VAE path overriding the one in the model's config")
    model.add_argument("--revision", help="hub revision when --model is a repo id")
    model.add_argument("--device", choices=DEVICES, help=f"(default: {d.device}: cuda when the cluster has GPUs)")
    model.add_argument("--dtype", choices=DTYPES, help=f"(default: {d.dtype})")
    model.add_argument("--noise", choices=NOISE_MODES, help=f"sampler noise: fast, or reference (bit-for-bit with "
                       f"the official pipeline) (default: {d.noise})")

    render = parser.add_argument_group("render parameters (job defaults; manifest columns override them)")
    render.add_argument("--preset", help="draft, standard, premium, or one of the job file's presets")
    render.add_argument("--width", type=int, metavar="PX", help="pixels, a multiple of 16 (default: the model's)")
    render.add_argument("--height", type=int, metavar="PX", help="pixels, a multiple of 16 (default: the model's)")
    render.add_argument("--cfg", type=float, help="text guidance scale, >= 1")
    render.add_argument("--cfg-img", dest="cfg_img", type=float, metavar="CFG", help="image guidance scale (editing), >= 1")
    render.add_argument("--cfg-schedule", dest="cfg_schedule", choices=CFG_SCHEDULES)
    render.add_argument("--use-norm", dest="use_norm", action=argparse.BooleanOptionalAction,
                        help="layer-norm each sampled token")
    render.add_argument("--shift", dest="timesteps_shift", type=float, metavar="SHIFT", help="timesteps shift, > 0")
    render.add_argument("--steps", dest="num_sampling_steps", type=int, metavar="N", help="sampling steps, >= 2")
    render.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT")
    render.add_argument("--positive-prompt", dest="positive_prompt", metavar="TEXT")
    render.add_argument("--num-images", dest="num_images", type=int, metavar="N", help="images per row (default: 1)")

    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=IMAGE_FORMATS, help=f"(default: {d.format})")
    output.add_argument("--quality", type=int, metavar="Q", help=f"jpeg/webp quality 1-100 (default: {d.quality})")
    output.add_argument("--storage-options", dest="storage_options", metavar="JSON",
                        help="fsspec options as a JSON object (credentials, endpoint_url); never logged")
    output.add_argument("--no-resume", dest="resume", action="store_false",
                        help="render committed shards again (default: skip them)")
    output.add_argument("--overwrite", action="store_true", help="clear the output root's job first")

    run = parser.add_argument_group("cluster and scheduling")
    run.add_argument("--address", metavar="ADDR", help="Ray address (default: RAY_ADDRESS, else a local Ray for this run)")
    run.add_argument("--actors", type=int, metavar="N", help="render actors (default: one per GPU, or 1 on CPU)")
    run.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help=f"requests per model call "
                     f"(default: {d.batch_size})")
    run.add_argument("--shard-size", dest="shard_size", type=int, metavar="ROWS", help=f"manifest rows per shard "
                     f"(default: {d.shard_size})")
    run.add_argument("--max-in-flight", dest="max_in_flight", type=int, metavar="N", help=f"shards queued per actor "
                     f"(default: {d.max_in_flight})")
    run.add_argument("--retries", type=int, metavar="N", help=f"extra attempts per row and per shard (default: {d.retries})")
    run.add_argument("--max-failed-fraction", dest="max_failed_fraction", type=float, metavar="F",
                     help=f"abort once more than this fraction of finished rows failed "
                          f"(default: {d.max_failed_fraction})")
    run.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float, metavar="N",
                     help=f"(default: {d.cpus_per_actor})")
    run.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, metavar="N",
                     help=f"(default: {d.gpus_per_actor})")
    run.add_argument("--limit", type=int, metavar="N", help="render only the first N rows of the plan")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or log lines")


def job_from_args(args: argparse.Namespace) -> JobConfig:
    """The job file's options, overridden by the flags given on the command line."""
    given = {key: value for key, value in vars(args).items() if key not in ("command", "handler", "config")}
    options = _read_job_file(args.config) if getattr(args, "config", None) else {}
    if not given.get("manifests"):
        given.pop("manifests", None)
    options.update(given)
    if not options.get("manifests"):
        raise CliError("no manifest given: pass one or more Parquet files, directories, globs or URLs")
    if not options.get("out"):
        raise CliError("no output given: pass --out PATH_OR_URL")
    return job_from_options(options)


def _read_job_file(path: str) -> dict:
    try:
        return load_config_file(path)
    except (ConfigError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - YAML and TOML syntax errors: one line naming the file
        raise CliError(f"{path}: not a valid job file: {' '.join(str(exc).split())}") from None


# -- run -----------------------------------------------------------------------------------------------------------


def add_run_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="render manifests", argument_default=argparse.SUPPRESS,
                                   description="Render Parquet prompt manifests to images + metadata Parquet.",
                                   epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(parser)
    parser.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    return driver.run(job_from_args(args)).exit_code


# -- status --------------------------------------------------------------------------------------------------------


def add_status_parser(subparsers) -> None:
    parser = subparsers.add_parser("status", help="progress of a running or finished job, from its output root",
                                   description="Report a job's progress from its output root alone "
                                               "(job record, commit markers, summary). Exit 2 if OUT holds no job.")
    parser.add_argument("out", metavar="OUT", help="the job's output root (local path or fsspec URL)")
    parser.add_argument("--storage-options", dest="storage_options", metavar="JSON", default=None,
                        help="fsspec options as a JSON object")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from ray_render import status

    report = status.job_status(args.out, parse_storage_options(args.storage_options))
    if report is None:
        raise CliError(f"{args.out}: no ray-render job here (no _job.json)")
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else status.format_status(report))
    return 0


def parse_storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--storage-options must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise CliError("--storage-options must be a JSON object")
    return options


# -- main ----------------------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_run_parser, add_status_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Render Parquet prompt manifests with NextStep-1 "
                                     "on a Ray cluster.", epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def _setup_logging() -> None:
    logger = logging.getLogger("ray_render")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ray-render` and `python -m ray_render`; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.handler(args)
    except (CliError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a job file or output root that cannot be read
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
