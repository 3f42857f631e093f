"""The shard plan: manifest files found and checked, and their rows cut into shards, from Parquet footers only.

The driver calls `plan()`: it reads only Parquet footers (row counts, schema), checks every file's schema, and cuts
the rows into shards, so a bad file fails the job before any GPU time is spent and planning a million rows costs
memory per shard, not per row. `mark_repeated_ids()` is the one pass over data before rendering (the id column):
rows whose id repeats an earlier row's end `invalid`. Each actor then reads and validates its shard's rows
(engine/rows.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from ray_render import storage
from ray_render.config import RENDER_PARAMS
from ray_render.output.schema import reserved_columns

ROW_ID_PATTERN = r"[A-Za-z0-9._-]{1,128}"

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
# What a row without an id is identified by (engine/rows.py: default_row_id): everything that decides its images.
DEFAULT_ID_COLUMNS = ("prompt", "seed", "input_image", "preset", *RENDER_PARAMS)
EXPECTED_TYPES = {
    "int": "an integer type (int8 ... int64, uint8 ... uint64)",
    "float": "a float or integer type",
    "bool": "bool",
    "string": "string or large_string",
}

_STEM_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")
PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
# Columns a staged manifest carries for the rows' own bookkeeping (engine/manifests.py): never passed through.
HIDDEN_PREFIX = "__ray_render_"


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

    files: list[str]  # where to read each manifest file: absolute local paths or URLs
    shards: list[Shard]
    total_rows: int
    # sha256 over the files' identities (their names as given, not where they happen to be unpacked), row counts,
    # schemas and the shard ranges; not the render settings
    fingerprint: str
    passthrough_columns: list[str]  # extra manifest columns copied to the output metadata, first-seen order
    passthrough_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # their Arrow types, all files
    warnings: list[str] = field(default_factory=list)  # things that work but cost, e.g. huge row groups
    has_ids: list[bool] = field(default_factory=list)  # per file: does it have an `id` column
    may_lack_ids: list[bool] = field(default_factory=list)  # per file: rows without an id (no column, or nulls)
    identities: list[dict] = field(default_factory=list)  # per file: file_identity(), written to the job record


# ---------------------------------------------------------------------------------------------------------------
# Finding files and planning shards


def is_passthrough(column: str) -> bool:
    """True for manifest columns copied unchanged to the output metadata: all but the known ones, pandas' index and
    a staged manifest's hidden columns."""
    return column not in KNOWN_COLUMNS and not column.startswith(("__index_level_", HIDDEN_PREFIX))


