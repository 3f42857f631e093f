"""Train the tiny NextStep-1 model that ships as `--model tiny`, on pictures of coloured shapes.

    python -m ray_render.models.nextstep.train_tiny --out DIR [--minutes N] [--seed S] [--threads T]

Four stages, each printing its progress, then one snapshot in the official layout (the same files a released
NextStep-1 checkpoint has, read by the same loader):

1. Tokenizer: a byte-level BPE in the Qwen2 style trained on the captions, then the ten NextStep special tokens.
2. VAE: a small Flux-style f8 autoencoder with 16 latent channels (diffusers' AutoencoderKL as the runtime
   builds it), trained to reconstruct the pictures. Its latents are layer-normed per 2x2 patch (`encoder_norm`),
   so every image token has zero mean and unit variance over its 64 values; the model renders with
   `use_norm` on, which keeps sampled tokens on that same sphere.
3. Image tokens of a fixed set of training pictures, encoded once.
4. Backbone + projectors + flow-matching head (the runtime's `NextStepModel`), teacher-forced: the condition of
   image token k is image_out_projector(the final hidden state before it), and the head learns the velocity
   x1 - noise at x_t = t*x1 + (1-t)*noise. Captions are dropped to "" now and then, which is what the
   unconditional row of classifier-free guidance renders with.

Pictures and captions come from `ray_render.models.nextstep.shapes` (training combinations only: the held-out ones
are left for `ray_render.tools.adherence`). A run is deterministic for a given seed, thread count and torch build.
`--minutes` is the budget on a 2-core CPU: it scales the number of steps of every stage (a fixed number per minute),
it does not stop on the clock, so the same command always trains the same weights.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ray_render.models.nextstep import shapes, snapshot
from ray_render.models.nextstep import vae as vae_lib
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.model import NextStepModel
from ray_render.models.nextstep.prompts import PromptBuilder

# The Qwen2 pre-tokenizer split: contractions, letters with one leading non-letter, single digits, punctuation.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# NextStep's special tokens, in the order of the released tokenizers; they take the ids after the BPE vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|image_placeholder|>", "<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>",
                  "<|begin_of_thinking|>", "<|end_of_thinking|>")

# The VAE, in the official AutoEncoderParams fields. scaling 1 / shift 0: the patch layer norm already puts the
# latents at unit scale, so image tokens are the normed latents themselves.
VAE_CONFIG = {
    "resolution": shapes.SIZE, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 1, 2, 1],
    "num_res_blocks": 1, "z_channels": 16, "scaling_factor": 1.0, "shift_factor": 0.0, "deterministic": False,
    "encoder_norm": True, "psz": 2,
}

# The tiny model's native render settings, chosen with `ray_render.tools.adherence` (see the README's figures).
RENDER_DEFAULTS = {"width": shapes.SIZE, "height": shapes.SIZE, "num_sampling_steps": 20, "cfg": 3.0,
                   "cfg_schedule": "constant", "use_norm": True, "timesteps_shift": 1.0}

DEFAULT_MINUTES = 22.0


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of a run; the step counts are those of DEFAULT_MINUTES."""

    # Tokenizer
    bpe_vocab: int = 512  # an upper bound: the captions' few words stop the merges well before it
    # VAE
    vae_crop_steps: int = 900  # steps on 32x32 crops (4x cheaper than whole pictures) ...
    vae_full_steps: int = 150  # ... then on whole 64x64 pictures, so the mid-block attention sees the full grid
    vae_crop_batch: int = 32
    vae_full_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-3  # small: the posterior std settles where it barely hurts reconstruction
    # Training pictures for the backbone, encoded once
    num_pictures: int = 8192
    # Backbone (Qwen2) and head
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_width: int = 128
    head_depth: int = 3
    # Backbone training
    steps: int = 6500
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    caption_dropout: float = 0.12  # share of captions replaced by "" (the unconditional row of guidance)
    head_batch_mul: int = 4  # noise levels drawn per image token and step, as the released training does
    # Noise (std, at most) added to the teacher-forced input tokens, which are then normed again: at render time
    # the model reads back its own samples, which are never exactly the pictures' tokens.
    input_noise: float = 0.3

    def scaled(self, minutes: float) -> Recipe:
        """The same recipe with every stage's step count scaled to a budget of `minutes`."""
        f = minutes / DEFAULT_MINUTES
        return replace(self, vae_crop_steps=max(1, round(self.vae_crop_steps * f)),
                       vae_full_steps=max(1, round(self.vae_full_steps * f)),
                       num_pictures=max(256, round(self.num_pictures * min(1.0, f))),
                       steps=max(1, round(self.steps * f)), warmup=max(1, round(self.warmup * min(1.0, f))))


