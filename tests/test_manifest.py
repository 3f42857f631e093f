"""engine/plan.py and engine/rows.py: finding files, the shard plan from footers only, reading shard rows,
validating rows."""

from __future__ import annotations

import math
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import prompt_rows

from ray_render import storage
from ray_render.config import RENDER_PARAMS, JobConfig
from ray_render.engine.plan import (
    ROW_ID_PATTERN,
    ManifestError,
    Shard,
    auto_shard_size,
    list_manifest_files,
    plan,
)
from ray_render.engine.rows import MAX_PROMPT_CHARS, InvalidRow, RowTask, read_shard_rows, validate_rows

MODEL_DEFAULTS = {"width": 64, "height": 64, "num_sampling_steps": 50, "cfg": 7.5, "use_norm": True}


def job(**settings) -> JobConfig:
    return JobConfig(manifests=["m.parquet"], out="out", **settings)


def validate(rows, *, file="m.parquet", row_start=0, file_index=0, model_defaults=MODEL_DEFAULTS, **settings):
    shard = Shard("00000-m-0000000000", file, row_start, row_start + len(rows), file_index)
    return validate_rows(rows, shard, model_defaults=model_defaults, job=job(**settings))


def only(rows, **kwargs):
    [item] = validate(rows, **kwargs)
    return item


# ---------------------------------------------------------------------------------------------------------------
# Finding files


def test_directories_globs_and_files_resolve_in_a_stable_order(tmp_path, make_manifest):
    base = tmp_path / "manifests"
    b = make_manifest(name="b.parquet")
    a = make_manifest(name="a.parquet")
    nested = make_manifest(url=str(base / "sub" / "c.parquet"))
    make_manifest(url=str(base / "_tmp" / "skip.parquet"))  # Spark-style temp dir
    make_manifest(url=str(base / ".hidden.parquet"))
    (base / "_SUCCESS").write_text("")
    (base / "notes.txt").write_text("not a manifest")

    assert list_manifest_files([str(base)]) == [a, b, nested]
    assert list_manifest_files([str(base / "*.parquet")]) == [a, b]
    # Explicit order is kept, and a file named twice is listed once.
    assert list_manifest_files([b, str(base)]) == [b, a, nested]


def test_missing_or_empty_specs_name_the_spec(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "nope.parquet"), str(tmp_path / "empty"), str(tmp_path / "*.parquet")):
        with pytest.raises(ManifestError, match=re.escape(spec)):
            list_manifest_files([spec])


