"""The `ray-render` command line: argument parsing only; the work happens in engine.driver.run and friends.

A subcommand is a small `cmd_<name>(args) -> exit code` function plus a `add_<name>_parser(subparsers)` that
registers its options; list the latter in SUBCOMMANDS (the tools' own subcommands are in tools/commands.py, and
`ray_render/__main__.py` puts both in one program). A bad command line or job file prints one line and exits 2; an
unexpected error prints one line and exits 4 (the traceback with --verbose).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from collections.abc import Callable

from ray_render.config import (
    CFG_SCHEDULES,
    COMPILE_MODES,
    DEVICES,
    DTYPES,
    EDIT_INPUTS,
    IMAGE_FORMATS,
    NOISE_MODES,
    RENDER_PARAMETERS,
    ROPE_PRECISIONS,
    ConfigError,
    JobConfig,
    job_from_options,
    load_config_file,
    read_storage_options,
)
from ray_render.engine.summary import EXIT_ABORTED, EXIT_CODES, EXIT_INTERNAL, EXIT_OK, EXIT_ROWS
from ray_render.output.record import RecordDamaged
from ray_render.storage import FilesystemMissing

PROG = "ray-render"

EXIT_CODES_HELP = "exit status:\n" + "\n".join(
    textwrap.fill(meaning, width=100, initial_indent=f"  {code}  ", subsequent_indent="     ")
    for code, meaning in EXIT_CODES.items())


class CliError(Exception):
    """A bad command line or job file: printed as one line, exit code 2."""


def _defaults() -> JobConfig:
    return JobConfig(manifests=["-"], out="-")


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Every option of a render job (shared by `run` and jobs/render.py); unset options stay out of the namespace."""
    d = _defaults()
    parser.add_argument("manifests", nargs="*", metavar="MANIFEST",
                        help="Parquet, CSV (.csv, .csv.gz) or JSON Lines (.jsonl, .ndjson, .jsonl.gz) files, "
                             "directories, globs or fsspec URLs (s3://, gs://, hf://datasets/...)")
    parser.add_argument("--prompt-column", dest="prompt_column", metavar="NAME",
                        help="the manifest's column holding the prompt, when it is not `prompt` (caption, text, ...)")
    parser.add_argument("--id-column", dest="id_column", metavar="NAME",
                        help="the manifest's column holding the row id, when it is not `id` (key, uid, ...)")
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
    model.add_argument("--rope-precision", dest="rope_precision", choices=ROPE_PRECISIONS,
                       help=f"RoPE frequencies: auto is bf16 for bfloat16 weights, as the official pipeline computes "
                            f"them, and fp32 otherwise (default: {d.rope_precision})")
    model.add_argument("--edit-input", dest="edit_input", choices=EDIT_INPUTS,
                       help=f"edit input images: resize to the output size (official), or crop to its aspect ratio "
                            f"first (default: {d.edit_input})")
    model.add_argument("--compile", choices=COMPILE_MODES,
                       help=f"NextStep token steps compiled with torch.compile (and replayed from CUDA graphs on CUDA) "
                            f"or eager; auto is on for CUDA (default: {d.compile})")

    render = parser.add_argument_group("render parameters (job defaults; manifest columns override them)")
    render.add_argument("--preset", help="draft, standard, premium, or one of the job file's presets")
    for param in RENDER_PARAMETERS:
        if param.type is bool:
            render.add_argument(param.flag, dest=param.name, action=argparse.BooleanOptionalAction, help=param.help)
        elif param.name == "cfg_schedule":
            render.add_argument(param.flag, dest=param.name, choices=CFG_SCHEDULES, help=param.help)
        else:
            render.add_argument(param.flag, dest=param.name, type=param.type, metavar=param.metavar, help=param.help)

    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=IMAGE_FORMATS, help=f"(default: {d.format})")
    output.add_argument("--quality", type=int, metavar="Q", help=f"jpeg/webp encoder quality 1-100 (default: "
                        f"{d.quality}); not --min-quality")
    output.add_argument("--no-report", dest="report", action="store_false",
                        help="do not write contact_sheet.png and report.html when the job ends")

    scores = parser.add_argument_group("image quality scores (see ray_render/engine/quality.py)")
    scores.add_argument("--quality-scores", dest="quality_scores", action="store_true",
                        help="add sharpness, colour_diversity, artefact_level, phash and quality_score columns")
    scores.add_argument("--min-quality", dest="min_quality", type=float, metavar="Q",
                        help="0-1: re-render an image whose quality_score is below Q with a new deterministic seed "
                             "(implies --quality-scores; the seed column holds the seed actually used)")
    scores.add_argument("--quality-retries", dest="quality_retries", type=int, metavar="N",
                        help=f"re-renders per image at most under --min-quality; the best attempt is kept "
                             f"(default: {d.quality_retries})")
    output.add_argument("--storage-options", dest="storage_options", metavar="JSON|@FILE",
                        help="fsspec options as a JSON object, or @FILE holding one (default: the "
                             "RAY_RENDER_STORAGE_OPTIONS environment variable); never logged or recorded. Keep "
                             "credentials off the command line: use @FILE or the variable")
    output.add_argument("--no-resume", dest="resume", action="store_false",
                        help="render committed shards again (default: skip them)")
    output.add_argument("--overwrite", action="store_true", help="clear the output root's job first (only "
                        "ray-render's own files are deleted)")
    output.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                        help="render the failed rows of committed shards again, once each, on any actor; the "
                             "rows that are ok stay as they are (run only: a refresh renders failed rows anyway)")
    output.add_argument("--input-roots", dest="input_roots", nargs="+", metavar="PREFIX",
                        help="where edit rows' input images may come from, besides the manifests' own directories "
                             "(paths or URL prefixes); anything else is refused")
    output.add_argument("--max-input-bytes", dest="max_input_bytes", type=int, metavar="N",
                        help=f"an input image larger than this fails its row (default: {d.max_input_bytes})")
    output.add_argument("--input-timeout", dest="input_timeout_s", type=float, metavar="SECONDS",
                        help=f"an input image read slower than this fails its row (default: {d.input_timeout_s:g})")
    output.add_argument("--lease-ttl", dest="lease_ttl_s", type=float, metavar="SECONDS",
                        help=f"another run may take the output over this long after this run's last heartbeat "
                             f"(default: {d.lease_ttl_s:g})")

    run = parser.add_argument_group("cluster and scheduling")
    run.add_argument("--address", metavar="ADDR",
                     help="Ray address (default: RAY_ADDRESS, else a local Ray for this run)")
    run.add_argument("--actors", type=int, metavar="N",
                     help="a fixed pool of N render actors (default on GPUs: an elastic pool of up to --max-actors, "
                          "each used as soon as it is ready and released when no work is left; on CPU: 1)")
    run.add_argument("--max-actors", dest="max_actors", type=int, metavar="N",
                     help="the most GPU actors the elastic pool asks for (an autoscaler adds nodes for them; default: "
                          "one per shard left)")
    run.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help=f"requests per model call "
                     f"(default: {d.batch_size})")
    run.add_argument("--shard-size", dest="shard_size", type=int, metavar="ROWS",
                     help="manifest rows per shard (default: sized to the job: each shard at most 1/64 of the rows "
                          "after it, between 16 and 1000 rows, so shards shrink towards the end)")
    run.add_argument("--max-in-flight", dest="max_in_flight", type=int, metavar="N", help=f"shards queued per actor "
                     f"(default: {d.max_in_flight})")
    run.add_argument("--call-timeout", dest="call_timeout_s", type=float, metavar="SECONDS",
                     help=f"the most one render call may take (each also has a deadline of 5x the recent time per "
                          f"row, at least 60 s; 900 s for an actor's first call); past it the actor is killed "
                          f"(default: {d.call_timeout_s:g})")
    run.add_argument("--retries", type=int, metavar="N",
                     help=f"extra attempts per row and per shard (default: {d.retries})")
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
    given = {key: value for key, value in vars(args).items()
             if key not in ("command", "handler", "config", "verbose", "log_level")}
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
    from ray_render.engine import driver

    return driver.run(job_from_args(args)).exit_code


