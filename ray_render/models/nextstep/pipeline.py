"""NextStepImageModel: a resident NextStep model that renders batches of heterogeneous requests on one device.

Rows of one `render` call share the token count, the step count, the guidance branch count and edit-or-not
(`batch_key`); everything else (prompts, seeds, cfg, cfg_img, schedule, shift, use_norm, size) may differ per
row. Every output image draws its noise from its own torch.Generator seeded with `request.seed`, so a row's image
does not depend on the rest of its batch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ray_render.config import check_render_param
from ray_render.models.base import ModelInfo, ModelOutOfMemory, RenderRequest, RowError
from ray_render.models.nextstep import snapshot as snap
from ray_render.models.nextstep import vae as vae_lib
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.model import NextStepModel, short_listing
from ray_render.models.nextstep.prompts import IMAGE_TAG, PromptBuilder
from ray_render.models.nextstep.resolve import resolve, resolve_vae
from ray_render.models.nextstep.sampler import (GraphedTokenSampler, TokenSampler, draws_per_token,
                                                guidance_scales, noise_table, timestep_grid)

logger = logging.getLogger(__name__)

NOISE_MODES = ("fast", "reference")
# Published defaults (NEXTSTEP.md): NextStep-1 and NextStep-1.1; edit models add shift 3.2 and cfg_img 2.0.
VERSION_DEFAULTS = {
    "1": {"num_sampling_steps": 50, "cfg": 7.5, "use_norm": True, "timesteps_shift": 1.0, "width": 512,
          "height": 512, "cfg_schedule": "constant"},
    "1.1": {"num_sampling_steps": 28, "cfg": 7.5, "use_norm": False, "timesteps_shift": 1.0, "width": 512,
            "height": 512, "cfg_schedule": "constant"},
}
EDIT_DEFAULTS = {"timesteps_shift": 3.2, "cfg_img": 2.0}
SMALL_MODEL_HIDDEN = 1024  # at or below this width, CPU renders run on one thread (see _cpu_threads)


@dataclass
class Trace:
    """Intermediate tensors of one render, in the fixture's names (for conformance tests and debugging)."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    cond_hidden: list = field(default_factory=list)  # per token: (R, hidden)
    head_cond: list = field(default_factory=list)
    tokens_raw: torch.Tensor | None = None  # (B, N, D) before use_norm
    tokens: torch.Tensor | None = None
    noise: torch.Tensor | None = None  # (B, N, draws, D)
    latents: list = field(default_factory=list)  # per image (1, C, 2h, 2w)
    decoded: list = field(default_factory=list)  # per image (1, 3, H, W) float32


