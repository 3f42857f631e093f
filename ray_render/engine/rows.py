"""A shard's rows: reading them from the manifest and validating each into a `RowTask` (ready to render) or an
`InvalidRow` (a bad value; the row ends `invalid` in the metadata and nothing else is lost), and the metadata row
each one ends as.

Row rules (DESIGN.md "Manifest" is the contract):
- `prompt` must be a non-null string that is non-empty after stripping whitespace, at most MAX_PROMPT_CHARS
  characters, valid UTF-8 and without NUL characters. An edit row (with `input_image`) still needs its prompt:
  NextStep's edit prompts carry the `<image>` marker.
- `id`: a string (or an integer, used as its decimal text) matching ROW_ID_PATTERN, not "." or "..", not starting
  with "."; a null id defaults to "h" + 20 hex digits of a hash of the row's prompt, render columns, seed, input
  image and preset and of the job's render settings (`default_row_id`). Ids must be unique across the plan; a
  repeat is invalid and names the first row (the driver finds repeats across shards before rendering).
- `seed`: a whole number from 0 to 2**63 - 1 (image k uses seed + k, which must fit too); a null seed is derived
  from the id, so a row's images do not depend on where it lands.
- `input_image`: a URI string; null, empty or blank means "no input image".
- Null cells mean "use the job default"; NaN and infinities are invalid.
- Row numbers in messages are 0-based positions in the manifest file (the same as the `source_row` output column).
  A staged manifest (engine/manifests.py) names the user's file instead of the staged copy, adds the line of a
  text manifest, and carries the problem of a cell it could not convert: that row is invalid for it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from functools import cached_property

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.config import (
    RENDER_PARAMS,
    JobConfig,
    check_render_param,
    resolve_params,
)
from ray_render.engine import manifests
from ray_render.engine.plan import (
    DEFAULT_ID_COLUMNS,
    ROW_ID_PATTERN,
    ManifestError,
    Shard,
    column_values,
    is_passthrough,
    is_text_type,
)
from ray_render.models.base import RenderRequest
from ray_render.output.schema import RENDER_COLUMNS

MAX_PROMPT_CHARS = 20_000  # about 5,000 text tokens: far past NextStep's useful context, small enough to log
MAX_URI_CHARS = 4096
MAX_SEED = 2**63 - 1  # seeds travel as int64 in the metadata and through torch generators
PROMPT_FIELDS = ("prompt", "negative_prompt", "positive_prompt")

_ROW_ID_RE = re.compile(ROW_ID_PATTERN)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class RowTask:
    """A valid manifest row with every render setting resolved: what an actor renders, and the metadata it writes."""

    row_index: int  # 0-based row in the manifest file
    id: str
    prompt: str
    params: dict  # every RENDER_PARAMS name, resolved (model < job preset < job options < row preset < row)
    seed: int  # image k uses seed + k
    input_image: str | None  # URI of the image to edit
    preset: str | None  # the row's own preset column, if any
    passthrough: dict  # extra manifest columns, unchanged
    fingerprint: str  # sha256 of params + prompt + seed + input_image: changes iff the rendered images would
    source_file: str = ""

    @cached_property
    def passthrough_fingerprint(self) -> str:
        return passthrough_fingerprint(self.passthrough)

    def requests(self, input_image: bytes | None = None) -> list[RenderRequest]:
        """One RenderRequest per image; `input_image` is the fetched content of `self.input_image`."""
        settings = {name: value for name, value in self.params.items() if name != "num_images"}
        return [RenderRequest(key=f"{self.id}#{k}", prompt=self.prompt, seed=self.seed + k, input_image=input_image,
                              **settings)
                for k in range(self.params["num_images"])]

    def _columns(self) -> dict:
        """The metadata columns every row of this task carries."""
        row = {name: self.params.get(name) for name in RENDER_COLUMNS}
        row.update(id=self.id, prompt=self.prompt, width=self.params.get("width"), height=self.params.get("height"),
                   preset=self.preset, input_image=self.input_image, row_fingerprint=self.fingerprint,
                   passthrough_fingerprint=self.passthrough_fingerprint, source_file=self.source_file,
                   source_row=self.row_index)
        return row

    def ok_row(self, image_index: int, *, image_uri: str, sha256: str, width: int, height: int, fmt: str,
               model: str, model_revision: str, render_ms: float | None, attempts: int, worker: str,
               created_at: datetime | None = None, seed: int | None = None) -> dict:
        """The metadata row of one stored image; `seed` is the seed actually used (default: row seed + image index;
        a --min-quality re-render uses another)."""
        row = self._columns()
        seed = self.seed + image_index if seed is None else seed
        row.update(image_index=image_index, status="ok", error=None, image_uri=image_uri, width=width,
                   height=height, format=fmt, sha256=sha256, seed=seed, model=model, model_revision=model_revision,
                   render_ms=render_ms, attempts=attempts, worker=worker, created_at=created_at or _now())
        row.update(self.passthrough)
        return row

    def failed_row(self, error: str, attempts: int, *, image_index: int | None = None, model: str = "",
                   model_revision: str = "", worker: str = "", render_ms: float | None = None,
                   created_at: datetime | None = None) -> dict:
        """The metadata row of this row (or one image of it, given `image_index`) when it could not be rendered."""
        row = self._columns()
        row.update(image_index=image_index, status="failed", error=error, image_uri=None, format=None, sha256=None,
                   seed=self.seed + (image_index or 0), model=model, model_revision=model_revision,
                   render_ms=render_ms, attempts=attempts, worker=worker, created_at=created_at or _now())
        row.update(self.passthrough)
        return row


@dataclass
class InvalidRow:
    """A manifest row with a bad value: it yields one `invalid` metadata row carrying `error`."""

    row_index: int
    id: str  # the row's own id when usable, else f"row-{file_index}-{row_index}"
    column: str  # the offending column
    error: str  # names the file, row, id, column and the allowed values
    passthrough: dict
    source_file: str = ""
    prompt: str | None = None  # kept when it was a usable string, to help find the row
    # The row's RowTask.fingerprint when the model refused its settings (the same model refuses them again, so a
    # refresh leaves the row be); None for a bad value in the manifest, or an input image that could not be used
    fingerprint: str | None = None

    @cached_property
    def passthrough_fingerprint(self) -> str:
        return passthrough_fingerprint(self.passthrough)

    def metadata_row(self, *, model: str = "", model_revision: str = "", worker: str = "",
                     created_at: datetime | None = None) -> dict:
        """The `invalid` metadata row: render settings null, the error says why."""
        row = {"id": self.id, "image_index": None, "status": "invalid", "error": self.error, "prompt": self.prompt,
               "model": model, "model_revision": model_revision, "attempts": 0, "worker": worker,
               "created_at": created_at or _now(), "source_file": self.source_file, "source_row": self.row_index,
               "row_fingerprint": self.fingerprint, "passthrough_fingerprint": self.passthrough_fingerprint}
        row.update(self.passthrough)
        return row


# ---------------------------------------------------------------------------------------------------------------
# Reading one shard's rows


def _table_to_rows(table: pa.Table) -> list[dict]:
    columns = [_cells(column) for column in table.columns]
    return [dict(zip(table.column_names, values)) for values in zip(*columns)]


def _cells(column: pa.ChunkedArray) -> list:
    if not is_text_type(column.type):
        return column_values(column)
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    # Some cell is not valid UTF-8. Keep the bytes (as surrogate escapes) so validation can name the row and column
    # instead of failing the whole shard.
    as_text = column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column
    raw = as_text.cast(pa.large_binary()).to_pylist()
    return [None if value is None else value.decode("utf-8", "surrogateescape") for value in raw]


def read_shard_rows(shard: Shard, storage_options: dict | None = None) -> list[dict]:
    """The shard's rows as dicts (all columns), reading only the row groups that overlap it."""
    fs, path = storage.open_fs(shard.file, storage_options)

    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            wanted, first_row, offset = [], None, 0
            for index in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(index).num_rows
                if offset < shard.row_stop and offset + rows > shard.row_start:
                    wanted.append(index)
                    first_row = offset if first_row is None else first_row
                offset += rows
            if not wanted or offset < shard.row_stop:
                raise ManifestError(f"manifest {shard.file}: has {offset} rows, shard {shard.shard_id} needs rows "
                                    f"{shard.row_start} to {shard.row_stop}; was the file changed after planning?")
            table = parquet.read_row_groups(wanted)
        table = table.slice(shard.row_start - first_row, shard.row_stop - shard.row_start)
        return table if shard.rows is None else table.take([row - shard.row_start for row in shard.rows])

    table = storage.with_retries(read, what=f"read manifest {shard.file}", storage_options=storage_options)
    return _table_to_rows(table)


