"""NextStep-1 / NextStep-1.1 inference: official checkpoints, batched heterogeneous rows on one device.

Roles: config.py (config.json, both spellings), head.py (flow-matching head), model.py (backbone + projectors +
head), vae.py (VAE on diffusers, token <-> latent maps), snapshot.py (official directory layout), resolve.py
(model names -> local directories: tiny, paths, hub cache, fsspec URLs), prompts.py (prompt rows and ids),
sampler.py (timestep grids, noise, guidance, the SDE step), pipeline.py (the ImageModel), bench.py (figures).
"""

from __future__ import annotations


def load_nextstep(name: str, *, vae: str | None = None, revision: str | None = None, device: str = "auto",
                  dtype: str = "auto", noise: str = "fast", storage_options: dict | None = None, **kwargs):
    """Load a NextStep model as a `base.ImageModel` (see pipeline.load_nextstep)."""
    from ray_render.models.nextstep.pipeline import load_nextstep as _load

    return _load(name, vae=vae, revision=revision, device=device, dtype=dtype, noise=noise,
                 storage_options=storage_options, **kwargs)


__all__ = ["load_nextstep"]