def log(message: str) -> None:
    print(message, flush=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then a cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], as the VAE sees pictures."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# 1. Tokenizer ---------------------------------------------------------------------------------------------------

def train_tokenizer(recipe: Recipe):
    """A Qwen2-style byte-level BPE on the caption corpus, with NextStep's special tokens after the BPE ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.bpe_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(shapes.corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="[PAD]",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]), padding_side="left", model_max_length=512,
        clean_up_tokenization_spaces=False)


# 2. VAE ---------------------------------------------------------------------------------------------------------

def norm_patches(latents: torch.Tensor, psz: int) -> torch.Tensor:
    """Layer-norm each psz x psz latent patch over its channels (no affine): the `encoder_norm` of the runtime."""
    grouped = vae_lib.space_to_depth(latents, psz)
    grouped = F.layer_norm(grouped.permute(0, 2, 3, 1), grouped.shape[1:2], None, None, 1e-6).permute(0, 3, 1, 2)
    return vae_lib.depth_to_space(grouped, psz)


def train_vae(recipe: Recipe, seed: int):
    """Train the autoencoder on shape pictures: 32x32 crops, then whole pictures. Returns it in eval mode.

    The decoder always sees patch-normed latents, as it will at render time (use_norm), drawn from the posterior
    (mean + std * noise), so it learns to draw clean pictures from slightly-off tokens too.
    """
    vae = vae_lib.build_autoencoder(VAE_CONFIG)
    psz = VAE_CONFIG["psz"]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    crop_rng = np.random.default_rng(seed + 2)
    total = recipe.vae_crop_steps + recipe.vae_full_steps
    started = time.perf_counter()
    for step in range(total):
        set_lr(optimizer, cosine_lr(step, total, recipe.vae_lr, warmup=50, floor=0.05))
        crop = step < recipe.vae_crop_steps
        images, _, _ = shapes.make_batch(recipe.vae_crop_batch if crop else recipe.vae_full_batch,
                                         seed=seed * 1_000_003 + step, split="train")
        x = to_pixels(images)
        if crop:  # a 32x32 window on the 16-pixel token grid, so crops cut along token boundaries
            oy, ox = crop_rng.integers(0, 3, size=2) * 16
            x = x[:, :, oy:oy + 32, ox:ox + 32]
        mean, logvar = vae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        mean = norm_patches(mean, psz)
        noise = torch.randn(mean.shape, generator=generator)
        z = norm_patches(mean + torch.exp(0.5 * logvar) * noise, psz)
        y = vae.decoder(z)
        reconstruction = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        kl = 0.5 * (logvar.exp() - 1.0 - logvar).mean()  # the mean's part is constant once normed
        loss = reconstruction + recipe.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == total - 1:
            log(f"  vae step {step + 1}/{total} {'crops' if crop else 'whole'}: reconstruction "
                f"{reconstruction.item():.4f}, posterior std {torch.exp(0.5 * logvar).mean().item():.3f} "
                f"({time.perf_counter() - started:.0f} s)")
    return vae.eval()


@torch.no_grad()
def encode_tokens(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Pictures (B, H, W, 3) uint8 -> image tokens (B, N, 64): the patch-normed posterior means."""
    out = []
    for start in range(0, len(images), batch):
        mean, _ = vae_lib.encode_posterior(vae, to_pixels(images[start:start + batch]), True, VAE_CONFIG["psz"])
        latents = vae_lib.encode_latents(mean, None, None, VAE_CONFIG["scaling_factor"],
                                         VAE_CONFIG["shift_factor"])
        out.append(vae_lib.patchify(latents, VAE_CONFIG["psz"]))
    return torch.cat(out)


