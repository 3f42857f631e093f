"""Manifests in the formats people have: CSV, JSON Lines and Parquet from any fsspec URL (`hf://datasets/...`
included), with a dataset's own column names mapped onto the manifest's (`--prompt-column`, `--id-column`).

The planner and the actors read Parquet only: footers to plan, row groups to render a shard. So a text manifest,
and any manifest whose columns are renamed, is staged once before planning: converted to Parquet under the output
root as `_manifests/<stem>-<16 hex>.parquet`, a name that hashes the source's identity (its URL, size, and ETag or
content sha256), the mapping and the staging rules. A rerun with the source unchanged finds the staged copy and
reuses it; a changed source gets a new copy, hence a new plan fingerprint, so resume and exactly-once hold as they do
for Parquet (a run refuses to mix two versions of a manifest in one output).

    format       suffixes                              cells
    Parquet      .parquet .pq .parq                    as typed in the file
    CSV          .csv .csv.gz                          text: known columns converted to their types, the others
                                                       kept as text; an empty cell is null (the job default);
                                                       blank lines skipped
    JSON Lines   .jsonl .ndjson .jsonl.gz .ndjson.gz   one JSON object per line, blank lines skipped; a column
                                                       mixing types, or holding objects or lists, is kept as JSON text

Rows keep the user's file and row. A staged row carries hidden columns (`__ray_render_*`: the source file, its line,
and the problem of a cell that could not be converted), and a bad cell (width "abc", a line that is not JSON) is
null in the staged copy: that row alone ends `invalid`, with a message naming the source file, row and line
(engine/rows.py). Row numbers are 0-based positions among the file's records as for Parquet (CSV: after the header;
JSON Lines: non-blank lines), so the metadata's `source_file` and `source_row` point into the user's file.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import plan as planning
from ray_render.engine.plan import COLUMN_KINDS, HIDDEN_PREFIX, ManifestError
from ray_render.output import layout

TEXT_FORMATS = {".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl",
                ".ndjson.gz": "jsonl"}
MANIFEST_SUFFIXES = planning.PARQUET_SUFFIXES + tuple(TEXT_FORMATS)

# Hidden columns of a staged manifest (never passed through to the metadata: see plan.is_passthrough).
SOURCE_FILE = HIDDEN_PREFIX + "source_file"  # the user's file this row comes from
SOURCE_LINE = HIDDEN_PREFIX + "source_line"  # 1-based line where the row starts (text formats)
ERROR_COLUMN = HIDDEN_PREFIX + "error_column"  # the column whose cell could not be converted ("" for the whole row)
ERROR = HIDDEN_PREFIX + "error"  # why: the row ends invalid with this message

STAGING_VERSION = 1  # part of every staged name: bump it when the same source would stage differently
BATCH_ROWS = 8192  # rows converted at a time, and the staged file's row group size
MAX_CSV_FIELD = 16 << 20  # characters; a prompt is at most 20,000, but one huge cell must fail its row, not the file
INT64 = (-(2**63), 2**63 - 1)
ARROW_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
               "json": pa.string()}
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes"}, {"false", "0", "no"}
_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_CSV_INT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_CSV_FLOAT = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")
FLAGS = {"prompt": "--prompt-column", "id": "--id-column"}  # the options that map a column onto each name
JSON_NAMES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class _CellProblem(Exception):
    """A cell that cannot become its column's type; the message completes "column 'X' ..."."""


def manifest_format(url: str) -> str:
    """"csv", "jsonl" or "parquet" by the file's suffix; a file of any other name is read as Parquet."""
    lower = url.lower()
    for suffix, kind in TEXT_FORMATS.items():
        if lower.endswith(suffix):
            return kind
    return "parquet"


def column_mapping(job: JobConfig) -> dict[str, str]:
    """{the dataset's column: the manifest column it stands for}, from --prompt-column and --id-column."""
    mapping = {job.prompt_column: "prompt", job.id_column: "id"}
    return {source: target for source, target in mapping.items() if source is not None and source != target}


def needs_staging(job: JobConfig) -> bool:
    """Whether any of the job's manifests is staged (a text manifest, or one whose columns are renamed): then the
    run takes its output's lease before planning, since staging writes under the output root."""
    so = job.storage_options
    mapping = column_mapping(job)
    return any(manifest_format(url) != "parquet" or _needs_renaming(url, mapping, so)
               for url in planning.list_manifest_files(job.manifests, so, suffixes=MANIFEST_SUFFIXES))