# ---------------------------------------------------------------------------------------------------------------
# Validating rows


def _row_id_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not _ROW_ID_RE.fullmatch(value) or value.startswith("."):
        return (f"must be 1 to 128 characters from A-Z a-z 0-9 . _ - and not start with '.', "
                f"got {_short(value)}")
    return None


def _text_problem(value: str, limit: int) -> str | None:
    if "\x00" in value:
        return "must not contain NUL characters"
    if not value.isascii() and any("\udc80" <= char <= "\udcff" for char in value):
        return "is not valid UTF-8"
    if len(value) > limit:
        return f"must be at most {limit} characters, got {len(value)}"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _clean(value: object) -> object:
    # Passthrough text with undecodable bytes is written back with replacement characters, not as broken strings.
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _sha256(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def passthrough_fingerprint(passthrough: dict) -> str:
    """sha256 of a row's passthrough values, stored with its metadata rows: a refresh that finds only this changed
    updates those rows in place instead of rendering. Null cells are left out, as a column the row's file lacks
    (both read back as null); values JSON cannot hold (dates, decimals, bytes) count by their repr, which names
    their type."""
    present = {name: value for name, value in passthrough.items() if value is not None}
    return hashlib.sha256(json.dumps(present, sort_keys=True, ensure_ascii=True, default=repr).encode()).hexdigest()


def _canonical(name: str, value: object) -> object:
    """A manifest cell as it decides the images: render parameters in their checked type (7 and 7.0 are one cfg),
    a blank input image as none; a value that does not check stays as it is (the row is invalid anyway)."""
    if name in RENDER_PARAMS:
        try:
            return check_render_param(name, value)
        except ValueError:
            return repr(value)
    if name == "input_image" and isinstance(value, str):
        return value.strip() or None
    return value


def default_row_id(row: dict, job: JobConfig) -> str:
    """The id of a row that has none: "h" + 20 hex digits of a hash of what decides its images as the manifest says
    it (DEFAULT_ID_COLUMNS) and of the job's own render settings. A function of the row's cells alone, so the driver
    finds repeats across shards (engine/plan.py: mark_repeated_ids) before any row is rendered."""
    cells = {name: _canonical(name, row.get(name)) for name in DEFAULT_ID_COLUMNS if row.get(name) is not None}
    settings = {"preset": job.preset, "params": job.params, "presets": job.presets}
    return "h" + _sha256({"row": {k: v for k, v in cells.items() if v is not None}, "job": settings})[:20]


def base_params(model_defaults: dict) -> dict:
    """Every render parameter's lowest-precedence value: RenderRequest's field defaults, then the model's own."""
    request_defaults = {f.name: f.default for f in fields(RenderRequest)}
    params = {name: request_defaults[name] for name in RENDER_PARAMS if name in request_defaults}
    params["num_images"] = 1
    params.update({name: value for name, value in model_defaults.items() if name in RENDER_PARAMS})
    return params


class _RowProblem(Exception):
    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


def _where(row: dict, shard: Shard, row_index: int) -> tuple[str, str]:
    """(the user's file, "manifest FILE row N[, line L]") of a row: a staged manifest's rows name their source."""
    source = row.get(manifests.SOURCE_FILE) or shard.file
    line = row.get(manifests.SOURCE_LINE)
    return source, f"manifest {source} row {row_index}" + (f", line {line}" if line is not None else "")


def validate_rows(rows: list[dict], shard: Shard, *, model_defaults: dict,
                  job: JobConfig) -> list[RowTask | InvalidRow]:
    """One RowTask or InvalidRow per row, in order. Never raises for a bad value: that row alone is invalid."""
    presets = job.all_presets()
    defaults = base_params(model_defaults)
    first_row_of_id: dict[str, int] = {}
    repeated_elsewhere = dict(shard.repeated_ids)  # ids first used in an earlier shard (see plan)
    results: list[RowTask | InvalidRow] = []
    for row_index, row in zip(shard.row_indices(), rows):
        passthrough = {name: _clean(value) for name, value in row.items() if is_passthrough(name)}
        fallback_id = f"row-{shard.file_index}-{row_index}"
        row_id: str | None = None
        prompt = row.get("prompt")
        source_file, where = _where(row, shard, row_index)
        try:
            raw_id = row.get("id")
            if isinstance(raw_id, int) and not isinstance(raw_id, bool):
                raw_id = str(raw_id)
            if raw_id is not None:
                problem = _row_id_problem(raw_id)
                if problem:
                    raise _RowProblem("id", problem)
                row_id = raw_id
                if row_index in repeated_elsewhere:
                    raise _RowProblem("id", f"repeats the id of {repeated_elsewhere[row_index]}; ids must be unique")
                if row_id in first_row_of_id:
                    raise _RowProblem("id", f"repeats the id of row {first_row_of_id[row_id]} in this shard")
                first_row_of_id[row_id] = row_index
            if row.get(manifests.ERROR) is not None:  # a cell staging could not convert, or a line that is no row
                raise _RowProblem(row.get(manifests.ERROR_COLUMN) or "", row[manifests.ERROR])
            task = _resolve_row(row, row_index, row_id, defaults, presets, job, source_file, passthrough)
            if raw_id is None:
                earlier = (repeated_elsewhere.get(row_index) or
                           (f"row {first_row_of_id[task.id]} in this shard" if task.id in first_row_of_id else None))
                if earlier:
                    raise _RowProblem("id", f"is empty, and its default id {task.id!r} (a hash of the prompt and "
                                            f"settings) repeats {earlier}; give the rows distinct ids or settings")
                first_row_of_id[task.id] = row_index
            results.append(task)
        except _RowProblem as problem:
            shown_id = row_id if row_id is not None else fallback_id
            what = f"column {problem.column!r} {problem}" if problem.column else str(problem)
            usable_prompt = prompt if isinstance(prompt, str) and _text_problem(prompt, 10**9) is None else None
            results.append(InvalidRow(row_index=row_index, id=shown_id, column=problem.column,
                                      error=f"{where} (id {shown_id!r}): {what}", passthrough=passthrough,
                                      source_file=source_file, prompt=usable_prompt))
    return results


def _resolve_row(row: dict, row_index: int, row_id: str | None, defaults: dict, presets: dict, job: JobConfig,
                 source_file: str, passthrough: dict) -> RowTask:
    # 1. Prompt fields
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise _RowProblem("prompt", f"must be a non-empty string, got {_short(prompt)}")
    problem = _text_problem(prompt, MAX_PROMPT_CHARS)
    if problem:
        raise _RowProblem("prompt", problem)
    if not prompt.strip():
        raise _RowProblem("prompt", "must not be empty or only whitespace")

    # 2. Row preset and render parameters
    preset = row.get("preset")
    if preset is not None and preset not in presets:
        raise _RowProblem("preset", f"must be one of {', '.join(presets)}, got {_short(preset)}")
    row_params = {}
    for name in RENDER_PARAMS:
        value = row.get(name)
        if value is None:
            continue
        if name in PROMPT_FIELDS and isinstance(value, str):
            problem = _text_problem(value, MAX_PROMPT_CHARS)
            if problem:
                raise _RowProblem(name, problem)
        try:
            row_params[name] = check_render_param(name, value)
        except ValueError as exc:
            message = str(exc)
            raise _RowProblem(name, message[len(name) + 1:] if message.startswith(name + " ") else message) from None
    params = resolve_params(defaults, presets, job.preset, job.params, preset, row_params)

    # 3. Input image
    input_image = row.get("input_image")
    if input_image is not None:
        if not isinstance(input_image, str):
            raise _RowProblem("input_image", f"must be a URI string, got {_short(input_image)}")
        problem = _text_problem(input_image, MAX_URI_CHARS)
        if problem:
            raise _RowProblem("input_image", problem)
        input_image = input_image.strip() or None

    # 4. Seed and id: the default id hashes what decides the images; the default seed derives from the id
    seed = row.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _RowProblem("seed", f"must be a whole number, got {_short(seed)}")
        highest = MAX_SEED - (params["num_images"] - 1)
        if not 0 <= seed <= highest:
            raise _RowProblem("seed", f"must be from 0 to {highest} (image k uses seed + k, an int64), got {seed}")
    if row_id is None:
        row_id = default_row_id(row, job)
    if seed is None:
        seed = int(hashlib.sha256(row_id.encode()).hexdigest()[:15], 16)  # 60 bits: seed + k stays in int64

    fingerprint = _sha256({"prompt": prompt, "params": params, "seed": seed, "input_image": input_image})
    return RowTask(row_index=row_index, id=row_id, prompt=prompt, params=params, seed=seed, input_image=input_image,
                   preset=preset, passthrough=passthrough, fingerprint=fingerprint, source_file=source_file)
