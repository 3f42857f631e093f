"""Export of a finished output root to WebDataset tars and to Parquet that `datasets` loads as PIL images."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from output_factory import build_output_root
from PIL import Image

from ray_render import storage
from ray_render.output import export, layout
from ray_render.output.export import ExportError


@pytest.fixture
def root(tmp_path):
    # 3 committed shards x 3 rows x 2 images = 18 ok images, plus failed/invalid rows and one uncommitted shard.
    return build_output_root(str(tmp_path / "out"), shards=3, uncommitted_shards=1, scores=True)


def tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """Group a tar's members the way WebDataset does: key = name up to the first dot, extension after it."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            key, extension = member.name.split(".", 1)
            samples[key][extension] = archive.extractfile(member).read()
    return samples


def test_webdataset_shards_hold_every_committed_ok_image(root, tmp_path):
    dest = str(tmp_path / "wds")
    result = export.export(root.root, "webdataset", dest, samples_per_shard=7)
    assert result.samples == 18
    assert [os.path.basename(f) for f in result.files] == [f"train-0000{i}-of-00003.tar" for i in range(3)]
    assert result.pattern == f"{dest}/train-{{00000..00002}}-of-00003.tar"
    samples = {}
    sizes = []
    for url in result.files:
        shard = tar_samples(storage.read_bytes(url))
        sizes.append(len(shard))
        samples.update(shard)
    assert sizes == [7, 7, 4]
    expected = {export.sample_key(row["id"], row["image_index"]): row for row in root.ok}
    assert set(samples) == set(expected)  # no failed, invalid or uncommitted rows; no key split by a dot
    for key, files in samples.items():
        row = expected[key]
        assert set(files) == {"png", "json", "txt"}
        assert files["png"] == root.images[f"{row['id']}_{row['image_index']}"]
        meta = json.loads(files["json"])
        assert (meta["id"], meta["image_index"], meta["seed"], meta["status"]) == \
            (row["id"], row["image_index"], row["seed"], "ok")
        assert meta["category"] == row["category"] and meta["quality_score"] == pytest.approx(row["quality_score"])
        assert files["txt"].decode() == row["prompt"]
    assert "row%2E0%2E0_1" in samples  # the id "row.0.0" survives, escaped


def test_exports_are_deterministic(root, tmp_path):
    first = export.export(root.root, "webdataset", str(tmp_path / "a"), samples_per_shard=5)
    second = export.export(root.root, "webdataset", str(tmp_path / "b"), samples_per_shard=5)
    assert [os.path.basename(f) for f in first.files] == [os.path.basename(f) for f in second.files]
    for a, b in zip(first.files, second.files):
        assert storage.read_bytes(a) == storage.read_bytes(b)


