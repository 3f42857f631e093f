"""Regenerate jobs/examples/prompts.parquet: 16 short prompts about coloured shapes, the demo manifest.

    python jobs/examples/make_prompts.py

The prompts use the words of the embedded tiny model's training captions (ray_render/models/nextstep/shapes.py:
eight colours, four shapes, sizes, positions); some rows set their own seed or image count, and `shape` is a
passthrough column.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a green triangle on a white background",
    "a blue diamond on a cyan background",
    "a small purple square on a yellow background",
    "a large cyan triangle on a green background",
    "a white circle at the top left on a purple background",
    "a black square on a red background, in the center",
    "a small red triangle on a white background",
    "a large blue square at the bottom right on a yellow background",
    "black background with a green circle on the left",
    "a yellow diamond on a purple background",
    "a cyan circle on a blue background, at the top",
    "purple background with a small white triangle",
    "a white square on a green background",
    "a red diamond on a cyan background, on the right",
]


def build() -> pa.Table:
    n = len(PROMPTS)
    return pa.table({
        "id": [f"shape-{i:02d}" for i in range(n)],
        "prompt": PROMPTS,
        "seed": pa.array([1000 + i if i % 4 == 0 else None for i in range(n)], pa.int64()),  # null: derived from id
        "num_images": pa.array([2 if i == 3 else None for i in range(n)], pa.int32()),  # row 3 asks for two images
        "shape": [next(word for word in ("circle", "square", "triangle", "diamond") if word in p) for p in PROMPTS],
    })


if __name__ == "__main__":
    target = Path(__file__).with_name("prompts.parquet")
    pq.write_table(build(), target)
    print(f"wrote {target} ({len(PROMPTS)} rows)")
