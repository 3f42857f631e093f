"""The small interface every model family implements, and what the renderer hands it.

Nothing here imports torch: the driver, the planner and their tests use these types without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, Sequence

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


class ImageModel(Protocol):
    """A resident model that renders batches of requests on one device."""

    info: ModelInfo

    def defaults(self) -> dict:
        """Render-parameter defaults native to this model (RenderRequest field names -> values).

        For NextStep-1: 50 steps, cfg 7.5, use_norm on; for NextStep-1.1: 28 steps, use_norm off; the embedded
        tiny model: 64x64. Job options and manifest columns override these.
        """
        ...

    def check(self, request: RenderRequest) -> None:
        """Raise RowError naming the field and the allowed values if this model cannot render the request."""
        ...

    def batch_key(self, request: RenderRequest) -> Hashable:
        """Requests with equal keys may share one `render` call (lockstep: same token count, steps, branches)."""
        ...

    def render(self, requests: Sequence[RenderRequest]) -> list[np.ndarray]:
        """Render requests that share one batch key: one (height, width, 3) uint8 RGB array each, in order.

        Raises ModelOutOfMemory when the batch does not fit; any other exception fails the whole call, and the
        caller isolates the row that raised by splitting the batch.
        """
        ...