# -- plan / preview ------------------------------------------------------------------------------------------------


def add_plan_parser(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="rows, shards, images, image tokens and a cost estimate, before a run",
                                   argument_default=argparse.SUPPRESS,
                                   description="What `ray-render run` with the same options would render, and an "
                                               "estimate per GPU type (seconds per image, GPU-hours, cost) from a "
                                               "calibration table that says where each figure comes from. Starts "
                                               "no Ray, reads no weights; --out is optional (nothing is written).")
    add_job_options(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--price", action="append", metavar="GPU=USD_PER_HOUR",
                        help="price of an hour of a device (repeatable), e.g. --price H100=2.49: adds the cost")
    parser.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from ray_render.engine import forecast
    from ray_render.engine.plan import ManifestError

    values = vars(args)
    as_json = bool(values.pop("json", False))
    try:
        prices = forecast.parse_prices(values.pop("price", None) or [])
    except ValueError as exc:
        raise CliError(str(exc)) from None
    values.setdefault("out", "-")  # a run's output root; the plan writes nothing anywhere
    try:
        result = forecast.forecast(job_from_args(args), prices)
    except (ManifestError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(json.dumps(result.to_dict(), indent=2) if as_json else forecast.format_forecast(result))
    return 0


def add_preview_parser(subparsers) -> None:
    parser = subparsers.add_parser("preview", help="render a stratified sample of the manifest, with its report",
                                   argument_default=argparse.SUPPRESS, epilog=EXIT_CODES_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description="Render N rows sampled across the whole manifest (stratified by "
                                               "size and preset) with the job's settings into --out, with the "
                                               "contact sheet and report; the metadata's source_row says which "
                                               "rows (see ray_render/engine/preview.py).")
    add_job_options(parser)
    parser.add_argument("--sample", type=int, required=True, metavar="N", help="rows to render")
    parser.set_defaults(handler=cmd_preview)


def cmd_preview(args: argparse.Namespace) -> int:
    from ray_render.engine import preview

    sample = vars(args).pop("sample")
    if sample < 1:
        raise CliError(f"--sample must be a whole number >= 1, got {sample}")
    return preview.run(job_from_args(args), sample).exit_code


# -- status --------------------------------------------------------------------------------------------------------


def add_status_parser(subparsers) -> None:
    parser = subparsers.add_parser("status", help="progress of a running or finished job, from its output root",
                                   description="Report a job's progress from its output root alone "
                                               "(job record, commit log, lease, summary). Exit 2 if OUT holds no job.")
    parser.add_argument("out", metavar="OUT", help="the job's output root (local path or fsspec URL)")
    parser.add_argument("--storage-options", dest="storage_options", metavar="JSON", default=None,
                        help="fsspec options as a JSON object")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from ray_render.output import status

    report = status.job_status(args.out, parse_storage_options(args.storage_options))
    if report is None:
        raise CliError(f"{args.out}: no ray-render job here (no _job.json)")
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else status.format_status(report))
    return 0


