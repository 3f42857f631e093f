"""The public building blocks other code builds on (config, head, model, VAE, token layout), checked against the
official tiny checkpoint in tests/fixtures/nextstep-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ray_render.models.nextstep import vae as V
from ray_render.models.nextstep.config import ConfigFileError, NextStepConfig
from ray_render.models.nextstep.head import FlowMatchingHead
from ray_render.models.nextstep.model import NextStepModel, StateDictError
from ray_render.models.nextstep.sampler import guidance_scales, timestep_grid

FIXTURE = Path(__file__).parent / "fixtures" / "nextstep-tiny"
CASES = json.loads((FIXTURE / "reference" / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def weights():
    return load_file(str(FIXTURE / "model.safetensors"))


@pytest.fixture(scope="module")
def model(weights):
    m = NextStepModel(NextStepConfig.from_file(FIXTURE / "config.json")).eval()
    m.load_official_state_dict(weights)
    return m


def test_config_spellings_and_round_trip():
    raw = json.loads((FIXTURE / "config.json").read_text())
    cfg = NextStepConfig.from_dict(raw)
    assert (cfg.fm_head_dim, cfg.fm_head_layers, cfg.latent_channels, cfg.latent_patch_size) == (64, 2, 16, 2)
    assert cfg.version == "1" and cfg.token_dim == 64 and cfg.head_dim == 16
    assert NextStepConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["lm_loss_weight"] == raw["lm_loss_weight"]  # unknown fields survive

    v11 = dict(raw)
    for old, new in [("fm_head_dim", "genloss_width"), ("fm_head_layers", "genloss_depth"),
                     ("latent_channels", "num_channels"), ("latent_patch_size", "patch_size")]:
        v11[new] = v11.pop(old)
    cfg11 = NextStepConfig.from_dict(v11)
    assert cfg11.version == "1.1" and cfg11.fm_head_dim == 64 and cfg11.latent_channels == 16
    written = cfg11.to_dict()
    assert written["fm_head_dim"] == 64 and "genloss_width" not in written and written["nextstep_version"] == "1.1"
    assert NextStepConfig.from_dict(written) == cfg11

    with pytest.raises(ConfigFileError, match="unknown model_type 'qwen2'"):
        NextStepConfig.from_dict({**raw, "model_type": "qwen2"})
    # o_attention_bias as the official config class reads it: absent means "same as attention_bias".
    absent = {k: v for k, v in raw.items() if k != "o_attention_bias"}
    unset = NextStepConfig.from_dict(absent)
    assert unset.o_attention_bias is None and unset.o_proj_bias is True
    assert NextStepConfig.from_dict(unset.to_dict()) == unset  # still unset after a round trip
    assert NextStepConfig.from_dict(raw).o_proj_bias is False


def test_head_keys_are_the_checkpoint_names(weights):
    head = FlowMatchingHead(64, 64, width=64, depth=2)
    official = {k[len("image_head."):] for k in weights if k.startswith("image_head.")}
    assert set(head.state_dict()) == official


def test_model_official_state_dict_round_trip(model, weights):
    sd = model.official_state_dict()
    assert set(sd) == set(weights) - {"lm_head.weight"}
    for name, tensor in sd.items():
        assert torch.equal(tensor, weights[name]), name  # gen_pos_embed included: same sin-cos table
    fresh = NextStepModel(model.config)
    with pytest.raises(StateDictError, match="missing tensors: norm.weight"):
        fresh.load_official_state_dict({k: v for k, v in weights.items() if k != "norm.weight"})
    fresh.load_official_state_dict(weights)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_teacher_forced_forward_gives_the_reference_conditions(model):
    ref = load_file(str(FIXTURE / "reference" / "B.safetensors"))
    with torch.no_grad():
        hidden = model(model.embed(ref["input_ids"]), ref["attention_mask"])
        # Condition of token 0 is the last prompt position; token k>0 follows image token k-1 fed back.
        torch.testing.assert_close(hidden[:, -1:], ref["prefill_c"], atol=1e-5, rtol=0)
        tokens = ref["tokens"].repeat(2, 1, 1)  # both guidance rows receive the same tokens
        full = torch.cat([model.embed(ref["input_ids"]), model.image_in_projector(tokens[:, :-1])], dim=1)
        mask = torch.cat([ref["attention_mask"], torch.ones(2, 15, dtype=torch.long)], dim=1)
        hidden = model(full, mask)
    torch.testing.assert_close(hidden[:, -16:], ref["cond_hidden"], atol=1e-5, rtol=0)


def test_head_split_form_equals_forward_and_trains(model):
    head = model.image_head
    x, c, t = torch.randn(6, 64), torch.randn(6, 64), torch.rand(6)
    with torch.no_grad():
        direct = head(x, t, c)
        mods = head.modulations((head.embed_time(t) + head.embed_cond(c))[None])
        split = head.velocity(x, mods.step(0))
    torch.testing.assert_close(split, direct, atol=1e-6, rtol=0)
    trainable = FlowMatchingHead(64, 64, width=32, depth=1)
    loss = trainable.loss(torch.randn(8, 64), torch.randn(8, 64), mask=torch.tensor([1.0] * 6 + [0.0] * 2),
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0 and trainable.net.input_proj.weight.grad is not None


def test_vae_key_conversion_round_trip_and_decode():
    vae_config = json.loads((FIXTURE / "vae" / "config.json").read_text())
    official = torch.load(FIXTURE / "vae" / "checkpoint.pt", weights_only=True)
    vae = V.build_autoencoder(vae_config)
    converted = V.official_to_diffusers(official)
    assert set(converted) == set(vae.state_dict())
    vae.load_state_dict(converted)
    back = V.diffusers_to_official(vae.state_dict())
    assert set(back) == set(official) and all(torch.equal(back[k], official[k]) for k in official)
    ref = load_file(str(FIXTURE / "reference" / "A.safetensors"))
    with torch.no_grad():
        latents, decoded = V.decode_tokens(vae.eval(), ref["tokens"], 4, 4, 2, 0.3611, 0.1159)
    torch.testing.assert_close(latents, ref["latents"], atol=1e-6, rtol=0)
    torch.testing.assert_close(decoded, ref["decoded"], atol=1e-4, rtol=0)


def test_token_layout_for_non_square_grids():
    h, w, p, c = 2, 5, 2, 3
    tokens = torch.randn(1, h * w, c * p * p)
    latents = V.unpatchify(tokens, h, w, p)
    assert latents.shape == (1, c, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                for a in range(p):
                    for q in range(p):
                        assert latents[0, ch, p * i + a, p * j + q] == tokens[0, i * w + j, ch * p * p + a * p + q]
    assert torch.equal(V.patchify(latents, p), tokens)
    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(V.depth_to_space(V.space_to_depth(x, 2), 2), x)
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        V.unpatchify(tokens, 3, 3, p)


@pytest.mark.parametrize("name", sorted(CASES))
def test_timestep_grids_and_guidance_schedules(name):
    s = CASES[name]["settings"]
    grid = timestep_grid(s["num_sampling_steps"], s["timesteps_shift"])
    assert grid.tolist() == CASES[name]["timesteps_float32"]
    scales = guidance_scales(s["cfg"], s["cfg_schedule"], 16)
    assert torch.tensor(scales, dtype=torch.float32).tolist() == CASES[name]["cfg_per_token"]
