"""models.describe_model: what a model would load, without loading it, must equal what loading it reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_render import storage
from ray_render.models import describe_model, load_model
from ray_render.models.nextstep import snapshot
from ray_render.models.nextstep.describe import url_revision
from ray_render.models.nextstep.resolve import ResolveError, fetch_url, tiny_dir
from ray_render.models.placeholder import PlaceholderModel

FIXTURE = Path(__file__).parent / "fixtures" / "nextstep-tiny"


def loaded_facts(name: str, **options) -> dict:
    model = load_model(name, device="cpu", **options)
    return {"revision": model.info.revision, "defaults": model.defaults(),
            "down_factor": model.parts.down_factor, "context_length": model.config.max_position_embeddings,
            "device": model.info.device, "dtype": model.info.dtype}


def described_facts(name: str, **options) -> dict:
    d = describe_model(name, device="cpu", **options)
    return {"revision": d.revision, "defaults": d.defaults, "down_factor": d.down_factor,
            "context_length": d.context_length, "device": d.device, "dtype": d.dtype}


def copy_snapshot(source: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("reference", "KEYS.txt"))
    config = json.loads((target / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("variant", ["tiny", "fixture", "edit-1.1"])
def test_description_equals_what_the_loaded_model_reports(variant, tmp_path):
    name = {"tiny": "tiny", "fixture": str(FIXTURE)}.get(variant)
    if variant == "edit-1.1":  # a snapshot that says it is an edit model and NextStep-1.1 in its config
        name = str(copy_snapshot(tiny_dir(), tmp_path / "snapshot", nextstep_version="1.1", nextstep_task="edit"))
    described = described_facts(name)
    assert described == loaded_facts(name)
    if variant == "edit-1.1":
        # render_defaults.json still wins over the version's and the edit model's own defaults
        assert described["defaults"]["cfg_img"] == 2.0 and described["defaults"]["num_sampling_steps"] == 20
        assert describe_model(name).settings["sampler"] == "NextStep-1.1"


def test_the_architecture_counts_the_parameters_of_the_built_model():
    model = load_model("tiny", device="cpu").parts.model
    counted = {"head": 0, "backbone": 0}
    for tensor_name, parameter in model.named_parameters():
        if tensor_name.startswith("image_head."):
            counted["head"] += parameter.numel()
        elif "embed_tokens" not in tensor_name:  # a token reads one row of the embeddings, not all of them
            counted["backbone"] += parameter.numel()
    arch = describe_model("tiny").architecture
    assert (arch["backbone_params"], arch["head_params"]) == (counted["backbone"], counted["head"])
    large = describe_model("stepfun-ai/NextStep-1-Large").architecture  # published sizes: 14B backbone, 157M head
    assert 13e9 < large["backbone_params"] < 14e9 and 150e6 < large["head_params"] < 160e6


def test_describing_imports_no_torch_and_reads_no_weights(tmp_path):
    snapshot = copy_snapshot(tiny_dir(), tmp_path / "no-weights")
    (snapshot / "model.safetensors").write_bytes(b"weights are never opened")
    code = ("import sys; from ray_render.models import describe_model; d = describe_model(sys.argv[1]); "
            "print(d.defaults['width'], d.down_factor, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(snapshot)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "16", "False"]


def test_a_repo_that_is_not_cached_gets_its_published_defaults_without_a_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    d = describe_model("stepfun-ai/NextStep-1.1")
    assert calls and all(calls)  # only ever asked the local cache
    assert d.revision is None and "not in the local hub cache" in d.source
    assert d.defaults["num_sampling_steps"] == 28 and d.defaults["use_norm"] is False
    assert (d.down_factor, d.context_length) == (16, 131072)
    edit = describe_model("stepfun-ai/NextStep-1-Large-Edit")
    assert edit.defaults["timesteps_shift"] == 3.2 and edit.defaults["cfg_img"] == 2.0
    with pytest.raises(ResolveError, match="example-org/other-model"):
        describe_model("example-org/other-model")  # nothing cached and no NextStep name: nothing to say


def test_a_cached_hub_repo_is_described_with_its_commit(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example-org--nextstep-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    copy_snapshot(tiny_dir(), repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert described_facts("example-org/nextstep-tiny") == loaded_facts("example-org/nextstep-tiny")
    assert describe_model("example-org/nextstep-tiny").revision == commit


def test_a_snapshot_on_object_storage_is_described_from_its_json_files(s3):
    url = s3.fresh_url("snapshot")
    for relative in ("config.json", "render_defaults.json", "vae/config.json"):  # no weights uploaded at all
        storage.write_bytes(storage.join(url, relative), (tiny_dir() / relative).read_bytes(), s3.storage_options)
    d = describe_model(url, storage_options=s3.storage_options)
    tiny = describe_model("tiny")
    assert (d.defaults, d.down_factor, d.context_length) == (tiny.defaults, tiny.down_factor, tiny.context_length)
    with pytest.raises(ResolveError, match="no config.json"):
        describe_model(s3.fresh_url("empty"), storage_options=s3.storage_options)


def test_a_snapshot_on_object_storage_has_the_revision_its_load_reports(s3, tmp_path, monkeypatch):
    url = s3.fresh_url("snapshot")
    local = copy_snapshot(tiny_dir(), tmp_path / "tiny")
    (local / "vae.txt").write_text("sorts between vae/ and its files in a plain string sort")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(url, path.relative_to(local).as_posix()), path.read_bytes(),
                            s3.storage_options)
    described = describe_model(url, storage_options=s3.storage_options)
    monkeypatch.setenv("RAY_RENDER_MODEL_CACHE", str(tmp_path / "cache"))
    loaded = load_model(url, device="cpu", storage_options=s3.storage_options)
    assert described.revision == loaded.info.revision != describe_model("tiny").revision
    # Files past the size limit count by their size and first and last MiB, read as ranges of the remote file
    copy = fetch_url(url, s3.storage_options, tmp_path / "cache")
    weights = max(p.stat().st_size for p in copy.rglob("*") if p.is_file())
    assert weights > 2 << 20
    assert url_revision(url, None, None, s3.storage_options, small=weights - 1) == \
        snapshot.fingerprint(copy, small=weights - 1) != described.revision
    assert url_revision(url, "s3://elsewhere/vae", None, s3.storage_options) is None  # only a load tells


def test_placeholder_and_plugins():
    d = describe_model("placeholder")
    model = PlaceholderModel()
    assert (d.defaults, d.revision, d.family) == (model.defaults(), model.info.revision, "placeholder")
    assert (d.device, d.dtype) == (model.info.device, model.info.dtype)
    with pytest.raises(ValueError, match="without a describe"):
        describe_model("ray_render.tools.chaos:TinyOutOfMemoryAbove4")


def test_the_device_and_dtype_a_load_reports_are_known_once_the_device_is(tmp_path, monkeypatch):
    assert (describe_model("tiny").device, describe_model("tiny").dtype) == (None, None)  # "auto": the machine's
    assert describe_model("tiny").expected_info() is None
    cuda = describe_model("tiny", device="cuda")
    assert (cuda.device, cuda.dtype) == ("cuda", "bfloat16")  # dtype "auto" on CUDA, as the loader picks it
    assert describe_model("tiny", device="cuda:1", dtype="float32").dtype == "float32"
    info = describe_model("tiny", device="cpu").expected_info()
    assert (info["family"], info["revision"], info["device"], info["dtype"]) == (
        "nextstep", describe_model("tiny").revision, "cpu", "float32")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    uncached = describe_model("stepfun-ai/NextStep-1.1", device="cuda")  # published facts: no revision here
    assert uncached.revision is None and uncached.expected_info() is None


def test_size_rules():
    d = describe_model("tiny")
    assert d.image_tokens(64, 48) == 12
    assert d.size_problem(64, 64) is None
    assert d.size_problem(72, 64) == "width must be a multiple of 16 for this model, got 72"
    assert "more than the model's context of 4096 tokens" in d.size_problem(1024, 1024)
