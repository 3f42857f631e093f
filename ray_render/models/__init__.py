"""Model families behind one interface (`base.ImageModel`); `load_model` picks one from the `--model` value."""

from __future__ import annotations

from ray_render.models.base import ImageModel, ModelInfo, ModelOutOfMemory, RenderRequest, RowError

__all__ = ["ImageModel", "ModelInfo", "ModelOutOfMemory", "RenderRequest", "RowError", "load_model"]


def load_model(name: str, *, vae: str | None = None, revision: str | None = None, device: str = "auto",
               dtype: str = "auto", noise: str = "fast", storage_options: dict | None = None) -> ImageModel:
    """Load the model a job names. torch is imported only here, inside the actor that holds the model."""
    if name == "placeholder":
        from ray_render.models.placeholder import PlaceholderModel

        return PlaceholderModel()
    from ray_render.models.nextstep import load_nextstep

    return load_nextstep(name, vae=vae, revision=revision, device=device, dtype=dtype, noise=noise,
                         storage_options=storage_options or {})
