"""NextStep-1 / NextStep-1.1 inference: official checkpoints, batched heterogeneous rows on one device.

Roles, one per module:

    config.py       config.json in both spellings (NextStep-1, NextStep-1.1)
    head.py         the flow-matching head
    model.py        backbone + projectors + head, under the checkpoint's tensor names
    vae.py          the VAE on diffusers, token <-> latent maps, posterior and decoding
    snapshot.py     the official directory layout: weights, tokenizer, VAE files, what a snapshot is
    resolve.py      model names -> local directories (tiny, paths, hub cache, fsspec URLs)
    loading.py      device, dtype, building in place, loading, render defaults: load_nextstep
    selfcheck.py    runtime self-checks of the built backbone (RoPE theta and precision, attention)
    images.py       edit inputs: encoded bytes -> the pixels the VAE encodes
    prompts.py      prompt rows and token ids
    sampler.py      timestep grids, noise, guidance, the SDE step
    backbone.py     the Qwen2 backbone as functions of its weights: prefill, one decode step over a static cache
    step.py         the token step (head sampling, feedback, backbone step) over static buffers
    decoder.py      the token loop: buffers kept across calls; eager, compiled or CUDA-graph steps
    planner.py      the memory planner: the largest batch of a shape that fits the device
    generate.py     the generation loop, as numbered steps
    image_model.py  NextStepImageModel, the base.ImageModel
    bench.py        figures: images/s against batch size, a full-size random model
    train_tiny.py   training the embedded tiny model
"""

from __future__ import annotations


def load_nextstep(name: str, *, vae: str | None = None, revision: str | None = None, device: str = "auto",
                  dtype: str = "auto", noise: str = "fast", storage_options: dict | None = None, **kwargs):
    """Load a NextStep model as a `base.ImageModel` (see loading.load_nextstep); imports torch on first use."""
    from ray_render.models.nextstep.loading import load_nextstep as _load

    return _load(name, vae=vae, revision=revision, device=device, dtype=dtype, noise=noise,
                 storage_options=storage_options, **kwargs)


__all__ = ["load_nextstep"]