def stage_manifests(job: JobConfig) -> tuple[list[str], dict[str, dict]]:
    """The manifest files to plan, with every text manifest (and every renamed one) replaced by its staged Parquet
    copy, and {staged URL: the source's identity (url, size, etag or sha256)} for the job record.

    Call it before planning, holding the output's lease when `needs_staging`. Raises ManifestError naming the file
    when one cannot be read or its columns cannot be used; rows with bad values are staged, to end invalid on their own.
    """
    so = job.storage_options
    mapping = column_mapping(job)
    planned: list[str] = []
    sources: dict[str, dict] = {}
    shown: list[str] = []  # the user's file for each planned one
    for url in planning.list_manifest_files(job.manifests, so, suffixes=MANIFEST_SUFFIXES):
        kind = manifest_format(url)
        shown.append(url)
        if kind == "parquet" and not _needs_renaming(url, mapping, so):
            planned.append(url)
            continue
        identity = source_identity(url, so)
        staged = staged_url(job.out, url, identity, mapping)
        if not storage.exists(staged, so):  # staged copies are published whole: one that exists is complete
            _guarded(url, so, lambda url=url, kind=kind, staged=staged, identity=identity:
                     _stage(url, kind, staged, identity, mapping, so))
        planned.append(staged)
        sources[staged] = identity
    if sources:
        # What plan() checks across files (a column's type in every file), but under the users' names: the planner
        # would name the staged copies.
        schemas = [(source, _guarded(source, so, lambda url=url: _footer_schema(url, so)))
                   for source, url in zip(shown, planned)]
        planning.check_manifest_schemas(schemas)
    return planned, sources


def _footer_schema(url: str, so: dict | None) -> pa.Schema:
    def read() -> pa.Schema:
        fs, path = storage.open_fs(url, so)
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).schema_arrow

    return storage.with_retries(read, what=f"read manifest footer {url}", storage_options=so)


def with_source_names(plan: planning.Plan, sources: dict[str, dict]) -> planning.Plan:
    """`plan` with its repeated-id notes (plan.mark_repeated_ids) naming the users' files, not the staged copies."""
    if not sources:
        return plan

    def shown(text: str) -> str:
        for staged, identity in sources.items():
            text = text.replace(staged, identity["url"])
        return text

    shards = [replace(shard, repeated_ids=tuple((row, shown(where)) for row, where in shard.repeated_ids))
              if shard.repeated_ids else shard for shard in plan.shards]
    return replace(plan, shards=shards)


def _needs_renaming(url: str, mapping: dict[str, str], so: dict | None) -> bool:
    """Whether a Parquet manifest has a column the mapping renames (its footer only)."""
    if not mapping:
        return False

    columns = _guarded(url, so, lambda: _footer_schema(url, so)).names
    return any(source in columns for source in mapping)


def source_identity(url: str, storage_options: dict | None = None) -> dict:
    """What says a source changed: its URL, size, and the store's ETag (object stores, hf://) or the sha256 of its
    bytes (local files and stores without one)."""

    def identify() -> dict:
        fs, path = storage.open_fs(url, storage_options)
        fs.invalidate_cache(path)
        info = fs.info(path)
        identity = {"url": url, "size": int(info.get("size") or 0)}
        tag = None if storage.is_local(fs) else _etag(info)
        if tag:
            identity["etag"] = tag
        else:
            digest = hashlib.sha256()
            with fs.open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            identity["sha256"] = digest.hexdigest()
        return identity

    return _guarded(url, storage_options, lambda: storage.with_retries(
        identify, what=f"read manifest {url}", storage_options=storage_options))


def _etag(info: dict) -> str | None:
    # s3fs and adlfs say ETag/etag, gcsfs etag; HfFileSystem gives an LFS file's sha256, else its git blob id.
    lfs = info.get("lfs") if isinstance(info.get("lfs"), dict) else {}
    tag = info.get("ETag") or info.get("etag") or lfs.get("sha256") or info.get("blob_id")
    return str(tag).strip('"') if tag else None


