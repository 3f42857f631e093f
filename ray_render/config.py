"""Job settings and render presets as dataclasses, validated in one place.

Precedence of a render parameter, lowest first: the model's own defaults, the job's `--preset`, the job's explicit
options (`--width`, `--cfg`, ...), the row's `preset` column, the row's own columns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RenderParam:
    """A per-row render parameter: a manifest column of this name and a job option set it (the row wins)."""

    name: str
    type: type
    flag: str  # the command-line option
    help: str
    metavar: str | None = None


# The one declaration of the render parameters; the manifest's column types, the metadata schema's columns and the
# command line's options are derived from it. Their allowed values are checked in `check_render_param`.
RENDER_PARAMETERS = (
    RenderParam("negative_prompt", str, "--negative-prompt", "negative prompt", "TEXT"),
    RenderParam("positive_prompt", str, "--positive-prompt", "appended to the caption", "TEXT"),
    RenderParam("width", int, "--width", "pixels, a multiple of 16 (default: the model's)", "PX"),
    RenderParam("height", int, "--height", "pixels, a multiple of 16 (default: the model's)", "PX"),
    RenderParam("cfg", float, "--cfg", "text guidance scale, >= 1"),
    RenderParam("cfg_img", float, "--cfg-img", "image guidance scale (editing), >= 1", "CFG"),
    RenderParam("cfg_schedule", str, "--cfg-schedule", "constant or linear"),
    RenderParam("use_norm", bool, "--use-norm", "layer-norm each sampled token"),
    RenderParam("timesteps_shift", float, "--shift", "timesteps shift, > 0", "SHIFT"),
    RenderParam("num_sampling_steps", int, "--steps", "sampling steps, >= 2", "N"),
    RenderParam("num_images", int, "--num-images", "images per row (default: 1)", "N"),
)
RENDER_PARAMS: dict[str, type] = {param.name: param.type for param in RENDER_PARAMETERS}

CFG_SCHEDULES = ("constant", "linear")
IMAGE_FORMATS = ("png", "jpeg", "webp")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
NOISE_MODES = ("fast", "reference")
ROPE_PRECISIONS = ("auto", "bf16", "fp32")
EDIT_INPUTS = ("resize", "crop")
COMPILE_MODES = ("off", "on", "auto")
MAX_SIDE = 4096  # pixels; 4096x4096 is 65,536 image tokens, far past anything NextStep was trained on


@dataclass(frozen=True)
class Preset:
    """A named bundle of defaults. `steps_factor` scales the model's own step count, so one preset name means
    "cheaper" or "better" for every model; `overrides` sets parameters outright."""

    steps_factor: float = 1.0
    overrides: dict = field(default_factory=dict)


BUILTIN_PRESETS: dict[str, Preset] = {
    "draft": Preset(steps_factor=0.4),  # layout checks and previews
    "standard": Preset(),  # the model's published defaults
    "premium": Preset(steps_factor=1.5),  # final assets
}


class ConfigError(ValueError):
    """A job setting is wrong: the job stops before any rendering, with this message."""


def check_render_param(name: str, value: Any) -> Any:
    """Return `value` converted to the parameter's type, or raise ValueError naming the allowed values.

    Used for job options and manifest cells alike, so both report the same ranges.
    """
    if name not in RENDER_PARAMS:
        raise ValueError(f"unknown render parameter {name!r}; known: {', '.join(RENDER_PARAMS)}")
    kind = RENDER_PARAMS[name]
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
        if name == "cfg_schedule" and value not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
        if name in ("width", "height") and (value < 16 or value > MAX_SIDE or value % 16):
            raise ValueError(f"{name} must be a multiple of 16 from 16 to {MAX_SIDE}, got {value}")
        if name == "num_sampling_steps" and not 2 <= value <= 1000:
            raise ValueError(f"num_sampling_steps must be from 2 to 1000, got {value}")
        if name == "num_images" and not 1 <= value <= 64:
            raise ValueError(f"num_images must be from 1 to 64, got {value}")
        return value
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if name in ("cfg", "cfg_img") and not 1.0 <= value <= 100.0:
        raise ValueError(f"{name} must be from 1 to 100 (1 turns guidance off), got {value}")
    if name == "timesteps_shift" and not 0.0 < value <= 100.0:
        raise ValueError(f"timesteps_shift must be greater than 0 and at most 100, got {value}")
    return value


# Which job settings decide the pixels (field metadata of JobConfig): a resumed job must not mix two sets of them.
# "job": a change re-renders every row; "row": resolved into each row's parameters, so a row's fingerprint holds it.
PIXELS = {"pixels": "job"}
ROW_PIXELS = {"pixels": "row"}


@dataclass
class JobConfig:
    """Everything `ray-render run` needs; the command line, a `--config` file and `jobs/render.py` build one."""

    manifests: list[str]
    out: str
    # The manifest's own names for the prompt and id columns (a dataset's `caption`, `key`, ...); staged manifests
    # carry them renamed (engine/manifests.py)
    prompt_column: str | None = None
    id_column: str | None = None
    # "tiny" (embedded), "placeholder", a snapshot dir, a hub repo id, or an fsspec URL
    model: str = field(default="tiny", metadata=PIXELS)
    vae: str | None = field(default=None, metadata=PIXELS)  # overrides the VAE path in the model's config.json
    revision: str | None = field(default=None, metadata=PIXELS)  # hub revision when `model` is a repo id
    preset: str | None = field(default=None, metadata=ROW_PIXELS)
    # explicit job-level render parameters (RENDER_PARAMS names)
    params: dict = field(default_factory=dict, metadata=ROW_PIXELS)
    presets: dict = field(default_factory=dict, metadata=ROW_PIXELS)  # the job's own presets: name -> {param: value}
    format: str = field(default="png", metadata=PIXELS)
    quality: int = field(default=95, metadata=PIXELS)  # jpeg / webp quality
    actors: int | None = None  # a fixed pool of this many; default: elastic GPU actors (max_actors), or 1 on CPU
    max_actors: int | None = None  # the elastic pool's bound; default: one per shard left
    batch_size: int = 8  # requests per model call
    shard_size: int | None = None  # manifest rows per shard; None: sized to the job (plan.auto_shard_size)
    max_in_flight: int = 2  # shards queued per actor (backpressure)
    retries: int = 3  # attempts per row and per shard beyond the first
    max_failed_fraction: float = 0.1  # abort once more than this fraction of finished rows failed
    device: str = "auto"
    dtype: str = field(default="auto", metadata=PIXELS)
    noise: str = field(default="fast", metadata=PIXELS)
    # NextStep RoPE frequencies: auto is bf16 for bfloat16 weights (what the official pipeline computes), else fp32.
    rope_precision: str = field(default="auto", metadata=PIXELS)
    # NextStep edit inputs: resized to the output size as the official example does, or centre-cropped to the
    # output's aspect ratio first (no distortion).
    edit_input: str = field(default="resize", metadata=PIXELS)
    # NextStep token steps: compiled (and replayed from CUDA graphs on CUDA) or eager; auto is on for CUDA. Compiled
    # and eager images can differ by a rounding step, so it decides pixels.
    compile: str = field(default="auto", metadata=PIXELS)
    address: str | None = None  # Ray address; default RAY_ADDRESS or a local Ray for this run
    storage_options: dict = field(default_factory=dict)  # fsspec options; never logged or recorded
    limit: int | None = None  # render only the first N rows of the plan
    resume: bool = True
    overwrite: bool = False
    retry_failed: bool = False  # render the failed rows of committed shards again, once (engine/repairs.py)
    lease_ttl_s: float = 60.0  # another run may take the output over this long after this run's last heartbeat
    call_timeout_s: float = 3600.0  # no render call may run longer: its actor is killed and the attempt counted
    # Where edit rows' input images may come from, besides the directories of the job's own manifests.
    input_roots: list = field(default_factory=list)
    max_input_bytes: int = 64 << 20  # an input image larger than this fails its row
    input_timeout_s: float = 60.0  # an input image read that takes longer fails its row
    progress: bool = True
    cpus_per_actor: float = 0.5  # small on purpose: leave CPU for Ray's own tasks on small machines
    gpus_per_actor: float = 1.0  # used when device resolves to cuda
    quality_scores: bool = False  # write the quality columns (on automatically when min_quality is set)
    # 0..1: re-render images whose quality_score is below it
    min_quality: float | None = field(default=None, metadata=PIXELS)
    # re-renders per image at most under min_quality, each with a new deterministic seed
    quality_retries: int = field(default=2, metadata=PIXELS)
    report: bool = True  # write contact_sheet.png and report.html under the output root when the job ends

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.manifests:
            raise ConfigError("no manifest given: pass one or more Parquet files, directories, globs or URLs")
        if not self.out:
            raise ConfigError("no output given: pass --out PATH_OR_URL")
        mapped = {"prompt_column": self.prompt_column, "id_column": self.id_column}
        for name, column in mapped.items():
            if column is not None and (not isinstance(column, str) or not column.strip()):
                raise ConfigError(f"--{name.replace('_', '-')} must be a column name, got {column!r}")
        if self.prompt_column is not None and self.prompt_column == self.id_column:
            raise ConfigError(f"--prompt-column and --id-column name the same column {self.prompt_column!r}")
        choices = {"format": IMAGE_FORMATS, "device": DEVICES, "dtype": DTYPES, "noise": NOISE_MODES,
                   "rope_precision": ROPE_PRECISIONS, "edit_input": EDIT_INPUTS, "compile": COMPILE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        positive = {"batch_size": self.batch_size, "max_in_flight": self.max_in_flight,
                    **({"shard_size": self.shard_size} if self.shard_size is not None else {})}
        if self.actors is not None:
            positive["actors"] = self.actors
        if self.max_actors is not None:
            positive["max_actors"] = self.max_actors
        if self.limit is not None:
            positive["limit"] = self.limit
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"--retries must be a whole number >= 0, got {self.retries!r}")
        if isinstance(self.lease_ttl_s, bool) or not isinstance(self.lease_ttl_s, (int, float)) \
                or not 1.0 <= self.lease_ttl_s <= 86400.0:
            raise ConfigError(f"--lease-ttl must be from 1 to 86400 seconds, got {self.lease_ttl_s!r}")
        if isinstance(self.call_timeout_s, bool) or not isinstance(self.call_timeout_s, (int, float)) \
                or not 1.0 <= self.call_timeout_s <= 7 * 86400:
            raise ConfigError(f"--call-timeout must be from 1 second to a week, got {self.call_timeout_s!r}")
        if isinstance(self.input_roots, str):
            self.input_roots = [self.input_roots]
        if not all(isinstance(root, str) and root for root in self.input_roots):
            raise ConfigError(f"--input-roots must be paths or URL prefixes, got {self.input_roots!r}")
        if isinstance(self.max_input_bytes, bool) or not isinstance(self.max_input_bytes, int) \
                or self.max_input_bytes < 1:
            raise ConfigError(f"--max-input-bytes must be a whole number >= 1, got {self.max_input_bytes!r}")
        if isinstance(self.input_timeout_s, bool) or not isinstance(self.input_timeout_s, (int, float)) \
                or not 0 < self.input_timeout_s <= 3600:
            raise ConfigError(f"--input-timeout must be more than 0 and at most 3600 seconds, got "
                              f"{self.input_timeout_s!r}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ConfigError(f"--max-failed-fraction must be from 0 to 1, got {self.max_failed_fraction}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality must be from 1 to 100, got {self.quality}")
        if self.min_quality is not None and (isinstance(self.min_quality, bool) or not 0.0 <= self.min_quality <= 1.0):
            raise ConfigError(f"--min-quality must be from 0 to 1, got {self.min_quality!r}")
        retries = self.quality_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"--quality-retries must be a whole number >= 0, got {self.quality_retries!r}")
        for name, value in list(self.params.items()):
            try:
                self.params[name] = check_render_param(name, value)
            except ValueError as exc:
                raise ConfigError(f"job option: {exc}") from None
        for name, values in self.presets.items():
            for param, value in values.items():
                try:
                    check_render_param(param, value)
                except ValueError as exc:
                    raise ConfigError(f"preset {name!r}: {exc}") from None
        if self.preset is not None and self.preset not in self.all_presets():
            raise ConfigError(f"--preset must be one of {', '.join(self.all_presets())}, got {self.preset!r}")

    @property
    def scores_quality(self) -> bool:
        """True when images get the quality columns: asked for, or needed by --min-quality."""
        return self.quality_scores or self.min_quality is not None

    def all_presets(self) -> dict[str, Preset]:
        custom = {name: Preset(overrides=dict(values)) for name, values in self.presets.items()}
        return {**BUILTIN_PRESETS, **custom}

    def model_options(self) -> dict:
        """The keyword arguments of `models.load_model` for this job's `model`."""
        return {"vae": self.vae, "revision": self.revision, "device": self.device, "dtype": self.dtype,
                "noise": self.noise, "storage_options": self.storage_options,
                "rope_precision": self.rope_precision, "edit_input": self.edit_input, "compile": self.compile}

    def record(self) -> dict:
        """The settings as written to the job record: storage options are left out, they may hold secrets."""
        settings = asdict(self)
        settings["storage_options"] = sorted(self.storage_options)  # the option names only
        return settings


