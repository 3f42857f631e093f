"""The token step: one image token of every row of a batch, as a function of static device buffers.

Decoding an image repeats one step per token: the flow-matching head samples the token from its condition (every
SDE step, guidance with its per-token scale, use_norm, the noise drawn up front), and the backbone runs the token
fed back, which gives the next condition. `TokenStep` does all of it from `StepBuffers`, tensors allocated once
for a batch shape and refilled per call, and writes its results back into them in place; the token index and the
cache position are device tensors that the step advances itself. So the step is the same function at every token:
nothing is read from the host and nothing is synchronised inside the token loop, and it can be compiled once and
captured in a CUDA graph once per (batch shape, attention window) (see decoder.py).

Shapes: B images, R = branches * B rows, N tokens per image, S draws per token, G grid points, D token values,
H backbone width, C cache slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ray_render.models.nextstep.backbone import BackboneWeights, decode
from ray_render.models.nextstep.model import NextStepModel
from ray_render.models.nextstep.sampler import SamplerConstants, sample_token


@dataclass(frozen=True)
class StepShape:
    """What fixes the shapes of a token step: buffers and compiled graphs are made per StepShape."""

    images: int  # B (after padding to a batch bucket)
    branches: int
    tokens: int  # N
    draws: int  # S
    grid: int  # G
    capacity: int  # C, cache slots (see Decoder.capacity)

    @property
    def rows(self) -> int:
        return self.images * self.branches


class StepBuffers:
    """Every tensor a token step reads or writes, on the model's device, the KV cache included.

    Per call the decoder refills the inputs (`load`), the prefill writes the cache and the first condition, and
    `start` sets the counters; the step then reads and writes only these tensors, so their addresses stay fixed
    across tokens and calls. `view(images)` is the same storage for fewer images (the first rows of each).
    """

    # Every buffer is batch-major (rows or images first), so that a view of fewer images has the same strides as
    # the whole: a compiled step with a dynamic batch size then serves both.
    BATCHED = ("cond", "head_cond", "noise", "cfg", "cfg_img", "use_norm", "time_emb", "pos_embed", "tokens",
               "tokens_raw")

    def __init__(self, model: NextStepModel, weights: BackboneWeights, shape: StepShape, time_width: int,
                 pos_embed: bool, dynamic_batch: bool = False) -> None:
        dev, dtype = weights.device, weights.dtype
        b, r, n = shape.images, shape.rows, shape.tokens
        hidden, d = model.config.hidden_size, model.config.token_dim
        self.shape = shape
        self.cond = torch.zeros(r, hidden, dtype=dtype, device=dev)  # condition of the current token
        self.head_cond = torch.zeros(r, hidden, dtype=dtype, device=dev)  # its projection, kept for traces
        self.token_index = torch.zeros(1, dtype=torch.long, device=dev)  # k
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # the cache slot token k is fed back at
        # Key bias, 0 or -inf: (R, 1, 1, C) in a row of a multiple of 16 slots, the alignment SDPA's
        # memory-efficient kernel wants of a bias (else it pads a copy at every call).
        self.bias = torch.zeros(r, 1, 1, -(-shape.capacity // 16) * 16, dtype=dtype, device=dev)[..., :shape.capacity]
        # The KV cache, a tensor per layer for keys and one for values: (R, kv, C, d) each. Zeros, not empty: a
        # hidden slot's value is multiplied by a zero weight, and 0 * NaN would not be zero.
        cache = (r, weights.kv_heads, shape.capacity, weights.head_dim)
        self.keys = [torch.zeros(cache, dtype=dtype, device=dev) for _ in weights.layers]
        self.values = [torch.zeros(cache, dtype=dtype, device=dev) for _ in weights.layers]
        self.noise = torch.zeros(b, n, shape.draws, d, device=dev)  # (B, N, S, D) float32
        self.cfg = torch.ones(b, n, 1, device=dev)  # (B, N, 1) per-token guidance scales
        self.cfg_img = torch.ones(b, n, 1, device=dev)
        self.use_norm = torch.zeros(b, 1, dtype=torch.bool, device=dev)
        self.constants = SamplerConstants(torch.zeros(b, shape.grid, device=dev))
        self.time_emb = torch.zeros(r, shape.grid, time_width, dtype=dtype, device=dev)  # (R, G, width)
        self.pos_embed = torch.zeros(r, n, hidden, dtype=dtype, device=dev) if pos_embed else None  # (R, N, H)
        self.tokens = torch.zeros(b, n, d, dtype=dtype, device=dev)  # (B, N, D), after use_norm
        self.tokens_raw = torch.zeros(b, n, d, device=dev)  # (B, N, D) float32, before use_norm
        self.dynamic_batch = dynamic_batch
        self._windows: dict[int, torch.Tensor] = {}
        self._mark_batch()

    def _mark_batch(self) -> None:
        """With `dynamic_batch`, mark the batch dimensions dynamic, so that one compiled step serves every batch
        size (torch still specialises a batch of one)."""
        if not self.dynamic_batch:
            return
        batched = [getattr(self, name) for name in self.BATCHED]
        batched += [*self.keys, *self.values, *(getattr(self.constants, f) for f in SamplerConstants.FIELDS)]
        for t in batched:
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)

    def view(self, images: int) -> StepBuffers:
        """These buffers for the first `images` images (and their rows): the same storage, fewer rows."""
        if images == self.shape.images:
            return self
        rows = images * self.shape.branches
        v = object.__new__(StepBuffers)
        v.shape = dataclasses.replace(self.shape, images=images)
        v.token_index, v.position = self.token_index, self.position
        v.cond, v.head_cond, v.bias = self.cond[:rows], self.head_cond[:rows], self.bias[:rows]
        v.keys, v.values = [t[:rows] for t in self.keys], [t[:rows] for t in self.values]
        v.noise, v.use_norm, v.tokens, v.tokens_raw = (self.noise[:images], self.use_norm[:images],
                                                        self.tokens[:images], self.tokens_raw[:images])
        v.cfg, v.cfg_img = self.cfg[:images], self.cfg_img[:images]
        v.constants = object.__new__(SamplerConstants)
        for name in SamplerConstants.FIELDS:
            setattr(v.constants, name, getattr(self.constants, name)[:images])
        v.time_emb = self.time_emb[:rows]
        v.pos_embed = None if self.pos_embed is None else self.pos_embed[:rows]
        v.dynamic_batch, v._windows = self.dynamic_batch, {}
        v._mark_batch()
        return v

    def window(self, slots: int) -> torch.Tensor:
        """The key bias of the first `slots` slots, (R, 1, 1, slots): the same view object every time, marked as
        the compiled step's dynamic size."""
        if slots not in self._windows:
            view = self.bias[..., :slots]
            torch._dynamo.mark_dynamic(view, 3)
            if self.dynamic_batch:
                torch._dynamo.maybe_mark_dynamic(view, 0)
            self._windows[slots] = view
        return self._windows[slots]

    def load(self, *, noise: torch.Tensor, cfg: torch.Tensor, cfg_img: torch.Tensor, use_norm: torch.Tensor,
             constants: SamplerConstants, time_emb: torch.Tensor, pos_embed: torch.Tensor | None) -> None:
        """Copy one call's per-row inputs in: noise (B, N, S, D), cfg and cfg_img (N, B), use_norm (B, 1),
        time_emb (G, R, width), pos_embed (N, R, H) or None."""
        self.noise.copy_(noise)
        self.cfg.copy_(cfg.T[..., None])
        self.cfg_img.copy_(cfg_img.T[..., None])
        self.use_norm.copy_(use_norm)
        for name in SamplerConstants.FIELDS:
            getattr(self.constants, name).copy_(getattr(constants, name))
        self.time_emb.copy_(time_emb.transpose(0, 1))
        if self.pos_embed is not None:
            self.pos_embed.copy_(pos_embed.transpose(0, 1))

    def start(self, prompt_length: int, keys_ok: torch.Tensor) -> None:
        """After the prefill, before token 0: the prompt's key bias (pads and unfilled slots hidden), the unfilled
        slots cleared (whatever an earlier call left there stays out of this one), k = 0, position = L.
        keys_ok: (R, L) bool."""
        self.bias.fill_(float("-inf"))
        self.bias[:, 0, 0, :prompt_length].masked_fill_(keys_ok, 0.0)
        for t in (*self.keys, *self.values):
            t[:, :, prompt_length:].zero_()
        self.token_index.zero_()
        self.position.fill_(prompt_length)


