"""The small interface every model family implements, and what the renderer hands it.

Nothing here imports torch: the driver, the planner and their tests use these types without loading a model.

The life of a request: the renderer builds a `RenderRequest` per output image, passes it through
`model.check(request)` once, and keeps the request `check` returns (it may carry work done while validating, such
as the decoded input image). It groups checked requests by `model.batch_key` and hands each group, at most
`max_batch(model, request)` at a time, to `model.render`, which neither validates nor decodes again.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class RenderRequest:
    """One output image: a manifest row's fully resolved settings, and which of the row's images it is.

    Image k of a row carries `seed = row seed + k`, so the request alone decides the image: a model must render
    the same pixels for it whatever else shares its batch.
    """

    key: str  # "<row id>#<image index>", used in error messages
    prompt: str
    negative_prompt: str = ""
    positive_prompt: str = ""
    width: int = 64
    height: int = 64
    cfg: float = 7.5
    cfg_img: float = 1.0
    cfg_schedule: str = "constant"  # "constant" or "linear"
    use_norm: bool = True
    timesteps_shift: float = 1.0
    num_sampling_steps: int = 50
    seed: int = 0
    input_image: bytes | None = None  # encoded image (PNG/JPEG/WebP) for editing, already fetched
    # Set by `check`: `input_image` decoded and preprocessed for the model, uint8 (height, width, 3) RGB. Derived
    # from `input_image`, so it takes no part in equality or hashing.
    input_pixels: np.ndarray | None = field(default=None, compare=False, repr=False)


class RowError(ValueError):
    """A request the model cannot render as given (bad value for this model): the row ends `invalid`."""


class ModelOutOfMemory(RuntimeError):
    """The device ran out of memory for this batch; the caller retries with a smaller batch."""


@dataclass(frozen=True)
class ModelInfo:
    """What the output metadata and the job record say about the model that rendered."""

    name: str  # what the user asked for: "tiny", "placeholder", a path, a repo id or a URL
    family: str  # "nextstep", "placeholder", ...
    revision: str  # content hash or hub commit: changes whenever the weights change
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", ...
    # Resolved runtime settings that change pixels beyond the weights and dtype (for NextStep: the sampler
    # version, RoPE precision, noise mode and the device it is drawn on, edit preprocessing), for the job record.
    settings: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ModelDescription:
    """What a model renders by default and accepts, known without loading it (`models.describe_model`): for planning
    a job and checking rows before any weights are read. Every field equals what the loaded model reports."""

    name: str  # as given to describe_model / load_model
    family: str  # "nextstep", "placeholder", ...
    revision: str | None  # ModelInfo.revision of the loaded model; None where only loading it can tell
    defaults: dict  # what the loaded model's defaults() returns
    down_factor: int  # pixels per image-token side: width and height must be multiples of it
    context_length: int | None  # tokens of prompt, image prefix and image a row may take; None: no such limit
    source: str  # where the facts were read: a snapshot directory, a URL, or published defaults
    settings: dict = field(default_factory=dict)  # what decided them (sampler version, edit model, and why)
    # The sizes a cost estimate needs, for autoregressive families: parameters read per image token
    # (`backbone_params`), per sampling step of the head (`head_params`), the token embeddings held in memory
    # (`embedding_params`), `layers`, `head_layers`, and `kv_width` (key/value values per layer and position).
    # Empty when the family has none of these.
    architecture: dict = field(default_factory=dict)
    # The device type ("cuda", "cpu", ...) and dtype the loaded model reports for the device and dtype described;
    # None where only loading tells (device "auto": what the machine has).
    device: str | None = None
    dtype: str | None = None

    def expected_info(self) -> dict | None:
        """The ModelInfo fields `same_model` compares, as the loaded model will report them: what an output's job
        record is checked against without loading anything. None when loading is the only way to know one."""
        if self.revision is None or self.device is None or self.dtype is None:
            return None
        return {"name": self.name, "family": self.family, "revision": self.revision, "device": self.device,
                "dtype": self.dtype, "settings": dict(self.settings)}

    def image_tokens(self, width: int, height: int) -> int:
        """Image tokens of one image of this size: one autoregressive step each."""
        return (int(height) // self.down_factor) * (int(width) // self.down_factor)

    def size_problem(self, width: int, height: int) -> str | None:
        """Why this model cannot render width x height (the row's message), or None when it can."""
        for name, value in (("width", width), ("height", height)):
            if int(value) % self.down_factor:
                return f"{name} must be a multiple of {self.down_factor} for this model, got {value}"
        if self.context_length is not None and self.image_tokens(width, height) >= self.context_length:
            return (f"{width}x{height} is {self.image_tokens(width, height)} image tokens, more than the model's "
                    f"context of {self.context_length} tokens")
        return None


class ImageModel(Protocol):
    """A resident model that renders batches of requests on one device."""

    info: ModelInfo

    def defaults(self) -> dict:
        """Render-parameter defaults native to this model (RenderRequest field names -> values).

        For NextStep-1: 50 steps, cfg 7.5, use_norm on; for NextStep-1.1: 28 steps, use_norm off; the embedded
        tiny model: 64x64. Job options and manifest columns override these.
        """
        ...

    def check(self, request: RenderRequest) -> RenderRequest:
        """Validate `request` once and return the request to render.

        Raises RowError naming the field and the allowed values if this model cannot render it. The returned
        request may be a copy carrying what validation produced (NextStep attaches `input_pixels`, the decoded
        input image), so callers render the returned request, not the one they passed in.
        """
        ...

    def batch_key(self, request: RenderRequest) -> Hashable:
        """Requests with equal keys may share one `render` call (lockstep: same token count, steps, branches)."""
        ...

    def render(self, requests: Sequence[RenderRequest]) -> list[np.ndarray]:
        """Render requests returned by `check` that share one batch key: one (height, width, 3) uint8 RGB array
        each, in order. Nothing is validated or decoded again; a mix of batch keys is refused with ValueError.

        Raises ModelOutOfMemory when the batch does not fit; any other exception fails the whole call, and the
        caller isolates the row that raised by splitting the batch.
        """
        ...

    # Optional: `max_batch(self, request: RenderRequest) -> int | None`, the most requests like this one (same
    # batch key) that one `render` call can hold on this model's device, or None when the model sets no limit
    # beyond the job's batch size. A memory planner reads it through the module-level `max_batch` below, so a
    # model without the method behaves as one that returns None.


    # Optional: `input_image_tag: str | None`, the marker an edit prompt carries where the input image goes
    # ("<image>" for NextStep), or None when the model cannot edit. The renderer fetches a row's input_image only
    # when the model has a tag and the prompt holds it; read it through the module-level `input_image_tag`.


EDIT_TAG = "<image>"  # the edit marker NextStep's prompts use; the placeholder model checks it the same way


def same_model(old: dict, new: dict) -> bool:
    """Whether two models (ModelInfo as dicts) render the same pixels for the same request: family, revision,
    dtype, device type."""
    same_device = str(old.get("device", "")).split(":")[0] == str(new.get("device", "")).split(":")[0]
    return same_device and all(old.get(key) == new.get(key) for key in ("family", "revision", "dtype"))


def input_image_tag(model: ImageModel) -> str | None:
    """The marker of an edit prompt on this model, or None when it takes no input image."""
    return getattr(model, "input_image_tag", None)


def check_edit_tags(request: RenderRequest, tag: str | None) -> None:
    """The edit rules every model applies alike: an input image needs a model that edits and exactly one tag in
    the prompt; a tag needs an input image; the negative and positive prompts never hold one."""
    if request.input_image is not None and tag is None:
        raise RowError(f"{request.key}: input_image: this model cannot edit images; remove input_image, or use an "
                       f"editing model (e.g. NextStep-1-Large-Edit)")
    if tag is None:
        return
    for name in ("negative_prompt", "positive_prompt"):
        if tag in getattr(request, name):
            raise RowError(f"{request.key}: {name} must not contain {tag}")
    tags = request.prompt.count(tag)
    if request.input_image is not None and tags != 1:
        raise RowError(f"{request.key}: prompt must contain exactly one {tag} when input_image is given "
                       f"(found {tags})")
    if request.input_image is None and tags:
        raise RowError(f"{request.key}: prompt contains {tag} but no input_image was given; add input_image or "
                       f"remove {tag}")


def max_batch(model: ImageModel, request: RenderRequest) -> int | None:
    """The model's own bound on requests per `render` call for `request`'s batch key, or None for no bound."""
    method = getattr(model, "max_batch", None)
    if method is None:
        return None
    limit = method(request)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{type(model).__name__}.max_batch must return None or a whole number >= 1, got {limit!r}")
    return limit