def parse_storage_options(text: str | None, what: str = "--storage-options") -> dict:
    """See config.read_storage_options: JSON, @FILE, or the RAY_RENDER_STORAGE_OPTIONS environment variable."""
    return read_storage_options(text, what)


# -- expand / export / report (dataset synthesis) --------------------------------------------------------------------


def add_expand_parser(subparsers) -> None:
    from ray_render.synthesis import templates

    parser = subparsers.add_parser("expand", help="expand a prompt template and its values into a manifest",
                                   description="Expand a prompt template (YAML) and its values table into a "
                                               "manifest Parquet file for `ray-render run`.")
    parser.add_argument("template", metavar="TEMPLATE", help="template YAML file (path or fsspec URL)")
    parser.add_argument("--out", required=True, metavar="MANIFEST", help="manifest Parquet file to write")
    parser.add_argument("--values", metavar="FILE", help="values table (YAML, CSV or Parquet); default: the "
                        "template's `values`")
    parser.add_argument("--max-rows", dest="max_rows", type=int, default=templates.MAX_ROWS, metavar="N",
                        help=f"refuse to write more rows than this (default: {templates.MAX_ROWS})")
    parser.add_argument("--storage-options", dest="storage_options", metavar="JSON", default=None,
                        help="fsspec options as a JSON object")
    parser.set_defaults(handler=cmd_expand)


