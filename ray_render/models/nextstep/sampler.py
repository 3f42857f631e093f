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


class TokenSampler:
    """Samples token k of every row given the rows' head conditions.

    grids: (B, G) float32 per-row timestep grids; cfg, cfg_img: (N, B) float32 per-token scales; branches: the
    guidance branch count shared by the batch (rows are branch-major: R = branches * B); dtype: the head's.
    """

    def __init__(self, head: FlowMatchingHead, grids: torch.Tensor, cfg: torch.Tensor, cfg_img: torch.Tensor,
                 branches: int, version: str, dtype: torch.dtype):
        self.head, self.branches, self.version, self.dtype = head, branches, version, dtype
        self.cfg, self.cfg_img = cfg[..., None], cfg_img[..., None]  # (N, B, 1)
        t = grids  # (B, G)
        self.n_sde = t.shape[1] - 1  # stochastic steps
        # Per-row step constants, in the reference float32 operation order.
        self.t = t[:, :, None]  # (B, G, 1)
        one_minus_t = 1 - self.t
        self.one_minus_t = one_minus_t
        self.var = one_minus_t**2 - self.t * -1 * one_minus_t
        self.noise_scale = torch.sqrt(2 * (1 - self.t))
        dt = self.t[:, 1:] - self.t[:, :-1]
        self.dt, self.sqrt_dt = dt, torch.sqrt(dt)
        # The same constants sliced per step once, not at every token.
        self.step_constants = [(self.t[:, i], self.var[:, i], one_minus_t[:, i], self.dt[:, i], self.sqrt_dt[:, i],
                                self.noise_scale[:, i]) for i in range(self.n_sde)]
        # The time embedding depends only on the grid: compute it once for every step and row.
        t_rows = t.repeat(branches, 1).to(dtype)  # (R, G): the reference casts t to the condition's dtype
        self.time_emb = head.embed_time(t_rows.transpose(0, 1))  # (G, R, width)

    def _velocity(self, x: torch.Tensor, mods, i: int, cfg: torch.Tensor, cfg_img: torch.Tensor) -> torch.Tensor:
        xin = x.to(self.dtype)
        if self.branches > 1:
            xin = xin.repeat(self.branches, 1)  # every branch of an image sees the same x
        v = self.head.velocity(xin, mods, i).float()
        if self.branches == 2:
            cond, uncond = v.chunk(2)
            return uncond + cfg * (cond - uncond)
        if self.branches == 3:
            cond, img, neg = v.chunk(3)
            return neg + cfg_img * (img - neg) + cfg * (cond - img)
        return v

    def sample(self, head_cond: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
        """Token k (B, token_dim) float32. head_cond: (R, hidden) = image_out_projector(condition);
        noise: (B, draws, token_dim) float32, this token's draws."""
        return self.sample_scaled(head_cond, noise, self.cfg[k], self.cfg_img[k])

    def sample_scaled(self, head_cond: torch.Tensor, noise: torch.Tensor, cfg: torch.Tensor,
                      cfg_img: torch.Tensor) -> torch.Tensor:
        """`sample` with this token's guidance scales given as (B, 1) tensors (static inputs for a CUDA graph)."""
        y = self.time_emb + self.head.embed_cond(head_cond)[None]  # (G, R, width)
        mods = self.head.modulations(y)
        x = noise[:, 0]
        for i, (t, var, one_minus_t, dt, sqrt_dt, noise_scale) in enumerate(self.step_constants):
            v = self._velocity(x, mods, i, cfg, cfg_img)
            score = (t * v - x) / var
            drift = v + one_minus_t * score
            dw = noise[:, i + 1] * sqrt_dt
            mean_x = x + drift * dt
            x = mean_x + noise_scale * dw
        if self.version == "1":
            x = x + self._velocity(x, mods, self.n_sde, cfg, cfg_img) * LAST_STEP
        return x


class GraphedTokenSampler:
    """A TokenSampler whose per-token work (all S head evaluations) is one CUDA graph replay.

    In eager mode a token costs about 100 kernel launches per step; on a GPU the launches, not the arithmetic,
    bound the head at small batches. The graph is captured once per render call (shapes are fixed within a
    call) from static input buffers that each token copies into. Opt-in (`cuda_graphs=True`) until measured on
    a GPU; `verified` compares a replay with the eager result before it is trusted.
    """

    def __init__(self, sampler: TokenSampler, head_cond: torch.Tensor, noise: torch.Tensor):
        self.sampler = sampler
        self.inputs = [head_cond.clone(), noise.clone(), sampler.cfg[0].clone(), sampler.cfg_img[0].clone()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, cuBLAS handles)
            for _ in range(2):
                sampler.sample_scaled(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = sampler.sample_scaled(*self.inputs)

    def sample(self, head_cond: torch.Tensor, noise: torch.Tensor, k: int) -> torch.Tensor:
        for static, value in zip(self.inputs, (head_cond, noise, self.sampler.cfg[k], self.sampler.cfg_img[k])):
            static.copy_(value)
        self.graph.replay()
        return self.output.clone()

    def verified(self, head_cond: torch.Tensor, noise: torch.Tensor, atol: float = 1e-2) -> bool:
        """Whether a replay agrees with the eager sampler on token 0."""
        return torch.allclose(self.sample(head_cond, noise, 0), self.sampler.sample(head_cond, noise, 0), atol=atol)