@torch.no_grad()
def reconstruction_error(vae, seed: int, n: int = 64) -> float:
    """Mean absolute pixel error (0-255) of encode + decode on held-out-combination pictures."""
    images, _, _ = shapes.make_batch(n, seed=seed, split="heldout")
    tokens = encode_tokens(vae, images)
    grid = shapes.SIZE // 16
    _, decoded = vae_lib.decode_tokens(vae, tokens, grid, grid, VAE_CONFIG["psz"], VAE_CONFIG["scaling_factor"],
                                       VAE_CONFIG["shift_factor"])
    return float((vae_lib.to_uint8(decoded).float() - torch.from_numpy(images).float()).abs().mean())


# 3-4. Backbone + projectors + head ------------------------------------------------------------------------------

def model_config(recipe: Recipe, tokenizer) -> NextStepConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    return NextStepConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=4096, fm_head_dim=recipe.head_width, fm_head_layers=recipe.head_depth,
        boi=ids["<|begin_of_image|>"], eoi=ids["<|end_of_image|>"],
        image_placeholder_id=ids["<|image_placeholder|>"], pad_token_id=ids["[PAD]"], bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"], vae_name_or_path="vae", torch_dtype="float32",
        extra={"latent_size": shapes.SIZE // 8, "fm_head_batch_mul": recipe.head_batch_mul},
    )


def build_model(config: NextStepConfig, seed: int) -> NextStepModel:
    """A freshly initialised model; the head starts as the identity blocks + zero output of the released init."""
    torch.manual_seed(seed)
    model = NextStepModel(config, with_lm_head=True, attn_implementation="sdpa")
    net = model.image_head.net
    with torch.no_grad():
        for block in net.res_blocks:
            block.adaLN_modulation[1].weight.zero_()
            block.adaLN_modulation[1].bias.zero_()
        net.final_layer.adaLN_modulation[1].weight.zero_()
        net.final_layer.adaLN_modulation[1].bias.zero_()
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.bias.zero_()
    return model


def sequence_mask(prompt_mask: torch.Tensor, n_image: int) -> torch.Tensor:
    """The (B, 1, T, T) boolean attention of prompt + image inputs: causal, padding keys hidden, and each pad query
    sees itself (as at render time) so that no row of the softmax is empty."""
    b, length = prompt_mask.shape
    total = length + n_image
    keys = torch.cat([prompt_mask.bool(), torch.ones(b, n_image, dtype=torch.bool)], dim=1)
    mask = torch.ones(total, total, dtype=torch.bool).tril()[None] & keys[:, None, :]
    diagonal = torch.arange(total)
    mask[:, diagonal, diagonal] = True
    return mask[:, None]


