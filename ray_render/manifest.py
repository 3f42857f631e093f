"""Reading manifests, row validation, the shard plan.

The driver calls `plan()`: it reads only Parquet footers (row counts, schema), checks every file's schema, and cuts
the rows into shards, so a bad file fails the job before any GPU time is spent and planning a million rows costs
memory per shard, not per row. Each actor then calls `read_shard_rows()` for its shard's rows and
`validate_rows()` to turn them into `RowTask`s (ready to render) or `InvalidRow`s (a bad value; the row ends
`invalid` in the metadata and nothing else is lost).

Manifest rules decided here (DESIGN.md "Manifest" is the contract):
- `prompt` must be a non-null string that is non-empty after stripping whitespace, at most MAX_PROMPT_CHARS
  characters, valid UTF-8 and without NUL characters. An edit row (with `input_image`) still needs its prompt:
  NextStep's edit prompts carry the `<image>` marker.
- `id`: a string (or an integer, used as its decimal text) matching ROW_ID_PATTERN, not "." or "..", not starting
  with "."; a null id defaults to "h" + 20 hex digits of a hash of the prompt, the resolved render settings, the
  explicit seed and the input image. Ids must be unique within a shard; a repeat is invalid and names the first row.
- `seed`: a whole number from 0 to 2**63 - 1 (image k uses seed + k, which must fit too); a null seed is derived
  from the id, so a row's images do not depend on where it lands.
- `input_image`: a URI string; null, empty or blank means "no input image".
- Null cells mean "use the job default"; NaN and infinities are invalid.
- Row numbers in messages are 0-based positions in the manifest file (the same as the `source_row` output column).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.config import RENDER_PARAMS, JobConfig, check_render_param, resolve_params
from ray_render.models.base import RenderRequest

ROW_ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"
MAX_PROMPT_CHARS = 20_000  # about 5,000 text tokens: far past NextStep's useful context, small enough to log
MAX_URI_CHARS = 4096
MAX_SEED = 2**63 - 1  # seeds travel as int64 in the metadata and through torch generators
PROMPT_FIELDS = ("prompt", "negative_prompt", "positive_prompt")

# Arrow types each known column accepts: "int" any integer, "float" any integer or float, "bool", "string".
COLUMN_KINDS: dict[str, str] = {
    "id": "string",  # integers are accepted too and used as their decimal text
    "prompt": "string",
    "seed": "int",
    "input_image": "string",
    "preset": "string",
    **{name: {str: "string", int: "int", float: "float", bool: "bool"}[kind] for name, kind in RENDER_PARAMS.items()},
}
KNOWN_COLUMNS = frozenset(COLUMN_KINDS)
EXPECTED_TYPES = {
    "int": "an integer type (int8 ... int64, uint8 ... uint64)",
    "float": "a float or integer type",
    "bool": "bool",
    "string": "string or large_string",
}

_ROW_ID_RE = re.compile(ROW_ID_PATTERN)
_STEM_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")


class ManifestError(Exception):
    """A manifest cannot be used at all (unreadable file, wrong schema, no rows): the job stops before rendering."""


@dataclass(frozen=True)
class Shard:
    """Rows [row_start, row_stop) of one manifest file: the unit of work, retry, commit and resume."""

    shard_id: str  # stable for the same file list and shard size; safe as an object key
    file: str  # fsspec URL or absolute local path
    row_start: int
    row_stop: int
    file_index: int = 0  # position of `file` in Plan.files; names rows whose own id is unusable
    rows: tuple[int, ...] | None = None  # only these rows of the range, ascending (a refresh's changed rows)
    repeated_ids: tuple[tuple[int, str], ...] = ()  # (row, where its id first appears) for ids used earlier

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start if self.rows is None else len(self.rows)

    def row_indices(self) -> range | tuple[int, ...]:
        """The shard's 0-based rows in its file."""
        return range(self.row_start, self.row_stop) if self.rows is None else self.rows


@dataclass
class Plan:
    """Every shard of a job, from Parquet footers only, and a fingerprint to tell a resumed job from a new one."""

    files: list[str]
    shards: list[Shard]
    total_rows: int
    fingerprint: str  # sha256 over file URLs, row counts, sizes, schemas, shard ranges (not the render settings)
    passthrough_columns: list[str]  # extra manifest columns copied to the output metadata, first-seen order
    passthrough_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # their Arrow types, all files
    warnings: list[str] = field(default_factory=list)  # things that work but cost, e.g. huge row groups
    has_ids: list[bool] = field(default_factory=list)  # per file: does it have an `id` column


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

    def requests(self, input_image: bytes | None = None) -> list[RenderRequest]:
        """One RenderRequest per image; `input_image` is the fetched content of `self.input_image`."""
        settings = {name: value for name, value in self.params.items() if name != "num_images"}
        return [RenderRequest(key=f"{self.id}#{k}", prompt=self.prompt, seed=self.seed + k, input_image=input_image,
                              **settings)
                for k in range(self.params["num_images"])]


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


