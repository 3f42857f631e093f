"""`ray-render plan MANIFEST... [run options]`: what a run would do and what it would cost, before any of it. No Ray
is started and no weights are read.

1. Stage text manifests into a scratch directory and plan them as the run will: the same files, rows and shards.
2. Read the columns that decide a row's cost (size, images, steps, guidance, preset, input image) and resolve them
   as the actors will: the model's defaults (`models.describe_model`, weights-free), presets, the job's options,
   the row's own values. A row with a bad value there counts as invalid and costs nothing (prompts are checked
   when the run reads them: reading every prompt would cost the plan what it saves).
3. Estimate seconds per image on each device of the calibration table (engine/calibration.py, every figure with
   its origin), summed to GPU-hours, and the cost with --price.

`row_settings` (step 2, row by row) also serves `ray-render preview`, which samples rows by their resolved size.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from ray_render import storage
from ray_render.config import RENDER_PARAMS, JobConfig, check_render_param, resolve_params
from ray_render.engine import calibration, manifests
from ray_render.engine import plan as planning
from ray_render.engine.rows import base_params
from ray_render.models import describe_model
from ray_render.models.base import ModelDescription

COST_COLUMNS = ("width", "height", "num_images", "num_sampling_steps", "cfg", "cfg_img", "preset", "input_image")


@dataclass
class Forecast:
    """What `ray-render plan` reports (`to_dict` is its --json)."""

    files: list[str]
    rows: int
    shards: int
    shard_size: int  # the largest shard's rows
    images: int
    image_tokens: int
    invalid_rows: int
    model: ModelDescription
    shapes: Counter = field(default_factory=Counter)  # calibration.RowShape -> images
    estimate: list = field(default_factory=list)  # calibration.Estimate, one per device
    staged: int = 0  # files staged from CSV / JSON Lines (or renamed)
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        sizes = Counter()
        for shape, count in self.shapes.items():
            sizes[(shape.width, shape.height, shape.steps)] += count
        return {"rows": self.rows, "shards": self.shards, "images": self.images, "image_tokens": self.image_tokens,
                "invalid_rows": self.invalid_rows, "files": self.files, "shard_size": self.shard_size,
                "model": {"name": self.model.name, "family": self.model.family, "revision": self.model.revision,
                          "source": self.model.source, "defaults": self.model.defaults},
                "sizes": [{"width": w, "height": h, "steps": s, "images": n}
                          for (w, h, s), n in sorted(sizes.items(), key=lambda item: -item[1])],
                "estimate": [estimate.to_dict() for estimate in self.estimate]}


def forecast(job: JobConfig, prices: dict[str, float] | None = None) -> Forecast:
    """Plan `job` and estimate it (see the module docstring). Raises ManifestError for an unusable manifest and
    ValueError when the model cannot be described without loading it."""
    model = describe_model(job.model, **job.model_options())
    with tempfile.TemporaryDirectory(prefix="ray-render-plan-") as scratch:
        files, sources = manifests.stage_manifests(dataclasses.replace(job, out=scratch))
        plan = planning.plan(files, job.shard_size, job.storage_options, job.limit)
        result = Forecast(files=[sources[f]["url"] if f in sources else f for f in plan.files], rows=plan.total_rows,
                          shards=len(plan.shards), shard_size=max(shard.num_rows for shard in plan.shards),
                          images=0, image_tokens=0, invalid_rows=0, model=model, staged=len(sources),
                          warnings=list(plan.warnings))
        for _, _, params, _ in row_settings(plan, job, model):
            if params is None:
                result.invalid_rows += 1
                continue
            shape = row_shape(params, model)
            result.shapes[shape] += params["num_images"]
            result.images += params["num_images"]
            result.image_tokens += params["num_images"] * shape.tokens
    if result.images:
        tiny = describe_model("tiny").revision if model.family == "nextstep" else None
        # The bandwidth model is for GPUs, where --compile auto compiles the token steps.
        result.estimate = calibration.estimates(model, dict(result.shapes), job.batch_size, tiny, prices,
                                                compiled=job.compile != "off")
    return result


def row_shape(params: dict, model: ModelDescription) -> calibration.RowShape:
    edit = bool(params.get("input_image"))
    branches = 3 if edit and params["cfg_img"] > 1 else 2 if params["cfg"] > 1 else 1
    return calibration.RowShape(params["width"], params["height"], model.image_tokens(params["width"],
                                                                                     params["height"]),
                                params["num_sampling_steps"], branches, edit)


def row_settings(plan: planning.Plan, job: JobConfig, model: ModelDescription
                 ) -> Iterator[tuple[int, int, dict | None, str | None]]:
    """(the shard's position in the plan, the row, its resolved render parameters or None when the row is invalid,
    its own preset) for every row of the plan, in plan order. Reads only the COST_COLUMNS, one file at a time (shards
    come in file order); each distinct combination of values is resolved once."""
    presets = job.all_presets()
    defaults = base_params(model.defaults)
    resolved: dict[tuple, dict | None] = {}
    current, columns = None, {}
    for position, shard in enumerate(plan.shards):
        if shard.file_index != current:
            current, columns = shard.file_index, _cost_columns(plan.files[shard.file_index], job.storage_options)
        names = list(columns)
        for row in shard.row_indices():
            if manifests.ERROR in columns and columns[manifests.ERROR][row] is not None:
                yield position, row, None, None  # a cell staging could not convert: the row is invalid
                continue
            key = tuple(columns[name][row] for name in names)
            if key not in resolved:
                resolved[key] = _resolve(dict(zip(names, key)), defaults, presets, job, model)
            yield position, row, resolved[key], columns["preset"][row] if "preset" in columns else None


def _cost_columns(url: str, storage_options: dict | None) -> dict[str, list]:
    fs, path = storage.open_fs(url, storage_options)

    def read() -> dict[str, list]:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            wanted = [name for name in (*COST_COLUMNS, manifests.ERROR) if name in parquet.schema_arrow.names]
            table = parquet.read(columns=wanted)
        return {name: table.column(name).to_pylist() for name in wanted}  # small columns: a few bytes a row

    return storage.with_retries(read, what=f"read manifest {url}", storage_options=storage_options)


def _resolve(raw: dict, defaults: dict, presets: dict, job: JobConfig, model: ModelDescription) -> dict | None:
    """The row's parameters as the actors resolve them, or None where they would find it invalid."""
    preset = raw.get("preset")
    if preset is not None and preset not in presets:
        return None
    row_params = {}
    for name, value in raw.items():
        if name in RENDER_PARAMS and value is not None:
            try:
                row_params[name] = check_render_param(name, value)
            except ValueError:
                return None
    params = resolve_params(defaults, presets, job.preset, job.params, preset, row_params)
    if model.size_problem(params["width"], params["height"]) is not None:
        return None
    input_image = raw.get("input_image")
    params["input_image"] = input_image.strip() if isinstance(input_image, str) and input_image.strip() else None
    return params


