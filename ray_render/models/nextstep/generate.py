"""The NextStep generation loop: a batch of checked requests in, one uint8 RGB image per request out.

`generate` reads top to bottom as numbered steps. Every output image draws its noise from its own
torch.Generator seeded with `request.seed`, up front, so a row's image does not depend on the rest of its batch;
rows of one call share the token count, step count, guidance branch count and edit-or-not (the batch key), and
may differ in everything else (prompt, seed, cfg, cfg_img, schedule, shift, use_norm, size). The token loop
itself is decoder.py's: one token step (step.py) per image token over static buffers.

Shapes: B images, R = branches * B prompt rows (branch-major), L prompt length, N image tokens per image,
D values per token (64), H backbone width, G timestep grid points, S noise draws per token.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ray_render.models.base import RenderRequest
from ray_render.models.nextstep import vae as vae_lib
from ray_render.models.nextstep.backbone import prefill
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.decoder import Decoder
from ray_render.models.nextstep.model import NextStepModel
from ray_render.models.nextstep.prompts import PromptBuilder
from ray_render.models.nextstep.sampler import (
    SamplerConstants,
    draws_per_token,
    guidance_scales,
    noise_table,
    time_embedding,
    timestep_grid,
)
from ray_render.models.nextstep.step import StepShape

logger = logging.getLogger(__name__)


@dataclass
class Trace:
    """Intermediate tensors of one render, in the fixture's names (for conformance tests and debugging)."""

    input_ids: torch.Tensor | None = None  # (R, L)
    attention_mask: torch.Tensor | None = None  # (R, L)
    cond_hidden: list = field(default_factory=list)  # per token: (R, H)
    head_cond: list = field(default_factory=list)  # per token: (R, H)
    tokens_raw: torch.Tensor | None = None  # (B, N, D) before use_norm
    tokens: torch.Tensor | None = None  # (B, N, D)
    noise: torch.Tensor | None = None  # (B, N, S, D)
    latents: list = field(default_factory=list)  # per image (1, C, 2h, 2w)
    decoded: list = field(default_factory=list)  # per image (1, 3, H, W) float32


@dataclass
class Parts:
    """A loaded NextStep model as the loop uses it, and the rules that lay a request out in rows and tokens."""

    model: NextStepModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    prompts: PromptBuilder
    config: NextStepConfig
    vae_settings: dict  # official VAE config fields (vae.vae_settings)
    noise: str  # "fast" or "reference" (sampler.noise_table)
    device: torch.device
    dtype: torch.dtype
    vae_batch: int  # images per VAE decoder call
    decoder: Decoder  # the token loop, and the buffers and compiled steps it keeps across calls

    @property
    def patch(self) -> int:
        return self.config.latent_patch_size

    @property
    def down_factor(self) -> int:
        """Pixels per token side: the VAE's spatial factor times the latent patch size."""
        return 2 ** (len(self.vae_settings["ch_mult"]) - 1) * self.patch

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (rows, columns) of an image of this size."""
        return int(height) // self.down_factor, int(width) // self.down_factor

    def branches(self, r: RenderRequest) -> int:
        """Guidance rows per image: 3 with image guidance (also at cfg 1: v = cond + (cfg_img - 1) * (img - neg)),
        2 with text guidance, else 1."""
        if r.input_image is not None and r.cfg_img > 1:
            return 3
        return 2 if r.cfg > 1 else 1

    def image_scale(self, r: RenderRequest) -> float:
        # Image guidance needs an image; without one cfg_img has nothing to act on and is 1.
        return float(r.cfg_img) if r.input_image is not None else 1.0

    def batch_key(self, r: RenderRequest) -> Hashable:
        h, w = self.grid(r.height, r.width)
        return (h * w, int(r.num_sampling_steps), self.branches(r), r.input_image is not None)

    def image_string(self, r: RenderRequest) -> str | None:
        """The `<image>` replacement, sized from the input image's own pixels as the official code sizes it."""
        if r.input_pixels is None:
            return None
        return self.prompts.image_string(*self.grid(*r.input_pixels.shape[:2]))

    def texts(self, r: RenderRequest) -> list[str]:
        """The texts of the request's rows, one per guidance branch."""
        return self.prompts.rows(r.prompt, r.positive_prompt, r.negative_prompt, self.branches(r),
                                 self.image_string(r))