def train_backbone(model: NextStepModel, tokenizer, tokens: torch.Tensor, scenes: list, recipe: Recipe,
                   seed: int) -> None:
    """Teacher-forced flow matching on (caption, image tokens) pairs; captions are re-worded every time."""
    config = model.config
    prompts = PromptBuilder(tokenizer, config.boi, config.eoi, config.image_placeholder_id, config.pad_token_id)
    grid = (shapes.SIZE // 16, shapes.SIZE // 16)
    n_tokens = grid[0] * grid[1]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed + 3)
    generator = torch.Generator().manual_seed(seed + 4)
    model.train()
    started, running = time.perf_counter(), []
    for step in range(recipe.steps):
        set_lr(optimizer, cosine_lr(step, recipe.steps, recipe.lr, recipe.warmup))
        # 1. A batch of pictures, each with a fresh wording of its caption (or "" for the unconditional row).
        picks = rng.integers(len(scenes), size=recipe.batch)
        texts = []
        for i in picks:
            if rng.random() < recipe.caption_dropout:
                texts.append("")
            else:
                texts.append(shapes.caption(scenes[i], template=int(rng.integers(3)),
                                            say_position=bool(rng.random() < 0.8), say_size=bool(rng.random() < 0.8)))
        ids = prompts.build(texts, [grid] * len(texts))
        target = tokens[torch.from_numpy(picks)]  # (B, N, D)
        # 2. Inputs: the prompt, then image tokens 0..N-2 through image_in_projector (teacher forcing).
        inputs = target[:, :-1]
        if recipe.input_noise > 0:
            sigma = recipe.input_noise * torch.rand((inputs.shape[0], 1, 1), generator=generator)
            inputs = inputs + sigma * torch.randn(inputs.shape, generator=generator)
            inputs = F.layer_norm(inputs, inputs.shape[-1:], None, None, 1e-6)
        embeds = torch.cat([model.embed(ids.input_ids), model.image_in_projector(inputs)], dim=1)
        length = ids.input_ids.shape[1]
        hidden = model(embeds, attention_mask={"full_attention": sequence_mask(ids.attention_mask, n_tokens - 1)})
        # 3. The condition of token k is the output at the position before it: slots length-1 ... length+N-2.
        cond = model.image_out_projector(hidden[:, length - 1:])  # (B, N, hidden)
        rows = target.reshape(-1, target.shape[-1]).repeat(recipe.head_batch_mul, 1)
        conds = cond.reshape(-1, cond.shape[-1]).repeat(recipe.head_batch_mul, 1)
        loss = model.image_head.loss(rows, conds, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"  model step {step + 1}/{recipe.steps}: flow loss {np.mean(running):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
            running = []
    model.eval()


# Putting it together --------------------------------------------------------------------------------------------

def train(out: str | Path, minutes: float = DEFAULT_MINUTES, seed: int = 0, threads: int = 1,
          recipe: Recipe | None = None) -> Path:
    """Run every stage and write the snapshot to `out`; returns its path."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    recipe = recipe or Recipe().scaled(minutes)
    started = time.perf_counter()
    log(f"training the tiny NextStep model: seed {seed}, {threads} threads, budget {minutes:g} min")

    log("1/4 tokenizer")
    tokenizer = train_tokenizer(recipe)
    log(f"  {len(tokenizer) - len(SPECIAL_TOKENS)} BPE tokens + {len(SPECIAL_TOKENS)} special tokens")

    log(f"2/4 VAE ({recipe.vae_crop_steps} + {recipe.vae_full_steps} steps)")
    vae = train_vae(recipe, seed)
    log(f"  reconstruction error on held-out combinations: {reconstruction_error(vae, seed + 5):.2f}/255")

    log(f"3/4 image tokens of {recipe.num_pictures} training pictures")
    images, _, scenes = shapes.make_batch(recipe.num_pictures, seed=seed + 6, split="train")
    tokens = encode_tokens(vae, images)
    del images

    config = model_config(recipe, tokenizer)
    model = build_model(config, seed)
    size = sum(p.numel() for p in model.parameters())
    log(f"4/4 backbone + head ({size / 1e6:.2f} M parameters, {recipe.steps} steps of {recipe.batch})")
    train_backbone(model, tokenizer, tokens, scenes, recipe, seed)

    path = snapshot.write_snapshot(out, config, model.official_state_dict(), tokenizer, dict(VAE_CONFIG),
                                   vae_lib.diffusers_to_official(vae.state_dict()), render_defaults=RENDER_DEFAULTS)
    log(f"wrote {path} in {(time.perf_counter() - started) / 60:.1f} min")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_render.models.nextstep.train_tiny",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the snapshot to")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help=f"budget on a 2-core CPU; scales every stage's steps (default {DEFAULT_MINUTES:g})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the weights depend on it (default 1: on a shared 2-core machine a "
                             "second thread mostly waits for the first)")
    parser.add_argument("--eval", action="store_true", help="print the adherence table of the result")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    path = train(args.out, minutes=args.minutes, seed=args.seed, threads=args.threads)
    if args.eval:
        from ray_render import adherence

        report = adherence.evaluate(str(path), device="cpu")
        print(adherence.format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
