"""Model families behind one interface (`base.ImageModel`); `load_model` picks one from the `--model` value, and
`describe_model` says what it would load (defaults, size rules, revision) without loading anything."""

from __future__ import annotations

import importlib
import re

from ray_render.models.base import (
    ImageModel,
    ModelDescription,
    ModelInfo,
    ModelOutOfMemory,
    RenderRequest,
    RowError,
    input_image_tag,
    max_batch,
)

__all__ = ["ImageModel", "ModelDescription", "ModelInfo", "ModelOutOfMemory", "RenderRequest", "RowError",
           "describe_model", "input_image_tag", "load_model", "max_batch"]

_PLUGIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")  # module.path:name


def load_model(name: str, *, vae: str | None = None, revision: str | None = None, device: str = "auto",
               dtype: str = "auto", noise: str = "fast", storage_options: dict | None = None,
               rope_precision: str = "auto", edit_input: str = "resize", compile: str = "auto") -> ImageModel:
    """Load the model a job names. torch is imported only here, inside the actor that holds the model.

    `name` may also be `package.module:factory`: your own model family, a class or function importable on every
    node (installed, or shipped in the runtime_env), called with this function's keyword arguments and returning
    an `ImageModel`; accept `**kwargs` so that options added later reach it without breaking it. It comes from the
    job's settings only, never from a manifest, and is imported by name, never unpickled.
    `ray_render.tools.chaos:TinyOutOfMemoryAbove4` is one (a fault injector for drills).

    rope_precision ("auto", "bf16", "fp32"), edit_input ("resize", "crop") and compile ("off", "on", "auto") are
    NextStep options (see nextstep/loading.py); other families ignore them.
    """
    options = dict(vae=vae, revision=revision, device=device, dtype=dtype, noise=noise,
                   storage_options=storage_options or {}, rope_precision=rope_precision, edit_input=edit_input,
                   compile=compile)
    if _PLUGIN.fullmatch(name):
        module_name, attribute = name.split(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        return factory(**options)
    if name == "placeholder":
        from ray_render.models.placeholder import PlaceholderModel

        return PlaceholderModel()
    from ray_render.models.nextstep import load_nextstep

    return load_nextstep(name, **options)


def describe_model(name: str, **options) -> ModelDescription:
    """What `load_model(name, **options)` would load, without loading it: no weights read, no torch imported,
    nothing downloaded (see base.ModelDescription). For planning a job and checking rows before a model loads.

    A plugin factory (`package.module:factory`) is described by its own `describe(**options)` when it has one;
    otherwise ValueError says that only loading it can tell. NextStep names raise nextstep.resolve.ResolveError
    (a ValueError) when nothing about the model is on this machine.
    """
    if _PLUGIN.fullmatch(name):
        module_name, attribute = name.split(":")
        describe = getattr(getattr(importlib.import_module(module_name), attribute), "describe", None)
        if describe is None:
            raise ValueError(f"model {name!r}: a plugin without a describe() function; only loading it tells its "
                             f"defaults")
        return describe(**options)
    if name == "placeholder":
        from ray_render.models.placeholder import describe

        return describe()
    from ray_render.models.nextstep.describe import describe_nextstep

    return describe_nextstep(name, **options)