def cmd_expand(args: argparse.Namespace) -> int:
    from ray_render.synthesis import templates

    try:
        rows = templates.expand_file(args.template, args.out, parse_storage_options(args.storage_options),
                                     args.values, args.max_rows)
    except (templates.TemplateError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {rows} rows to {args.out}")
    return 0


def add_export_parser(subparsers) -> None:
    from ray_render.output import export

    parser = subparsers.add_parser("export", help="export a finished output as WebDataset or Parquet shards",
                                   description="Write the committed ok images of an output root as WebDataset tar "
                                               "or Hugging Face-loadable Parquet shards.")
    parser.add_argument("out", metavar="OUT_ROOT", help="the job's output root (local path or fsspec URL)")
    parser.add_argument("--kind", required=True, choices=export.KINDS)
    parser.add_argument("--dest", required=True, metavar="URL", help="directory for train-NNNNN-of-MMMMM files")
    parser.add_argument("--samples-per-shard", dest="samples_per_shard", type=int, default=1000, metavar="N",
                        help="images per exported file (default: 1000)")
    parser.add_argument("--min-quality", dest="min_quality", type=float, metavar="Q",
                        help="0-1: leave out images whose quality_score is below Q")
    parser.add_argument("--storage-options", dest="storage_options", metavar="JSON", default=None,
                        help="fsspec options of OUT_ROOT as a JSON object")
    parser.add_argument("--dest-storage-options", dest="dest_storage_options", metavar="JSON", default=None,
                        help="fsspec options of --dest (default: --storage-options)")
    parser.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ray_render.output import export

    so = parse_storage_options(args.storage_options)
    dest_so = parse_storage_options(args.dest_storage_options, "--dest-storage-options") if args.dest_storage_options \
        else None
    try:
        result = export.export(args.out, args.kind, args.dest, so, args.samples_per_shard,
                               dest_storage_options=dest_so, min_quality=args.min_quality)
    except export.ExportError as exc:
        raise CliError(str(exc)) from None
    print(f"exported {result.samples} images in {len(result.files)} files: {result.pattern}")
    return 0


def add_report_parser(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write an output's contact sheet and HTML report again",
                                   description="Write contact_sheet.png and report.html under a job's output root "
                                               "(the job writes them when it ends, unless --no-report).")
    parser.add_argument("out", metavar="OUT_ROOT", help="the job's output root (local path or fsspec URL)")
    parser.add_argument("--samples", type=int, default=24, metavar="N", help="images on the contact sheet (0-100, "
                        "default: 24)")
    parser.add_argument("--storage-options", dest="storage_options", metavar="JSON", default=None,
                        help="fsspec options as a JSON object")
    parser.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ray_render import storage
    from ray_render.output import commits, record, report

    so = parse_storage_options(args.storage_options)
    if record.read_job_record(args.out, so) is None and not commits.committed_shard_ids(args.out, so):
        raise CliError(f"{args.out}: no ray-render job here (no _job.json, no committed shards)")
    try:
        result = report.write_report(args.out, so, samples=args.samples)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {result.html} and {storage.join(args.out, report.CONTACT_SHEET)} ({result.samples} samples)")
    return 0


# -- refresh -------------------------------------------------------------------------------------------------------


def add_refresh_parser(subparsers) -> None:
    parser = subparsers.add_parser("refresh", help="render only new and changed rows into an existing output",
                                   argument_default=argparse.SUPPRESS, epilog=EXIT_CODES_HELP,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description="Bring an output up to date with a manifest: render the rows that "
                                               "are new or whose render settings changed, mark rows that left the "
                                               "manifest `removed` (see ray_render/engine/refresh.py).")
    add_job_options(parser)
    parser.add_argument("--prune", action="store_true", help="delete the images of removed rows")
    parser.set_defaults(handler=cmd_refresh)


def cmd_refresh(args: argparse.Namespace) -> int:
    from ray_render.engine import refresh

    prune = bool(vars(args).pop("prune", False))
    return refresh.run(job_from_args(args), prune=prune).exit_code


# -- main ----------------------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_run_parser, add_plan_parser, add_preview_parser, add_status_parser, add_refresh_parser,
               add_expand_parser, add_export_parser, add_report_parser]


LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_logging_options(parser: argparse.ArgumentParser, default) -> None:
    try:
        parser.add_argument("-v", "--verbose", action="store_true", default=default,
                            help="debug logging, and tracebacks of errors (same as --log-level debug)")
    except argparse.ArgumentError:  # a subcommand with a -v of its own
        pass
    parser.add_argument("--log-level", dest="log_level", choices=LOG_LEVELS, default=default,
                        help="how much ray-render logs to stderr (default: info)")


def build_parser(subcommands=None) -> argparse.ArgumentParser:
    from ray_render import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Render prompt manifests (Parquet, CSV, JSON Lines) "
                                     "with NextStep-1 on a Ray cluster.", epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_logging_options(parser, None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in SUBCOMMANDS if subcommands is None else subcommands:
        add_parser(subparsers)
    for subparser in subparsers.choices.values():  # -v and --log-level after the subcommand too
        _add_logging_options(subparser, argparse.SUPPRESS)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a redirect, a notebook's, a test's capture), not the
    one there was when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool = False, level: str | None = None) -> None:
    logger = logging.getLogger("ray_render")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else getattr(logging, (level or "info").upper()))


def job_entrypoint(command: str, argv: list[str]) -> int:
    """`python jobs/render.py ...` and `jobs/refresh.py`: `ray-render COMMAND ...` under an orchestrator (a RayJob,
    a CronJob, `ray job submit`), which reads any non-zero status as a failure to retry on new GPU clusters. So a job
    that finished with some failed or invalid rows (EXIT_ROWS; they are in the metadata, a rerun with
    --retry-failed renders the failed ones again) exits 0 here, unless --strict is given."""
    strict = "--strict" in argv
    code = main([command, *(arg for arg in argv if arg != "--strict")])
    if code == EXIT_ROWS and not strict:
        print(f"{PROG}: finished with failed or invalid rows (exit {EXIT_ROWS}); exiting 0 for the orchestrator "
              f"(pass --strict to fail the job instead)", file=sys.stderr)
        return EXIT_OK
    return code


def main(argv: list[str] | None = None, subcommands=None,
         forwarded: dict[str, Callable[[list[str]], int]] | None = None) -> int:
    """Run one subcommand (default: the SUBCOMMANDS above); returns the exit status. `forwarded` names subcommands
    that parse their own arguments: they get everything after their name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in (forwarded or {}):
        _setup_logging()
        return forwarded[argv[0]](argv[1:])
    args = build_parser(subcommands).parse_args(argv)
    args.verbose = bool(args.verbose) or args.log_level == "debug"
    _setup_logging(args.verbose, args.log_level)
    try:
        return args.handler(args)
    except (CliError, ConfigError, FilesystemMissing, RecordDamaged) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except OSError as exc:  # a job file or output root that cannot be read
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback only when asked for
        logging.getLogger("ray_render").debug("internal error", exc_info=exc)
        hint = "" if args.verbose else "; rerun with --verbose for the traceback"
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
