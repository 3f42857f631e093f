"""The metadata schema: one fixed Arrow type per column, so every shard's file has the same schema and
`pyarrow.dataset.dataset(root + "/metadata")` reads them as one table.

One row per output image, and one per input row that produced no image. The render parameters' columns come from
`config.RENDER_PARAMETERS`; a scoring job adds the quality columns; the manifest's passthrough columns follow.
"""

from __future__ import annotations

import pyarrow as pa

from ray_render.config import RENDER_PARAMETERS

STATUSES = ("ok", "invalid", "failed")  # what rendering a row ends in (the counts of a run)
# Set by `ray-render refresh` on the rows of ids that left the manifest; the image is kept (image_uri set) unless
# the refresh ran with --prune (image_uri null).
REMOVED = "removed"
ALL_STATUSES = STATUSES + (REMOVED,)

# Quality scores (engine/quality.py computes them): column -> Arrow type alias.
QUALITY_COLUMNS: dict[str, str] = {
    "sharpness": "float64",
    "colour_diversity": "float64",
    "artefact_level": "float64",
    "phash": "string",
    "quality_score": "float64",
}
# With --min-quality: whether the kept image reached it, and how many renders it took (1 = the first).
RERENDER_COLUMNS: dict[str, str] = {"quality_passed": "bool", "quality_renders": "int32"}



def empty_counts() -> dict[str, int]:
    """Input rows by final status, all zero."""
    return {status: 0 for status in STATUSES}


_ARROW_TYPES = {str: pa.string(), int: pa.int32(), float: pa.float64(), bool: pa.bool_()}
# Render parameters written elsewhere in the row: the pixel size is the stored image's, the image count is implied.
_SIZE_PARAMS = ("width", "height")

METADATA_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("image_index", pa.int32()),  # null for rows that produced no image
    pa.field("status", pa.string()),  # see ALL_STATUSES
    pa.field("error", pa.string()),
    pa.field("image_uri", pa.string()),  # full fsspec URL
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("sha256", pa.string()),  # of the encoded image bytes
    pa.field("prompt", pa.string()),
    *[pa.field(param.name, _ARROW_TYPES[param.type]) for param in RENDER_PARAMETERS
      if param.name not in _SIZE_PARAMS],
    pa.field("seed", pa.int64()),  # the seed this image used (row seed + image index, or a re-render's)
    pa.field("preset", pa.string()),
    pa.field("input_image", pa.string()),
    pa.field("model", pa.string()),
    pa.field("model_revision", pa.string()),
    pa.field("render_ms", pa.float64()),  # this image's share of its batch's model time
    pa.field("attempts", pa.int32()),
    pa.field("worker", pa.string()),
    pa.field("created_at", pa.timestamp("ms", tz="UTC")),
    pa.field("row_fingerprint", pa.string()),  # engine.rows.RowTask.fingerprint: changes iff the row's images would
    pa.field("passthrough_fingerprint", pa.string()),  # engine.rows.passthrough_fingerprint of the passthrough values
    pa.field("source_file", pa.string()),
    pa.field("source_row", pa.int64()),  # 0-based row in source_file
]
METADATA_COLUMNS = [f.name for f in METADATA_FIELDS]
RENDER_COLUMNS = tuple(param.name for param in RENDER_PARAMETERS if param.name not in _SIZE_PARAMS)


def quality_fields() -> list[pa.Field]:
    """The columns a scoring job adds: QUALITY_COLUMNS, then RERENDER_COLUMNS."""
    columns = {**QUALITY_COLUMNS, **RERENDER_COLUMNS}
    return [pa.field(name, pa.type_for_alias(kind)) for name, kind in columns.items()]


def reserved_columns() -> set[str]:
    """Names a manifest's passthrough column may not take: every column the metadata writes itself."""
    return set(METADATA_COLUMNS) | {f.name for f in quality_fields()}


def metadata_schema(passthrough_schema: pa.Schema | None = None, quality_columns: bool = False) -> pa.Schema:
    """The fixed metadata columns, the quality columns when asked for, then the manifest's passthrough columns
    (their manifest types, nullable)."""
    scores = quality_fields() if quality_columns else []
    extra = [pa.field(f.name, f.type, nullable=True) for f in (passthrough_schema or pa.schema([]))]
    clashes = [f.name for f in extra if f.name in reserved_columns()]
    if clashes:
        raise ValueError(f"passthrough column(s) {', '.join(clashes)} clash with metadata columns")
    return pa.schema(METADATA_FIELDS + scores + extra)


def metadata_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by column name) as a table of exactly `schema`; missing keys are null."""
    unknown = sorted({key for row in rows for key in row} - set(schema.names))
    if unknown:
        raise ValueError(f"metadata rows carry column(s) not in the schema: {', '.join(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)