def generate(parts: Parts, requests: Sequence[RenderRequest], trace: Trace | None = None,
             batch_limit: int | None = None) -> list[np.ndarray]:
    """One (height, width, 3) uint8 image per request, in order; requests come from `check` (see image_model.py).

    Call under torch.inference_mode(). Fills `trace` when given. `batch_limit` caps the batch bucket a compiled
    step pads to (the memory planner's batch for these requests).
    """
    model, decoder, dev, dtype = parts.model, parts.decoder, parts.device, parts.dtype
    version = parts.config.version

    # 1. Lockstep: every row shares the token count, steps, branches and edit-or-not.
    keys = {parts.batch_key(r) for r in requests}
    if len(keys) > 1:
        raise ValueError(f"requests of one render call must share a batch key, got {sorted(keys)}")
    n_tokens, steps, branches, edit = keys.pop()
    if edit and any(r.input_pixels is None for r in requests):
        raise ValueError("edit requests must come from check(), which decodes their input_image")
    real = len(requests)
    # Compiled steps have fixed shapes: pad to the batch bucket with copies of the last request (dropped below).
    b = decoder.batch_bucket(real, batch_limit)
    requests = list(requests) + [requests[-1]] * (b - real)
    grids = [parts.grid(r.height, r.width) for r in requests]

    # 2. Prompt rows and ids, branch-major: [captions x B, second branch x B, ...].
    per_image = [parts.texts(r) for r in requests]
    texts = [per_image[i][j] for j in range(branches) for i in range(b)]
    ids = parts.prompts.build(texts, [grids[i] for _ in range(branches) for i in range(b)])
    input_ids, keys_ok = ids.input_ids.to(dev), ids.attention_mask.to(dev).bool()  # (R, L), (R, L)
    real_rows = torch.cat([torch.arange(j * b, j * b + real) for j in range(branches)])  # the unpadded rows
    if trace:
        trace.input_ids, trace.attention_mask = ids.input_ids[real_rows], ids.attention_mask[real_rows]

    # 3. One generator per image; an edit's posterior sample is its generator's first draw.
    generators = [torch.Generator(device=dev).manual_seed(int(r.seed)) for r in requests]
    if edit:
        embeds = embed_with_images(parts, requests, input_ids, generators, branches)  # (R, L, H)
    else:
        embeds = model.embed(input_ids)  # (R, L, H)

    # 4. Noise tables, drawn up front per image in the reference order.
    draws = draws_per_token(steps, version)
    noise = torch.stack([noise_table(g, n_tokens, draws, parts.config.token_dim, parts.noise).to(dev)
                         for g in generators])  # (B, N, S, D)
    if trace:
        trace.noise = noise[:real].cpu()

    # 5. Per-row sampler settings as tensors.
    grid_t = torch.stack([timestep_grid(steps, float(r.timesteps_shift), version) for r in requests]).to(dev)
    cfg = torch.tensor([guidance_scales(float(r.cfg), r.cfg_schedule, n_tokens) for r in requests],
                       dtype=torch.float32).T.to(dev)  # (N, B)
    cfg_img = torch.tensor([guidance_scales(parts.image_scale(r), r.cfg_schedule, n_tokens) for r in requests],
                           dtype=torch.float32).T.to(dev)  # (N, B)
    use_norm = torch.tensor([bool(r.use_norm) for r in requests], device=dev)[:, None]  # (B, 1)
    pos_embed = gen_pos_embed(parts, grids, n_tokens, branches)  # (N, R, H) or None

    # 6. The step buffers of this shape (kept from an earlier call when they fit); CUDA graphs captured if new.
    rows, length = input_ids.shape
    shape = StepShape(images=b, branches=branches, tokens=n_tokens, draws=draws, grid=grid_t.shape[1],
                      capacity=decoder.capacity(length, n_tokens))
    buffers = decoder.buffers(shape, model.image_head.net.cond_embed.out_features, pos_embed is not None)
    decoder.prepare(buffers, branches, version, [decoder.window(length + k) for k in range(n_tokens)])
    buffers.load(noise=noise, cfg=cfg, cfg_img=cfg_img, use_norm=use_norm,
                 constants=SamplerConstants(grid_t), time_emb=time_embedding(model.image_head, grid_t, branches, dtype),
                 pos_embed=pos_embed)

    # 7. Prefill the KV cache with the prompt rows; the last position conditions token 0.
    buffers.cond.copy_(prefill(decoder.weights, embeds, keys_ok, buffers.keys, buffers.values))  # (R, H)
    buffers.start(length, keys_ok)

    # 8. Decode one image token per step for every row: sample it from its condition, feed it back.
    real_rows = real_rows.to(dev)

    def record(k: int, before: bool) -> None:
        if before:
            cond = buffers.cond if pos_embed is None else buffers.cond + pos_embed[k]
            trace.cond_hidden.append(cond[real_rows].float().cpu())
        else:
            trace.head_cond.append(buffers.head_cond[real_rows].float().cpu())

    decoder.run(buffers, branches, version, length, n_tokens, record if trace else None)
    tokens = buffers.tokens[:real]  # (B, N, D)
    if trace:
        # Copies: the buffers are the next call's.
        trace.tokens_raw, trace.tokens = buffers.tokens_raw[:real].clone().cpu(), tokens.float().clone().cpu()

    # 9. Decode latents to pixels, images of one size together.
    return decode_images(parts, tokens, grids[:real], trace)


