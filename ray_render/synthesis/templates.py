"""Prompt expansion: a template with {placeholders} and a table of values become a manifest.

A template file (YAML) names the template, its text fields and where its values are:

    name: brand_identity            # id prefix: a row's id is "<name>-<hash of the row's values>"
    mode: product                   # product: every combination of the columns' values; zip: one row per table row
    values: values.yaml             # YAML, CSV or Parquet; a relative path is relative to the template file
    prompt: "A {style} logo for {brand}, {palette} palette"
    negative_prompt: "blurry, watermark"   # optional; negative_prompt and positive_prompt may use placeholders too

Each manifest row gets `id`, the filled text fields, `template` (the template's name) and every values column
unchanged, so the output metadata records which values made each image. A values column named like a manifest
column (`seed`, `width`, `num_images`, `preset`, ...) sets that column for its rows: same seed across the
variants of an A/B test, a per-row size, and so on. Ids depend only on the template name and the values, so
editing the template's wording keeps the ids, and a refresh re-renders exactly the rows whose prompt changed.

`python -m ray_render.templates TEMPLATE.yaml --out manifest.parquet` writes the manifest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import posixpath
import re
import string
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ray_render import storage
from ray_render.config import RENDER_PARAMS, check_render_param

MODES = ("zip", "product")
TEXT_FIELDS = ("prompt", "negative_prompt", "positive_prompt")  # the manifest columns a template may fill
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,100}")  # leaves room for "-<hash>" within the 128-character id limit
MAX_ROWS = 1_000_000  # a product of a few long columns grows fast; past this, expansion stops with an error
# Manifest columns that values may set, with their manifest types (DESIGN.md, "Manifest (input)").
MANIFEST_TYPES: dict[str, pa.DataType] = {
    "seed": pa.int64(), "width": pa.int32(), "height": pa.int32(), "num_sampling_steps": pa.int32(),
    "num_images": pa.int32(), "cfg": pa.float64(), "cfg_img": pa.float64(), "timesteps_shift": pa.float64(),
    "use_norm": pa.bool_(), "cfg_schedule": pa.string(), "preset": pa.string(), "input_image": pa.string(),
    "negative_prompt": pa.string(), "positive_prompt": pa.string(),
}


class TemplateError(ValueError):
    """A template or its values table is wrong; the message names the file, the row and the column."""


@dataclass(frozen=True)
class Template:
    """A named prompt template and where its values table is."""

    name: str
    prompt: str
    negative_prompt: str | None = None
    positive_prompt: str | None = None
    mode: str = "zip"
    values: str | None = None  # path or URL of the values table
    source: str = "template"  # where the template came from, for messages

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise TemplateError(f"{self.source}: name must be 1-100 characters of A-Z a-z 0-9 . _ -, "
                                f"got {self.name!r}")
        if self.mode not in MODES:
            raise TemplateError(f"{self.source}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for field in TEXT_FIELDS:
            text = getattr(self, field)
            if field == "prompt" and not isinstance(text, str):
                raise TemplateError(f"{self.source}: prompt must be a string, got {text!r}")
            if text is not None:
                placeholders(text, where=f"{self.source}: {field}")  # fail early on a malformed field

    def fields(self) -> dict[str, str]:
        """The text fields this template fills, name -> template text."""
        return {field: getattr(self, field) for field in TEXT_FIELDS if getattr(self, field) is not None}


def placeholders(text: str, where: str = "template") -> list[str]:
    """The placeholder names in `text`, in order of first use; `{{` and `}}` are literal braces."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"{where}: {exc} in {text!r} (write {{{{ and }}}} for literal braces)") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        # Only plain names: "{}" and "{0}" have no column, "{a.b}" and "{a[0]}" would reach into the values.
        if not name.isidentifier():
            raise TemplateError(f"{where}: placeholder {{{name}}} must be a column name (letters, digits, _)")
        if name not in names:
            names.append(name)
    return names


