"""Loading NextStep snapshots: the official layout (single file or shards), both config spellings, clear errors
for missing or mismatched files, the embedded `tiny` model, the VAE override, the Hugging Face hub cache
(offline), and fsspec URLs copied once per node into a cache that concurrent processes share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ray_render.models.base import RenderRequest, RowError
from ray_render.models.nextstep import load_nextstep
from ray_render.models.nextstep.resolve import COMPLETE_MARKER, ResolveError, tiny_dir
from ray_render.models.nextstep.snapshot import SnapshotError, write_snapshot

FIXTURE = Path(__file__).parent / "fixtures" / "nextstep-tiny"
REQUEST = RenderRequest(key="q", prompt="A small red cube on a wooden table.", negative_prompt="blurry", cfg=3.0,
                        num_sampling_steps=4, seed=21)


def fixture_parts():
    config = json.loads((FIXTURE / "config.json").read_text())
    weights = load_file(str(FIXTURE / "model.safetensors"))
    vae_config = json.loads((FIXTURE / "vae" / "config.json").read_text())
    vae_sd = torch.load(FIXTURE / "vae" / "checkpoint.pt", weights_only=True)
    return config, weights, vae_config, vae_sd


def write_variant(directory: Path, *, config_changes=None, drop=(), shard_bytes=None, vae_sd=None) -> Path:
    config, weights, vae_config, fixture_vae_sd = fixture_parts()
    config.update(config_changes or {})
    for name in drop:
        weights.pop(name)
    write_snapshot(directory, config, weights, FIXTURE, vae_config,
                   fixture_vae_sd if vae_sd is None else vae_sd, shard_bytes=shard_bytes)
    return directory


@pytest.fixture(scope="module")
def baseline():
    """The fixture's image for REQUEST, loaded from the fixture directory itself."""
    return load_nextstep(str(FIXTURE), device="cpu").render([REQUEST])[0]


# The official layout ---------------------------------------------------------------------------------------------

def test_sharded_snapshot_loads_like_a_single_file(tmp_path, baseline):
    snap = write_variant(tmp_path / "sharded", shard_bytes=300_000)
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (snap / "model.safetensors").exists()
    assert all((snap / s).is_file() for s in shards)
    assert np.array_equal(load_nextstep(str(snap), device="cpu").render([REQUEST])[0], baseline)


def test_nextstep_1_1_field_names(tmp_path):
    config, weights, vae_config, vae_sd = fixture_parts()
    for old, new in [("fm_head_dim", "genloss_width"), ("fm_head_layers", "genloss_depth"),
                     ("latent_channels", "num_channels"), ("latent_patch_size", "patch_size")]:
        config[new] = config.pop(old)
    snap = tmp_path / "v11"
    write_snapshot(snap, config, weights, FIXTURE, vae_config, vae_sd)
    # write_snapshot writes the NextStep-1 names plus the version; restore the 1.1 spelling on disk.
    (snap / "config.json").write_text(json.dumps(config))
    model = load_nextstep(str(snap), device="cpu", noise="reference")
    assert model.config.version == "1.1" and model.config.fm_head_dim == 64
    assert model.defaults()["num_sampling_steps"] == 28 and model.defaults()["use_norm"] is False
    images, trace = model.generate([REQUEST], trace=True)
    # The NextStep-1.1 sampler: S + 1 draws per token, the grid ending at t = 1.
    assert trace.noise.shape == (1, 16, REQUEST.num_sampling_steps + 1, 64)
    assert images[0].shape == (64, 64, 3)
    assert torch.isfinite(trace.tokens).all()


def test_missing_tensor_is_named(tmp_path):
    snap = write_variant(tmp_path / "missing", drop=["layers.1.mlp.up_proj.weight", "image_head.net.cond_embed.bias"])
    with pytest.raises(SnapshotError) as err:
        load_nextstep(str(snap), device="cpu")
    message = str(err.value)
    assert "model.safetensors" in message and "missing tensors" in message
    assert "layers.1.mlp.up_proj.weight" in message and "image_head.net.cond_embed.bias" in message


def test_wrong_shapes_are_named(tmp_path):
    snap = write_variant(tmp_path / "shapes", config_changes={"intermediate_size": 96})
    with pytest.raises(SnapshotError) as err:
        load_nextstep(str(snap), device="cpu")
    assert "layers.0.mlp.up_proj.weight has shape [128, 64], expected [96, 64]" in str(err.value)


def test_unexpected_tensor_is_named(tmp_path):
    config, weights, vae_config, vae_sd = fixture_parts()
    weights["layers.0.self_attn.o_proj.bias"] = torch.zeros(64)  # an o_proj bias the config says is absent
    write_snapshot(tmp_path / "extra", config, weights, FIXTURE, vae_config, vae_sd)
    with pytest.raises(SnapshotError, match=r"unexpected tensors: layers\.0\.self_attn\.o_proj\.bias"):
        load_nextstep(str(tmp_path / "extra"), device="cpu")