def is_text_type(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return is_text_type(kind.value_type)
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _type_ok(column: str, kind: pa.DataType) -> bool:
    if pa.types.is_null(kind):  # a column of nulls only: every row takes the default
        return column != "prompt"
    expected = COLUMN_KINDS[column]
    if expected == "string":
        return is_text_type(kind) or (column == "id" and pa.types.is_integer(kind))
    if expected == "int":
        return pa.types.is_integer(kind)
    if expected == "float":
        return pa.types.is_integer(kind) or pa.types.is_floating(kind)
    return pa.types.is_boolean(kind)


def list_manifest_files(specs: list[str], storage_options: dict | None = None,
                        suffixes: tuple[str, ...] = PARQUET_SUFFIXES) -> list[str]:
    """Resolve paths, directories (every file below ending in one of `suffixes`, sorted), globs and URLs to a
    deterministic file list.

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
                    files += _files_below(fs, match, suffixes) if fs.isdir(match) else [match]
                return files
            if fs.isdir(path):
                return _files_below(fs, path, suffixes)
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
            kinds = "Parquet files" if suffixes == PARQUET_SUFFIXES else f"manifest files ({', '.join(suffixes)})"
            raise ManifestError(f"manifest {spec!r}: matches no {kinds}")
        for path in found:
            url = path if storage.is_local(fs) else fs.unstrip_protocol(path)
            if url not in result:
                result.append(url)
    return result


def _files_below(fs, directory: str, suffixes: tuple[str, ...]) -> list[str]:
    files = []
    for path in fs.find(directory):
        relative = path[len(directory.rstrip("/")):].strip("/")
        if any(part.startswith((".", "_")) for part in relative.split("/")):
            continue
        if path.endswith(suffixes):
            files.append(path)
    return sorted(files)


@dataclass
class _FileFacts:
    url: str
    size: int
    row_group_rows: list[int]
    schema: pa.Schema
    footer_sha256: str
    may_lack_ids: bool = True  # no id column, or its statistics do not rule out nulls


def _read_footer(url: str, storage_options: dict | None) -> _FileFacts:
    fs, path = storage.open_fs(url, storage_options)

    def read() -> _FileFacts:
        size = fs.size(path)
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
            schema = metadata.schema.to_arrow_schema()
            # The footer's own bytes ([footer][4-byte length]["PAR1"] at the end): row groups, column chunk offsets
            # and sizes, statistics. A rewritten file almost always changes them; the content hash catches the rest.
            handle.seek(size - 8)
            length = int.from_bytes(handle.read(4), "little")
            handle.seek(size - 8 - length)
            footer = hashlib.sha256(handle.read(length)).hexdigest()
        rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        return _FileFacts(url=url, size=size, row_group_rows=rows, schema=schema, footer_sha256=footer,
                          may_lack_ids=_may_lack_ids(metadata, schema))

    try:
        return storage.with_retries(read, what=f"read manifest footer {url}", storage_options=storage_options)
    except storage.StorageError as exc:
        raise ManifestError(f"manifest {url}: cannot read it: {exc}") from None
    except Exception as exc:
        message = f"manifest {url}: not a readable Parquet file ({type(exc).__name__}: {exc})"
        raise ManifestError(storage.redact(message, storage_options)) from None


def _may_lack_ids(metadata: pq.FileMetaData, schema: pa.Schema) -> bool:
    """Whether some row may have no id: no `id` column, or row-group statistics that do not say it has no nulls."""
    if "id" not in schema.names:
        return True
    column = metadata.schema.names.index("id") if "id" in metadata.schema.names else None
    if column is None:
        return True
    for group in range(metadata.num_row_groups):
        stats = metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_null_count or stats.null_count:
            return True
    return False


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


def check_manifest_schemas(schemas: list[tuple[str, pa.Schema]]) -> None:
    """The checks `plan()` makes of the files' schemas (a prompt column, no repeated names, the known columns'
    types, passthrough columns of one type in every file and not named like a metadata column), for files that are
    not planned yet: staged manifests are checked under their sources' names. Raises ManifestError naming the file
    and the column."""
    all_facts = [_FileFacts(url=url, size=0, row_group_rows=[], schema=schema, footer_sha256="")
                 for url, schema in schemas]
    for facts in all_facts:
        _check_schema(facts)
    _passthrough_schema(all_facts)


def _passthrough_schema(all_facts: list[_FileFacts]) -> pa.Schema:
    reserved = reserved_columns()
    fields_by_name: dict[str, tuple[pa.Field, str]] = {}
    for facts in all_facts:
        for column in facts.schema:
            if not is_passthrough(column.name):
                continue
            if column.name in reserved:
                raise ManifestError(f"manifest {facts.url}: column {column.name!r} clashes with an output metadata "
                                    f"column of the same name; rename it (reserved: {', '.join(sorted(reserved))})")
            # Plain types (dictionary-encoded -> values) and no pandas metadata: every shard's schema must match.
            kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
            plain = pa.field(column.name, kind, nullable=True)
            if column.name not in fields_by_name:
                fields_by_name[column.name] = (plain, facts.url)
                continue
            seen, first_url = fields_by_name[column.name]
            if seen.type.equals(plain.type):
                continue
            if _loses_unsigned(seen.type, plain.type):
                raise ManifestError(f"manifest {facts.url}: column {column.name!r} has type {plain.type}, but "
                                    f"{first_url} has {seen.type}: one type for both would not hold every uint64 "
                                    f"value; give it one type in every file")
            try:
                merged = pa.unify_schemas([pa.schema([seen]), pa.schema([plain])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                raise ManifestError(f"manifest {facts.url}: column {column.name!r} has type {plain.type}, but "
                                    f"{first_url} has {seen.type}; give it one type in every file") from None
            fields_by_name[column.name] = (merged.field(0), first_url)
    return pa.schema([seen for seen, _ in fields_by_name.values()])


def _loses_unsigned(a: pa.DataType, b: pa.DataType) -> bool:
    """Whether promoting one of these integer types to the other's would squeeze uint64 into int64."""
    kinds = {a, b}
    return pa.uint64() in kinds and any(pa.types.is_signed_integer(kind) for kind in kinds)