class TokenStep:
    """Sample token k of every row from its condition, feed it back, leave the condition of token k + 1.

    `__call__(buffers, bias)` does one step in place; `bias` is the first W slots of `buffers.bias`, W the
    attention window (a multiple of the length bucket that covers the position). It is passed on its own so that
    a compiled step sees W as its one dynamic size.
    """

    def __init__(self, model: NextStepModel, weights: BackboneWeights, branches: int, version: str) -> None:
        self.model, self.weights, self.branches, self.version = model, weights, branches, version
        self.dtype = weights.dtype

    def __call__(self, b: StepBuffers, bias: torch.Tensor) -> None:
        model, k = self.model, b.token_index
        # 1. This token's inputs, picked on the device by k: the condition, noise and guidance scales.
        cond = b.cond
        if b.pos_embed is not None:
            cond = cond + b.pos_embed.index_select(1, k)[:, 0]
        head_cond = model.image_out_projector(cond)  # (R, H)
        noise = b.noise.index_select(1, k)[:, 0]  # (B, S, D)
        cfg, cfg_img = b.cfg.index_select(1, k)[:, 0], b.cfg_img.index_select(1, k)[:, 0]  # (B, 1)
        # 2. The head's SDE from noise to the token, guided.
        raw = sample_token(model.image_head, b.constants, b.time_emb.transpose(0, 1), head_cond, noise, cfg,
                           cfg_img, self.branches, self.version, self.dtype).to(self.dtype)  # (B, D)
        # 3. use_norm: layer norm over the token's values (no affine), per row.
        token = torch.where(b.use_norm, F.layer_norm(raw, raw.shape[-1:], None, None, 1e-6), raw)
        b.tokens.index_copy_(1, k, token[:, None])
        b.tokens_raw.index_copy_(1, k, raw.float()[:, None])
        b.head_cond.copy_(head_cond)
        # 4. Feed the token back at `position`: its key slot becomes visible, the backbone gives the next condition.
        bias.index_fill_(-1, b.position, 0.0)
        embeds = model.image_in_projector(token).repeat(self.branches, 1)  # (R, H): every branch gets the token
        b.cond.copy_(decode(self.weights, embeds, b.position, b.keys, b.values, bias))
        # 5. Advance.
        k.add_(1)
        b.position.add_(1)