PIXEL_SETTINGS = tuple(f.name for f in fields(JobConfig) if f.metadata.get("pixels"))
JOB_PIXEL_SETTINGS = tuple(f.name for f in fields(JobConfig) if f.metadata.get("pixels") == "job")


def resolve_params(model_defaults: dict, presets: dict[str, Preset], job_preset: str | None, job_params: dict,
                   row_preset: str | None = None, row_params: dict | None = None) -> dict:
    """Merge render parameters by precedence (see the module docstring). Unknown preset names raise ValueError."""
    resolved = dict(model_defaults)
    for preset_name, explicit in ((job_preset, job_params), (row_preset, row_params or {})):
        if preset_name is not None:
            if preset_name not in presets:
                raise ValueError(f"preset must be one of {', '.join(presets)}, got {preset_name!r}")
            preset = presets[preset_name]
            steps = resolved.get("num_sampling_steps")
            if steps is not None and preset.steps_factor != 1.0:
                resolved["num_sampling_steps"] = max(2, round(steps * preset.steps_factor))
            resolved.update(preset.overrides)
        resolved.update(explicit)
    return resolved


STORAGE_OPTIONS_ENV = "RAY_RENDER_STORAGE_OPTIONS"  # JSON, or @FILE: credentials that stay off command lines
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def read_storage_options(value: object, what: str = "--storage-options") -> dict:
    """fsspec options from a mapping, a JSON text, `@FILE` (a JSON file), or, when none is given, from the
    RAY_RENDER_STORAGE_OPTIONS environment variable (JSON or @FILE). Inline JSON naming a credential logs a warning:
    a command line is visible to `ps`, `ray job list` and `ray job logs`."""
    source = what
    if value is None or value == "":
        value, source = os.environ.get(STORAGE_OPTIONS_ENV) or "{}", STORAGE_OPTIONS_ENV
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a JSON object, @FILE or a mapping, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read {text[1:]}: {exc.strerror or exc}") from None
    elif source == what and any(word in text.lower() for word in _SECRET_WORDS):
        import logging

        logging.getLogger("ray_render").warning(
            "%s holds credentials on the command line, where `ps`, `ray job list` and `ray job logs` show them: "
            "put them in a file and pass %s @FILE, or set %s", what, what, STORAGE_OPTIONS_ENV)
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{source} must be a JSON object")
    return options


def load_config_file(path: str) -> dict:
    """Read a YAML or TOML job file into option names (dashes become underscores)."""
    text = Path(path).read_text()
    if path.endswith(".toml"):
        import tomllib

        data = tomllib.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of option names to values")
    options = {key.replace("-", "_"): value for key, value in data.items()}
    check_option_names(options, path)
    return options


def check_option_names(options: dict, where: str) -> None:
    """ConfigError naming the unknown ones, unless every name is a JobConfig field or a render parameter."""
    known = {f.name for f in fields(JobConfig)} | set(RENDER_PARAMS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def job_from_options(options: dict) -> JobConfig:
    """Build a JobConfig from a flat mapping of option names, render parameters split out into `params`."""
    options = dict(options)
    params = dict(options.pop("params", None) or {})
    for name in RENDER_PARAMS:
        if options.get(name) is not None:
            params[name] = options.pop(name)
        else:
            options.pop(name, None)
    if isinstance(options.get("manifests"), str):
        options["manifests"] = [options["manifests"]]
    options["storage_options"] = read_storage_options(options.get("storage_options"))
    address = options.get("address") or os.environ.get("RAY_ADDRESS") or None
    options["address"] = address
    return JobConfig(params=params, **options)