def staged_url(out: str, source: str, identity: dict, mapping: dict[str, str]) -> str:
    """Where `source` is staged under the output root: a name that changes with its identity and the mapping."""
    key = json.dumps({"identity": identity, "mapping": mapping, "version": STAGING_VERSION}, sort_keys=True)
    name = source.rstrip("/").rsplit("/", 1)[-1]
    for suffix in sorted(MANIFEST_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = _STEM_UNSAFE.sub("_", name).strip("_")[:40] or "manifest"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return storage.join(storage.normalize_url(out), layout.MANIFESTS_DIR, f"{stem}-{digest}.parquet")


def _guarded(url: str, storage_options: dict | None, action):
    """Run `action`; any failure to read the source becomes a ManifestError naming it (credentials blanked)."""
    try:
        return action()
    except ManifestError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"manifest {url}: no such file") from None
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise ManifestError(f"manifest {url}: not a readable gzip file ({exc})") from None
    except storage.StorageError as exc:
        raise ManifestError(f"manifest {url}: cannot read it: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other reason the file is unusable: one line naming it
        message = f"manifest {url}: cannot be read ({type(exc).__name__}: {exc})"
        raise ManifestError(storage.redact(message, storage_options)) from None


# ---------------------------------------------------------------------------------------------------------------
# Staging: source -> local Parquet file -> the output root


def _stage(url: str, kind: str, staged: str, identity: dict, mapping: dict[str, str], so: dict | None) -> None:
    readers = {"csv": _csv_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches}
    with tempfile.TemporaryDirectory(prefix="ray-render-stage-") as scratch:
        local = os.path.join(scratch, "staged.parquet")

        def convert() -> None:
            writer = None
            try:
                for table in readers[kind](url, mapping, so):
                    if writer is None:
                        metadata = {b"ray_render.source": json.dumps(identity, sort_keys=True).encode()}
                        writer = pq.ParquetWriter(local, table.schema.with_metadata(metadata), compression="zstd")
                    writer.write_table(table, row_group_size=BATCH_ROWS)
            finally:
                if writer is not None:
                    writer.close()

        # A dropped connection mid-file restarts the conversion; the output root sees only the finished copy.
        storage.with_retries(convert, what=f"read manifest {url}", storage_options=so)
        storage.upload_file(local, staged, so)


def _open_binary(url: str, so: dict | None):
    fs, path = storage.open_fs(url, so)
    return fs.open(path, "rb", compression="gzip" if url.lower().endswith(".gz") else None)


def _renamed(url: str, columns: list[str], mapping: dict[str, str]) -> list[str]:
    """The columns under their manifest names. A file that already names a column as the manifest does keeps it
    (one job may mix a dataset's files with manifests of its own); ManifestError when a file has neither name, or
    both."""
    for source, target in mapping.items():
        if source not in columns and target not in columns:
            raise ManifestError(f"manifest {url}: no column {source!r} ({FLAGS[target]}) nor {target!r}; columns: "
                                f"{', '.join(columns) or 'none'}")
        if source in columns and target in columns:
            raise ManifestError(f"manifest {url}: has both {source!r} ({FLAGS[target]}) and {target!r}; drop or "
                                f"rename one of them")
    return [mapping.get(column, column) for column in columns]


def _schema(url: str, kinds: dict[str, str]) -> pa.Schema:
    """The staged schema for columns of these kinds plus the hidden columns, checked as plan() checks a file (under
    the source's name)."""
    fields = [pa.field(name, ARROW_TYPES[kind]) for name, kind in kinds.items()]
    planning.check_manifest_schemas([(url, pa.schema(fields))])
    hidden = [pa.field(SOURCE_FILE, pa.string()), pa.field(SOURCE_LINE, pa.int64()),
              pa.field(ERROR_COLUMN, pa.string()), pa.field(ERROR, pa.string())]
    return pa.schema(fields + hidden)


class _Batch:
    """Converted rows of one batch, column by column, with each row's hidden columns."""

    def __init__(self, schema: pa.Schema, url: str) -> None:
        self.schema, self.url = schema, url
        self.columns: dict[str, list] = {name: [] for name in schema.names}

    def add(self, cells: dict, problem: tuple[str, str] | None, line: int) -> None:
        for name, values in self.columns.items():
            values.append(cells.get(name))
        self.columns[SOURCE_FILE][-1] = self.url
        self.columns[SOURCE_LINE][-1] = line
        self.columns[ERROR_COLUMN][-1], self.columns[ERROR][-1] = problem or (None, None)

    def __len__(self) -> int:
        return len(self.columns[SOURCE_FILE])

    def table(self) -> pa.Table:
        return pa.table({name: pa.array(values, self.schema.field(name).type)
                         for name, values in self.columns.items()}, schema=self.schema)


def _text_ok(value: str) -> bool:
    """False for text holding bytes that were not UTF-8 (decoded as surrogate escapes): Arrow cannot store it."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- CSV -----------------------------------------------------------------------------------------------------------


def _csv_cell(kind: str, text: str):
    """A CSV cell (text) as a value of its column's kind, or _CellProblem."""
    if kind in ("string", "json"):
        return text
    stripped = text.strip()
    if kind == "bool":
        if stripped.lower() in TRUE_WORDS:
            return True
        if stripped.lower() in FALSE_WORDS:
            return False
        raise _CellProblem(f"must be true or false, got {_short(text)}")
    try:
        number = float(stripped)
    except ValueError:
        expected = "a whole number" if kind == "int" else "a number"
        raise _CellProblem(f"must be {expected}, got {_short(text)}") from None
    if kind == "float":
        return number
    try:
        value = int(stripped)
    except ValueError:
        if not (math.isfinite(number) and number.is_integer()):
            raise _CellProblem(f"must be a whole number, got {_short(text)}") from None
        value = int(number)
    if not INT64[0] <= value <= INT64[1]:
        raise _CellProblem(f"must fit in 64 bits, got {_short(text)}")
    return value


def _csv_records(url: str, so: dict | None) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, its fields) for every record, the header first; blank lines are skipped."""
    csv.field_size_limit(MAX_CSV_FIELD)
    with _open_binary(url, so) as raw:
        reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=""))
        line = 1
        try:
            for record in reader:
                if record:
                    yield line, record
                line = reader.line_num + 1
        except csv.Error as exc:
            raise ManifestError(f"manifest {url}: not a readable CSV file at line {line} ({exc})") from None


def _csv_text_kind(text: str) -> str:
    """What a passthrough cell looks like: "int" (no leading zeros: "00042" is a code), "float", "bool" or text."""
    if _CSV_INT.fullmatch(text):
        return "int" if INT64[0] <= int(text) <= INT64[1] else "string"
    if _CSV_FLOAT.fullmatch(text):
        return "float"
    return "bool" if text.lower() in ("true", "false") else "string"


def _csv_batches(url: str, mapping: dict[str, str], so: dict | None) -> Iterator[pa.Table]:
    # Pass 1: the header, and what the passthrough columns' cells look like (numbers stay numbers, as in Parquet).
    records = _csv_records(url, so)
    try:
        _, header = next(records)
    except StopIteration:
        raise ManifestError(f"manifest {url}: empty (a CSV manifest starts with a header row)") from None
    unnamed = [str(n + 1) for n, name in enumerate(header) if not name.strip()]
    if unnamed:
        raise ManifestError(f"manifest {url}: header column(s) {', '.join(unnamed)} have no name")
    names = _renamed(url, header, mapping)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ManifestError(f"manifest {url}: column(s) {', '.join(repeated)} appear more than once")
    passthrough = [(position, name) for position, name in enumerate(names) if name not in COLUMN_KINDS]
    seen: dict[str, set[str]] = {name: set() for _, name in passthrough}
    for _, record in records:
        for position, name in passthrough:
            if position < len(record) and record[position] != "":
                seen[name].add(_csv_text_kind(record[position]))
    kinds = {name: COLUMN_KINDS.get(name) or _passthrough_kind(seen[name]) for name in names}
    schema = _schema(url, kinds)
    # Pass 2: convert.
    batch = _Batch(schema, url)
    records = _csv_records(url, so)
    next(records)
    for line, record in records:
        batch.add(*_csv_row(names, kinds, record), line=line)
        if len(batch) >= BATCH_ROWS:
            yield batch.table()
            batch = _Batch(schema, url)
    yield batch.table()


def _csv_row(names: list[str], kinds: dict[str, str], record: list[str]) -> tuple[dict, tuple[str, str] | None]:
    """(cells by column, the first problem) of one CSV record; a bad cell is null and named by the problem."""
    cells, problem = {}, None
    if len(record) != len(names):
        problem = ("", f"has {len(record)} fields, the header has {len(names)} columns")
    for name, text in zip(names, record):
        if text == "":
            continue
        if not _text_ok(text):
            if name not in COLUMN_KINDS:  # passthrough: keep it, readable
                cells[name] = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            else:
                problem = problem or (name, "is not valid UTF-8")
            continue
        try:
            cells[name] = _csv_cell(kinds[name], text)
        except _CellProblem as exc:
            problem = problem or (name, str(exc))
    return cells, problem


# -- JSON Lines ----------------------------------------------------------------------------------------------------


def _json_kind(value) -> str | None:
    """The Arrow kind a passthrough JSON value asks for; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if INT64[0] <= value <= INT64[1] else "json"
    if isinstance(value, float):
        return "float"
    return "string" if isinstance(value, str) else "json"


