"""Build small finished output roots with the writer's own functions, as input for export and report tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ray_render.engine import quality
from ray_render.engine.rows import InvalidRow, RowTask
from ray_render.output import commits, images, schema
from ray_render.output.lease import Lease

PASSTHROUGH = pa.schema([pa.field("category", pa.string())])
RUN_ID = "0123456789ab"  # the run that "rendered" a built root
CREATED_AT = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)  # fixed, so two builds give equal metadata


def picture(number: int, size: int = 32) -> np.ndarray:
    """A distinct, deterministic picture per number: a colour ramp with a bright square at a number-dependent spot."""
    rng = np.random.default_rng(number)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = rng.uniform(0, 1, 3).astype(np.float32)
    image = (ramp[None, :, None] * base[None, None, :] + ramp[:, None, None] * (1 - base[None, None, :]) / 2)
    image = image.astype(np.uint8)
    x, y = (number * 7) % (size - 8), (number * 3) % (size - 8)
    image[y:y + 8, x:x + 8] = 255
    return image


@dataclass
class BuiltRoot:
    root: str
    ok: list[dict] = field(default_factory=list)  # metadata rows of the committed ok images, in shard/row order
    images: dict[str, bytes] = field(default_factory=dict)  # "<id>_<k>" -> encoded bytes
    committed: list[str] = field(default_factory=list)


def build_output_root(root: str, *, shards: int = 2, rows_per_shard: int = 3, num_images: int = 2,
                      fmt: str = "png", scores: bool = False, uncommitted_shards: int = 0,
                      storage_options: dict | None = None) -> BuiltRoot:
    """Write `shards` committed shards (each row: `num_images` ok images; the shard's last row also gets one
    failed and one invalid row) plus `uncommitted_shards` shard attempts whose images and metadata exist but were
    never committed. Commits go through the real protocol: a lease on the root, a commit entry, publication.
    With `scores`, the metadata carries the quality columns, computed from the pixels."""
    meta_schema = schema.metadata_schema(PASSTHROUGH)
    if scores:
        extra = [pa.field(name, pa.type_for_alias(kind)) for name, kind in schema.QUALITY_COLUMNS.items()]
        meta_schema = pa.schema(list(meta_schema) + extra)
    built = BuiltRoot(root=root)
    lease = Lease(root, RUN_ID, storage_options)
    lease.acquire()
    number = 0
    for shard in range(shards + uncommitted_shards):
        shard_id = f"s{shard:03d}"
        attempt_id = f"{RUN_ID}-{shard + 1}"
        rows = []
        for r in range(rows_per_shard):
            row_id = f"row.{shard}.{r}" if r == 0 else f"row-{shard}-{r}"  # one id with dots, as ids may have
            task = RowTask(row_index=r, id=row_id, prompt=f"prompt number {shard * rows_per_shard + r}: a red fox",
                           params={"width": 32, "height": 32, "num_images": num_images, "cfg": 7.5},
                           seed=1000 + r, input_image=None, preset=None,
                           passthrough={"category": ["animals", "plants"][r % 2]}, fingerprint=f"fp{r}",
                           source_file="manifest.parquet")
            for k in range(num_images):
                array = picture(number)
                number += 1
                data = images.encode_image(array, fmt)
                url = images.write_image(root, shard_id, attempt_id, row_id, k, fmt, data, storage_options)
                row = task.ok_row(k, image_uri=url, sha256=images.sha256_hex(data), width=32, height=32,
                                    fmt=fmt, model="tiny", model_revision="rev1", render_ms=1.0, attempts=1,
                                    worker="w0", created_at=CREATED_AT)
                if scores:
                    row.update(quality.score(array))
                rows.append(row)
                if shard < shards:
                    built.ok.append(row)
                    built.images[f"{row_id}_{k}"] = data
        task = RowTask(row_index=rows_per_shard, id=f"bad-{shard}", prompt="a prompt that failed", params={},
                       seed=5, input_image=None, preset=None, passthrough={"category": "animals"}, fingerprint="x",
                       source_file="manifest.parquet")
        rows.append(task.failed_row("out of memory after 3 attempts", 3, created_at=CREATED_AT))
        rows.append(InvalidRow(row_index=rows_per_shard + 1, id=f"inv-{shard}", column="width",
                               error="width must be a multiple of 16, got 30", passthrough={"category": "plants"},
                               source_file="manifest.parquet", prompt="bad size").metadata_row(created_at=CREATED_AT))
        commits.write_attempt_metadata(root, shard_id, attempt_id, schema.metadata_table(rows, meta_schema),
                                       storage_options)
        if shard < shards:
            lease.append("commit", shard=shard_id, attempt=attempt_id, info={"rows": len(rows)})
            commits.publish(root, shard_id, attempt_id, storage_options)
            built.committed.append(shard_id)
    lease.release(leftovers=[])
    return built