def load_template(url: str, storage_options: dict | None = None) -> Template:
    """Read a template file (YAML); a relative `values` path is resolved against the file's directory."""
    try:
        data = yaml.safe_load(storage.read_bytes(url, storage_options))
    except yaml.YAMLError as exc:
        raise TemplateError(f"{url}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{url}: a template file must be a mapping with name, prompt, mode and values")
    known = {"name", "mode", "values", *TEXT_FIELDS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TemplateError(f"{url}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("name", "prompt"):
        if key not in data:
            raise TemplateError(f"{url}: missing {key!r}")
    values = data.get("values")
    if isinstance(values, str) and "://" not in values and not values.startswith("/"):
        values = posixpath.join(posixpath.dirname(url), values)
    return Template(name=data["name"], prompt=data["prompt"], negative_prompt=data.get("negative_prompt"),
                    positive_prompt=data.get("positive_prompt"), mode=data.get("mode", "zip"), values=values,
                    source=url)


def read_values(url: str, storage_options: dict | None = None) -> dict[str, list]:
    """Read a values table into column name -> list of values (None for an empty cell).

    YAML: a mapping of column -> list of values (columns may differ in length in product mode), or a list of
    row mappings. CSV: a header row, every cell read as text (so "007" stays "007"). Parquet: its own types.
    """
    data = storage.read_bytes(url, storage_options)
    suffix = url.lower().rsplit(".", 1)[-1]
    if suffix in ("yaml", "yml"):
        try:
            parsed = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise TemplateError(f"{url}: not valid YAML: {exc}") from None
        if isinstance(parsed, list) and all(isinstance(row, dict) for row in parsed):
            names = list(dict.fromkeys(name for row in parsed for name in row))
            columns = {name: [row.get(name) for row in parsed] for name in names}
        elif isinstance(parsed, dict):
            columns = {name: value if isinstance(value, list) else [value] for name, value in parsed.items()}
        else:
            raise TemplateError(f"{url}: a YAML values table is a mapping of column -> list of values, "
                                "or a list of rows")
    elif suffix == "csv":
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
        header = next(reader, None)
        if not header:
            raise TemplateError(f"{url}: empty CSV, expected a header row of column names")
        columns = {name.strip(): [] for name in header}
        if len(columns) != len(header):
            raise TemplateError(f"{url}: duplicate column names in the header {header}")
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue  # blank lines
            if len(row) != len(header):
                raise TemplateError(f"{url}: line {line} has {len(row)} cells, the header has {len(header)}")
            for name, cell in zip(columns, row):
                columns[name].append(cell if cell != "" else None)
    elif suffix == "parquet":
        columns = pq.read_table(io.BytesIO(data)).to_pydict()
    else:
        raise TemplateError(f"{url}: values tables must be .yaml, .yml, .csv or .parquet")
    for name in columns:
        if not isinstance(name, str) or not name:
            raise TemplateError(f"{url}: column names must be non-empty strings, got {name!r}")
    return columns


def _coerce(name: str, value, where: str):
    """A manifest column's value in its manifest type: CSV text like "512" becomes 512 for `width`."""
    if value is None or name not in MANIFEST_TYPES:
        return value
    kind = MANIFEST_TYPES[name]
    try:
        if isinstance(value, str) and kind != pa.string():
            text = value.strip()
            if pa.types.is_boolean(kind):
                if text.lower() not in ("true", "false"):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                value = text.lower() == "true"
            elif pa.types.is_integer(kind):
                if not re.fullmatch(r"[+-]?\d+", text):
                    raise ValueError(f"{name} must be a whole number, got {value!r}")
                value = int(text)
            else:
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {value!r}") from None
        if name in RENDER_PARAMS:
            return check_render_param(name, value)
        if name == "seed" and (isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63):
            raise ValueError(f"seed must be a whole number within int64, got {value!r}")
        if kind == pa.string() and not isinstance(value, str):
            raise ValueError(f"{name} must be text, got {value!r}")
    except ValueError as exc:
        raise TemplateError(f"{where}, column {name!r}: {str(exc).removeprefix(name + ' ')}") from None
    return value


def _row_id(name: str, values: dict) -> str:
    canonical = json.dumps(values, sort_keys=True, default=str, ensure_ascii=False)
    return f"{name}-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def _value_rows(template: Template, columns: dict[str, list], source: str, max_rows: int):
    """Yield (where, values) per manifest row, in a deterministic order."""
    if template.mode == "zip":
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise TemplateError(f"{source}: in zip mode every column needs the same number of values, got "
                                + ", ".join(f"{name}: {n}" for name, n in lengths.items()))
        count = next(iter(lengths.values()), 0)
        if count > max_rows:
            raise TemplateError(f"{source}: {count} rows, more than the limit of {max_rows}")
        for index in range(count):
            yield f"{source} row {index + 1}", {name: values[index] for name, values in columns.items()}
        return
    axes = {}
    for name, values in columns.items():
        present = [value for value in values if value is not None]
        if not present:
            raise TemplateError(f"{source}: column {name!r} has no values")
        seen = set()
        for value in present:
            key = json.dumps(value, sort_keys=True, default=str)
            if key in seen:
                raise TemplateError(f"{source}: column {name!r} lists {value!r} twice; in product mode each "
                                    "column's values must differ")
            seen.add(key)
        axes[name] = present
    count = math.prod(len(values) for values in axes.values())
    if count > max_rows:
        raise TemplateError(f"{source}: product mode makes {count} rows ("
                            + " x ".join(f"{len(v)} {n}" for n, v in axes.items())
                            + f"), more than the limit of {max_rows}; use fewer values or zip mode")
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        yield f"{source} combination {values}", values


def expand(template: Template, columns: dict[str, list], source: str = "values table",
           max_rows: int = MAX_ROWS) -> pa.Table:
    """The manifest rows of `template` filled from `columns` (see `read_values`), as an Arrow table.

    Raises TemplateError naming the placeholder and the table's columns when a placeholder has no column, and
    naming the row and column for a missing or bad value or for two rows with the same values (same id).
    """
    fields = template.fields()
    names = list(columns)
    if not names:
        raise TemplateError(f"{source}: the values table has no columns")
    reserved = {"id", "template", *fields}
    clashes = [name for name in names if name in reserved]
    if clashes:
        raise TemplateError(f"{source}: column(s) {', '.join(clashes)} would overwrite what the template makes "
                            f"({', '.join(sorted(reserved))}); rename them")
    for field, text in fields.items():
        for name in placeholders(text, where=f"{template.source}: {field}"):
            if name not in columns:
                raise TemplateError(f"{template.source}: {field} uses placeholder {{{name}}}, which is not a "
                                    f"column of {source}; its columns are: {', '.join(names)}")
    used = {name for text in fields.values() for name in placeholders(text)}
    out: dict[str, list] = {"id": [], **{field: [] for field in fields}, "template": [], **{n: [] for n in names}}
    first_row: dict[str, str] = {}  # id -> where it first appeared; product rows say "combination N"
    for number, (where, values) in enumerate(_value_rows(template, columns, source, max_rows), start=1):
        values = {name: _coerce(name, value, where) for name, value in values.items()}
        for name in used:
            if values[name] is None:
                raise TemplateError(f"{where}: column {name!r} is empty, and the template uses {{{name}}}")
        row_id = _row_id(template.name, values)
        if row_id in first_row:
            raise TemplateError(f"{where} has the same values as {first_row[row_id]}; ids come from the template "
                                "name and the values, so every row's values must differ")
        first_row[row_id] = where if template.mode == "zip" else f"combination {number}"
        out["id"].append(row_id)
        for field, text in fields.items():
            try:
                out[field].append(text.format_map(values))
            except (ValueError, TypeError) as exc:
                raise TemplateError(f"{where}: {field}: cannot format {text!r}: {exc}") from None
        out["template"].append(template.name)
        for name in names:
            out[name].append(values[name])
    if not out["id"]:
        raise TemplateError(f"{source}: the values table has no rows")
    arrays = {}
    for name, values in out.items():
        try:
            array = pa.array(values, type=MANIFEST_TYPES.get(name, pa.string() if name in fields else None))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TemplateError(f"{source}: column {name!r} mixes kinds of values ({exc}); "
                                "make every value in it the same kind (all text or all numbers)") from None
        # A column left empty in every row has no type of its own; text is what a reader expects of it.
        arrays[name] = array.cast(pa.string()) if pa.types.is_null(array.type) else array
    return pa.table(arrays)


def expand_file(template_url: str, out_url: str, storage_options: dict | None = None,
                values_url: str | None = None, max_rows: int = MAX_ROWS) -> int:
    """Expand a template file into a manifest Parquet file at `out_url`; returns the number of rows."""
    template = load_template(template_url, storage_options)
    values_url = values_url or template.values
    if not values_url:
        raise TemplateError(f"{template_url}: no values table: add `values: FILE` or pass one")
    table = expand(template, read_values(values_url, storage_options), source=values_url, max_rows=max_rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(out_url, sink.getvalue().to_pybytes(), storage_options)
    return table.num_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_render.templates",
                                     description="Expand a prompt template and its values table into a manifest.")
    parser.add_argument("template", help="template YAML file (path or fsspec URL)")
    parser.add_argument("--out", required=True, help="manifest Parquet to write (path or fsspec URL)")
    parser.add_argument("--values", help="values table (YAML/CSV/Parquet); default: the template's `values`")
    parser.add_argument("--storage-options", default="{}", help="fsspec options as JSON")
    parser.add_argument("--max-rows", type=int, default=MAX_ROWS)
    args = parser.parse_args(argv)
    try:
        rows = expand_file(args.template, args.out, json.loads(args.storage_options), args.values, args.max_rows)
    except (TemplateError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