def test_unknown_model_type_names_config_file(tmp_path):
    snap = write_variant(tmp_path / "llama")
    config = json.loads((snap / "config.json").read_text())
    config["model_type"] = "llama"
    (snap / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: unknown model_type 'llama'; expected one of nextstep"):
        load_nextstep(str(snap), device="cpu")


@pytest.mark.parametrize("remove, expected", [
    ("config.json", r"config\.json: no such file"),
    ("vae/checkpoint.pt", r"vae/checkpoint\.pt: missing"),
    ("model-00002-of-", r"model-00002-of-\d+\.safetensors: missing; model\.safetensors\.index\.json lists it"),
    ("tokenizer.json", r"no tokenizer; expected tokenizer\.json"),
])
def test_missing_file_is_named(tmp_path, remove, expected):
    snap = write_variant(tmp_path / "snap", shard_bytes=300_000)
    target = next(p for p in snap.rglob("*") if p.relative_to(snap).as_posix().startswith(remove))
    target.unlink()
    with pytest.raises((SnapshotError, ResolveError, FileNotFoundError), match=expected):
        load_nextstep(str(snap), device="cpu")


def test_vae_weights_must_match_vae_config(tmp_path):
    config, weights, vae_config, vae_sd = fixture_parts()
    vae_sd.pop("decoder.conv_out.bias")
    write_snapshot(tmp_path / "bad-vae", config, weights, FIXTURE, vae_config, vae_sd)
    expected = r"checkpoint\.pt does not match .*config\.json: missing tensors: decoder\.conv_out\.bias"
    with pytest.raises(SnapshotError, match=expected):
        load_nextstep(str(tmp_path / "bad-vae"), device="cpu")


# The VAE location ------------------------------------------------------------------------------------------------

def test_vae_path_resolves_against_snapshot_and_vae_argument_overrides(tmp_path, baseline):
    snap = write_variant(tmp_path / "snap", config_changes={"vae_name_or_path": "autoencoder"})
    shutil.move(snap / "vae", snap / "autoencoder")
    # Relative to the snapshot directory, whatever the working directory is.
    assert np.array_equal(load_nextstep(str(snap), device="cpu").render([REQUEST])[0], baseline)
    # Without the VAE directory the error names the path that config.json asked for.
    shutil.move(snap / "autoencoder", tmp_path / "elsewhere")
    with pytest.raises(ResolveError, match=r"autoencoder: missing; config\.json's vae_name_or_path 'autoencoder'"):
        load_nextstep(str(snap), device="cpu")
    # vae= overrides it: a VAE directory, or a directory holding vae/.
    assert np.array_equal(load_nextstep(str(snap), vae=str(tmp_path / "elsewhere"), device="cpu").render(
        [REQUEST])[0], baseline)
    assert np.array_equal(load_nextstep(str(snap), vae=str(FIXTURE), device="cpu").render([REQUEST])[0], baseline)


def test_decoder_only_vae_renders_text_to_image_and_refuses_edits(tmp_path, baseline):
    config, weights, vae_config, vae_sd = fixture_parts()
    decoder_only = {k: v for k, v in vae_sd.items() if k.startswith("decoder.")}
    write_snapshot(tmp_path / "dec", config, weights, FIXTURE, vae_config, decoder_only)
    model = load_nextstep(str(tmp_path / "dec"), device="cpu")
    assert np.array_equal(model.render([REQUEST])[0], baseline)
    edit = RenderRequest(key="e1", prompt="<image> in blue", input_image=b"\x89PNG")
    with pytest.raises(RowError, match="e1: input_image: this model's VAE has no encoder"):
        model.check(edit)


# The embedded default model -------------------------------------------------------------------------------------

def test_tiny_loads_through_the_snapshot_path_with_its_render_defaults(tmp_path):
    model = load_nextstep("tiny", device="cpu")
    # Written so that a retrained tiny model dropped into ray_render/models/tiny/ passes unchanged.
    declared = json.loads((tiny_dir() / "render_defaults.json").read_text())
    defaults = model.defaults()
    assert {k: defaults[k] for k in declared} == declared
    assert defaults["width"] % 16 == 0 and defaults["num_sampling_steps"] <= 20  # small and fast by design
    assert model.info.name == "tiny" and model.info.family == "nextstep" and model.info.dtype == "float32"
    assert {p.name for p in tiny_dir().iterdir()} >= {"config.json", "tokenizer.json", "vae", "render_defaults.json"}
    # Same code path as any snapshot directory: a copy of the directory renders the same pixels.
    copy = shutil.copytree(tiny_dir(), tmp_path / "tiny-copy")
    rows = [RenderRequest(key=f"t{i}", prompt=f"object {i}", seed=i, **defaults) for i in range(3)]
    images = model.render(rows)
    assert [im.shape for im in images] == [(defaults["height"], defaults["width"], 3)] * 3
    for a, b in zip(images, load_nextstep(str(copy), device="cpu").render(rows)):
        assert np.array_equal(a, b)
    assert load_nextstep(str(copy), device="cpu").info.revision == model.info.revision


def test_bad_render_defaults_are_refused(tmp_path):
    snap = write_variant(tmp_path / "defaults")
    (snap / "render_defaults.json").write_text(json.dumps({"cfg": 0.2}))
    with pytest.raises(SnapshotError, match=r"render_defaults\.json: cfg must be from 1 to 100"):
        load_nextstep(str(snap), device="cpu")
    (snap / "render_defaults.json").write_text(json.dumps({"guidance": 2}))
    with pytest.raises(SnapshotError, match="unknown render parameter 'guidance'"):
        load_nextstep(str(snap), device="cpu")


def test_revision_follows_the_weights(tmp_path):
    a = load_nextstep(str(write_variant(tmp_path / "a")), device="cpu").info.revision
    b = load_nextstep(str(write_variant(tmp_path / "b")), device="cpu").info.revision
    config, weights, vae_config, vae_sd = fixture_parts()
    weights["norm.weight"] = weights["norm.weight"] * 1.01
    write_snapshot(tmp_path / "c", config, weights, FIXTURE, vae_config, vae_sd)
    c = load_nextstep(str(tmp_path / "c"), device="cpu").info.revision
    assert a == b != c


# Hugging Face hub cache -----------------------------------------------------------------------------------------

def test_hub_repo_id_loads_from_the_local_cache_offline(tmp_path, monkeypatch, baseline):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example-org--nextstep-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_variant(repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_nextstep("example-org/nextstep-tiny", device="cpu")
    assert model.info.revision == commit
    assert np.array_equal(model.render([REQUEST])[0], baseline)
    # The VAE override accepts a repo id too (here the same cached snapshot, which holds vae/).
    assert load_nextstep(str(FIXTURE), vae="example-org/nextstep-tiny", device="cpu").render([REQUEST])[0].shape \
        == (64, 64, 3)
    with pytest.raises(ResolveError, match="example-org/not-cached: no such local directory; .* and HF_HUB_OFFLINE"):
        load_nextstep("example-org/not-cached", device="cpu")


# fsspec URLs and the shared node cache ---------------------------------------------------------------------------

FETCH_CHILD = textwrap.dedent("""
    import json, logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    from ray_render.models.nextstep.resolve import fetch_url
    url, options, go = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    Path(sys.argv[4]).touch()  # ready
    deadline = time.monotonic() + 60
    while not go.exists():
        assert time.monotonic() < deadline, "never told to go"
        time.sleep(0.01)
    print(fetch_url(url, options))
""")


def test_fsspec_url_is_copied_once_per_node_for_concurrent_processes(s3, tmp_path, monkeypatch, baseline):
    import fsspec

    url = s3.fresh_url("nextstep-tiny")
    fs, root = fsspec.core.url_to_fs(url, **s3.storage_options)
    fs.put(str(FIXTURE) + "/", root, recursive=True)
    cache = tmp_path / "node-cache"
    monkeypatch.setenv("RAY_RENDER_MODEL_CACHE", str(cache))
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    go = tmp_path / "go"
    children = []
    for i in range(3):
        ready = tmp_path / f"ready-{i}"
        children.append((ready, subprocess.Popen(
            [sys.executable, "-c", FETCH_CHILD, url, json.dumps(s3.storage_options), str(go), str(ready)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready, _ in children) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()  # all three start fetching at once
    results = [proc.communicate(timeout=120) for _, proc in children]
    assert all(proc.returncode == 0 for _, proc in children), [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    copies = sum(err.count("copying s3://") for _, err in results)
    assert copies == 1, [err for _, err in results]
    assert all(s3.storage_options["secret"] not in out + err for out, err in results)
    local = Path(paths.pop())
    assert local.parent == cache and (local / COMPLETE_MARKER).is_file()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary directory left
    assert (local / "model.safetensors").read_bytes() == (FIXTURE / "model.safetensors").read_bytes()
    # Loading by URL reuses the copy and renders what the local snapshot renders.
    model = load_nextstep(url, device="cpu", storage_options=s3.storage_options)
    assert np.array_equal(model.render([REQUEST])[0], baseline)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_vae_override_by_url(s3, tmp_path, monkeypatch, baseline):
    import fsspec

    snap = write_variant(tmp_path / "novae")
    shutil.rmtree(snap / "vae")
    url = s3.fresh_url("vae")
    fs, root = fsspec.core.url_to_fs(url, **s3.storage_options)
    fs.put(str(FIXTURE / "vae") + "/", root, recursive=True)
    monkeypatch.setenv("RAY_RENDER_MODEL_CACHE", str(tmp_path / "cache"))
    model = load_nextstep(str(snap), vae=url, device="cpu", storage_options=s3.storage_options)
    assert np.array_equal(model.render([REQUEST])[0], baseline)