# The steps' parts ------------------------------------------------------------------------------------------------

def embed_with_images(parts: Parts, requests: Sequence[RenderRequest], input_ids: torch.Tensor,
                      generators: list[torch.Generator], branches: int) -> torch.Tensor:
    """Token embeddings (R, L, H) with each input image's tokens at its rows' placeholders (the caption row, and
    the image row with 3 branches). Each copy is its own posterior sample: one draw of (copies, C, h, w) from the
    row's generator, in the VAE's dtype, as the official pipeline draws it."""
    copies = 2 if branches == 3 else 1
    s = parts.vae_settings
    per_copy: list[list[torch.Tensor]] = [[] for _ in range(copies)]
    for r, generator in zip(requests, generators):
        pixels = torch.from_numpy(r.input_pixels).to(parts.device).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        pixels = (pixels / 255 - 0.5) / 0.5
        mean, std = vae_lib.encode_posterior(parts.vae, pixels, bool(s["encoder_norm"]), s["psz"],
                                             bool(s["deterministic"]))  # (1, C, h, w) each
        mean, std = mean.expand(copies, -1, -1, -1), std.expand(copies, -1, -1, -1)  # (copies, C, h, w)
        draw = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        latents = vae_lib.encode_latents(mean, std, draw.to(mean.device), s["scaling_factor"], s["shift_factor"])
        image_tokens = vae_lib.patchify(latents, parts.patch)  # (copies, N_in, D)
        for c in range(copies):
            per_copy[c].append(image_tokens[c])
    # Placeholders in row order: branch 0 (captions) for every image, then branch 1 (image + negative).
    ordered = torch.cat([t for copy in per_copy for t in copy])  # (P, D)
    return parts.model.embed(input_ids, ordered.to(parts.dtype))


def gen_pos_embed(parts: Parts, grids: list[tuple[int, int]], n_tokens: int, branches: int):
    """Per token k and row, the position added to the condition when use_gen_pos_embed is on: (N, R, H) or None."""
    table = parts.model.gen_pos_embed
    if not parts.config.use_gen_pos_embed or table is None:
        return None
    side = parts.config.base_image_grid_size
    index = []
    for _, gw in grids:
        k = torch.arange(n_tokens)
        # NextStep-1 indexes the flattened table by k; NextStep-1.1 crops the (gh, gw) corner of the grid.
        index.append(k if parts.config.version == "1" else (k // gw) * side + (k % gw))
    index = torch.stack(index).repeat(branches, 1).to(parts.device)  # (R, N)
    # The condition of token k gets the position of token k (the prefill condition: position 0).
    return table[0][index.T].to(parts.dtype)  # (N, R, H)


def decode_images(parts: Parts, tokens: torch.Tensor, grids: list[tuple[int, int]],
                  trace: Trace | None) -> list[np.ndarray]:
    """Tokens (B, N, D) -> B uint8 (H, W, 3) images, `parts.vae_batch` images of one size per decoder call."""
    images: list[np.ndarray | None] = [None] * len(grids)
    latents_out, decoded_out = [None] * len(grids), [None] * len(grids)
    scaling, shift = parts.vae_settings["scaling_factor"], parts.vae_settings["shift_factor"]
    by_grid: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(grids):
        by_grid.setdefault(g, []).append(i)
    for (gh, gw), members in by_grid.items():
        for start in range(0, len(members), parts.vae_batch):
            chunk = members[start:start + parts.vae_batch]
            latents, decoded = vae_lib.decode_tokens(parts.vae, tokens[chunk], gh, gw, parts.patch, scaling, shift)
            pixels = vae_lib.to_uint8(decoded).cpu().numpy()  # (b, H, W, 3)
            for j, i in enumerate(chunk):
                images[i] = pixels[j]
                if trace:
                    latents_out[i], decoded_out[i] = latents[j:j + 1].float().cpu(), decoded[j:j + 1].cpu()
    if trace:
        trace.latents, trace.decoded = latents_out, decoded_out
    return images  # type: ignore[return-value]
