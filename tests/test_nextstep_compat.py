"""What makes the runtime correct on any stack it installs on and compatible with the official pipeline's details:
the backbone self-checks (RoPE theta and precision, attention implementation), o_attention_bias, the VAE's
deterministic flag and lenient loading, the sampler version and edit defaults from the snapshot itself, edit
preprocessing, float16, control tokens in prompts, and renders that print no warnings.

Everything runs the real loader on the official-layout tiny checkpoint (tests/fixtures/nextstep-tiny) or on
variants of it written to disk.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ray_render import cli
from ray_render.config import JOB_PIXEL_SETTINGS, ConfigError, JobConfig
from ray_render.models import load_model
from ray_render.models.base import RenderRequest, RowError, max_batch
from ray_render.models.nextstep import load_nextstep, snapshot
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.generate import embed_with_images
from ray_render.models.nextstep.images import decode_input_image
from ray_render.models.nextstep.selfcheck import SelfCheckError, check_attention, check_rotary, expected_inv_freq
from ray_render.models.nextstep.snapshot import SnapshotError, write_snapshot

FIXTURE = Path(__file__).parent / "fixtures" / "nextstep-tiny"
REQUEST = RenderRequest(key="q", prompt="A small red cube on a wooden table.", negative_prompt="blurry", cfg=3.0,
                        num_sampling_steps=4, seed=21)


@pytest.fixture(scope="module")
def fixture_model():
    return load_nextstep(str(FIXTURE), device="cpu", noise="reference")


@pytest.fixture(scope="module")
def baseline(fixture_model):
    return fixture_model.render([REQUEST])[0]


def write_variant(directory: Path, *, config_changes=None, remove=(), weights_changes=None, vae_changes=None,
                  vae_config_changes=None) -> Path:
    """The fixture written again with its config, model weights or VAE changed."""
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(config_changes or {})
    for key in remove:
        config.pop(key)
    weights = {**load_file(str(FIXTURE / "model.safetensors")), **(weights_changes or {})}
    vae_config = {**json.loads((FIXTURE / "vae" / "config.json").read_text()), **(vae_config_changes or {})}
    vae_sd = {**torch.load(FIXTURE / "vae" / "checkpoint.pt", weights_only=True), **(vae_changes or {})}
    write_snapshot(directory, config, weights, FIXTURE, vae_config, vae_sd)
    written = json.loads((directory / "config.json").read_text())
    for key in remove:  # write_snapshot writes every field; restore the absence under test
        written.pop(key, None)
    (directory / "config.json").write_text(json.dumps(written))
    return directory


def png_bytes(array: np.ndarray, mode: str | None = None, exif=None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(buffer, format="PNG", exif=exif) if exif is not None else image.save(buffer, format="PNG")
    return buffer.getvalue()


# Runtime self-checks ---------------------------------------------------------------------------------------------

def test_rope_self_check_refuses_a_backbone_with_the_wrong_theta(monkeypatch):
    # What transformers 4.57 does with this config (it reads rope_theta, not rope_parameters): theta 1e4.
    original = NextStepConfig.qwen2_config

    def silently_default_theta(self, attn_implementation="sdpa"):
        cfg = original(self, attn_implementation)
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        return cfg

    monkeypatch.setattr(NextStepConfig, "qwen2_config", silently_default_theta)
    with pytest.raises(SelfCheckError, match=r"not those of theta 1e\+06 in fp32 \(they are theta 1e\+04's"):
        load_nextstep(str(FIXTURE), device="cpu")


def test_rope_self_check_passes_the_loaded_model_and_knows_its_precision(fixture_model):
    backbone, config = fixture_model.parts.model.backbone, fixture_model.config
    check_rotary(backbone, config.rope_theta, config.head_dim, "fp32")
    with pytest.raises(SelfCheckError, match="in bf16"):  # fp32 frequencies are not the official bf16 ones
        check_rotary(backbone, config.rope_theta, config.head_dim, "bf16")
    with pytest.raises(SelfCheckError, match="theta 1e\\+05"):
        check_rotary(backbone, 1e5, config.head_dim, "fp32")


def test_attention_other_than_sdpa_is_refused(fixture_model):
    with pytest.raises(ValueError, match="attn_implementation 'eager' is not supported: only sdpa"):
        load_nextstep(str(FIXTURE), device="cpu", attn_implementation="eager")
    backbone = fixture_model.parts.model.backbone
    check_attention(backbone)
    backbone.config._attn_implementation = "eager"  # as transformers may fall back when sdpa is unavailable
    try:
        with pytest.raises(SelfCheckError, match="runs 'eager', but only sdpa applies the boolean padding masks"):
            check_attention(backbone)
    finally:
        backbone.config._attn_implementation = "sdpa"


def test_rope_precision_bf16_is_the_official_bfloat16_default(fixture_model):
    bf16 = load_nextstep(str(FIXTURE), device="cpu", dtype="bfloat16")
    assert bf16.info.settings["rope_precision"] == "bf16"
    inv_freq = bf16.parts.model.backbone.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.bfloat16
    assert torch.equal(inv_freq.float(), expected_inv_freq(1e6, 16, "bf16"))
    assert load_nextstep(str(FIXTURE), device="cpu", dtype="bfloat16", rope_precision="fp32") \
        .parts.model.backbone.rotary_emb.inv_freq.dtype == torch.float32
    # float32 weights keep float32 frequencies (the conformance cases); bf16 frequencies on them change the
    # hidden states, a little at these short positions, as they do in the official bfloat16 pipeline.
    assert fixture_model.info.settings["rope_precision"] == "fp32"
    rounded = load_nextstep(str(FIXTURE), device="cpu", noise="reference", rope_precision="bf16")
    _, exact = fixture_model.generate([REQUEST], trace=True)
    _, official_bf16 = rounded.generate([REQUEST], trace=True)
    difference = (torch.stack(exact.cond_hidden) - torch.stack(official_bf16.cond_hidden)).abs().max()
    assert 1e-6 < difference < 0.5
    with pytest.raises(ValueError, match="rope_precision must be one of auto, bf16, fp32"):
        load_nextstep(str(FIXTURE), device="cpu", rope_precision="fp16")


def test_float16_is_refused():
    with pytest.raises(ValueError, match="float16 is not supported for NextStep: .* overflow"):
        load_nextstep(str(FIXTURE), device="cpu", dtype="float16")


# Checkpoint details as the official loaders read them ---------------------------------------------------------

def test_o_attention_bias_absent_follows_attention_bias(tmp_path, baseline):
    # Absent from config.json, the official rule gives o_proj a bias: the checkpoint's is loaded and applied.
    zeros = {f"layers.{i}.self_attn.o_proj.bias": torch.zeros(64) for i in range(2)}
    model = load_nextstep(str(write_variant(tmp_path / "zero-bias", remove=["o_attention_bias"],
                                            weights_changes=zeros)), device="cpu", noise="reference")
    assert model.config.o_attention_bias is True
    assert np.array_equal(model.render([REQUEST])[0], baseline)  # a zero bias is no bias
    halves = {name: torch.full((64,), 0.5) for name in zeros}
    biased = load_nextstep(str(write_variant(tmp_path / "bias", remove=["o_attention_bias"],
                                             weights_changes=halves)), device="cpu", noise="reference")
    assert biased.config.o_attention_bias is True
    assert not np.array_equal(biased.render([REQUEST])[0], baseline)
    # A checkpoint without those tensors renders as the official loader does: their zero initialisation.
    unbiased = load_nextstep(str(write_variant(tmp_path / "no-bias", remove=["o_attention_bias"])), device="cpu",
                             noise="reference")
    assert unbiased.config.o_attention_bias is False
    assert np.array_equal(unbiased.render([REQUEST])[0], baseline)
    # Said explicitly, the config is held to: a bias it denies is an unexpected tensor.
    with pytest.raises(SnapshotError, match=r"unexpected tensors: layers\.0\.self_attn\.o_proj\.bias"):
        load_nextstep(str(write_variant(tmp_path / "denied", weights_changes=zeros)), device="cpu")


def test_unused_checkpoint_tensors_are_not_read(fixture_model):
    model = fixture_model.parts.model
    assert not model.holds("lm_head.weight") and not model.holds("gen_pos_embed")
    assert model.holds("layers.1.self_attn.q_proj.bias") and model.holds("image_head.net.input_proj.weight")


def test_vae_loads_leniently_like_the_official_loader(tmp_path, baseline):
    stray = {"decoder.extra_block.weight": torch.zeros(3), "quant_conv.weight": torch.zeros(1)}
    snap = write_variant(tmp_path / "stray", vae_changes=stray,
                         config_changes={"vae_name_or_path": "/mnt/training-cluster/NextStep-1-f8ch16-Tokenizer"})
    # Tensors the VAE has no place for are ignored; a path from the training machine falls back to ./vae.
    model = load_nextstep(str(snap), device="cpu", noise="reference")
    assert np.array_equal(model.render([REQUEST])[0], baseline)


def test_vae_deterministic_flag_uses_the_posterior_mean_and_keeps_the_draws(tmp_path):
    image = png_bytes((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    edit = RenderRequest(key="e", prompt="<image> in blue", cfg=3.0, cfg_img=2.0, num_sampling_steps=3, seed=5,
                         input_image=image)

    def image_tokens(model, seed):
        parts = model.parts
        req = model.check(edit)
        ids = parts.prompts.build(parts.texts(req), [(4, 4)] * 3)
        with torch.inference_mode():
            return embed_with_images(parts, [req], ids.input_ids, [torch.Generator().manual_seed(seed)], 3)

    sampled = load_nextstep(str(FIXTURE), device="cpu", noise="reference")
    deterministic = load_nextstep(str(write_variant(tmp_path / "det", vae_config_changes={"deterministic": True})),
                                  device="cpu", noise="reference")
    assert not torch.equal(image_tokens(sampled, 1), image_tokens(sampled, 2))
    assert torch.equal(image_tokens(deterministic, 1), image_tokens(deterministic, 2))
    # The posterior noise is still drawn, so the sampler's noise that follows it is the same in both.
    _, a = sampled.generate([sampled.check(edit)], trace=True)
    _, b = deterministic.generate([deterministic.check(edit)], trace=True)
    assert torch.equal(a.noise, b.noise)


# What a snapshot is: sampler version and edit defaults from the snapshot itself ---------------------------------

def identity(tmp_path, dirname: str, given: str | None = None, **config_changes):
    raw = {**json.loads((FIXTURE / "config.json").read_text()), **config_changes}
    directory = tmp_path / dirname
    directory.mkdir(parents=True)
    return snapshot.read_identity(directory, NextStepConfig.from_dict(raw), given or str(directory))


def test_sampler_version_comes_from_an_explicit_fact_before_the_spelling(tmp_path):
    spelled_11 = {"genloss_width": 64, "genloss_depth": 2}
    explicit = identity(tmp_path, "a", nextstep_version="1", **spelled_11)
    assert (explicit.version, explicit.version_source) == ("1", "nextstep_version")
    named = identity(tmp_path, "models--stepfun-ai--NextStep-1.1/snapshots/0123abcd")
    assert (named.version, named.version_source) == ("1.1", "name 'NextStep-1.1'")
    recorded = identity(tmp_path, "b", _name_or_path="stepfun-ai/NextStep-1-Large", **spelled_11)
    assert (recorded.version, recorded.version_source) == ("1", "name 'NextStep-1-Large'")
    guessed = identity(tmp_path, "c", **spelled_11)
    assert (guessed.version, guessed.version_source) == ("1.1", "field names")


def test_edit_defaults_come_from_the_snapshot_not_the_name_it_was_given(tmp_path):
    hub_copy = identity(tmp_path, "models--stepfun-ai--NextStep-1-Large-Edit/snapshots/0123abcd", given="/models/x")
    assert hub_copy.edit and hub_copy.edit_source == "name 'NextStep-1-Large-Edit'"
    assert not identity(tmp_path, "NextStep-1-Large", given="/models/NextStep-1-Large").edit
    assert not identity(tmp_path, "edit-copy", nextstep_task="t2i").edit  # the config's word wins
    with pytest.raises(SnapshotError, match="nextstep_task must be 'edit' or 't2i'"):
        identity(tmp_path, "bad", nextstep_task="inpaint")
    # Loaded by a path that says nothing, an edit snapshot still gets the edit defaults.
    snap = write_variant(tmp_path / "checkpoints" / "v3", config_changes={"nextstep_task": "edit"})
    model = load_nextstep(str(snap), device="cpu")
    assert (model.defaults()["timesteps_shift"], model.defaults()["cfg_img"]) == (3.2, 2.0)
    assert model.info.settings["edit_source"] == "nextstep_task"


# Edit inputs -------------------------------------------------------------------------------------------------------

def test_edit_input_is_prepared_as_the_official_loader_does():
    # Left quarter red, middle half green, right quarter blue.
    bands = np.zeros((64, 128, 3), dtype=np.uint8)
    bands[:, :32, 0], bands[:, 32:96, 1], bands[:, 96:, 2] = 255, 255, 255
    resized = decode_input_image(png_bytes(bands), 64, 64, "resize")  # the official example: squeeze to size
    assert resized.shape == (64, 64, 3)
    assert resized[32, 2].tolist() == [255, 0, 0] and resized[32, 61].tolist() == [0, 0, 255]
    cropped = decode_input_image(png_bytes(bands), 64, 64, "crop")  # the centre square: green only
    assert (cropped[:, 4:60] == [0, 255, 0]).all()
    # Transparent pixels are composited on white, not dropped to their colour.
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    assert (decode_input_image(png_bytes(rgba, "RGBA"), 16, 16) == 255).all()
    # The EXIF orientation is applied: a 32x16 picture tagged "rotate 90" is 16 wide and 32 tall.
    exif = Image.Exif()
    exif[0x0112] = 6
    tall = np.zeros((16, 32, 3), dtype=np.uint8)
    tall[:, :16] = 255  # white left half, which ends up at the top after rotation
    upright = decode_input_image(png_bytes(tall, exif=exif), 16, 32, "crop")
    assert upright.shape == (32, 16, 3) and (upright[:14] == 255).all() and (upright[18:] == 0).all()


def test_edit_input_errors_name_the_field(fixture_model):
    sixteen_bit = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint16)).save(sixteen_bit, format="PNG")
    request = RenderRequest(key="row-3#0", prompt="<image> brighter", input_image=sixteen_bit.getvalue())
    with pytest.raises(RowError, match=r"row-3#0: input_image: image mode I;16 is not supported"):
        fixture_model.check(request)


# Requests ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "positive_prompt"])
def test_control_tokens_in_prompts_are_row_errors(fixture_model, field):
    request = RenderRequest(**{"key": "row-9#0", "prompt": "a cat", field: "a cat <|image_placeholder|> here"})
    with pytest.raises(RowError, match=f"row-9#0: {field} contains the control token '<\\|image_placeholder\\|>'"):
        fixture_model.check(request)


def test_check_returns_the_request_to_render_and_render_prints_no_warnings(fixture_model, baseline):
    checked = fixture_model.check(REQUEST)
    assert checked == REQUEST and checked.input_pixels is None
    assert max_batch(fixture_model, checked) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = fixture_model.render([checked])
    assert [str(w.message) for w in caught] == []
    assert np.array_equal(images[0], baseline)


def test_job_options_reach_the_model(tmp_path):
    args = cli.build_parser().parse_args(["run", "m.parquet", "--out", str(tmp_path), "--rope-precision", "bf16",
                                          "--edit-input", "crop", "--compile", "on"])
    job = cli.job_from_args(args)
    assert (job.rope_precision, job.edit_input, job.compile) == ("bf16", "crop", "on")
    assert "compile" in JOB_PIXEL_SETTINGS  # compiled and eager images may differ by a rounding step
    model = load_model(job.model, **{**job.model_options(), "device": "cpu"})
    assert (model.info.settings["rope_precision"], model.info.settings["edit_input"]) == ("bf16", "crop")
    assert model.info.settings["compile"] == "on" and model.compiled
    assert load_model("tiny", device="cpu").info.settings["compile"] == "off"  # auto: eager off CUDA
    drill = load_model("ray_render.tools.chaos:TinyOutOfMemoryAbove4", device="cpu", rope_precision="bf16")
    assert drill.info.settings["rope_precision"] == "bf16"  # plugin factories get the same keywords
    with pytest.raises(ConfigError, match="--rope-precision must be one of auto, bf16, fp32, got 'fp16'"):
        JobConfig(manifests=["m.parquet"], out=str(tmp_path), rope_precision="fp16")
    with pytest.raises(ConfigError, match="--edit-input must be one of resize, crop, got 'pad'"):
        JobConfig(manifests=["m.parquet"], out=str(tmp_path), edit_input="pad")
    with pytest.raises(ConfigError, match="--compile must be one of off, on, auto, got 'yes'"):
        JobConfig(manifests=["m.parquet"], out=str(tmp_path), compile="yes")


def test_gpu_check_script_passes_on_cpu(tmp_path):
    # benchmarks/nextstep_gpu_checks.py is what a CUDA machine runs; on CPU it must agree with the fixture too.
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "nextstep_gpu_checks.py"
    spec = importlib.util.spec_from_file_location("nextstep_gpu_checks", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cpu", "--out", str(tmp_path / "checks.json")]) == 0
    result = json.loads((tmp_path / "checks.json").read_text())
    assert result["pass"] and all(case["identical"] for case in result["draws"].values())
