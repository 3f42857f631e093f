"""CSV, JSON Lines and Parquet manifests in one job, column mapping, and staging under the output root: real files
(some written by Hugging Face `datasets`, as its users' files are), a real local Ray, a real S3-compatible server."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import driver, refresh
from ray_render.engine import summary as exits
from ray_render.engine.manifests import stage_manifests
from ray_render.engine.plan import ManifestError
from ray_render.output import layout, record


def rows_of(out: str, storage_options: dict | None = None) -> list[dict]:
    fs, path = storage.open_fs(storage.join(out, "metadata"), storage_options)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def job_for(manifests, out, **options) -> JobConfig:
    manifests = [str(m) for m in manifests] if isinstance(manifests, list) else [str(manifests)]
    return JobConfig(manifests=manifests, out=str(out), **{"model": "placeholder", "progress": False, **options})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


CSV = ("id,prompt,width,seed,team\n"
       "c0,a red circle,64,1,00042\n"
       "c1,a blue square,abc,2,7\n"        # width is not a number: this row alone is invalid
       "\n"                                 # blank lines are no rows
       'c2,"a green, quoted\nprompt",,3,x\n'  # a prompt over two lines; an empty cell is the job default
       "c3,,64,4,y\n")                      # no prompt: invalid
JSONL = ('{"id": "j0", "prompt": "a yellow star", "cfg": 2, "tags": ["a", "b"]}\n'
         '{"id": "j1", "prompt": "broken" "json"}\n'   # line 2 is not JSON: its row alone is invalid
         "\n"
         '{"id": "j2", "prompt": "a cat", "cfg": "high", "tags": 5}\n'   # cfg is text: invalid
         '["not", "an", "object"]\n'
         '{"id": 17, "prompt": "an integer id", "seed": 9}\n')


def test_csv_jsonl_and_parquet_in_one_job_fail_only_their_bad_rows(ray_cluster, tmp_path, make_manifest):
    csv_file = write(tmp_path / "in" / "captions.csv.gz", CSV)
    jsonl_file = write(tmp_path / "in" / "more.jsonl", JSONL)
    parquet = make_manifest([{"id": "p0", "prompt": "a parquet row"}], name="rows.parquet")
    job = job_for([csv_file, jsonl_file, parquet], tmp_path / "out", shard_size=3)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_ROWS, summary.message
    assert summary.rows == {"ok": 5, "invalid": 5, "failed": 0} and summary.rows_total == 10
    rows = {row["id"]: row for row in rows_of(job.out)}
    assert sorted(rows) == ["17", "c0", "c1", "c2", "c3", "j0", "j2", "p0", "row-1-1", "row-1-3"]
    # Every row names the user's file and its row there, never the staged copy.
    assert {(row["id"], row["source_file"], row["source_row"]) for row in rows.values()} >= {
        ("c2", str(csv_file), 2), ("j2", str(jsonl_file), 2), ("17", str(jsonl_file), 4), ("p0", parquet, 0)}
    assert rows["c1"]["error"] == (f"manifest {csv_file} row 1, line 3 (id 'c1'): column 'width' must be a whole "
                                   f"number, got 'abc'")
    assert rows["c3"]["error"].startswith(f"manifest {csv_file} row 3, line 7 (id 'c3'): column 'prompt'")
    assert rows["row-1-1"]["error"].startswith(f"manifest {jsonl_file} row 1, line 2 (id 'row-1-1'): is not "
                                               f"valid JSON")
    assert rows["j2"]["error"].endswith("column 'cfg' must be a number, got 'high'")
    assert rows["row-1-3"]["error"].endswith("holds a JSON array, not an object")
    # Cells keep their types: CSV text stays text (leading zeros), JSON values of mixed types become JSON text.
    assert rows["c2"]["prompt"] == "a green, quoted\nprompt" and rows["c2"]["width"] == 64 and rows["c2"]["seed"] == 3
    assert rows["c0"]["team"] == "00042" and rows["j0"]["cfg"] == 2.0
    assert (rows["j0"]["tags"], rows["j2"]["tags"]) == ('["a", "b"]', "5")
    assert not any(name.startswith("__") for name in rows["c0"])  # the staged copy's own columns stay hidden
    staged = sorted(os.listdir(tmp_path / "out" / layout.MANIFESTS_DIR))
    assert len(staged) == 2 and staged[0].startswith("captions-") and staged[1].startswith("more-")
    sources = record.read_job_record(job.out)["manifest_sources"]
    assert sorted(source["url"] for source in sources.values()) == sorted([str(csv_file), str(jsonl_file)])
    assert all(len(source["sha256"]) == 64 and source["size"] > 0 for source in sources.values())


def test_a_rerun_reuses_the_staged_copy_and_a_changed_source_is_another_job(ray_cluster, tmp_path):
    manifest = write(tmp_path / "prompts.jsonl", "".join(json.dumps({"id": f"r{i}", "prompt": f"shape {i}"}) + "\n"
                                                         for i in range(6)))
    job = job_for(manifest, tmp_path / "out", shard_size=2)
    assert driver.run(job).exit_code == exits.EXIT_OK
    staged_dir = tmp_path / "out" / layout.MANIFESTS_DIR
    (staged,) = staged_dir.iterdir()
    written = staged.stat().st_mtime_ns
    again = driver.run(job)
    assert (again.exit_code, again.shards_resumed, again.rows_this_run) == (exits.EXIT_OK, 3, 0)
    assert [p.name for p in staged_dir.iterdir()] == [staged.name] and staged.stat().st_mtime_ns == written
    write(manifest, manifest.read_text().replace("shape 3", "shape three"))
    changed = driver.run(job)
    assert changed.exit_code == exits.EXIT_ABORTED and "holds another job" in changed.message
    assert changed.rows_this_run == 0 and len(list(staged_dir.iterdir())) == 2


def test_refresh_of_a_csv_manifest_renders_only_the_changed_rows(ray_cluster, tmp_path):
    manifest = write(tmp_path / "catalogue.csv", "id,prompt\n" + "".join(f"r{i},item {i}\n" for i in range(5)))
    job = job_for(manifest, tmp_path / "out", shard_size=2)
    assert refresh.run(job).exit_code == exits.EXIT_OK
    write(manifest, manifest.read_text().replace("item 2", "item two") + "r5,item 5\n")
    second = refresh.run(job)
    assert second.exit_code == exits.EXIT_OK and second.rows_this_run == 2  # r2 changed, r5 is new
    rows = {row["id"]: row for row in rows_of(job.out)}
    assert len(rows) == 6 and rows["r2"]["prompt"] == "item two" and rows["r5"]["source_row"] == 5
    assert rows["r5"]["source_file"] == str(manifest)


def test_column_mapping_on_files_written_by_hugging_face_datasets(ray_cluster, tmp_path):
    datasets = pytest.importorskip("datasets")
    def split(n: int):
        return datasets.Dataset.from_dict({"key": [f"k{n}a", f"k{n}b", "k0a"][: 3 if n == 2 else 2],
                                           "caption": ["a red circle", "", "a repeat"][: 3 if n == 2 else 2],
                                           "aesthetic": [5.5 + n, 4.0, 1.0][: 3 if n == 2 else 2]})

    files = [tmp_path / "hf" / "train-00000.parquet", tmp_path / "hf" / "train-00001.jsonl",
             tmp_path / "hf" / "train-00002.csv"]
    files[0].parent.mkdir()
    split(0).to_parquet(str(files[0]))
    split(1).to_json(str(files[1]))  # JSON Lines, as datasets writes it
    split(2).to_csv(str(files[2]), index=False)
    job = job_for(str(tmp_path / "hf"), tmp_path / "out", prompt_column="caption", id_column="key")
    summary = driver.run(job)
    assert summary.rows == {"ok": 3, "invalid": 4, "failed": 0}, summary.message
    rows = {(row["source_file"], row["source_row"]): row for row in rows_of(job.out)}
    assert {(f"k{n}a", "ok", 5.5 + n) for n in range(3)} == {
        (row["id"], row["status"], row["aesthetic"]) for row in rows.values() if row["status"] == "ok"}
    assert {row["source_file"] for row in rows.values()} == {str(f) for f in files}
    assert "caption" not in next(iter(rows.values())) and "key" not in next(iter(rows.values()))
    # An id repeated across files names the user's file where it first appeared, not a staged copy.
    repeat = rows[(str(files[2]), 2)]["error"]
    assert f"repeats the id of row 0 of {files[0]}" in repeat and layout.MANIFESTS_DIR not in repeat
    # The Parquet file is staged too (renamed); its rows still name it.
    assert len(os.listdir(tmp_path / "out" / layout.MANIFESTS_DIR)) == 3


@pytest.mark.parametrize("name, content, options, expected", [
    ("a.csv", "id,caption\nr0,a cat\n", {}, "no 'prompt' column (columns: id, caption)"),
    ("b.csv", "", {}, "empty (a CSV manifest starts with a header row)"),
    ("c.csv.gz", "not gzip at all", {}, "not a readable gzip file"),
    ("d.csv", "prompt,status\na cat,ok\n", {}, "column 'status' clashes with an output metadata column"),
    ("e.jsonl", '{"text": "a cat"}\n', {"prompt_column": "caption"},
     "no column 'caption' (--prompt-column) nor 'prompt'"),
    ("f.jsonl", '{"caption": "a", "prompt": "b"}\n', {"prompt_column": "caption"},
     "has both 'caption' (--prompt-column) and 'prompt'"),
])
def test_an_unusable_text_manifest_fails_the_job_before_rendering(tmp_path, name, content, options, expected):
    path = tmp_path / name
    path.write_bytes(content.encode())  # written as given: c.csv.gz is deliberately no gzip file
    job = job_for(path, tmp_path / "out", **options)
    with pytest.raises(ManifestError) as failure:
        stage_manifests(job)
    assert str(failure.value).startswith(f"manifest {path}: ") and expected in str(failure.value)
    summary = driver.run(job)  # the run aborts with the same message, before any Ray or model work
    assert summary.exit_code == exits.EXIT_ABORTED and expected in summary.message and summary.startup_s == 0


def test_text_manifest_and_output_on_object_storage(ray_cluster, s3):
    so = s3.storage_options
    manifest = s3.fresh_url("in") + "/prompts.csv.gz"
    storage.write_bytes(manifest, gzip.compress(b"id,prompt\nr0,a red circle\nr1,a blue square\n"), so)
    out = s3.fresh_url("out")
    summary = driver.run(job_for(manifest, out, storage_options=so))
    assert summary.exit_code == exits.EXIT_OK, summary.message
    assert {row["source_file"] for row in rows_of(out, so)} == {manifest}
    (source,) = record.read_job_record(out, so)["manifest_sources"].values()
    assert source["url"] == manifest and source["etag"] and "sha256" not in source  # the store's ETag, no re-read
    staged = storage.list_names(storage.join(out, layout.MANIFESTS_DIR), so)
    assert len(staged) == 1
    fs, path = storage.open_fs(storage.join(out, layout.MANIFESTS_DIR, staged[0]), so)
    with fs.open(path, "rb") as handle:
        assert pq.ParquetFile(handle).metadata.num_rows == 2