def test_s3_directory_of_manifests(s3, make_manifest):
    root = s3.fresh_url("manifests")
    options = s3.storage_options
    second = make_manifest(n=3, url=storage.join(root, "part-1.parquet"), storage_options=options)
    first = make_manifest(n=5, url=storage.join(root, "part-0.parquet"), storage_options=options)
    assert list_manifest_files([root], options) == [first, second]
    result = plan([root], shard_size=2, storage_options=options)
    assert result.total_rows == 8
    rows = [row for shard in result.shards for row in read_shard_rows(shard, options)]
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(5)] + [f"r{i}" for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# Planning


def test_shards_cover_every_row_once_with_stable_safe_ids(make_manifest):
    files = [make_manifest(n=23, name="first file.parquet"), make_manifest(n=7, name="second.parquet")]
    result = plan(files, shard_size=10)
    assert result.files == files and result.total_rows == 30
    covered = {file: [] for file in files}
    for shard in result.shards:
        assert 0 < shard.num_rows <= 10
        assert re.fullmatch(ROW_ID_PATTERN, shard.shard_id) and not shard.shard_id.startswith(".")
        covered[shard.file].append((shard.row_start, shard.row_stop))
    assert covered[files[0]] == [(0, 10), (10, 20), (20, 23)]
    assert covered[files[1]] == [(0, 7)]
    assert len({shard.shard_id for shard in result.shards}) == len(result.shards)

    again = plan(files, shard_size=10)
    assert again.fingerprint == result.fingerprint
    assert [s.shard_id for s in again.shards] == [s.shard_id for s in result.shards]
    assert plan(files, shard_size=5).fingerprint != result.fingerprint


def test_fingerprint_changes_when_a_file_changes(make_manifest):
    path = make_manifest(n=10, name="m.parquet")
    before = plan([path], shard_size=4).fingerprint
    make_manifest(n=11, name="m.parquet")
    assert plan([path], shard_size=4).fingerprint != before


def test_limit_keeps_the_first_rows_of_the_plan(make_manifest):
    files = [make_manifest(n=5), make_manifest(n=5)]
    result = plan(files, shard_size=3, limit=7)
    assert result.total_rows == 7
    assert [(s.file, s.row_start, s.row_stop) for s in result.shards] == [
        (files[0], 0, 3), (files[0], 3, 5), (files[1], 0, 2)]


def test_plan_reads_footers_only(make_manifest):
    # Destroy the data pages but keep the footer: planning must still work, reading the rows must not.
    path = make_manifest(n=50, row_group_size=10)
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(0).column(0)
    with open(path, "r+b") as handle:
        handle.seek(column.data_page_offset)
        handle.write(b"\xff" * column.total_compressed_size)
    result = plan([path], shard_size=10)
    assert result.total_rows == 50 and len(result.shards) == 5
    # Only the row groups a shard overlaps are read: shard 2 never touches the damaged first row group.
    assert [row["id"] for row in read_shard_rows(result.shards[2])] == [f"r{i}" for i in range(20, 30)]
    with pytest.raises(OSError):  # pyarrow: the damaged page does not decode
        read_shard_rows(result.shards[0])


def test_a_million_rows_plan_into_a_thousand_shards(tmp_path):
    path = str(tmp_path / "big.parquet")
    count = 1_000_000
    prompts = pa.array(["a prompt"] * count)
    pq.write_table(pa.table({"prompt": prompts, "n": pa.array(range(count), pa.int64())}), path,
                   row_group_size=100_000)
    result = plan([path], shard_size=1000)
    assert result.total_rows == count and len(result.shards) == 1000
    assert result.shards[-1].row_stop == count
    assert result.passthrough_columns == ["n"]
    assert [row["n"] for row in read_shard_rows(result.shards[321])] == list(range(321_000, 322_000))


def test_default_shards_shrink_towards_the_end_and_a_million_rows_keep_files_of_a_thousand(tmp_path, make_manifest):
    files = [make_manifest(n=6000, row_group_size=16), make_manifest(n=4000, row_group_size=16)]
    result = plan(files, shard_size=None)
    sizes = [shard.num_rows for shard in result.shards]
    assert sum(sizes) == 10_000 and sizes[0] == 157 and sizes[-1] == 16 and min(sizes) >= 16
    for file in files:  # contiguous, never across files, shrinking (but a file's last shard, cut at its end)
        shards = [shard for shard in result.shards if shard.file == file]
        assert [shard.row_start for shard in shards] == [0] + [shard.row_stop for shard in shards[:-1]]
        assert shards[-1].row_stop == (6000 if file == files[0] else 4000)
        middle = [shard.num_rows for shard in shards[:-1]]
        assert middle == sorted(middle, reverse=True)
    assert plan(files, shard_size=None).fingerprint == result.fingerprint  # the same job plans the same shards

    total, remaining, million = 1_000_000, 1_000_000, []
    while remaining:
        million.append(auto_shard_size(remaining, total))
        remaining -= million[-1]
    assert sum(size == 1000 for size in million) >= 900 and min(million) >= 244 and len(million) < 1100


def test_rows_across_row_group_boundaries_read_in_order(make_manifest):
    path = make_manifest(n=53, row_group_size=7)
    result = plan([path], shard_size=10)
    ids = [row["id"] for shard in result.shards for row in read_shard_rows(shard)]
    assert ids == [f"r{i}" for i in range(53)]


@pytest.mark.parametrize("content", [b"", b"id,prompt\n1,a cat\n", b"PAR1" + os.urandom(200) + b"PAR1"],
                         ids=["empty", "csv", "garbage"])
def test_unreadable_file_fails_the_plan_naming_the_file(tmp_path, make_manifest, content):
    good = make_manifest(n=3)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(content)
    with pytest.raises(ManifestError, match=re.escape(str(bad))):
        plan([good, str(bad)], shard_size=10)


def test_missing_prompt_column_is_a_manifest_error(make_manifest):
    path = make_manifest([{"id": "a", "caption": "x"}])
    with pytest.raises(ManifestError, match=r"no 'prompt' column.*caption"):
        plan([path], shard_size=10)


@pytest.mark.parametrize("column, arrow_type, value, expected", [
    ("width", pa.string(), "64", "an integer type"),
    ("width", pa.float64(), 64.0, "an integer type"),
    ("cfg", pa.string(), "7", "a float or integer type"),
    ("use_norm", pa.int64(), 1, "bool"),
    ("prompt", pa.int64(), 3, "string or large_string"),
    ("seed", pa.float64(), 1.0, "an integer type"),
    ("cfg_schedule", pa.bool_(), True, "string or large_string"),
])
def test_wrong_column_type_names_file_column_found_and_expected(make_manifest, column, arrow_type, value, expected):
    row = {"prompt": "a cat", column: value}
    schema = pa.schema([pa.field("prompt", pa.string() if column != "prompt" else arrow_type)]
                       + ([pa.field(column, arrow_type)] if column != "prompt" else []))
    path = make_manifest([row], schema=schema)
    with pytest.raises(ManifestError) as info:
        plan([path], shard_size=10)
    message = str(info.value)
    assert path in message and f"'{column}'" in message and str(arrow_type) in message and expected in message


def test_compatible_types_are_accepted(make_manifest):
    schema = pa.schema([("prompt", pa.large_string()), ("id", pa.int64()), ("width", pa.int16()),
                        ("height", pa.uint16()), ("cfg", pa.int32()), ("timesteps_shift", pa.float32()),
                        ("num_images", pa.int8()), ("seed", pa.uint64()), ("negative_prompt", pa.null()),
                        ("preset", pa.dictionary(pa.int32(), pa.string())), ("use_norm", pa.bool_())])
    path = make_manifest([{"prompt": "a cat", "id": 7, "width": 32, "height": 48, "cfg": 3, "timesteps_shift": 1.5,
                           "num_images": 2, "seed": 5, "negative_prompt": None, "preset": "draft", "use_norm": False}],
                         schema=schema)
    result = plan([path], shard_size=10)
    [task] = validate(read_shard_rows(result.shards[0]), file=path)
    assert isinstance(task, RowTask)
    assert task.id == "7" and task.seed == 5 and task.preset == "draft"
    assert task.params["width"] == 32 and task.params["height"] == 48 and task.params["cfg"] == 3.0
    assert task.params["timesteps_shift"] == 1.5 and task.params["num_images"] == 2
    assert task.params["use_norm"] is False and task.params["negative_prompt"] == ""


def test_zero_rows_overall_is_a_manifest_error(make_manifest):
    path = make_manifest(pa.table({"prompt": pa.array([], pa.string())}))
    with pytest.raises(ManifestError, match="no rows"):
        plan([path], shard_size=10)


def test_passthrough_columns_are_the_union_over_files(make_manifest):
    first = make_manifest([{"prompt": "a", "tag": "x", "score": 1}])
    second = make_manifest([{"prompt": "b", "tag": "y", "source_url": "http://example.invalid/1"}])
    result = plan([first, second], shard_size=10)
    assert result.passthrough_columns == ["tag", "score", "source_url"]
    assert result.passthrough_schema.field("score").type == pa.int64()


def test_passthrough_columns_with_conflicting_types_fail_naming_both_files(make_manifest):
    first = make_manifest([{"prompt": "a", "tag": "x"}])
    second = make_manifest([{"prompt": "b", "tag": [1, 2]}])
    with pytest.raises(ManifestError, match=f"{re.escape(second)}.*'tag'.*{re.escape(first)}"):
        plan([first, second], shard_size=10)


def test_manifest_column_clashing_with_output_metadata_is_rejected(make_manifest):
    path = make_manifest([{"prompt": "a", "status": "draft"}])
    with pytest.raises(ManifestError, match="'status'.*rename"):
        plan([path], shard_size=10)


# ---------------------------------------------------------------------------------------------------------------
# Validating rows


def test_parameters_resolve_by_precedence():
    rows = [{"id": "a", "prompt": "p"},
            {"id": "b", "prompt": "p", "preset": "premium"},
            {"id": "c", "prompt": "p", "preset": "premium", "num_sampling_steps": 7, "width": 128, "cfg": None}]
    a, b, c = validate(rows, model_defaults={**MODEL_DEFAULTS, "num_images": 2}, preset="draft",
                       params={"cfg": 3.0, "height": 32})
    # model defaults < job preset (draft: 0.4 x 50 steps) < job options
    assert a.params["num_sampling_steps"] == 20 and a.params["cfg"] == 3.0 and a.params["height"] == 32
    assert a.params["width"] == 64 and a.params["num_images"] == 2
    assert b.params["num_sampling_steps"] == 30  # row preset on top: 1.5 x 20
    assert c.params["num_sampling_steps"] == 7 and c.params["width"] == 128 and c.params["cfg"] == 3.0
    # Parameters nobody set fall back to the request defaults.
    assert a.params["cfg_schedule"] == "constant" and a.params["negative_prompt"] == ""
    assert set(a.params) == set(RENDER_PARAMS)


def test_job_presets_from_the_job_apply_to_rows():
    task = only([{"id": "a", "prompt": "p", "preset": "square"}], presets={"square": {"width": 256, "height": 256}})
    assert (task.params["width"], task.params["height"]) == (256, 256)


def test_requests_one_per_image_with_consecutive_seeds():
    task = only([{"id": "cat", "prompt": "a cat", "seed": 100, "num_images": 3, "negative_prompt": "blurry"}])
    requests = task.requests(input_image=b"img")
    assert [r.key for r in requests] == ["cat#0", "cat#1", "cat#2"]
    assert [r.seed for r in requests] == [100, 101, 102]
    assert all(r.negative_prompt == "blurry" and r.width == 64 and r.input_image == b"img" for r in requests)


def test_default_id_and_seed_come_from_the_content():
    rows = [{"prompt": "a red fox"}, {"prompt": "a red fox", "cfg": 2.0}, {"prompt": "a blue fox"}]
    first = validate(rows)
    elsewhere = validate(rows, row_start=500, file="other.parquet")
    assert [t.id for t in first] == [t.id for t in elsewhere]  # wherever the row lands
    assert len({t.id for t in first}) == 3
    assert all(re.fullmatch(r"h[0-9a-f]{20}", t.id) for t in first)
    assert [t.seed for t in first] == [t.seed for t in elsewhere]
    assert len({t.seed for t in first}) == 3 and all(0 <= t.seed < 2**63 - 64 for t in first)
    # A default seed depends on the id only.
    assert only([{"id": "x", "prompt": "one"}]).seed == only([{"id": "x", "prompt": "two"}]).seed


def test_fingerprint_follows_what_decides_the_images():
    base = only([{"id": "a", "prompt": "p", "tag": "x"}])
    assert only([{"id": "a", "prompt": "p", "tag": "y"}]).fingerprint == base.fingerprint
    assert only([{"id": "zz", "prompt": "p", "seed": base.seed}]).fingerprint == base.fingerprint
    for change in ({"prompt": "q"}, {"cfg": 2.0}, {"seed": 1}, {"input_image": "s3://b/in.png"}):
        assert only([{"id": "a", "prompt": "p", **change}]).fingerprint != base.fingerprint
    assert only([{"id": "a", "prompt": "p"}], params={"width": 32}).fingerprint != base.fingerprint


def test_passthrough_and_source_are_kept():
    task = only([{"id": "a", "prompt": "p", "tag": "x", "score": 0.5}], file="s3://b/m.parquet", row_start=40)
    assert task.passthrough == {"tag": "x", "score": 0.5}
    assert task.source_file == "s3://b/m.parquet" and task.row_index == 40


def test_bad_value_message_names_file_row_id_column_and_range():
    rows = prompt_rows(17) + [{"id": "cat-3", "prompt": "a cat", "width": 100}]
    *valid, bad = validate(rows, file="a.parquet")
    assert all(isinstance(t, RowTask) for t in valid)
    assert isinstance(bad, InvalidRow)
    assert bad.error == ("manifest a.parquet row 17 (id 'cat-3'): column 'width' must be a multiple of 16 "
                         "from 16 to 4096, got 100")
    assert bad.column == "width" and bad.id == "cat-3" and bad.row_index == 17 and bad.prompt == "a cat"


@pytest.mark.parametrize("row, column, phrase", [
    ({"prompt": None}, "prompt", "non-empty string"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": " \n\t"}, "prompt", "empty"),
    ({"prompt": "a\x00b"}, "prompt", "NUL"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt", f"at most {MAX_PROMPT_CHARS}"),
    ({"prompt": "p", "negative_prompt": "bad\x00"}, "negative_prompt", "NUL"),
    ({"prompt": "p", "cfg": math.nan}, "cfg", "finite"),
    ({"prompt": "p", "timesteps_shift": math.inf}, "timesteps_shift", "finite"),
    ({"prompt": "p", "cfg": 0.5}, "cfg", "from 1 to 100"),
    ({"prompt": "p", "num_sampling_steps": 1}, "num_sampling_steps", "from 2 to 1000"),
    ({"prompt": "p", "num_images": 0}, "num_images", "from 1 to 64"),
    ({"prompt": "p", "cfg_schedule": "cosine"}, "cfg_schedule", "constant, linear"),
    ({"prompt": "p", "preset": "ultra"}, "preset", "draft, standard, premium"),
    ({"prompt": "p", "seed": -1}, "seed", "from 0 to"),
    ({"prompt": "p", "seed": 2**63}, "seed", "from 0 to"),
    ({"prompt": "p", "seed": 2**63 - 2, "num_images": 4}, "seed", "seed + k"),
    ({"prompt": "p", "input_image": "a\x00b"}, "input_image", "NUL"),
])
def test_each_bad_value_invalidates_its_row_only(row, column, phrase):
    before, bad, after = validate([{"id": "ok-1", "prompt": "fine"}, {"id": "bad", **row},
                                   {"id": "ok-2", "prompt": "fine"}])
    assert isinstance(before, RowTask) and isinstance(after, RowTask)
    assert isinstance(bad, InvalidRow), bad
    assert bad.column == column and bad.id == "bad"
    assert phrase in bad.error and f"column '{column}'" in bad.error and "row 1 (id 'bad')" in bad.error


@pytest.mark.parametrize("bad_id", ["", ".", "..", ".hidden", "a/b", "../../etc", "x" * 129, "sp ace", "é"])
def test_unsafe_ids_are_invalid_and_replaced_by_a_fallback(bad_id):
    invalid = only([{"id": bad_id, "prompt": "p"}], row_start=5, file_index=3)
    assert isinstance(invalid, InvalidRow) and invalid.column == "id"
    assert invalid.id == "row-3-5"
    assert "A-Z a-z 0-9" in invalid.error


def test_duplicate_ids_in_a_shard_invalidate_the_later_rows():
    items = validate([{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}, {"id": "a", "prompt": "three"},
                      {"prompt": "same"}, {"prompt": "same"}])
    assert [type(item).__name__ for item in items] == ["RowTask", "RowTask", "InvalidRow", "RowTask", "InvalidRow"]
    assert "repeats the id of row 0" in items[2].error
    assert "repeats row 3" in items[4].error and items[4].id == "row-0-4"


def test_nulls_mean_defaults_and_blank_input_image_means_none():
    task = only([{"id": "a", "prompt": "p", "width": None, "cfg": None, "seed": None, "preset": None,
                  "input_image": "  ", "negative_prompt": None}])
    assert task.params["width"] == 64 and task.params["cfg"] == 7.5 and task.input_image is None
    assert only([{"id": "a", "prompt": "p", "negative_prompt": ""}]).params["negative_prompt"] == ""


def test_undecodable_prompt_invalidates_only_that_row(make_manifest):
    raw = pa.array([b"a fine prompt", b"\xff\xfe broken", b"another"], pa.binary())
    table = pa.table({"id": ["a", "b", "c"], "prompt": raw.view(pa.string()),
                      "note": pa.array([b"ok", b"bad \xff", None], pa.binary()).view(pa.string())})
    path = make_manifest(table)
    result = plan([path], shard_size=10)
    a, b, c = validate(read_shard_rows(result.shards[0]), file=path)
    assert isinstance(a, RowTask) and isinstance(c, RowTask)
    assert isinstance(b, InvalidRow) and b.column == "prompt" and "UTF-8" in b.error
    assert b.passthrough["note"] == "bad \ufffd"  # written back with a replacement character


def test_pandas_style_columns(make_manifest):
    # A categorical (dictionary) column in one file and plain strings in another are one passthrough column; a
    # saved pandas index is not a passthrough column.
    first = make_manifest(pa.table({"prompt": pa.array(["a", "b"]).dictionary_encode(),
                                    "tag": pa.array(["x", "y"]).dictionary_encode(),
                                    "__index_level_0__": pa.array([10, 11])}))
    second = make_manifest([{"prompt": "c", "tag": "z"}])
    result = plan([first, second], shard_size=10)
    assert result.passthrough_columns == ["tag"]
    assert result.passthrough_schema.field("tag").type == pa.string()
    tasks = [task for shard in result.shards for task in validate(read_shard_rows(shard), file=shard.file)]
    assert [(task.prompt, task.passthrough) for task in tasks] == [("a", {"tag": "x"}), ("b", {"tag": "y"}),
                                                                   ("c", {"tag": "z"})]