def _is_ns_temporal(kind: pa.DataType) -> bool:
    return ((pa.types.is_timestamp(kind) or pa.types.is_duration(kind) or pa.types.is_time64(kind))
            and kind.unit == "ns")


def column_values(column: pa.ChunkedArray | pa.Array) -> list:
    """A manifest column's cells as Python values from which the metadata writer rebuilds the same Arrow type
    losslessly: nanosecond timestamps, durations and times as their integer counts (a datetime holds microseconds
    only, and without pandas pyarrow will not convert them at all)."""
    if _is_ns_temporal(column.type):
        return column.cast(pa.int64()).to_pylist()
    return column.to_pylist()


SAMPLE_ROWS = 64  # rows per schema that planning writes back as metadata would


def _check_passthrough_values(all_facts: list[_FileFacts], passthrough: pa.Schema,
                              storage_options: dict | None) -> None:
    """Write the first rows of each distinct passthrough schema back as the metadata writer would, so that a type
    the writer cannot keep aborts here, before any GPU time, naming the file and the column, rather than failing
    every shard after its images were rendered."""
    seen: set[str] = set()
    for facts in all_facts:
        # Text is always written as text (a cell that is not UTF-8 fails its own row: engine/rows.py).
        names = [name for name in facts.schema.names
                 if name in passthrough.names and not is_text_type(facts.schema.field(name).type)]
        key = pa.schema([facts.schema.field(name) for name in names]).to_string(show_field_metadata=False)
        if not names or key in seen or not facts.row_group_rows:
            continue
        seen.add(key)
        fs, path = storage.open_fs(facts.url, storage_options)

        def read(fs=fs, path=path, names=names) -> pa.Table:
            with fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).read_row_group(0, columns=names).slice(0, SAMPLE_ROWS)

        sample = storage.with_retries(read, what=f"read manifest {facts.url}", storage_options=storage_options)
        for name in names:
            target = passthrough.field(name).type
            try:
                pa.array(column_values(sample.column(name)), type=target)
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
                raise ManifestError(f"manifest {facts.url}: column {name!r} ({facts.schema.field(name).type}) cannot "
                                    f"be copied to the metadata as {target}: {type(exc).__name__}: {exc}; cast it "
                                    f"to a plainer type, or drop it from the manifest") from None


def make_shard_id(file_index: int, url: str, row_start: int) -> str:
    """The id of the shard of file `url` (the plan's `file_index`-th) that starts at `row_start`."""
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    stem = _STEM_UNSAFE_RE.sub("_", stem).strip("_")[:40] or "file"
    return f"{file_index:05d}-{stem}-{row_start:010d}"


def identity_name(url: str) -> str:
    """How the job record names a manifest: a local file under the working directory by its relative path (a
    `ray job submit --working-dir` unpacks the same files under a new directory every time), anything else by its
    absolute path or URL."""
    if "://" in url or "::" in url:
        return url
    relative = os.path.relpath(url)
    return url if relative.startswith("..") else relative


def _content(url: str, storage_options: dict | None) -> str:
    """What says the bytes are the same: the store's ETag (or md5/crc32c), or for a local file the sha256 of its
    content (hashed, not its mtime: an unpacked copy of the same file has a new mtime)."""
    fs, path = storage.open_fs(url, storage_options)
    if not storage.is_local(fs):
        etag = storage.identity(url, storage_options).get("etag")
        return f"etag:{etag}" if etag else ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def file_identity(facts: _FileFacts, storage_options: dict | None) -> dict:
    """A manifest file's identity in the job record: its name as given (see identity_name), size, footer hash and
    content; `url` (where this run read it) is information only."""
    return {"name": identity_name(facts.url), "size": facts.size, "footer_sha256": facts.footer_sha256,
            "content": _content(facts.url, storage_options), "url": facts.url}


