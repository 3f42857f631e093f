"""The flow-matching head: an MLP with adaLN conditioning that predicts the velocity of one image token.

Module and parameter names follow the released checkpoints, so `image_head.` + a key of this module's state dict
is the checkpoint's tensor name (`image_head.net.res_blocks.0.adaLN_modulation.1.weight`, ...).

Besides the plain `forward(x, t, c)` (training, and a readable definition), the sampler uses a split form: the
time embedding depends only on the timestep grid and the adaLN modulations only on (t, condition), so
`modulations` computes them for every step of a token at once and `velocity` runs the per-step part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t, laid out [cos, sin] (float32): (...,) -> (..., dim)."""
    half = dim // 2
    # Same float32 operation order as the reference: exp(-ln(P) * i / half).
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[..., None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from adaLN(y)."""

    def __init__(self, width: int, mlp_ratio: float = 1.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return self.modulated(x, shift, 1 + scale, gate)

    def modulated(self, x, shift, scale1p, gate):
        h = self.mlp(self.in_ln(x) * scale1p + shift)
        return x + gate * h


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.modulated(x, shift, 1 + scale)

    def modulated(self, x, shift, scale1p):
        return self.linear(self.norm_final(x) * scale1p + shift)


class AdaLNMLP(nn.Module):
    """The network under `image_head.net`."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


@dataclass
class Modulations:
    """adaLN outputs for a stack of steps: per block (shift, 1 + scale, gate), then the final (shift, 1 + scale).

    Each tensor is (steps, rows, width); `step(i)` gives the (rows, width) slices of step i.
    """

    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    final: tuple[torch.Tensor, torch.Tensor]

    def step(self, i: int):
        return [(s[i], sc[i], g[i]) for s, sc, g in self.blocks], (self.final[0][i], self.final[1][i])


class FlowMatchingHead(nn.Module):
    """Velocity model of one image token given the backbone's condition (token_dim values per token)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1536, depth: int = 12, mlp_ratio: float = 1.0):
        super().__init__()
        self.token_dim = token_dim
        self.net = AdaLNMLP(token_dim, cond_dim, width, depth, mlp_ratio)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Velocity at x (rows, token_dim), timestep t (rows,), condition c (rows, cond_dim)."""
        return self.net(x, t, c)

    # Split form used by the sampler -------------------------------------------------------------------------

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """(...,) timesteps, already in the weights' dtype as the reference casts them -> (..., width)."""
        return self.net.time_embed(t)

    def embed_cond(self, c: torch.Tensor) -> torch.Tensor:
        return self.net.cond_embed(c)

    def modulations(self, y: torch.Tensor) -> Modulations:
        """adaLN of y = time embedding + condition embedding, (steps, rows, width), for all steps at once."""
        y = F.silu(y)
        blocks = []
        for block in self.net.res_blocks:
            shift, scale, gate = block.adaLN_modulation[1](y).chunk(3, dim=-1)
            blocks.append((shift, 1 + scale, gate))
        shift, scale = self.net.final_layer.adaLN_modulation[1](y).chunk(2, dim=-1)
        return Modulations(blocks, (shift, 1 + scale))

    def velocity(self, x: torch.Tensor, mods) -> torch.Tensor:
        """The network output at one step of a token, given that step's modulations (`Modulations.step(i)`):
        x (rows, token_dim).

        The same operations as `forward`, called functionally: this runs S times per image token, and module
        call overhead is most of its cost on small models."""
        net = self.net
        h = F.linear(x, net.input_proj.weight, net.input_proj.bias)
        width = h.shape[-1:]
        blocks, (shift, scale1p) = mods
        for block, (s, sc, g) in zip(net.res_blocks, blocks):
            ln, fc1, fc2 = block.in_ln, block.mlp[0], block.mlp[2]
            u = F.layer_norm(h, width, ln.weight, ln.bias, ln.eps) * sc + s
            u = F.linear(F.silu(F.linear(u, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
            h = h + g * u
        final = net.final_layer
        u = F.layer_norm(h, width, None, None, final.norm_final.eps) * scale1p + shift
        return F.linear(u, final.linear.weight, final.linear.bias)

    # Training ------------------------------------------------------------------------------------------------

    def loss(self, target: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss of the released training recipe: t ~ logit-normal, x_t = t*target + (1-t)*noise,
        regress the velocity target - noise. target (rows, token_dim), c (rows, cond_dim), mask (rows,) or None."""
        noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        u = torch.randn((target.shape[0],), generator=generator, device=target.device)
        t = torch.sigmoid(u).to(target.dtype)
        xt = t[:, None] * target + (1 - t[:, None]) * noise
        err = (self.net(xt, t, c).float() - (target - noise).float()) ** 2
        per_row = err.mean(dim=-1)
        if mask is None:
            return per_row.mean()
        return (per_row * mask).sum() / (mask.sum() + 1e-8)
