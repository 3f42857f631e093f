"""The Qwen2 backbone as plain functions of its weights, over a static KV cache: the prompt prefill, and one decode
step that reads only the filled part of the cache.

The weights stay in transformers' `Qwen2Model` (loading, checkpoint names and training use it); `BackboneWeights`
collects them once so a decode step does no module lookups. The arithmetic is transformers' Qwen2, operation for
operation (RMSNorm in float32 then cast back, rotate-half RoPE from float32 angles, SDPA with scale head_dim**-0.5,
SiLU-gated MLP), so the outputs agree with `Qwen2Model` to float rounding.

Why not `Qwen2Model.forward` with a `StaticCache`: every call rebuilds masks and position embeddings and walks
module hooks, about 44 dispatched ops per layer; and attention reads the whole cache under a boolean mask, which
keeps SDPA off its fused kernels and reads the slots not yet filled. Here:

- The cache is a (rows, kv_heads, slots, head_dim) tensor per layer for keys and one for values, allocated once
  and reused across calls (step.StepBuffers holds it).
- A decode step writes its keys and values at `position` (a device tensor, advanced in place) and attends to a
  window of the first `W` slots, W the filled length rounded up to a length bucket (64 or 128): one compiled
  graph covers every window, and a captured CUDA graph per window reads no more than it must.
- Padding and the unfilled slots of the window are hidden by an additive key bias of (rows, 1, 1, W) (0 or -inf),
  not a dense boolean mask: SDPA's memory-efficient kernel takes it on CUDA.
- Grouped-query attention without repeating keys: the g = heads / kv_heads query heads that share a key head are
  passed to SDPA as g queries of that head, so each key and value is read once.

Shapes: R rows, L prompt length, H hidden, h heads, kv key/value heads, g = h / kv, d head_dim, C cache slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LayerWeights(NamedTuple):
    input_norm: torch.Tensor
    q: torch.Tensor
    q_bias: torch.Tensor
    k: torch.Tensor
    k_bias: torch.Tensor
    v: torch.Tensor
    v_bias: torch.Tensor
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


class BackboneWeights:
    """The tensors of a transformers Qwen2Model that prefill and decode read, gathered once."""

    def __init__(self, backbone) -> None:
        config = backbone.config
        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(LayerWeights(
                layer.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
                attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
                layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                mlp.down_proj.weight))
        self.norm = backbone.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        rotary = backbone.rotary_emb
        self.inv_freq = rotary.inv_freq  # float32, or bf16 values under rope_precision bf16 (see loading.py)
        self.rope_scaling = float(rotary.attention_scaling)
        self.dtype, self.device = self.norm.dtype, self.norm.device


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary(w: BackboneWeights, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., d) at integer `positions` (...): angles in float32 from the (possibly bf16) frequencies."""
    freqs = positions[..., None].float() * w.inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * w.rope_scaling).to(dtype), (angles.sin() * w.rope_scaling).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def mlp(layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, layer.gate)) * F.linear(x, layer.up), layer.down)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Attention of g queries per key head over a window: q (R, kv, g, d), keys and values (R, kv, W, d), bias
    (R, 1, 1, W) -> (R, kv, g, d).

    On CUDA this is SDPA, whose memory-efficient kernel takes the additive bias. On the CPU, SDPA's kernel costs
    about 60 us a call at decode sizes whatever the work; two matmuls and a float32 softmax (the arithmetic of
    transformers' eager attention) cost a fifth of that."""
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale + bias  # (R, kv, g, W)
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)