def changed_files(previous: list, current: list[dict]) -> list[str]:
    """What differs between two plans' file identities, one phrase per file, naming it."""
    old = {entry["name"]: entry for entry in previous if isinstance(entry, dict) and "name" in entry}
    new = {entry["name"]: entry for entry in current}
    changes = [f"manifest {name} is new" for name in new if name not in old]
    changes += [f"manifest {name} is gone" for name in old if name not in new]
    for name in new.keys() & old.keys():
        parts = [what for what in ("size", "footer_sha256", "content")
                 if old[name].get(what) and new[name].get(what) and old[name][what] != new[name][what]]
        if parts:
            changes.append(f"manifest {name} was rewritten since this output was rendered "
                           f"({', '.join(part.replace('footer_sha256', 'footer') for part in parts)} differ)")
    return sorted(changes)


# Shard sizes when --shard-size is not given ("guided": each shard a share of the rows still to plan).
MAX_SHARD_ROWS = 1000  # a big job writes metadata files of about this many rows
GUIDED_SHARE = 64  # a shard holds at most 1/64 of the rows planned after it: several per actor, finer at the tail
MIN_SHARD_ROWS = 16  # ... and at least this many (a shard's own overhead: a read, a metadata file, a commit) ...
MIN_SHARD_SHARE = 4096  # ... or 1/4096 of the job, for a big job whose tail need not be finer than that


