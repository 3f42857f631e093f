"""The per-token flow-matching sampler, vectorised over the rows of a batch.

Each row has its own timestep grid (its shift), guidance scales (its cfg, cfg_img and schedule) and noise (its
seed); they are tensors indexed by row, so one token of every row is sampled by the same sequence of kernels.
The arithmetic follows the reference operation order in float32, which reproduces its tokens exactly:

    score = (t*v - x) / ((1-t)^2 - (t*-1)*(1-t));  drift = v + (1-t)*score
    x     = (x + drift*dt) + sqrt(2*(1-t)) * (w*sqrt(dt))

NextStep-1: a grid of S points on [0, 0.96], S-1 stochastic steps, then x += 0.04 * v(t[S-1]) (S draws per
token). NextStep-1.1: S+1 points ending at 1.0, S stochastic steps (S+1 draws).
"""

from __future__ import annotations

import torch

from ray_render.models.nextstep.head import FlowMatchingHead

LAST_STEP = 0.04  # NextStep-1's final deterministic Euler step


def timestep_grid(steps: int, shift: float, version: str = "1") -> torch.Tensor:
    """The shifted float32 grid of one row: (S,) for NextStep-1, (S+1,) for NextStep-1.1."""
    if version == "1":
        t = torch.linspace(0, 1 - LAST_STEP, steps)
        return t / (shift - (shift - 1) * t)
    t = torch.linspace(0, 1, steps + 1)[:-1]
    t = t / (shift - (shift - 1) * t)
    return torch.cat([t, torch.ones(1)])


def draws_per_token(steps: int, version: str = "1") -> int:
    """Normal draws of token_dim values per token: the initial x, then one per stochastic step."""
    return steps if version == "1" else steps + 1


def guidance_scales(scale: float, schedule: str, n_tokens: int) -> list[float]:
    """The scale used at each token: constant, or linear 1 + (scale-1)*(N-k)/N (never reaching 1)."""
    if schedule == "constant":
        return [scale] * n_tokens
    if schedule == "linear":
        return [1 + (scale - 1) * (n_tokens - k) / n_tokens for k in range(n_tokens)]
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")


def noise_table(generator: torch.Generator, n_tokens: int, draws: int, dim: int, mode: str) -> torch.Tensor:
    """(n_tokens, draws, dim) float32 normals from one row's generator, in the reference order (per token: the
    initial x, then one per step). "reference" makes one (1, dim) draw per site as the official pipeline does, on
    the generator's device: with the generator on the model's device this is what an official single-prompt call
    draws from torch's global generator of that device (CPU or CUDA). "fast" makes one call for the whole table
    (the same numbers on CPU, where a (k, dim) draw equals k (1, dim) draws for dim a multiple of 16; different
    numbers on CUDA, whose generator advances per call)."""
    if mode == "reference":
        sites = [torch.randn((1, dim), generator=generator, device=generator.device)
                 for _ in range(n_tokens * draws)]
        return torch.cat(sites).reshape(n_tokens, draws, dim)
    if mode == "fast":
        return torch.randn((n_tokens * draws, dim), generator=generator, device=generator.device).reshape(
            n_tokens, draws, dim)
    raise ValueError(f"noise must be 'fast' or 'reference', got {mode!r}")


class SamplerConstants:
    """The per-row constants of the SDE steps, in the reference float32 operation order, from the rows' grids.

    grids: (B, G) float32. Each field is (B, G, 1) (per grid point) or (B, G - 1, 1) (per step); a token step
    slices step i as field[:, i], a (B, 1) column.
    """

    FIELDS = ("t", "one_minus_t", "var", "noise_scale", "dt", "sqrt_dt")

    def __init__(self, grids: torch.Tensor):
        t = grids[:, :, None]  # (B, G, 1)
        self.t = t
        self.one_minus_t = 1 - t
        self.var = self.one_minus_t**2 - t * -1 * self.one_minus_t
        self.noise_scale = torch.sqrt(2 * (1 - t))
        self.dt = t[:, 1:] - t[:, :-1]  # (B, G - 1, 1)
        self.sqrt_dt = torch.sqrt(self.dt)

    @property
    def n_sde(self) -> int:
        """Stochastic steps per token."""
        return self.dt.shape[1]


def time_embedding(head: FlowMatchingHead, grids: torch.Tensor, branches: int, dtype: torch.dtype) -> torch.Tensor:
    """(G, R, width): the head's time embedding of every grid point of every row, computed once per call (it
    depends only on the grid). The reference casts t to the condition's dtype first."""
    return head.embed_time(grids.repeat(branches, 1).to(dtype).transpose(0, 1))


def guided_velocity(head: FlowMatchingHead, x: torch.Tensor, mods, cfg: torch.Tensor, cfg_img: torch.Tensor,
                    branches: int, dtype: torch.dtype) -> torch.Tensor:
    """The guided float32 velocity (B, D) given one step's modulations; every branch of an image sees the same x."""
    xin = x.to(dtype)
    if branches > 1:
        xin = xin.repeat(branches, 1)
    v = head.velocity(xin, mods).float()
    if branches == 2:
        cond, uncond = v.chunk(2)
        return uncond + cfg * (cond - uncond)
    if branches == 3:
        cond, img, neg = v.chunk(3)
        return neg + cfg_img * (img - neg) + cfg * (cond - img)
    return v


def sde_step(head: FlowMatchingHead, x: torch.Tensor, mods, t: torch.Tensor, one_minus_t: torch.Tensor,
             var: torch.Tensor, dt: torch.Tensor, sqrt_dt: torch.Tensor, noise_scale: torch.Tensor, w: torch.Tensor,
             cfg: torch.Tensor, cfg_img: torch.Tensor, branches: int, dtype: torch.dtype) -> torch.Tensor:
    """One stochastic step of every row: x (B, D) -> (B, D); mods: this step's modulations (Modulations.step);
    the constants are this step's (B, 1) columns; w (B, D) its noise draw."""
    v = guided_velocity(head, x, mods, cfg, cfg_img, branches, dtype)
    score = (t * v - x) / var
    drift = v + one_minus_t * score
    dw = w * sqrt_dt
    mean_x = x + drift * dt
    return mean_x + noise_scale * dw


def sample_token(head: FlowMatchingHead, c: SamplerConstants, time_emb: torch.Tensor, head_cond: torch.Tensor,
                 noise: torch.Tensor, cfg: torch.Tensor, cfg_img: torch.Tensor, branches: int, version: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """One token of every row (B, D) float32.

    time_emb: (G, R, width) from `time_embedding`; head_cond: (R, hidden) = image_out_projector(condition);
    noise: (B, draws, D) float32, this token's draws; cfg, cfg_img: (B, 1) this token's guidance scales."""
    y = time_emb + head.embed_cond(head_cond)[None]  # (G, R, width)
    mods = head.modulations(y)
    x = noise[:, 0]
    for i in range(c.n_sde):
        x = sde_step(head, x, mods.step(i), c.t[:, i], c.one_minus_t[:, i], c.var[:, i], c.dt[:, i],
                     c.sqrt_dt[:, i], c.noise_scale[:, i], noise[:, i + 1], cfg, cfg_img, branches, dtype)
    if version == "1":
        x = x + guided_velocity(head, x, mods.step(c.n_sde), cfg, cfg_img, branches, dtype) * LAST_STEP
    return x