def prefill_bias(keys_ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, 1, L, L) additive mask of the prompt: causal, pad keys hidden (0 or -inf). keys_ok: (R, L) bool.
    A pad query sees no real key; it sees itself, so no row of the softmax is empty (its output is unused)."""
    rows, length = keys_ok.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=keys_ok.device).tril()
    visible = causal & keys_ok[:, None, :] | torch.eye(length, dtype=torch.bool, device=keys_ok.device)
    bias = torch.zeros(rows, 1, length, length, dtype=dtype, device=keys_ok.device)
    return bias.masked_fill_(~visible[:, None], float("-inf"))


def prefill(w: BackboneWeights, embeds: torch.Tensor, keys_ok: torch.Tensor, keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> torch.Tensor:
    """Run the prompt rows, writing their keys and values to slots 0..L-1 of the cache; returns the final-normed
    output at the last slot (R, H), the condition of image token 0.

    embeds: (R, L, H); keys_ok: (R, L) bool, False on left padding; keys, values: per layer (R, kv, C, d).
    Positions are the slot indices 0..L-1 for every row, pads included, as in the official pipeline."""
    rows, length, _ = embeds.shape
    cos, sin = rotary(w, torch.arange(length, device=embeds.device), embeds.dtype)  # (L, d)
    bias = prefill_bias(keys_ok, embeds.dtype)  # (R, 1, L, L)
    groups = w.heads // w.kv_heads
    h = embeds
    for layer, layer_keys, layer_values in zip(w.layers, keys, values):
        x = rms_norm(h, layer.input_norm, w.eps)
        q = F.linear(x, layer.q, layer.q_bias).view(rows, length, w.heads, w.head_dim).transpose(1, 2)
        k = F.linear(x, layer.k, layer.k_bias).view(rows, length, w.kv_heads, w.head_dim).transpose(1, 2)
        v = F.linear(x, layer.v, layer.v_bias).view(rows, length, w.kv_heads, w.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (R, h, L, d), (R, kv, L, d)
        layer_keys[:, :, :length] = k
        layer_values[:, :, :length] = v
        # Keys repeated per query head (as transformers does): every SDPA kernel takes this with a float mask.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (R, h, L, d)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=w.scale)  # (R, h, L, d)
        a = a.transpose(1, 2).reshape(rows, length, -1)
        h = h + F.linear(a, layer.o, layer.o_bias)
        h = h + mlp(layer, rms_norm(h, layer.post_norm, w.eps))
    return rms_norm(h[:, -1], w.norm, w.eps)  # (R, H)


def decode(w: BackboneWeights, embeds: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
           values: list[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """One token per row at cache slot `position`; returns the final-normed output (R, H).

    embeds: (R, H); position: (1,) int64 on the device; keys, values: per layer (R, kv, C, d), views of the cache;
    bias: (R, 1, 1, W) the key bias of the window of slots 0..W-1 (W <= C), already 0 at `position`. Writes the
    new keys and values at `position`; reads only the window."""
    cos, sin = rotary(w, position, embeds.dtype)  # (1, d)
    h = embeds
    for layer, layer_keys, layer_values in zip(w.layers, keys, values):
        h = decode_layer(layer, h, layer_keys, layer_values, position, cos, sin, bias, w.eps, w.kv_heads,
                         w.heads // w.kv_heads, w.scale)
    return rms_norm(h, w.norm, w.eps)


def decode_layer(layer: LayerWeights, h: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 position: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor, eps: float,
                 kv_heads: int, groups: int, scale: float) -> torch.Tensor:
    """One decoder layer of the decode step: h (R, H) -> (R, H); keys, values (R, kv, C, d) get slot `position`."""
    rows, window, head_dim = h.shape[0], bias.shape[-1], keys.shape[-1]
    x = rms_norm(h, layer.input_norm, eps)
    # The g query heads sharing key head j become g queries of head j: (R, kv, g, d).
    q = rotate(F.linear(x, layer.q, layer.q_bias).view(rows, kv_heads, groups, head_dim), cos, sin)
    k = rotate(F.linear(x, layer.k, layer.k_bias).view(rows, kv_heads, 1, head_dim), cos, sin)
    v = F.linear(x, layer.v, layer.v_bias).view(rows, kv_heads, 1, head_dim)
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    a = attend(q, keys[:, :, :window], values[:, :, :window], bias, scale)  # (R, kv, g, d)
    h = h + F.linear(a.reshape(rows, -1), layer.o, layer.o_bias)
    return h + mlp(layer, rms_norm(h, layer.post_norm, eps))
