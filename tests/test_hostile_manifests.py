"""Hostile manifests (`-m chaos`): every bad input gets its documented outcome, the good rows still render, and
nothing is written outside the output root.

Outcomes (DESIGN.md, "Manifest"): a bad value fails its row only (`invalid`, with a message naming the file, the
row, the column and the allowed values); a manifest that cannot be used at all fails the job before any rendering.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import summary as exits

pytestmark = pytest.mark.chaos

# (name, cells that replace a good row's, column the error names, a phrase of the allowed values)
BAD_ROWS = [
    ("null prompt", {"prompt": None}, "prompt", "non-empty string"),
    ("empty prompt", {"prompt": ""}, "prompt", "must not be empty"),
    ("whitespace prompt", {"prompt": " \t\n"}, "prompt", "must not be empty"),
    ("100,000-character prompt", {"prompt": "x" * 100_000}, "prompt", "at most 20000 characters"),
    ("NUL in prompt", {"prompt": "a\x00b"}, "prompt", "NUL"),
    ("100,000-character negative prompt", {"negative_prompt": "n" * 100_000}, "negative_prompt", "at most"),
    ("id with ../", {"id": "../escape"}, "id", "A-Z a-z 0-9 . _ -"),
    ("id with /", {"id": "a/b"}, "id", "A-Z a-z 0-9 . _ -"),
    ("id with a space", {"id": "a b"}, "id", "A-Z a-z 0-9 . _ -"),
    ("id with NUL", {"id": "a\x00b"}, "id", "A-Z a-z 0-9 . _ -"),
    ("id ..", {"id": ".."}, "id", "not start with '.'"),
    ("id of 129 characters", {"id": "i" * 129}, "id", "1 to 128 characters"),
    ("duplicate id", {"id": "good0"}, "id", "repeats the id of row"),
    ("width not a multiple of 16", {"width": 100}, "width", "multiple of 16 from 16 to 4096"),
    ("height not a multiple of 16", {"height": 17}, "height", "multiple of 16 from 16 to 4096"),
    ("width zero", {"width": 0}, "width", "multiple of 16 from 16 to 4096"),
    ("negative height", {"height": -64}, "height", "multiple of 16 from 16 to 4096"),
    ("huge width", {"width": 1_000_000}, "width", "multiple of 16 from 16 to 4096"),
    ("NaN cfg", {"cfg": float("nan")}, "cfg", "finite"),
    ("infinite cfg", {"cfg": float("inf")}, "cfg", "finite"),
    ("cfg below 1", {"cfg": 0.5}, "cfg", "from 1 to 100"),
    ("zero steps", {"num_sampling_steps": 0}, "num_sampling_steps", "from 2 to 1000"),
    ("negative steps", {"num_sampling_steps": -3}, "num_sampling_steps", "from 2 to 1000"),
    ("zero images", {"num_images": 0}, "num_images", "from 1 to 64"),
    ("unknown preset", {"preset": "ultra"}, "preset", "draft, standard, premium"),
    ("unknown cfg schedule", {"cfg_schedule": "cubic"}, "cfg_schedule", "constant, linear"),
    ("zero timesteps shift", {"timesteps_shift": 0.0}, "timesteps_shift", "greater than 0"),
    ("negative seed", {"seed": -1}, "seed", "from 0 to"),
    # Edit inputs ({inputs} is the manifest's own directory, an allowed input root): fetched only for an edit
    # prompt, only from allowed places, only regular files.
    ("input image without <image>", {"input_image": "{inputs}/input.png"}, "input_image", "exactly one <image>"),
    ("missing input image", {"prompt": "<image> paint it", "input_image": "{inputs}/missing.png"}, "input_image",
     "no such file"),
    ("input image outside the roots", {"prompt": "<image> paint it", "input_image": "/etc/hostname"},
     "input_image", "outside the allowed input roots"),
    ("cloud metadata URL", {"prompt": "<image> paint it", "input_image": "http://169.254.169.254/latest/meta-data"},
     "input_image", "outside the allowed input roots"),
    ("input image that is a FIFO", {"prompt": "<image> paint it", "input_image": "{inputs}/pipe"}, "input_image",
     "not a regular file"),
]


def _good(i: int) -> dict:
    return {"id": f"good{i}", "prompt": f"a tidy little house {i}"}


def _snapshot(directory) -> set[str]:
    return {os.path.join(root, name) for root, _, names in os.walk(directory) for name in names}


def _job(manifest, out, **options) -> JobConfig:
    return JobConfig(manifests=[str(manifest)], out=str(out), model="placeholder", progress=False, **options)


def test_bad_rows_are_invalid_with_a_message_and_the_good_rows_render(ray_cluster, tmp_path):
    inputs = tmp_path / "manifests"
    inputs.mkdir()
    os.mkfifo(inputs / "pipe")  # a read of it would block forever: it must never be opened
    rows = [_good(0)]
    for index, (_, cells, _, _) in enumerate(BAD_ROWS):
        cells = {key: value.replace("{inputs}", str(inputs)) if isinstance(value, str) else value
                 for key, value in cells.items()}
        rows.append({**_good(1000 + index), **cells})
        rows.append(_good(index + 1))
    # An undecodable prompt: bytes that are not UTF-8 inside a string column.
    raw = [b"a tidy little house", b"\xff\xfe broken", b"another tidy house"]
    offsets = pa.array([0, len(raw[0]), len(raw[0]) + len(raw[1]), sum(map(len, raw))], pa.int32())
    broken = pa.StringArray.from_buffers(3, offsets.buffers()[1], pa.py_buffer(b"".join(raw)))
    table = pa.Table.from_pylist([{name: row.get(name) for name in dict.fromkeys(k for r in rows for k in r)}
                                  for row in rows])
    tail = pa.table({"id": ["tail0", "undecodable", "tail1"], "prompt": broken})
    table = pa.concat_tables([table, tail.select(["id", "prompt"]).cast(pa.schema([table.schema.field("id"),
                                                                                     table.schema.field("prompt")]))],
                             promote_options="default")
    manifest = inputs / "hostile.parquet"
    pq.write_table(table, manifest)
    out = tmp_path / "job" / "out"
    before = _snapshot(tmp_path)

    summary = driver.run(_job(manifest, out, shard_size=16))
    assert summary.exit_code == exits.EXIT_ROWS, summary.format()
    metadata = ds.dataset(str(out / "metadata")).to_table().to_pylist()
    by_row = {row["source_row"]: row for row in metadata}
    assert len(metadata) == len(table)  # every input row accounted for, exactly once

    # Every row but the bad ones (at odd positions) and the undecodable one (second to last) is good.
    bad_rows = {1 + 2 * index for index in range(len(BAD_ROWS))} | {len(table) - 2}
    good = [i for i in range(len(table)) if i not in bad_rows]
    assert all(by_row[i]["status"] == "ok" for i in good), [by_row[i] for i in good if by_row[i]["status"] != "ok"]
    assert summary.rows["ok"] == len(good), [(i, by_row[i]["id"], by_row[i]["error"]) for i in sorted(bad_rows)
                                             if by_row[i]["status"] == "ok"]
    for index, (name, _, column, allowed) in enumerate(BAD_ROWS):
        row = by_row[1 + 2 * index]
        assert row["status"] == "invalid", (name, row)
        assert f"row {1 + 2 * index}" in row["error"] and column in row["error"] and allowed in row["error"], \
            (name, row["error"])
        assert str(manifest) in row["error"], (name, row["error"])
    undecodable = by_row[len(table) - 2]
    assert undecodable["status"] == "invalid" and "UTF-8" in undecodable["error"], undecodable
    assert summary.rows["invalid"] == len(BAD_ROWS) + 1

    # Nothing outside the output root, and every image key under it.
    new_files = _snapshot(tmp_path) - before
    assert new_files and all(path.startswith(str(out) + os.sep) for path in new_files), sorted(new_files)[:5]
    assert all(row["image_uri"].startswith(str(out) + "/images/") for row in metadata if row["status"] == "ok")


def _write(path, table) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


# (name, how to make the file, phrase the job-level message must hold)
BAD_FILES = [
    ("no prompt column", lambda p: _write(p, pa.table({"id": ["a"], "caption": ["x"]})), "no 'prompt' column"),
    ("prompt of integers", lambda p: _write(p, pa.table({"prompt": [1, 2]})), "column 'prompt' has type int64"),
    ("width as text", lambda p: _write(p, pa.table({"prompt": ["x"], "width": ["64"]})), "column 'width' has type"),
    ("cfg as text", lambda p: _write(p, pa.table({"prompt": ["x"], "cfg": ["high"]})), "expected a float"),
    ("seed as float", lambda p: _write(p, pa.table({"prompt": ["x"], "seed": [1.5]})), "column 'seed' has type"),
    ("id as float", lambda p: _write(p, pa.table({"prompt": ["x"], "id": [1.5]})), "column 'id' has type"),
    ("use_norm as text", lambda p: _write(p, pa.table({"prompt": ["x"], "use_norm": ["yes"]})), "expected bool"),
    ("a column named like an output column",
     lambda p: _write(p, pa.table({"prompt": ["x"], "status": ["new"]})), "clashes with an output metadata column"),
    ("no rows", lambda p: _write(p, pa.table({"prompt": pa.array([], pa.string())})), "0 rows"),
    ("empty file", lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(b""), str(p))[-1],
     "not a readable Parquet file"),
    ("corrupt Parquet", lambda p: (p.parent.mkdir(parents=True, exist_ok=True),
                                   p.write_bytes(b"PAR1" + os.urandom(64) + b"PAR1"), str(p))[-1],
     "not a readable Parquet file"),
    ("truncated Parquet", lambda p: (_write(p, pa.table({"prompt": ["x"] * 100})),
                                     p.write_bytes(p.read_bytes()[:-20]), str(p))[-1], "not a readable Parquet file"),
    ("no such file", lambda p: str(p), "no such file"),
]


@pytest.mark.parametrize("name,make,phrase", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_unusable_manifests_fail_the_job_before_rendering(tmp_path, name, make, phrase):
    manifest = make(tmp_path / "manifests" / "bad.parquet")
    out = tmp_path / "out"
    summary = driver.run(_job(manifest, out))
    assert summary.exit_code == exits.EXIT_ABORTED, (name, summary.format())
    assert phrase in summary.message, (name, summary.message)
    assert "bad.parquet" in summary.message, (name, summary.message)
    assert not out.exists()  # nothing rendered, nothing claimed
    assert summary.startup_s == 0.0 and not summary.model  # failed before any actor (or Ray) was started


def test_bad_job_settings_fail_before_rendering(tmp_path):
    from ray_render.config import ConfigError

    for params, phrase in [({"cfg": float("nan")}, "finite"), ({"width": 100}, "multiple of 16"),
                           ({"num_sampling_steps": 0}, "from 2 to 1000")]:
        with pytest.raises(ConfigError, match=phrase):
            JobConfig(manifests=["m.parquet"], out=str(tmp_path / "out"), params=params)
    with pytest.raises(ConfigError, match="draft, standard, premium"):
        JobConfig(manifests=["m.parquet"], out=str(tmp_path / "out"), preset="ultra")