def test_parquet_loads_as_pil_images_with_datasets(root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    result = export.export(root.root, "parquet", str(tmp_path / "pq"), samples_per_shard=10)
    assert [os.path.basename(f) for f in result.files] == ["train-00000-of-00002.parquet",
                                                           "train-00001-of-00002.parquet"]
    loaded = datasets.load_dataset("parquet", data_files=result.files, split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.num_rows == 18
    assert isinstance(loaded.features["image"], datasets.Image)
    assert "status" not in loaded.column_names and "category" in loaded.column_names
    by_key = {f"{row['id']}_{row['image_index']}": row for row in root.ok}
    for item in loaded:
        assert isinstance(item["image"], Image.Image)
        source = Image.open(io.BytesIO(root.images[f"{item['id']}_{item['image_index']}"]))
        assert np.array_equal(np.asarray(item["image"]), np.asarray(source))
        assert item["prompt"] == by_key[f"{item['id']}_{item['image_index']}"]["prompt"]
    # Plain pyarrow readers see the struct and small row groups.
    parquet = pq.ParquetFile(result.files[0])
    assert parquet.schema_arrow.field("image").type == export.HF_IMAGE_TYPE
    assert parquet.metadata.num_row_groups == 1 and parquet.metadata.num_rows == 10


def test_min_quality_keeps_only_good_images(root, tmp_path):
    scores = sorted(row["quality_score"] for row in root.ok)
    threshold = scores[len(scores) // 2]
    result = export.export(root.root, "parquet", str(tmp_path / "q"), min_quality=threshold)
    kept = pq.read_table(result.files[0], columns=["quality_score"]).column("quality_score").to_pylist()
    assert len(kept) == sum(score >= threshold for score in scores) and min(kept) >= threshold
    plain = build_output_root(str(tmp_path / "plain"), shards=1)
    with pytest.raises(ExportError, match="quality_score"):
        export.export(plain.root, "parquet", str(tmp_path / "p"), min_quality=0.5)


def test_a_smaller_export_removes_the_earlier_shards(root, tmp_path):
    dest = str(tmp_path / "wds")
    assert len(export.export(root.root, "webdataset", dest, samples_per_shard=4).files) == 5
    (tmp_path / "wds" / "notes.txt").write_text("mine")
    result = export.export(root.root, "webdataset", dest, samples_per_shard=100)
    assert sorted(os.listdir(dest)) == ["notes.txt", "train-00000-of-00001.tar"]
    assert result.samples == 18


def test_a_corrupt_image_stops_the_export_and_leaves_no_partial_shard(root, tmp_path):
    last = root.ok[-1]
    image_path = layout.row_image_url(root.root, "s002", last)
    with open(image_path, "r+b") as handle:
        handle.write(b"garbage")
    dest = tmp_path / "wds"
    with pytest.raises(ExportError, match=r"s002/[0-9a-f]{12}-3/row-2-2_1\.png: content does not match the sha256"):
        export.export(root.root, "webdataset", str(dest), samples_per_shard=10)
    assert sorted(os.listdir(dest)) == ["train-00000-of-00002.tar"]  # the first shard whole, the second not at all
    os.remove(image_path)
    with pytest.raises(ExportError, match="is missing, though its shard is committed"):
        export.export(root.root, "webdataset", str(dest), samples_per_shard=10)


def test_bad_requests_are_refused_clearly(root, tmp_path):
    with pytest.raises(ExportError, match="kind must be one of webdataset, parquet"):
        export.export(root.root, "tfrecord", str(tmp_path / "x"))
    with pytest.raises(ExportError, match="samples_per_shard"):
        export.export(root.root, "parquet", str(tmp_path / "x"), samples_per_shard=0)
    with pytest.raises(ExportError, match="inside the output's metadata/"):
        export.export(root.root, "parquet", root.root + "/metadata/export")
    with pytest.raises(ExportError, match="no committed shards"):
        export.export(str(tmp_path / "empty"), "parquet", str(tmp_path / "x"))


def test_export_between_object_store_prefixes(s3):
    options = s3.storage_options
    source = build_output_root(s3.fresh_url("out"), shards=2, fmt="jpeg", storage_options=options)
    dest = s3.fresh_url("export")
    result = export.export(source.root, "webdataset", dest, options, samples_per_shard=5)
    assert result.samples == 12 and len(result.files) == 3
    assert storage.list_names(dest, options) == [f"train-0000{i}-of-00003.tar" for i in range(3)]
    samples = {}
    for url in result.files:
        samples.update(tar_samples(storage.read_bytes(url, options)))
    assert all(set(files) == {"jpg", "json", "txt"} for files in samples.values())
    assert {key: files["jpg"] for key, files in samples.items()} == \
        {export.sample_key(r["id"], r["image_index"]): source.images[f"{r['id']}_{r['image_index']}"]
         for r in source.ok}
    parquet = export.export(source.root, "parquet", dest + "-pq", options, samples_per_shard=100)
    table = pq.read_table(io.BytesIO(storage.read_bytes(parquet.files[0], options)))
    assert table.num_rows == 12 and table.schema.metadata[b"huggingface"]


def test_a_failed_shard_upload_leaves_no_object(s3):
    options = s3.storage_options
    source = build_output_root(s3.fresh_url("out"), shards=2, storage_options=options)
    last = source.ok[-1]
    storage.write_bytes(layout.row_image_url(source.root, "s001", last),
                        b"not the rendered image", options)
    dest = s3.fresh_url("export")
    with pytest.raises(ExportError, match="does not match the sha256"):
        export.export(source.root, "webdataset", dest, options, samples_per_shard=8)
    assert storage.list_names(dest, options) == ["train-00000-of-00002.tar"]  # nothing of the second shard
