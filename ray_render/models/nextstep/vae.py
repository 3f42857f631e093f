"""The NextStep VAE (Flux-style f8, 16 latent channels) on diffusers' AutoencoderKL, and the latent <-> token maps.

The released VAE is a plain state dict in the official (Flux/LDM) naming plus a config.json of the official
`AutoEncoderParams`. `official_to_diffusers` / `diffusers_to_official` rename between the two layouts;
`build_autoencoder` builds the matching AutoencoderKL (no quant convs, single-head mid attention).

Token layout: a token is the (channel, row-in-patch, column-in-patch) values of one p x p latent patch, tokens in
raster order over an (h, w) grid of patches: latents[b, c, p*i + a, p*j + q] = tokens[b, i*w + j, c*p*p + a*p + q].
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

# Fields of the official AutoEncoderParams and their defaults (the released f8ch16 tokenizer).
VAE_DEFAULTS = {
    "resolution": 256, "in_channels": 3, "ch": 128, "out_ch": 3, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "z_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "deterministic": False,
    "encoder_norm": False, "psz": None,
}


def vae_settings(vae_config: dict) -> dict:
    """The official fields with defaults filled in; unknown fields are kept."""
    return {**VAE_DEFAULTS, **vae_config}


def build_autoencoder(vae_config: dict):
    """A diffusers AutoencoderKL with the architecture of an official VAE config (weights uninitialised)."""
    from diffusers import AutoencoderKL

    s = vae_settings(vae_config)
    levels = len(s["ch_mult"])
    return AutoencoderKL(
        in_channels=s["in_channels"], out_channels=s["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(s["ch"] * m for m in s["ch_mult"]), layers_per_block=s["num_res_blocks"],
        act_fn="silu", latent_channels=s["z_channels"], norm_num_groups=32, sample_size=s["resolution"],
        scaling_factor=s["scaling_factor"], shift_factor=s["shift_factor"], force_upcast=False,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    )


# Key renaming --------------------------------------------------------------------------------------------------

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def official_to_diffusers(sd: dict) -> dict:
    """Rename an official VAE state dict to diffusers' AutoencoderKL names (attention 1x1 convs -> linear)."""
    up_levels = _levels(sd, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        new = _official_key_to_diffusers(key, up_levels)
        if new.split(".")[-2] in ("to_q", "to_k", "to_v", "0") and "attentions" in new and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def _official_key_to_diffusers(key: str, up_levels: int) -> str:
    part, rest = key.split(".", 1)  # encoder / decoder
    if m := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", rest):
        kind, level, j, name, wb = m.groups()
        level = int(level) if kind == "down" else up_levels - 1 - int(level)
        return f"{part}.{kind}_blocks.{level}.resnets.{j}.{_RESNET_PARTS[name]}.{wb}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest):
        return f"{part}.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest):
        return f"{part}.up_blocks.{up_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"mid\.block_([12])\.(\w+)\.(weight|bias)", rest):
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{_RESNET_PARTS[m.group(2)]}.{m.group(3)}"
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        return f"{part}.mid_block.attentions.0.{_ATTN_PARTS[m.group(1)]}.{m.group(2)}"
    if m := re.fullmatch(r"norm_out\.(weight|bias)", rest):
        return f"{part}.conv_norm_out.{m.group(1)}"
    return key  # conv_in, conv_out: same names


def diffusers_to_official(sd: dict) -> dict:
    """Inverse of `official_to_diffusers` (attention linears back to 1x1 convs)."""
    up_levels = _levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    resnet = {v: k for k, v in _RESNET_PARTS.items()}
    attn = {v: k for k, v in _ATTN_PARTS.items()}
    out = {}
    for key, value in sd.items():
        part, rest = key.split(".", 1)
        new = key
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", rest):
            kind, level, j, name, wb = m.groups()
            level = int(level) if kind == "down" else up_levels - 1 - int(level)
            new = f"{part}.{kind}.{level}.block.{j}.{resnet[name]}.{wb}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", rest):
            new = f"{part}.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", rest):
            new = f"{part}.up.{up_levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", rest):
            new = f"{part}.mid.block_{int(m.group(1)) + 1}.{resnet[m.group(2)]}.{m.group(3)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
                               rest):
            new = f"{part}.mid.attn_1.{attn[m.group(1)]}.{m.group(2)}"
            if m.group(1) != "group_norm" and value.dim() == 2:
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"conv_norm_out\.(weight|bias)", rest):
            new = f"{part}.norm_out.{m.group(1)}"
        out[new] = value
    return out


# Tokens <-> latents ----------------------------------------------------------------------------------------------

def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, p*h, p*w) latents -> (B, h*w, C*p*p) tokens."""
    b, c, hh, ww = latents.shape
    h, w = hh // p, ww // p
    x = latents.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(b, h * w, c * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h*w, C*p*p) tokens on an h x w patch grid -> (B, C, p*h, p*w) latents."""
    b, n, d = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    c = d // (p * p)
    x = tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(b, c, h * p, w * p)


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p), channels ordered (C, row-in-patch, column-in-patch)."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, hh // p, ww // p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    b, cpp, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c, h * p, w * p)


# Encode / decode -----------------------------------------------------------------------------------------------

def decode_tokens(vae, tokens: torch.Tensor, h: int, w: int, patch_size: int, scaling_factor: float,
                  shift_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens (B, h*w, D) -> (latents, images): the decoder input and its raw float32 output (B, 3, H, W)."""
    latents = unpatchify(tokens, h, w, patch_size) / scaling_factor + shift_factor
    decoded = vae.decode(latents.to(vae.dtype)).sample
    return latents, decoded.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3): round(clamp(x/2 + 0.5, 0, 1) * 255)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def encode_posterior(vae, pixels: torch.Tensor, encoder_norm: bool, psz: int | None, deterministic: bool = False):
    """Pixels in [-1, 1] (B, 3, H, W) -> (mean, std) of the latent posterior, in the VAE's dtype, with the
    encoder_norm option: the mean, regrouped psz x psz space-to-depth, is layer-normed over its channels (no
    affine, eps 1e-6). `deterministic` (the VAE config's flag) makes std zero, so a sample is the mean; the
    official code still draws the sample's noise, and so does the caller, to keep the random stream in step."""
    moments = vae.encoder(pixels.to(vae.dtype))
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    mean, logvar = moments.chunk(2, dim=1)
    if encoder_norm:
        grouped = space_to_depth(mean, psz) if psz else mean
        grouped = F.layer_norm(grouped.permute(0, 2, 3, 1), grouped.shape[1:2], None, None, 1e-6).permute(0, 3, 1, 2)
        mean = depth_to_space(grouped, psz) if psz else grouped
    std = torch.zeros_like(mean) if deterministic else torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean, std


def encode_latents(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None, scaling_factor: float,
                   shift_factor: float) -> torch.Tensor:
    """A posterior sample (mean + std * noise; the mean when noise is None) scaled to the model's latent space."""
    sample = mean if noise is None else mean + std * noise.to(mean.dtype)
    return (sample - shift_factor) * scaling_factor