def _passthrough_kind(seen: set[str]) -> str:
    if not seen:
        return "string"  # nulls only
    if seen <= {"int", "float"}:
        return "float" if "float" in seen else "int"
    return next(iter(seen)) if len(seen) == 1 else "json"


def _json_cell(kind: str, column: str, value):
    """A JSON value as a value of its column's kind, or _CellProblem. Numbers must be JSON numbers, text JSON
    strings: the same types a Parquet manifest's columns must have."""
    if kind == "json":  # a passthrough column of mixed types: text stays text, the rest JSON text
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if kind == "string":
        if isinstance(value, str):
            return value
        if column == "id" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # as for Parquet: an integer id is used as its decimal text
        raise _CellProblem(f"must be a string, got {_short(value)}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _CellProblem(f"must be true or false, got {_short(value)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _CellProblem(f"must be {'a whole number' if kind == 'int' else 'a number'}, got {_short(value)}")
    if kind == "float":
        return float(value)
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise _CellProblem(f"must be a whole number, got {_short(value)}")
        value = int(value)
    if not INT64[0] <= value <= INT64[1]:
        raise _CellProblem(f"must fit in 64 bits, got {_short(value)}")
    return value


def _json_lines(url: str, so: dict | None) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, the object or None, why not) for every non-blank line."""
    with _open_binary(url, so) as raw:
        for number, data in enumerate(raw, 1):
            if not data.strip():
                continue
            text = data.decode("utf-8", "surrogateescape")
            if number == 1:
                text = text.removeprefix("\ufeff")
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                yield number, None, f"is not valid JSON ({exc})"
                continue
            if not isinstance(value, dict):
                yield number, None, f"holds a JSON {JSON_NAMES.get(type(value), 'value')}, not an object"
                continue
            yield number, value, None


def _jsonl_batches(url: str, mapping: dict[str, str], so: dict | None) -> Iterator[pa.Table]:
    # Pass 1: the columns (first-seen order) and the kinds of values each passthrough column holds.
    seen: dict[str, set[str]] = {}
    for _, value, _ in _json_lines(url, so):
        for key, cell in (value or {}).items():
            kinds = seen.setdefault(key, set())
            kind = _json_kind(cell)
            if kind is not None:
                kinds.add(kind)
    names = _renamed(url, list(seen), mapping)
    kinds = {name: COLUMN_KINDS.get(name) or _passthrough_kind(seen[source])
             for name, source in zip(names, seen)}
    schema = _schema(url, kinds)
    rename = dict(zip(seen, names))
    # Pass 2: convert.
    batch = _Batch(schema, url)
    for number, value, error in _json_lines(url, so):
        cells, problem = {}, ("", error) if error else None
        for key, cell in (value or {}).items():
            name = rename[key]
            if cell is None:
                continue
            if isinstance(cell, str) and not _text_ok(cell):
                if name not in COLUMN_KINDS:
                    cells[name] = cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                else:
                    problem = problem or (name, "is not valid UTF-8")
                continue
            try:
                cells[name] = _json_cell(kinds[name], name, cell)
            except _CellProblem as exc:
                problem = problem or (name, str(exc))
        batch.add(cells, problem, number)
        if len(batch) >= BATCH_ROWS:
            yield batch.table()
            batch = _Batch(schema, url)
    yield batch.table()


# -- Parquet with renamed columns ------------------------------------------------------------------------------------


def _parquet_batches(url: str, mapping: dict[str, str], so: dict | None) -> Iterator[pa.Table]:
    fs, path = storage.open_fs(url, so)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        source = parquet.schema_arrow.remove_metadata()
        names = _renamed(url, source.names, mapping)
        schema = pa.schema([field.with_name(name) for field, name in zip(source, names)])
        planning.check_manifest_schemas([(url, schema)])
        schema = schema.append(pa.field(SOURCE_FILE, pa.string()))
        emitted = False
        for record_batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            table = pa.Table.from_batches([record_batch]).rename_columns(names)
            table = table.append_column(SOURCE_FILE, pa.array([url] * table.num_rows, pa.string()))
            emitted = True
            yield table.cast(schema)
        if not emitted:
            yield schema.empty_table()
