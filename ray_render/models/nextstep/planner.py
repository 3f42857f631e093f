"""The memory planner: the largest batch of one shape that fits the device memory left after the model loaded.

A pure function of (model config, dtype, free bytes, request shape), so it is the same on every machine and is
tested without a GPU. What a render holds at its peak, per image and once per call:

    per image   KV cache: layers x 2 x kv_heads x head_dim x branches x cache slots (prompt + tokens, rounded up
                to the length bucket), in the weights' dtype; the step buffers (the noise table, in float32, is
                the big one); the prefill's activations (every layer's hidden states, queries, repeated keys and
                values, the MLP's three intermediates, all rows at once) or the decode step's (the head's
                modulations for every sampling step), whichever is larger
    per call    the VAE decoding `vae_batch` images (its full-resolution activations), and a reserve for what
                is not modelled (CUDA graph pools, cuBLAS workspaces, fragmentation)

The prefill runs over all rows at once, so its activations count per image: an edit at 512x512 (three branches,
prompts of about 1,100 tokens) spends about as much on them as on its KV cache. The figures agree with what
NEXTSTEP.md reports for NextStep-1-Large on an 80 GB GPU: text to image at 1024x1024 fits batch 16 but not 32,
editing at 512x512 fits 16 but not 32. The out-of-memory back-off of the engine stays the safety net.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ray_render.models.nextstep.config import NextStepConfig

PROMPT_TOKENS = 256  # text tokens allowed for per row (long captions are about 150)
PREFIX_TOKENS = 16  # the image prefix and, for edits, the image string's markup around its placeholders
RESERVE_BYTES = 2 * 2**30  # not modelled: graph pools, library workspaces, allocator fragmentation
VAE_LIVE_TENSORS = 6  # full-resolution activations of the VAE decoder alive at once (conv in, norm, out, skip)


@dataclass(frozen=True)
class BatchPlan:
    """How many images of one shape fit, and the estimate behind it (bytes)."""

    batch: int  # 0 when not even one image fits
    free_bytes: int
    per_image_bytes: int
    per_call_bytes: int
    kv_bytes_per_image: int

    def to_dict(self) -> dict:
        return asdict(self)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_slots(tokens: int, prompt_tokens: int, length_bucket: int) -> int:
    """Cache slots of one row (as decoder.Decoder.capacity allocates them)."""
    return round_up(prompt_tokens + tokens, length_bucket) + 1


def plan_batch(config: NextStepConfig, dtype_bytes: int, free_bytes: int, width: int, height: int, branches: int,
               *, edit: bool = False, steps: int = 50, down_factor: int = 16, vae_channels: int = 128,
               vae_batch: int = 4, length_bucket: int = 128, prompt_tokens: int = PROMPT_TOKENS,
               reserve_bytes: int = RESERVE_BYTES) -> BatchPlan:
    """The largest batch of `width` x `height` images with `branches` guidance rows each (3 for an edit with
    image guidance) that fits `free_bytes`, for a model of `config` in a dtype of `dtype_bytes` per value.
    `steps` is the sampling steps (the noise table grows with it); the VAE defaults are the released f8ch16's."""
    tokens = (height // down_factor) * (width // down_factor)
    # An edit's rows carry the input image as placeholder tokens, one per output token (edit inputs are resized
    # to the output size).
    prompt = prompt_tokens + PREFIX_TOKENS + (tokens if edit else 0)
    slots = cache_slots(tokens, prompt, length_bucket)
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_width = config.num_key_value_heads * config.head_dim
    width_head, draws = config.fm_head_dim, steps + 1

    kv = layers * 2 * kv_width * dtype_bytes * branches * slots
    buffers = (tokens * draws * config.token_dim * 4  # noise table, float32
               + branches * (2 * hidden + slots + draws * width_head) * dtype_bytes  # cond, bias, time embedding
               + tokens * config.token_dim * (dtype_bytes + 4 + 8))  # tokens, raw tokens, guidance scales
    # Prefill: all rows at once. Live in one layer: hidden states and residual, normed input, queries, keys and
    # values repeated to every head, the attention output, the MLP's gate, up and product; plus the bias mask.
    prefill = branches * prompt * ((7 * hidden + 3 * inter) * dtype_bytes + prompt * dtype_bytes)
    # Decode step: the head's modulations for every grid point (3 per block, 2 for the final layer), and the
    # backbone's few row-sized activations.
    decode = branches * (draws * width_head * (3 * config.fm_head_layers + 2) + 4 * hidden + 3 * inter) * dtype_bytes
    per_image = kv + buffers + max(prefill, decode)
    vae = vae_batch * VAE_LIVE_TENSORS * vae_channels * width * height * dtype_bytes
    per_call = vae + reserve_bytes
    batch = max(0, (free_bytes - per_call) // per_image)
    return BatchPlan(batch=int(batch), free_bytes=int(free_bytes), per_image_bytes=int(per_image),
                     per_call_bytes=int(per_call), kv_bytes_per_image=int(kv))


def weight_bytes(config: NextStepConfig, dtype_bytes: int, *, include_embeddings: bool = True) -> int:
    """Bytes of the model's weights (backbone, projectors, head), without the unused lm_head."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_width = config.num_key_value_heads * config.head_dim
    q_width = config.num_attention_heads * config.head_dim
    attention = hidden * q_width + q_width + 2 * (hidden * kv_width + kv_width) + q_width * hidden
    attention += hidden if config.o_proj_bias else 0
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    backbone = layers * per_layer + hidden + (config.vocab_size * hidden if include_embeddings else 0)
    projectors = config.token_dim * hidden + hidden + hidden * hidden + hidden
    return (backbone + projectors + head_parameters(config)) * dtype_bytes


def head_parameters(config: NextStepConfig) -> int:
    """Parameters of the flow-matching head."""
    w, d = config.fm_head_dim, config.token_dim
    block = 2 * (w * w + w) + w * 3 * w + 3 * w + 2 * w  # MLP, adaLN, LayerNorm
    final = w * d + d + w * 2 * w + 2 * w
    embeds = 256 * w + w + w * w + w + config.hidden_size * w + w + d * w + w  # time MLP, condition, input
    return config.fm_head_layers * block + final + embeds


def bytes_read_per_token(config: NextStepConfig, dtype_bytes: int, steps: int, rows: int,
                         filled_slots: int) -> int:
    """Bytes a token step must read at least: the backbone's weights once (no embedding table), the head's
    per-step weights once per sampling step, its adaLN weights once, and `rows` rows of `filled_slots` cached
    keys and values: the memory-bandwidth bound of decoding is this over the device's copy bandwidth."""
    w, d = config.fm_head_dim, config.token_dim
    backbone = weight_bytes(config, dtype_bytes, include_embeddings=False) - head_parameters(config) * dtype_bytes
    per_step = (d * w + w + config.fm_head_layers * (2 * (w * w + w) + 2 * w) + w * d + d) * dtype_bytes
    adaln = (config.fm_head_layers * (w * 3 * w + 3 * w) + w * 2 * w + 2 * w + config.hidden_size * w) * dtype_bytes
    kv_width = config.num_key_value_heads * config.head_dim
    kv = config.num_hidden_layers * 2 * kv_width * dtype_bytes * rows * filled_slots
    return backbone + steps * per_step + adaln + kv