def auto_shard_size(remaining: int, total: int) -> int:
    """The default size of the next shard, with `remaining` of the job's `total` rows still to plan: a share of the
    rest, so shards shrink towards the end of the job and every actor finishes at about the same time. 10,000 rows
    start at 157 and end at 16; a million rows are 1,000 until the last 64,000, then down to 244."""
    floor = min(max(MIN_SHARD_ROWS, total // MIN_SHARD_SHARE), MAX_SHARD_ROWS)
    size = min(max(floor, math.ceil(remaining / GUIDED_SHARE)), MAX_SHARD_ROWS)
    return remaining if remaining - size < floor else size  # no stub of a shard at the very end


def plan(specs: list[str], shard_size: int | None, storage_options: dict | None = None, limit: int | None = None, *,
         out: str | None = None, allowed_inside_out: tuple[str, ...] = ()) -> Plan:
    """Find the manifest files, check their schemas and cut their rows into shards of `shard_size` rows (None: sizes
    from `auto_shard_size`; a shard never spans two files).

    Reads Parquet footers only (and hashes local files). Raises ManifestError naming the file (and column) when a
    file cannot be read or has a wrong schema, lies under the output root `out` (outside `allowed_inside_out`, the
    output's own staged copies), or when there are no rows at all. `limit` keeps only the first `limit` rows.
    """
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise ValueError(f"shard_size must be a whole number >= 1, got {shard_size!r}")
    files = list_manifest_files(specs, storage_options)
    if out:
        _refuse_files_inside(files, storage.normalize_url(out), allowed_inside_out)
    # Footers are tiny and far apart: fetch them concurrently, order kept by map().
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        all_facts = list(pool.map(lambda url: _read_footer(url, storage_options), files))
        identities = list(pool.map(lambda facts: file_identity(facts, storage_options), all_facts))
    for facts in all_facts:
        _check_schema(facts)
    passthrough = _passthrough_schema(all_facts)
    _check_passthrough_values(all_facts, passthrough, storage_options)

    shards: list[Shard] = []
    warnings: list[str] = []
    available = sum(sum(facts.row_group_rows) for facts in all_facts)
    total = available if limit is None else min(limit, available)
    remaining = total
    digest = hashlib.sha256()
    for file_index, (facts, identity) in enumerate(zip(all_facts, identities)):
        num_rows = sum(facts.row_group_rows)
        schema_text = facts.schema.remove_metadata().to_string(show_field_metadata=False)
        stable = {key: value for key, value in identity.items() if key != "url"}
        digest.update(json.dumps([stable, num_rows, schema_text], sort_keys=True).encode())
        first_shard = len(shards)
        row_start = 0
        while row_start < num_rows and remaining > 0:
            size = shard_size or auto_shard_size(remaining, total)
            row_stop = int(min(row_start + size, num_rows, row_start + remaining))
            shards.append(Shard(make_shard_id(file_index, facts.url, row_start), facts.url, row_start, row_stop,
                                file_index))
            remaining -= row_stop - row_start
            row_start = row_stop
        smallest = min((shard.num_rows for shard in shards[first_shard:]), default=0)
        if facts.row_group_rows and smallest and max(facts.row_group_rows) > 4 * smallest:
            warnings.append(f"manifest {facts.url}: row groups of up to {max(facts.row_group_rows)} rows, shards of "
                            f"{smallest} rows: every shard reads a whole row group; write it with smaller row groups")
    for shard in shards:
        digest.update(f"{shard.shard_id}:{shard.row_start}:{shard.row_stop}".encode())
    total_rows = sum(shard.num_rows for shard in shards)
    if total_rows == 0:
        raise ManifestError(f"no rows to render: {', '.join(files)} hold 0 rows")
    return Plan(files=files, shards=shards, total_rows=total_rows, fingerprint=digest.hexdigest(),
                passthrough_columns=passthrough.names, passthrough_schema=passthrough, warnings=warnings,
                has_ids=["id" in facts.schema.names for facts in all_facts],
                may_lack_ids=[facts.may_lack_ids for facts in all_facts], identities=identities)


def _refuse_files_inside(files: list[str], out: str, allowed: tuple[str, ...]) -> None:
    root = out.rstrip("/") + "/"
    for url in files:
        inside = url.startswith(root)
        if inside and not any(url.startswith(root + prefix.strip("/") + "/") for prefix in allowed):
            raise ManifestError(f"manifest {url} is inside the output root {out}: an output root is never a "
                                f"manifest source (its files are ray-render's to replace); move the manifest "
                                f"elsewhere")


def mark_repeated_ids(plan: Plan, storage_options: dict | None = None,
                      default_id: Callable[[dict], str] | None = None) -> Plan:
    """Tell each shard which of its rows repeat an id used earlier in the plan, so that the later rows end
    `invalid` and the output never holds one id twice, even when the repeats fall in different shards.

    The one pass over data before rendering (planning itself reads footers only). A row's id is its `id` cell, or,
    when that is null or the file has no `id` column, `default_id(row)` computed from the columns that decide it
    (engine/rows.py: DEFAULT_ID_COLUMNS), exactly as the actor will. Memory is 8 bytes a row (a hash of the id, not
    the id); only ids whose hash repeats are read again and compared as text. A file that cannot be read is
    skipped here: its shards fail on their own when they read it.
    """
    import numpy as np

    stops: dict[int, int] = {}  # file index -> rows of it in the plan
    for shard in plan.shards:
        stops[shard.file_index] = max(stops.get(shard.file_index, 0), shard.row_stop)
    readable = [index for index in sorted(stops) if plan.has_ids[index] or default_id is not None]

    def ids_of(index: int):
        """The id of each of the file's planned rows (None when it has none), a batch at a time: the driver never
        holds a whole column of ids, whose Python strings would cost it ~100 bytes a row."""
        fs, path = storage.open_fs(plan.files[index], storage_options)
        left = stops[index]
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            columns = ["id"] if plan.has_ids[index] else []
            if default_id is not None and plan.may_lack_ids[index]:
                columns += [name for name in DEFAULT_ID_COLUMNS if name in names and name != "id"]
            for batch in parquet.iter_batches(batch_size=65_536, columns=columns):
                rows = batch.slice(0, left).to_pylist()
                left -= len(rows)
                for row in rows:
                    value = row.get("id")
                    if value is None:
                        yield default_id(row) if default_id is not None else None
                    else:
                        yield str(value)
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