class NextStepImageModel:
    """base.ImageModel for NextStep checkpoints (text to image, and editing with an input image)."""

    def __init__(self, model: NextStepModel, vae, tokenizer, config: NextStepConfig, vae_config: dict,
                 info: ModelInfo, defaults: dict, noise: str = "fast", has_encoder: bool = True,
                 cpu_threads: int | None = None, vae_batch: int | None = None, cuda_graphs: bool = False):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
        self.model, self.vae, self.tokenizer, self.config = model, vae, tokenizer, config
        self.vae_settings = vae_lib.vae_settings(vae_config)
        self.info, self._defaults, self.noise, self.has_encoder = info, dict(defaults), noise, has_encoder
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.patch = config.latent_patch_size
        self.down_factor = 2 ** (len(self.vae_settings["ch_mult"]) - 1) * self.patch  # pixels per token side
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self.prompts = PromptBuilder(tokenizer, config.boi, config.eoi, config.image_placeholder_id, pad_id,
                                     add_bos_text=config.version == "1.1")
        if cpu_threads is None and self.device.type == "cpu" and config.hidden_size <= SMALL_MODEL_HIDDEN:
            cpu_threads = 1  # tiny matmuls gain nothing from threads and lose a lot to contention
        self.cpu_threads = cpu_threads
        self.vae_batch = vae_batch or (4 if self.device.type == "cuda" else 16)
        self.cuda_graphs = cuda_graphs  # opt-in: see sampler.GraphedTokenSampler

    # base.ImageModel ------------------------------------------------------------------------------------------

    def defaults(self) -> dict:
        return dict(self._defaults)

    def check(self, request: RenderRequest) -> None:
        """Raise RowError naming the field and the allowed values."""
        def fail(msg: str):
            raise RowError(f"{request.key}: {msg}")

        for name in ("prompt", "negative_prompt", "positive_prompt"):
            if not isinstance(getattr(request, name), str):
                fail(f"{name} must be a string, got {type(getattr(request, name)).__name__}")
        for name in ("width", "height", "cfg", "cfg_img", "cfg_schedule", "use_norm", "timesteps_shift",
                     "num_sampling_steps"):
            try:
                check_render_param(name, getattr(request, name))
            except ValueError as e:
                fail(str(e))
        for name in ("width", "height"):
            if getattr(request, name) % self.down_factor:
                fail(f"{name} must be a multiple of {self.down_factor} for this model, got {getattr(request, name)}")
        if isinstance(request.seed, bool) or not isinstance(request.seed, (int, np.integer)) \
                or not -(2**63) <= int(request.seed) < 2**64:
            fail(f"seed must be an integer from -2**63 to 2**64-1, got {request.seed!r}")
        tags = request.prompt.count(IMAGE_TAG)
        if request.input_image is not None:
            if not self.has_encoder:
                fail("input_image: this model's VAE has no encoder, so it cannot edit images; "
                     "remove input_image and <image> or use an editing model (e.g. NextStep-1-Large-Edit)")
            if tags != 1:
                fail(f"prompt must contain exactly one {IMAGE_TAG} when input_image is given (found {tags})")
            self._load_image(request)
        elif tags:
            fail(f"prompt contains {IMAGE_TAG} but no input_image was given; add input_image or remove {IMAGE_TAG}")
        for name in ("negative_prompt", "positive_prompt"):
            if IMAGE_TAG in getattr(request, name):
                fail(f"{name} must not contain {IMAGE_TAG}")
        n_tokens = self._grid(request)[0] * self._grid(request)[1]
        longest = max(self.prompts.count(t) for t in self._texts(request))
        if longest + 8 + n_tokens > self.config.max_position_embeddings:
            fail(f"prompt plus {n_tokens} image tokens exceeds the model's context of "
                 f"{self.config.max_position_embeddings} tokens; shorten the prompt or render smaller")

    def batch_key(self, request: RenderRequest) -> Hashable:
        h, w = self._grid(request)
        return (h * w, int(request.num_sampling_steps), self._branches(request), request.input_image is not None)

    def render(self, requests: Sequence[RenderRequest]) -> list[np.ndarray]:
        """One (height, width, 3) uint8 image per request, in order."""
        images, _ = self.generate(requests)
        return images

    # Rendering -----------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[RenderRequest], trace: bool = False) -> tuple[list[np.ndarray], Trace | None]:
        """Render and optionally keep the intermediate tensors (see Trace)."""
        if not requests:
            return [], None
        try:
            with torch.inference_mode(), _cpu_threads(self.cpu_threads if self.device.type == "cpu" else None):
                return self._generate(list(requests), Trace() if trace else None)
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ModelOutOfMemory(f"out of device memory rendering {len(requests)} images of "
                                   f"{requests[0].width}x{requests[0].height}; retry with a smaller batch") from e

    def _generate(self, requests: list[RenderRequest], trace: Trace | None):
        # 1. Check inputs: every row valid, all rows in lockstep.
        for r in requests:
            self.check(r)
        keys = {self.batch_key(r) for r in requests}
        if len(keys) > 1:
            raise ValueError(f"requests of one render call must share a batch key, got {sorted(keys)}")
        n_tokens, steps, branches, edit = keys.pop()
        b, dev, dtype, version = len(requests), self.device, self.dtype, self.config.version
        grids = [self._grid(r) for r in requests]

        # 2. Prompt rows and ids: R = branches * B rows, branch-major.
        image_strs = [self.prompts.image_string(*g) if edit else None for g in grids]
        per_image = [self._texts(r, s) for r, s in zip(requests, image_strs)]
        texts = [per_image[i][j] for j in range(branches) for i in range(b)]
        ids = self.prompts.build(texts, [grids[i] for _ in range(branches) for i in range(b)])
        input_ids, attn = ids.input_ids.to(dev), ids.attention_mask.to(dev)
        if trace:
            trace.input_ids, trace.attention_mask = ids.input_ids, ids.attention_mask

        # 3. Per-image generators; an edit's encoder sample is each generator's first draw.
        gen_device = "cpu" if self.noise == "reference" else dev
        generators = [torch.Generator(device=gen_device).manual_seed(int(r.seed)) for r in requests]
        embeds = self.model.embed(input_ids)
        if edit:
            embeds = self._embed_images(requests, input_ids, embeds, generators, branches)

        # 4. Noise tables, drawn per image in the reference order: (B, N, draws, D).
        draws = draws_per_token(steps, version)
        noise = torch.stack([noise_table(g, n_tokens, draws, self.config.token_dim, self.noise).to(dev)
                             for g in generators])
        if trace:
            trace.noise = noise.cpu()

        # 5. Per-row sampler settings as tensors.
        sampler = TokenSampler(
            self.model.image_head,
            grids=torch.stack([timestep_grid(steps, float(r.timesteps_shift), version) for r in requests]).to(dev),
            cfg=torch.tensor([guidance_scales(float(r.cfg), r.cfg_schedule, n_tokens) for r in requests],
                             dtype=torch.float32).T.to(dev),
            cfg_img=torch.tensor([guidance_scales(self._cfg_img(r), r.cfg_schedule, n_tokens) for r in requests],
                                 dtype=torch.float32).T.to(dev),
            branches=branches, version=version, dtype=dtype)
        use_norm = torch.tensor([bool(r.use_norm) for r in requests], device=dev)[:, None]
        pos_embed = self._gen_pos_embed(grids, n_tokens, branches)  # (N, R, hidden) or None

        # 6. Prefill the KV cache with the prompt rows.
        backbone = self.model.backbone
        rows, length = input_ids.shape
        cache_len = length + n_tokens - 1  # the last token is never fed back
        cache = _new_cache(backbone.config, cache_len)
        keys_ok = attn.bool()
        causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
        prefill_mask = torch.zeros(rows, 1, length, cache_len, dtype=torch.bool, device=dev)
        prefill_mask[:, 0, :, :length] = causal & keys_ok[:, None, :]
        # Pad queries see no key; let them see themselves so no row is fully masked (their outputs are unused).
        diagonal = torch.arange(length, device=dev)
        prefill_mask[:, 0, diagonal, diagonal] = True
        positions = torch.arange(length, device=dev).expand(rows, length)
        out = backbone(inputs_embeds=embeds, attention_mask={"full_attention": prefill_mask},
                       position_ids=positions, past_key_values=cache, use_cache=True)
        cond = out.last_hidden_state[:, -1]  # (R, hidden)

        # 7. Decode: one image token per step, every row at once.
        step_mask = torch.zeros(rows, 1, 1, cache_len, dtype=torch.bool, device=dev)
        step_mask[:, 0, 0, :length] = keys_ok
        tokens = torch.empty(b, n_tokens, self.config.token_dim, dtype=dtype, device=dev)
        tokens_raw = [] if trace else None
        for k in range(n_tokens):
            if pos_embed is not None:
                cond = cond + pos_embed[k]
            head_cond = self.model.image_out_projector(cond)
            if k == 0 and self.cuda_graphs and dev.type == "cuda":
                sampler = self._graphed(sampler, head_cond, noise[:, 0])
            x = sampler.sample(head_cond, noise[:, k], k)
            raw = x.to(dtype)
            token = torch.where(use_norm, F.layer_norm(raw, raw.shape[-1:], None, None, 1e-6), raw)
            tokens[:, k] = token
            if trace:
                trace.cond_hidden.append(cond.float().cpu())
                trace.head_cond.append(head_cond.float().cpu())
                tokens_raw.append(raw.float().cpu())
            if k == n_tokens - 1:
                break
            feed = self.model.image_in_projector(token)
            if branches > 1:
                feed = feed.repeat(branches, 1)
            step_mask[:, 0, 0, length + k] = True
            out = backbone(inputs_embeds=feed[:, None], attention_mask={"full_attention": step_mask},
                           position_ids=torch.full((rows, 1), length + k, device=dev), past_key_values=cache,
                           use_cache=True)
            cond = out.last_hidden_state[:, -1]
        del cache
        if trace:
            trace.tokens_raw, trace.tokens = torch.stack(tokens_raw, 1), tokens.float().cpu()

        # 8. Decode latents to pixels, grouping images of the same size.
        images: list[np.ndarray | None] = [None] * b
        latents_out, decoded_out = [None] * b, [None] * b
        scaling, shift = self.vae_settings["scaling_factor"], self.vae_settings["shift_factor"]
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        for (gh, gw), members in by_grid.items():
            for start in range(0, len(members), self.vae_batch):
                chunk = members[start:start + self.vae_batch]
                latents, decoded = vae_lib.decode_tokens(self.vae, tokens[chunk], gh, gw, self.patch, scaling, shift)
                pixels = vae_lib.to_uint8(decoded).cpu().numpy()
                for j, i in enumerate(chunk):
                    images[i] = pixels[j]
                    if trace:
                        latents_out[i], decoded_out[i] = latents[j:j + 1].float().cpu(), decoded[j:j + 1].cpu()
        if trace:
            trace.latents, trace.decoded = latents_out, decoded_out
        return images, trace

    # Helpers ---------------------------------------------------------------------------------------------------

    def _graphed(self, sampler: TokenSampler, head_cond: torch.Tensor, noise: torch.Tensor):
        """The CUDA-graph sampler when it captures and agrees with the eager one; else the eager sampler."""
        try:
            graphed = GraphedTokenSampler(sampler, head_cond, noise)
            if graphed.verified(head_cond, noise):
                return graphed
            logger.warning("CUDA graph of the token sampler disagrees with eager mode; using eager mode")
        except Exception as e:  # noqa: BLE001 - capture is an optimisation: never fail a render over it
            logger.warning("CUDA graph capture of the token sampler failed (%s); using eager mode", e)
        self.cuda_graphs = False
        return sampler

    def _grid(self, r: RenderRequest) -> tuple[int, int]:
        """The image's token grid (rows, columns)."""
        return int(r.height) // self.down_factor, int(r.width) // self.down_factor

    def _cfg_img(self, r: RenderRequest) -> float:
        # Image guidance needs an image; without one cfg_img has nothing to act on and is 1.
        return float(r.cfg_img) if r.input_image is not None else 1.0

    def _branches(self, r: RenderRequest) -> int:
        if r.input_image is not None and r.cfg_img > 1:
            return 3  # also for cfg == 1: v = cond + (cfg_img - 1) * (img - neg)
        return 2 if r.cfg > 1 else 1

    def _texts(self, r: RenderRequest, image_str: str | None = None) -> list[str]:
        if r.input_image is not None and image_str is None:
            image_str = self.prompts.image_string(*self._grid(r))
        return self.prompts.rows(r.prompt, r.positive_prompt, r.negative_prompt, self._branches(r), image_str)

    def _load_image(self, r: RenderRequest) -> torch.Tensor:
        """input_image bytes -> (3, height, width) float32 in [-1, 1]: centre-cropped to the request's aspect
        ratio and resized (bicubic) to its size; an image already of that size is used as it is."""
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(r.input_image))
            img.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise RowError(f"{r.key}: input_image is not a readable PNG/JPEG/WebP image ({e})") from None
        img = img.convert("RGB")
        w, h = img.size
        target = r.width / r.height
        if abs(w / h - target) > 1e-6:
            if w / h > target:
                cw = round(h * target)
                img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
            else:
                ch = round(w / target)
                img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
        if img.size != (r.width, r.height):
            img = img.resize((r.width, r.height), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return (arr / 255 - 0.5) / 0.5

    def _embed_images(self, requests, input_ids, embeds, generators, branches):
        """Write each input image's tokens into its rows' placeholders (caption row, and the image row with 3
        branches). Each copy is its own posterior sample: one draw of (copies, C, h, w) from the row's generator."""
        copies = 2 if branches == 3 else 1
        s = self.vae_settings
        image_tokens = [[None] * len(requests) for _ in range(copies)]
        for i, r in enumerate(requests):
            pixels = self._load_image(r).to(self.device)[None]
            mean, std = vae_lib.encode_posterior(self.vae, pixels, bool(s["encoder_norm"]), s["psz"])
            mean, std = mean.expand(copies, -1, -1, -1), std.expand(copies, -1, -1, -1)
            draw = torch.randn(mean.shape, generator=generators[i], device=generators[i].device)
            latents = vae_lib.encode_latents(mean.float(), std.float(), draw.to(self.device), s["scaling_factor"],
                                             s["shift_factor"])
            toks = vae_lib.patchify(latents, self.patch)  # (copies, N, D)
            for c in range(copies):
                image_tokens[c][i] = toks[c]
        # Placeholder rows in row order: branch 0 (captions), then branch 1 (image + negative) if present.
        ordered = [t for c in range(copies) for t in image_tokens[c]]
        return self.model.embed(input_ids, torch.cat(ordered).to(self.dtype))

    def _gen_pos_embed(self, grids, n_tokens: int, branches: int):
        """Per token k and row, the position added to the condition when use_gen_pos_embed is on."""
        table = self.model.gen_pos_embed
        if not self.config.use_gen_pos_embed or table is None:
            return None
        side = self.config.base_image_grid_size
        index = []
        for gh, gw in grids:
            k = torch.arange(n_tokens)
            # NextStep-1 indexes the flattened table by k; NextStep-1.1 crops the (gh, gw) corner of the grid.
            index.append(k if self.config.version == "1" else (k // gw) * side + (k % gw))
        index = torch.stack(index).repeat(branches, 1).to(self.device)  # (R, N)
        # The condition of token k gets the position of token k (the prefill condition: position 0).
        return table[0][index.T].to(self.dtype)  # (N, R, hidden)


def _names_an_edit_model(name: str) -> bool:
    """NextStep-1-Large-Edit and the like: the word "edit" in the last part of the name."""
    last = name.rstrip("/").rsplit("/", 1)[-1].lower()
    return re.search(r"(?<![a-z])edit(?![a-z])", last) is not None


def _new_cache(backbone_config, max_len: int):
    from transformers.cache_utils import StaticCache

    return StaticCache(config=backbone_config, max_cache_len=max_len)


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Loading -------------------------------------------------------------------------------------------------------

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def build_model(config: NextStepConfig, device: torch.device, dtype: torch.dtype,
                attn_implementation: str = "sdpa") -> NextStepModel:
    """An uninitialised NextStepModel allocated directly on `device` in `dtype` (no float32 copy on the way:
    the 14B backbone would not fit a GPU twice)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    with torch.device("meta"):
        model = NextStepModel(config, attn_implementation=attn_implementation)
    model = model.to(dtype=dtype).to_empty(device=device)
    # Non-persistent buffers do not survive the meta device: rebuild them.
    model.backbone.rotary_emb = Qwen2RotaryEmbedding(config=model.backbone.config).to(device)
    if model.gen_pos_embed is not None:
        from ray_render.models.nextstep.model import sincos_pos_embed_2d

        table = sincos_pos_embed_2d(config.hidden_size, config.base_image_grid_size)
        model.gen_pos_embed = torch.from_numpy(table).float()[None].to(device)
    return model.eval()


def load_vae(vae_dir: Path, device: torch.device, dtype: torch.dtype):
    """(diffusers AutoencoderKL, official vae config, has_encoder) from a VAE directory."""
    vae_config, official = snap.read_vae(vae_dir)
    vae = vae_lib.build_autoencoder(vae_config)
    sd = vae_lib.official_to_diffusers(official)
    has_encoder = any(k.startswith("encoder.") for k in sd)
    if not has_encoder:
        vae.encoder = None  # a decoder-only checkpoint: text to image only
    expected = vae.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {list(sd[k].shape)} (expected {list(expected[k].shape)})"
                   for k in expected if k in sd and sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        # Report names as they appear in checkpoint.pt (official naming).
        def official(names):
            return sorted(vae_lib.diffusers_to_official({k: expected.get(k, sd.get(k)) for k in names}))

        parts = []
        if missing:
            parts.append("missing tensors: " + short_listing(official(missing)))
        if unexpected:
            parts.append("unexpected tensors: " + short_listing(official(unexpected)))
        if wrong:
            parts.append("wrong shapes: " + short_listing(wrong))
        raise snap.SnapshotError(f"{vae_dir / snap.VAE_WEIGHTS_FILE} does not match "
                                 f"{vae_dir / snap.VAE_CONFIG_FILE}: " + "; ".join(parts))
    vae.load_state_dict(sd)
    # nn.Module.to, not diffusers' override, which warns about float32 modules this VAE does not have.
    vae = torch.nn.Module.to(vae, device=device, dtype=dtype)
    return vae.eval(), vae_config, has_encoder


def load_nextstep(name: str, *, vae: str | None = None, revision: str | None = None, device: str = "auto",
                  dtype: str = "auto", noise: str = "fast", storage_options: dict | None = None,
                  cpu_threads: int | None = None, attn_implementation: str = "sdpa",
                  cuda_graphs: bool = False) -> NextStepImageModel:
    """Load a NextStep snapshot ("tiny", a directory, a hub repo id or an fsspec URL) as an ImageModel.

    vae overrides config.json's vae_name_or_path (a directory, repo id or URL); revision picks a hub revision;
    dtype "auto" is bfloat16 on CUDA and float32 elsewhere; noise is "fast" or "reference" (see sampler.py).
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    found = resolve(name, revision=revision, storage_options=storage_options)
    directory = found.path
    config = snap.read_config(directory)
    vae_dir = resolve_vae(vae, directory, config.vae_name_or_path, storage_options=storage_options)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = build_model(config, dev, torch_dtype, attn_implementation)
    snap.load_weights(model, directory)
    tokenizer = snap.load_tokenizer(directory)
    # Rows are never truncated (as in the reference); check() bounds them by the model's context instead.
    tokenizer.model_max_length = config.max_position_embeddings
    vae_model, vae_config, has_encoder = load_vae(vae_dir, dev, torch_dtype)
    defaults = dict(VERSION_DEFAULTS[config.version])
    if _names_an_edit_model(name):
        defaults.update(EDIT_DEFAULTS)
    defaults.update(snap.read_render_defaults(directory))
    outside_vae = [] if vae_dir.is_relative_to(directory) else [vae_dir]
    revision_id = found.revision or snap.fingerprint(directory, *outside_vae)
    info = ModelInfo(name=name, family="nextstep", revision=revision_id, device=str(dev),
                     dtype=str(torch_dtype).replace("torch.", ""))
    return NextStepImageModel(model, vae_model, tokenizer, config, vae_config, info, defaults, noise=noise,
                              has_encoder=has_encoder, cpu_threads=cpu_threads, cuda_graphs=cuda_graphs)
