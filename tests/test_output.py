"""output/: image encoding, the fixed metadata schema, attempts and their commits, clean-up, the job record."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import journal
from ray_render.engine.plan import plan
from ray_render.engine.shard import ShardRenderer
from ray_render.models.placeholder import PlaceholderModel
from ray_render.output import commits, images, layout, record, schema
from ray_render.output.lease import Lease

RUN_ID = "0123456789ab"


def pixels(height=32, width=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def run_plan(make_manifest, manifests_rows, root, shard_size=3, storage_options=None, commit=lambda shard: True,
             run_id=RUN_ID):
    """Plan the manifests and render every shard with the placeholder model through the actor's own steps
    (engine.shard.ShardRenderer), then commit the attempts `commit(shard_id)` accepts as the driver does: under a
    lease, a commit entry, then publication. Returns (plan, schema, {shard id: metadata table}, {shard: attempt})."""
    files = [make_manifest(rows, name=f"m{i}.parquet", storage_options=storage_options,
                           url=None if storage_options is None else storage.join(root + "-in", f"m{i}.parquet"))
             for i, rows in enumerate(manifests_rows)]
    job = JobConfig(manifests=files, out=root, model="placeholder", params={"width": 32, "height": 16}, retries=2,
                    storage_options=storage_options or {})
    the_plan = plan(files, shard_size, storage_options)
    meta_schema = schema.metadata_schema(the_plan.passthrough_schema)
    renderer = ShardRenderer(PlaceholderModel(), job, meta_schema, "actor-0", journal=False)
    lease = Lease(root, run_id, storage_options)
    lease.acquire()
    tables, attempts = {}, {}
    for number, shard in enumerate(the_plan.shards, 1):
        attempts[shard.shard_id] = attempt_id = f"{run_id}-{number}"
        work = renderer.prepare(shard, attempt_id)
        renderer.render_batches(work)
        meta, counts, stored = renderer.build_rows(work)
        renderer.finish(work, meta, counts, stored, attempt=1)
        if commit(shard.shard_id):
            lease.append("commit", shard=shard.shard_id, attempt=attempt_id,
                         info={"file": shard.file, "rows": shard.num_rows})
            commits.publish(root, shard.shard_id, attempt_id, storage_options)
        tables[shard.shard_id] = schema.metadata_table(meta, meta_schema)
    lease.release(leftovers=[])
    return the_plan, meta_schema, tables, attempts


# ---------------------------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_images_decode_to_the_rendered_size(fmt, pil_format):
    array = pixels(24, 40)
    data = images.encode_image(array, fmt, quality=90)
    image = Image.open(io.BytesIO(data))
    assert image.format == pil_format and image.size == (40, 24) and image.mode == "RGB"
    if fmt == "png":  # lossless and byte-for-byte repeatable, so retries store identical objects
        assert np.array_equal(np.asarray(image), array)
        assert images.encode_image(array, "png") == data


def test_encode_rejects_wrong_arrays_and_formats():
    with pytest.raises(ValueError, match="uint8"):
        images.encode_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        images.encode_image(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="png, jpeg, webp"):
        images.encode_image(pixels(), "gif")


def test_image_keys_are_per_attempt_and_never_escape_the_root():
    assert (layout.image_key("00000-m-0000000000", "0123456789ab-7", "cat-3", 2, "jpeg")
            == "images/00000-m-0000000000/0123456789ab-7/cat-3_2.jpg")
    assert layout.image_url("s3://b/out", "s", "a-1", "a.b", 0, "webp") == "s3://b/out/images/s/a-1/a.b_0.webp"
    for bad in ("..", ".", "../x", "a/b", "", ".hidden", "x" * 129, "a\\b"):
        with pytest.raises(ValueError, match="unsafe"):
            layout.image_key("shard", "a-1", bad, 0, "png")
        with pytest.raises(ValueError, match="unsafe"):
            layout.image_key(bad, "a-1", "row", 0, "png")
        with pytest.raises(ValueError, match="unsafe"):
            layout.image_key("shard", bad, "row", 0, "png")
    with pytest.raises(ValueError):
        layout.image_key("shard", "a-1", "row", -1, "png")
    # A row's image is found under another root from the part of image_uri below images/<shard>/.
    row = {"id": "r", "image_uri": "s3://old/out/images/s/a-1/r_0.png"}
    assert layout.row_image_url("/copy", "s", row) == "/copy/images/s/a-1/r_0.png"
    with pytest.raises(ValueError, match="unsafe"):
        layout.row_image_url("/copy", "s", {"id": "r", "image_uri": "s3://old/out/images/s/../../x/r_0.png"})


# ---------------------------------------------------------------------------------------------------------------
# Metadata


def test_every_shard_has_the_same_schema_and_the_dataset_reads_as_one(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    rows = ([{"id": f"ok{i}", "prompt": f"p{i}", "num_images": 2, "tag": "t"} for i in range(3)]
            + [{"id": "bad id", "prompt": "p"}, {"id": "x", "prompt": "p", "width": 7}, {"id": "y", "prompt": ""}]
            + [{"id": "f1", "prompt": "fail me [placeholder:raise]", "tag": None}])
    the_plan, meta_schema, tables, _ = run_plan(make_manifest, [rows], root)
    assert len(tables) == 3
    invalid_only = tables[the_plan.shards[1].shard_id]
    assert set(invalid_only.column("status").to_pylist()) == {"invalid"}
    for table in tables.values():
        assert table.schema.equals(meta_schema)
    files = sorted(os.listdir(os.path.join(root, "metadata")))
    assert files == [f"{shard.shard_id}.parquet" for shard in the_plan.shards]
    for name in files:
        assert pq.read_schema(os.path.join(root, "metadata", name)).equals(meta_schema)

    dataset = ds.dataset(root + "/metadata").to_table()
    # 3 rows x 2 images, 3 invalid rows, 1 failed row: every input row accounted for.
    assert dataset.num_rows == 10
    by_status = dataset.group_by("status").aggregate([("id", "count")]).to_pydict()
    assert dict(zip(by_status["status"], by_status["id_count"])) == {"ok": 6, "invalid": 3, "failed": 1}
    assert dataset.column_names[: len(schema.METADATA_COLUMNS)] == schema.METADATA_COLUMNS
    assert dataset.column_names[len(schema.METADATA_COLUMNS):] == ["tag"]

    ok = dataset.filter(pa.compute.equal(dataset["status"], "ok")).to_pylist()
    for row in ok:
        assert os.path.exists(row["image_uri"])
        data = open(row["image_uri"], "rb").read()
        assert images.sha256_hex(data) == row["sha256"]
        assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"]) == (32, 16)
        assert row["tag"] == "t" and row["model"] == "placeholder" and row["attempts"] == 1
    seeds = {(row["id"], row["image_index"]): row["seed"] for row in ok}
    assert seeds[("ok0", 1)] == seeds[("ok0", 0)] + 1
    invalid = {row["source_row"]: row for row in dataset.filter(pa.compute.equal(dataset["status"], "invalid"))
               .to_pylist()}
    assert invalid[4]["id"] == "x" and "column 'width'" in invalid[4]["error"]
    assert invalid[3]["id"] == "row-0-3" and invalid[3]["image_uri"] is None and invalid[3]["image_index"] is None
    [failed] = dataset.filter(pa.compute.equal(dataset["status"], "failed")).to_pylist()
    assert failed["error"].startswith("RuntimeError") and failed["attempts"] == 3 and failed["width"] == 32


def test_passthrough_columns_of_several_manifests_union_with_nulls(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    first = [{"id": "a", "prompt": "p", "tag": "x"}]
    second = [{"id": "b", "prompt": "q", "score": 0.5}]
    _, meta_schema, _, _ = run_plan(make_manifest, [first, second], root)
    assert meta_schema.names[-2:] == ["tag", "score"]
    rows = sorted(ds.dataset(root + "/metadata").to_table().to_pylist(), key=lambda row: row["id"])
    assert (rows[0]["tag"], rows[0]["score"]) == ("x", None)
    assert (rows[1]["tag"], rows[1]["score"]) == (None, 0.5)


def test_metadata_table_rejects_columns_outside_the_schema():
    with pytest.raises(ValueError, match="surprise"):
        schema.metadata_table([{"id": "a", "surprise": 1}], schema.metadata_schema())


# ---------------------------------------------------------------------------------------------------------------
# Commits, orphans, overwrite


def test_only_committed_attempts_are_visible_and_uncommitted_ones_are_found_and_removed(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    rows = [{"id": f"r{i}", "prompt": "p"} for i in range(9)]
    the_plan, _, _, attempts = run_plan(make_manifest, [rows], root,
                                        commit=lambda shard_id: not shard_id.endswith("0000000006"))
    first, second, third = the_plan.shards
    # The third attempt wrote its images and metadata, as a crash before its commit would leave them.
    assert commits.committed_shard_ids(root) == {first.shard_id, second.shard_id}
    markers = commits.list_commits(root)
    assert markers[first.shard_id]["attempt"] == attempts[first.shard_id]
    assert {key: markers[first.shard_id][key] for key in ("file", "rows")} == {"file": first.file, "rows": 3}
    assert ds.dataset(root + "/metadata").count_rows() == 6  # readers never see an uncommitted attempt's rows

    committed = {shard_id: {"attempt": info["attempt"]} for shard_id, info in markers.items()}
    stale = commits.uncommitted_attempts(root, committed)
    assert stale == {(third.shard_id, attempts[third.shard_id])}
    assert commits.remove_attempts(root, stale) == 1
    assert sorted(os.listdir(os.path.join(root, "images"))) == [first.shard_id, second.shard_id]
    assert commits.uncommitted_attempts(root, committed) == set()
    assert ds.dataset(root + "/metadata").count_rows() == 6


def test_a_lost_publication_is_rolled_forward(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    the_plan, _, tables, _ = run_plan(make_manifest, [[{"id": f"r{i}", "prompt": "p"} for i in range(6)]], root)
    gone = the_plan.shards[1].shard_id
    os.remove(layout.metadata_url(root, gone))  # the holder died between the commit and the publication
    committed = {shard_id: {"attempt": info["attempt"]} for shard_id, info in commits.list_commits(root).items()}
    assert commits.roll_forward(root, committed).published == [gone]
    assert commits.read_shard_metadata(root, gone).equals(tables[gone])
    assert ds.dataset(root + "/metadata").count_rows() == 6


def test_journals_of_committed_shards_go_and_the_others_stay(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    rows = [{"id": f"r{i}", "prompt": "p"} for i in range(6)]
    the_plan, _, _, _ = run_plan(make_manifest, [rows], root, commit=lambda shard_id: shard_id.endswith("00000000"))
    first, second = (shard.shard_id for shard in the_plan.shards)
    for shard_id in (first, second):
        storage.write_bytes(layout.journal_url(root, shard_id, f"{RUN_ID}-9"), b'{"rendering": ["r0"]}')

    journal.remove_settled(root, commits.committed_shard_ids(root))
    assert os.listdir(os.path.join(root, "_journal")) == [second]  # still names its suspects
    assert journal.read(root, second, f"{RUN_ID}-9")["rendering"] == ["r0"]
    journal.remove_settled(root, {first, second})
    assert not os.path.exists(os.path.join(root, "_journal"))


def test_a_journal_carries_what_earlier_attempts_learned_before_its_first_call_and_rewrites_in_place(tmp_path):
    root, shard_id = str(tmp_path / "out"), "00000-m-0000000000"
    first = journal.ShardJournal(root, shard_id, f"{RUN_ID}-1", retries=2)
    first.rendering(["r0", "r1", "r2"])  # the actor died in this call
    # The next attempt blames those rows; it is killed before its first call (a node loss, a stop) and its own
    # successor must still know the suspects.
    second = journal.ShardJournal(root, shard_id, f"{RUN_ID}-2", retries=2, inherit=(f"{RUN_ID}-1", True))
    assert journal.read(root, shard_id, f"{RUN_ID}-2") == {"rendering": [], "calls_done": 0,
                                                             "suspects": ["r0", "r1", "r2"], "deaths": {}}
    second.rendering(["r1"])  # shorter than what is there: the rest is padding a reader never sees
    assert journal.read(root, shard_id, f"{RUN_ID}-2")["rendering"] == ["r1"]
    third = journal.ShardJournal(root, shard_id, f"{RUN_ID}-3", retries=2, inherit=(f"{RUN_ID}-2", True))
    assert third.deaths == {"r1": 1} and third.suspects == {"r0", "r1", "r2"}


def test_a_journal_keeps_one_file_open_while_rendering_and_none_after(tmp_path):
    root, shard_id = str(tmp_path / "out"), "00000-m-0000000000"
    opened = len(os.listdir("/proc/self/fd"))
    attempt = journal.ShardJournal(root, shard_id, f"{RUN_ID}-1", retries=2)
    for rows in (["r0", "r1"], ["r2"], ["r3", "r4", "r5"]):
        attempt.rendering(rows)
        attempt.call_returned()
        assert journal.read(root, shard_id, f"{RUN_ID}-1")["rendering"] == rows  # durable before each call
    assert len(os.listdir("/proc/self/fd")) == opened + 1
    attempt.done_rendering()
    assert journal.read(root, shard_id, f"{RUN_ID}-1") == {"rendering": [], "calls_done": 3, "suspects": [],
                                                             "deaths": {}}
    assert len(os.listdir("/proc/self/fd")) == opened


def test_another_attempt_of_a_shard_never_touches_the_first_attempts_files(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    rows = [[{"id": f"r{i}", "prompt": "p", "num_images": 2} for i in range(3)]]
    the_plan, _, first, first_attempts = run_plan(make_manifest, rows, root)
    shard_id = the_plan.shards[0].shard_id
    before = {name: open(os.path.join(root, "images", shard_id, first_attempts[shard_id], name), "rb").read()
              for name in os.listdir(os.path.join(root, "images", shard_id, first_attempts[shard_id]))}
    # Another run renders the shard again (--no-resume) and commits it: its attempt has its own names.
    _, _, second, second_attempts = run_plan(make_manifest, rows, root, run_id="ba9876543210")
    assert second_attempts[shard_id] != first_attempts[shard_id]
    assert sorted(os.listdir(os.path.join(root, "images", shard_id))) == sorted(
        [first_attempts[shard_id], second_attempts[shard_id]])
    assert before == {name: open(os.path.join(root, "images", shard_id, first_attempts[shard_id], name), "rb").read()
                      for name in before}  # not one byte of the first attempt changed
    assert commits.list_commits(root)[shard_id]["attempt"] == second_attempts[shard_id]
    assert ds.dataset(root + "/metadata").count_rows() == 6  # the later commit is the shard's, once
    assert first[shard_id].column("sha256").equals(second[shard_id].column("sha256"))


def test_empty_root_has_no_commits(tmp_path):
    assert commits.committed_shard_ids(str(tmp_path / "nothing")) == set()
    assert commits.list_commits(str(tmp_path / "nothing")) == {}
    assert record.read_job_record(str(tmp_path / "nothing")) is None
    assert record.read_summary(str(tmp_path / "nothing")) is None


def test_clear_output_removes_only_our_names_and_follows_no_link(tmp_path, make_manifest):
    root = str(tmp_path / "out")
    run_plan(make_manifest, [[{"id": "a", "prompt": "p"}]], root)
    record.write_job_record(root, {"plan_fingerprint": "f"})
    record.write_summary(root, {"ok": 1})
    storage.write_bytes(os.path.join(root, "README.txt"), b"the user's own file")
    storage.write_bytes(os.path.join(root, "imagesets", "x.bin"), b"not ours either")
    storage.write_bytes(os.path.join(root, "images", "user.png"), b"a picture of the user's")
    storage.write_bytes(os.path.join(root, "metadata", "prompts.parquet"), b"a manifest kept here")
    commits.clear_output(root)
    assert sorted(os.listdir(root)) == ["README.txt", "_log", "images", "imagesets", "metadata"]
    assert os.listdir(os.path.join(root, "images")) == ["user.png"]
    assert os.listdir(os.path.join(root, "metadata")) == ["prompts.parquet"]
    commits.clear_output(root)  # nothing left to clear: still fine

    # A symbolic link in place of images/: its target is not emptied.
    target = tmp_path / "elsewhere"
    (target / "00000-m0-0000000000").mkdir(parents=True)
    (target / "00000-m0-0000000000" / "keep.png").write_bytes(b"x")
    os.rename(os.path.join(root, "images"), str(tmp_path / "moved-images"))
    os.symlink(target, os.path.join(root, "images"))
    commits.clear_output(root)
    assert (target / "00000-m0-0000000000" / "keep.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Job record


def test_job_record_round_trip_without_credentials(tmp_path):
    root = str(tmp_path / "renders-eu-west-1")
    options = {"key": "AKIA-FAKE-KEY-123", "secret": "fake-secret-9876",
               "client_kwargs": {"region_name": "eu-west-1"}}
    job = JobConfig(manifests=["m.parquet"], out=root, storage_options=options)
    # A free-text message is redacted where it is made; the record's structure is written as it is.
    job_record = {"settings": job.record(), "plan_fingerprint": "abc", "model_revision": "rev-1",
                  "storage_options": options,
                  "note": storage.redact(f"endpoint error mentioning {options['secret']}", options)}
    record.write_job_record(root, job_record, options)
    text = open(os.path.join(root, "_job.json")).read()
    assert "AKIA-FAKE-KEY-123" not in text and "fake-secret-9876" not in text
    assert json.loads(text)["settings"]["out"] == root  # the region in the path is not blanked
    back = record.read_job_record(root, options)
    assert back["plan_fingerprint"] == "abc" and back["model_revision"] == "rev-1"
    assert back["settings"]["storage_options"] == ["client_kwargs", "key", "secret"]
    assert back["storage_options"] == ["client_kwargs", "key", "secret"]
    assert back["settings"]["manifests"] == ["m.parquet"]

    record.write_summary(root, {"ok": 5, "failed": 1, "invalid": 0}, options)
    assert record.read_summary(root, options) == {"ok": 5, "failed": 1, "invalid": 0}


# ---------------------------------------------------------------------------------------------------------------
# S3


def test_s3_round_trip_of_images_metadata_and_commits(s3, make_manifest):
    options = s3.storage_options
    root = s3.fresh_url("out")
    rows = [{"id": f"r{i}", "prompt": f"p{i}", "tag": i} for i in range(4)] + [{"id": "..", "prompt": "p"}]
    # Three shards of two rows; the last one (the bad id alone) is rendered but not committed.
    the_plan, meta_schema, _, attempts = run_plan(make_manifest, [rows], root, shard_size=2, storage_options=options,
                                                  commit=lambda shard_id: not shard_id.endswith("0000000004"))
    last = the_plan.shards[-1]
    assert commits.committed_shard_ids(root, options) == {shard.shard_id for shard in the_plan.shards[:-1]}

    fs, path = storage.open_fs(root, options)
    table = ds.dataset(path + "/metadata", filesystem=fs).to_table()
    assert table.schema.equals(meta_schema) and table.num_rows == 4
    for row in table.filter(pa.compute.equal(table["status"], "ok")).to_pylist():
        assert row["image_uri"].startswith(root + "/images/")
        data = storage.read_bytes(row["image_uri"], options)
        assert images.sha256_hex(data) == row["sha256"]
        assert Image.open(io.BytesIO(data)).size == (32, 16)

    record.write_job_record(root, {"storage_options": options, "plan_fingerprint": the_plan.fingerprint}, options)
    text = storage.read_bytes(storage.join(root, "_job.json"), options).decode()
    assert options["secret"] not in text and options["key"] not in text
    assert json.loads(text)["plan_fingerprint"] == the_plan.fingerprint

    # The uncommitted attempt on S3 is found and removed like a local one.
    committed = {shard_id: {"attempt": info["attempt"]}
                 for shard_id, info in commits.list_commits(root, options).items()}
    assert commits.uncommitted_attempts(root, committed, options) == {(last.shard_id, attempts[last.shard_id])}
    commits.remove_attempts(root, {(last.shard_id, attempts[last.shard_id])}, options)
    assert commits.uncommitted_attempts(root, committed, options) == set()
    commits.clear_output(root, options)
    assert storage.list_names(root, options) == ["_log"]  # the log is never deleted: it fences