# ---------------------------------------------------------------------------------------------------------------
# For people


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value >= 0.01 else f"{value:.2g}"


def format_forecast(result: Forecast) -> str:
    model = result.model
    lines = [f"plan: {len(result.files)} manifest file(s)"
             + (f", {result.staged} staged as Parquet (CSV / JSON Lines / renamed columns)" if result.staged else "")]
    lines.append(f"  rows          {result.rows:,} in {result.shards:,} shard(s) of up to {result.shard_size:,} rows"
                 + (f"; {result.invalid_rows:,} invalid (they cost nothing)" if result.invalid_rows else ""))
    lines.append(f"  images        {result.images:,}")
    lines.append(f"  image tokens  {result.image_tokens:,}")
    sizes = Counter()
    for shape, count in result.shapes.items():
        sizes[(shape.width, shape.height, shape.steps)] += count
    shown = ", ".join(f"{w}x{h} {s} steps: {n:,}" for (w, h, s), n in sizes.most_common(4))
    if len(sizes) > 4:
        shown += f", and {len(sizes) - 4} more"
    if shown:
        lines.append(f"  sizes         {shown}")
    revision = f", revision {model.revision}" if model.revision else ""
    lines.append(f"  model         {model.name} ({model.family}{revision}; defaults from {model.source})")
    for warning in result.warnings:
        lines.append(f"  warning       {warning}")
    if not result.estimate:
        lines.append("  estimate      none: no row would render")
        return "\n".join(lines)
    lines.append("estimate (seconds per image on one device; GPU-hours over all devices of a kind):")
    rows = [("device", "s/image", "GPU-hours", "cost", "batch", "limit", "origin")]
    for e in result.estimate:
        rows.append((e.gpu, "-" if e.seconds_per_image is None else _number(e.seconds_per_image),
                     "-" if e.gpu_hours is None else _number(e.gpu_hours),
                     "-" if e.usd is None else f"${e.usd:,.2f}", str(e.batch_size) if e.batch_size else "-",
                     e.limit, e.origin))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(width) if i in (0, 5) else cell.rjust(width)
                                      for i, (cell, width) in enumerate(zip(row[:6], widths))) + "  " + row[6])
    return "\n".join(lines)


def parse_prices(values: list[str]) -> dict[str, float]:
    """`--price GPU=USD_PER_HOUR` options as {gpu: price}; ValueError naming the bad one and the known devices."""
    known = {gpu.name.lower(): gpu.name for gpu in calibration.GPUS}
    known.update({entry.device.lower(): entry.device for entry in calibration.MEASURED})
    prices = {}
    for value in values:
        name, _, price = value.partition("=")
        try:
            usd = float(price)
        except ValueError:
            usd = math.nan
        if name.strip().lower() not in known or not math.isfinite(usd) or usd < 0:
            raise ValueError(f"--price must be DEVICE=USD_PER_HOUR with DEVICE one of {', '.join(known.values())}, "
                             f"got {value!r}")
        prices[known[name.strip().lower()]] = usd
    return prices