# ---------------------------------------------------------------------------------------------------------------
# Finding files and planning shards


def is_passthrough(column: str) -> bool:
    """True for manifest columns copied unchanged to the output metadata: all but the known ones and pandas' index."""
    return column not in KNOWN_COLUMNS and not column.startswith("__index_level_")


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _is_text(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _type_ok(column: str, kind: pa.DataType) -> bool:
    if pa.types.is_null(kind):  # a column of nulls only: every row takes the default
        return column != "prompt"
    expected = COLUMN_KINDS[column]
    if expected == "string":
        return _is_text(kind) or (column == "id" and pa.types.is_integer(kind))
    if expected == "int":
        return pa.types.is_integer(kind)
    if expected == "float":
        return pa.types.is_integer(kind) or pa.types.is_floating(kind)
    return pa.types.is_boolean(kind)


def list_manifest_files(specs: list[str], storage_options: dict | None = None) -> list[str]:
    """Resolve paths, directories (every *.parquet below, sorted), globs and URLs to a deterministic file list.

    Hidden and underscore-prefixed entries in directories (`.tmp`, `_SUCCESS`, `_metadata`) are skipped, as
    Spark and pyarrow datasets do. A file named twice is kept once, at its first position.
    """
    result: list[str] = []
    for spec in specs:
        fs, path = storage.open_fs(spec, storage_options)

        def resolve(fs=fs, path=path, spec=spec) -> list[str]:
            fs.invalidate_cache()
            if any(char in path for char in "*?["):
                # Like a shell glob, "*" does not match hidden names (temp files of writers in progress).
                matches = sorted(m for m in fs.glob(path) if not m.rstrip("/").rsplit("/", 1)[-1].startswith("."))
                files = []
                for match in matches:
                    files += _parquet_below(fs, match) if fs.isdir(match) else [match]
                return files
            if fs.isdir(path):
                return _parquet_below(fs, path)
            if fs.exists(path):
                return [path]
            raise ManifestError(f"manifest {spec!r}: no such file, directory or URL")

        try:
            found = storage.with_retries(resolve, what=f"list manifest {spec}", storage_options=storage_options)
        except ManifestError:
            raise
        except Exception as exc:
            message = f"manifest {spec!r}: cannot list it: {type(exc).__name__}: {exc}"
            raise ManifestError(storage.redact(message, storage_options)) from None
        if not found:
            raise ManifestError(f"manifest {spec!r}: matches no Parquet files")
        for path in found:
            url = path if storage.is_local(fs) else fs.unstrip_protocol(path)
            if url not in result:
                result.append(url)
    return result


def _parquet_below(fs, directory: str) -> list[str]:
    files = []
    for path in fs.find(directory):
        relative = path[len(directory.rstrip("/")):].strip("/")
        if any(part.startswith((".", "_")) for part in relative.split("/")):
            continue
        if path.endswith((".parquet", ".pq", ".parq")):
            files.append(path)
    return sorted(files)


@dataclass
class _FileFacts:
    url: str
    size: int
    row_group_rows: list[int]
    schema: pa.Schema


def _read_footer(url: str, storage_options: dict | None) -> _FileFacts:
    fs, path = storage.open_fs(url, storage_options)

    def read() -> _FileFacts:
        size = fs.size(path)
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
        rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        return _FileFacts(url=url, size=size, row_group_rows=rows, schema=schema)

    try:
        return storage.with_retries(read, what=f"read manifest footer {url}", storage_options=storage_options)
    except storage.StorageError as exc:
        raise ManifestError(f"manifest {url}: cannot read it: {exc}") from None
    except Exception as exc:
        message = f"manifest {url}: not a readable Parquet file ({type(exc).__name__}: {exc})"
        raise ManifestError(storage.redact(message, storage_options)) from None


def _check_schema(facts: _FileFacts) -> None:
    names = facts.schema.names
    if "prompt" not in names:
        raise ManifestError(f"manifest {facts.url}: no 'prompt' column (columns: {', '.join(names) or 'none'})")
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ManifestError(f"manifest {facts.url}: column(s) {', '.join(duplicated)} appear more than once")
    for column in facts.schema:
        if column.name in KNOWN_COLUMNS and not _type_ok(column.name, column.type):
            expected = EXPECTED_TYPES[COLUMN_KINDS[column.name]]
            if column.name == "id":
                expected += " (or an integer type)"
            raise ManifestError(f"manifest {facts.url}: column {column.name!r} has type {column.type}, "
                                f"expected {expected}")


def _passthrough_schema(all_facts: list[_FileFacts]) -> pa.Schema:
    from ray_render.writer import METADATA_COLUMNS  # output names a manifest column may not reuse

    fields_by_name: dict[str, tuple[pa.Field, str]] = {}
    for facts in all_facts:
        for column in facts.schema:
            if not is_passthrough(column.name):
                continue
            if column.name in METADATA_COLUMNS:
                raise ManifestError(f"manifest {facts.url}: column {column.name!r} clashes with an output metadata "
                                    f"column of the same name; rename it (reserved: {', '.join(METADATA_COLUMNS)})")
            # Plain types (dictionary-encoded -> values) and no pandas metadata: every shard's schema must match.
            kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
            plain = pa.field(column.name, kind, nullable=True)
            if column.name not in fields_by_name:
                fields_by_name[column.name] = (plain, facts.url)
                continue
            seen, first_url = fields_by_name[column.name]
            if seen.type.equals(plain.type):
                continue
            try:
                merged = pa.unify_schemas([pa.schema([seen]), pa.schema([plain])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                raise ManifestError(f"manifest {facts.url}: column {column.name!r} has type {plain.type}, but "
                                    f"{first_url} has {seen.type}; give it one type in every file") from None
            fields_by_name[column.name] = (merged.field(0), first_url)
    return pa.schema([seen for seen, _ in fields_by_name.values()])


def _shard_id(file_index: int, url: str, row_start: int) -> str:
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = _STEM_UNSAFE_RE.sub("_", stem).strip("_")[:40] or "file"
    return f"{file_index:05d}-{stem}-{row_start:010d}"


def plan(specs: list[str], shard_size: int, storage_options: dict | None = None, limit: int | None = None) -> Plan:
    """Find the manifest files, check their schemas and cut their rows into shards of at most `shard_size` rows.

    Reads Parquet footers only. Raises ManifestError naming the file (and column) when a file cannot be read or
    has a wrong schema, or when there are no rows at all. `limit` keeps only the first `limit` rows of the plan.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a whole number >= 1, got {shard_size!r}")
    files = list_manifest_files(specs, storage_options)
    # Footers are tiny and far apart: fetch them concurrently, order kept by map().
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        all_facts = list(pool.map(lambda url: _read_footer(url, storage_options), files))
    for facts in all_facts:
        _check_schema(facts)
    passthrough = _passthrough_schema(all_facts)

    shards: list[Shard] = []
    warnings: list[str] = []
    remaining = limit if limit is not None else math.inf
    digest = hashlib.sha256()
    for file_index, facts in enumerate(all_facts):
        num_rows = sum(facts.row_group_rows)
        schema_text = facts.schema.remove_metadata().to_string(show_field_metadata=False)
        digest.update(json.dumps([facts.url, num_rows, facts.size, schema_text]).encode())
        if facts.row_group_rows and max(facts.row_group_rows) > 4 * shard_size:
            warnings.append(f"manifest {facts.url}: row groups of up to {max(facts.row_group_rows)} rows, shard size "
                            f"{shard_size}: every shard reads a whole row group; write it with smaller row groups")
        for row_start in range(0, num_rows, shard_size):
            if remaining <= 0:
                break
            row_stop = int(min(row_start + shard_size, num_rows, row_start + remaining))
            shards.append(Shard(_shard_id(file_index, facts.url, row_start), facts.url, row_start, row_stop,
                                file_index))
            remaining -= row_stop - row_start
    for shard in shards:
        digest.update(f"{shard.shard_id}:{shard.row_start}:{shard.row_stop}".encode())
    total_rows = sum(shard.num_rows for shard in shards)
    if total_rows == 0:
        raise ManifestError(f"no rows to render: {', '.join(files)} hold 0 rows")
    return Plan(files=files, shards=shards, total_rows=total_rows, fingerprint=digest.hexdigest(),
                passthrough_columns=passthrough.names, passthrough_schema=passthrough, warnings=warnings,
                has_ids=["id" in facts.schema.names for facts in all_facts])


def mark_repeated_ids(plan: Plan, storage_options: dict | None = None) -> Plan:
    """Tell each shard which of its rows repeat an id used earlier in the plan, so that the later rows end
    `invalid` and the output never holds one id twice, even when the repeats fall in different shards.

    The one pass over data before rendering (planning itself reads footers only): the `id` column alone. Memory is
    8 bytes a row (a hash of the id, not the id); only ids whose hash repeats are read again and compared as text.
    A file whose ids cannot be read is skipped here: its shards fail on their own when they read it.
    """
    import numpy as np

    stops: dict[int, int] = {}  # file index -> rows of it in the plan
    for shard in plan.shards:
        stops[shard.file_index] = max(stops.get(shard.file_index, 0), shard.row_stop)
    readable = [index for index in sorted(stops) if plan.has_ids[index]]

    def ids_of(index: int):
        """The id column of the file's planned rows, as text (None for nulls), a batch at a time: the driver never
        holds a whole column of ids, whose Python strings would cost it ~100 bytes a row."""
        fs, path = storage.open_fs(plan.files[index], storage_options)
        left = stops[index]
        with fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=65_536, columns=["id"]):
                values = batch.column(0).slice(0, left).to_pylist()
                left -= len(values)
                yield from (None if value is None else str(value) for value in values)
                if left <= 0:
                    return

    hashes = []
    for index in list(readable):
        try:
            hashes.append(np.fromiter((hash(value) for value in ids_of(index) if value is not None), dtype=np.int64))
        except Exception:  # noqa: BLE001 - reported by the shards that read this file
            readable.remove(index)
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.zeros(0, np.int64), return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if not suspects:
        return plan
    first_seen: dict[str, str] = {}
    repeated: dict[tuple[int, int], str] = {}
    for index in readable:
        for row, value in enumerate(ids_of(index)):
            if value is None or hash(value) not in suspects:
                continue
            if value in first_seen:
                repeated[(index, row)] = first_seen[value]
            else:
                first_seen[value] = f"row {row} of {plan.files[index]}"
    shards = []
    for shard in plan.shards:
        rows = tuple((row, repeated[(shard.file_index, row)]) for row in shard.row_indices()
                     if (shard.file_index, row) in repeated)
        shards.append(replace(shard, repeated_ids=rows) if rows else shard)
    return replace(plan, shards=shards)


# ---------------------------------------------------------------------------------------------------------------
# Reading one shard's rows


def _table_to_rows(table: pa.Table) -> list[dict]:
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    # Some string cell is not valid UTF-8. Keep the bytes (as surrogate escapes) so validation can name the row and
    # column instead of failing the whole shard.
    columns = []
    for column in table.columns:
        if _is_text(column.type):
            as_text = column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column
            raw = as_text.cast(pa.large_binary()).to_pylist()
            columns.append([None if value is None else value.decode("utf-8", "surrogateescape") for value in raw])
        else:
            columns.append(column.to_pylist())
    return [dict(zip(table.column_names, values)) for values in zip(*columns)]


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
            task = _resolve_row(row, row_index, row_id, defaults, presets, job, shard, passthrough)
            if raw_id is None:
                if task.id in first_row_of_id:
                    raise _RowProblem("id", f"is empty, and its default id {task.id!r} (a hash of the prompt and "
                                            f"settings) repeats row {first_row_of_id[task.id]} in this shard")
                first_row_of_id[task.id] = row_index
            results.append(task)
        except _RowProblem as problem:
            shown_id = row_id if row_id is not None else fallback_id
            where = f"manifest {shard.file} row {row_index} (id {shown_id!r})"
            usable_prompt = prompt if isinstance(prompt, str) and _text_problem(prompt, 10**9) is None else None
            results.append(InvalidRow(row_index=row_index, id=shown_id, column=problem.column,
                                      error=f"{where}: column {problem.column!r} {problem}", passthrough=passthrough,
                                      source_file=shard.file, prompt=usable_prompt))
    return results


def _resolve_row(row: dict, row_index: int, row_id: str | None, defaults: dict, presets: dict, job: JobConfig,
                 shard: Shard, passthrough: dict) -> RowTask:
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
        row_id = "h" + _sha256({"prompt": prompt, "params": params, "seed": seed, "input_image": input_image})[:20]
    if seed is None:
        seed = int(hashlib.sha256(row_id.encode()).hexdigest()[:15], 16)  # 60 bits: seed + k stays in int64

    fingerprint = _sha256({"prompt": prompt, "params": params, "seed": seed, "input_image": input_image})
    return RowTask(row_index=row_index, id=row_id, prompt=prompt, params=params, seed=seed, input_image=input_image,
                   preset=preset, passthrough=passthrough, fingerprint=fingerprint, source_file=shard.file)
