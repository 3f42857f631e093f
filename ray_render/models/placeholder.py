"""A model-free stand-in: deterministic images for dry runs of layout, permissions, faults and throughput.

`--model placeholder` renders a colour gradient whose colours, angle and stripe pattern come from a hash of the
request (prompt, seed, size, ...), so a request always yields the same pixels whatever batch it shares, and two
different requests almost always differ. It loads nothing and imports no torch.

For fault drills the prompt may carry directives, which only this model understands:

- `[placeholder:raise]`  the `render` call holding this request raises RuntimeError (a model bug on one row);
- `[placeholder:oom]`    a batch of more than one request holding it raises ModelOutOfMemory;
- `[placeholder:sleep=S]` the call sleeps S seconds (a slow row: stragglers, killing an actor mid-shard);
- `[placeholder:invalid]` `check` rejects the request with RowError (a row this model cannot render);
- `[placeholder:crash]`  the process rendering it dies at once (SIGKILL), as in a native crash or an OOM kill.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import signal
import time
from collections.abc import Hashable, Sequence

import numpy as np

from ray_render.models.base import (
    EDIT_TAG,
    ModelDescription,
    ModelInfo,
    ModelOutOfMemory,
    RenderRequest,
    RowError,
    check_edit_tags,
)

REVISION = "placeholder-1"  # bump whenever the pixels for a request change
DOWN_FACTOR = 16  # pixels per image token side of every NextStep model: sizes it could not render fail here too
_DIRECTIVE = re.compile(r"\[placeholder:(raise|oom|invalid|crash|sleep=([0-9]*\.?[0-9]+))\]")


def _directives(prompt: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for match in _DIRECTIVE.finditer(prompt):
        if match.group(2) is not None:
            found["sleep"] = found.get("sleep", 0.0) + float(match.group(2))
        else:
            found[match.group(1)] = 1.0
    return found


class PlaceholderModel:
    """Implements `base.ImageModel` with a cheap hash-seeded gradient; see the module docstring."""

    def __init__(self, name: str = "placeholder") -> None:
        self.info = ModelInfo(name=name, family="placeholder", revision=REVISION, device="cpu", dtype="uint8")

    def defaults(self) -> dict:
        return {
            "negative_prompt": "",
            "positive_prompt": "",
            "width": 64,  # small on purpose: dry runs measure orchestration, not pixels
            "height": 64,
            "cfg": 1.0,
            "cfg_img": 1.0,
            "cfg_schedule": "constant",
            "use_norm": False,
            "timesteps_shift": 1.0,
            "num_sampling_steps": 2,
        }

    input_image_tag = EDIT_TAG  # it "edits": the input image's bytes seed the picture

    def check(self, request: RenderRequest) -> RenderRequest:
        """The checks a NextStep model makes that need no weights (a dry run finds the same bad rows): sizes, the
        edit tag rules; then the [placeholder:invalid] directive."""
        for name in ("width", "height"):
            if getattr(request, name) % DOWN_FACTOR:
                raise RowError(f"{request.key}: {name} must be a multiple of {DOWN_FACTOR}, got "
                               f"{getattr(request, name)}")
        check_edit_tags(request, self.input_image_tag)
        if "invalid" in _directives(request.prompt):
            raise RowError("prompt: [placeholder:invalid] asks the placeholder model to reject this row")
        return request

    def max_batch(self, request: RenderRequest) -> int | None:
        return None  # no device memory to run out of

    def batch_key(self, request: RenderRequest) -> Hashable:
        # Same rule as a real lockstep model: one image size per call.
        return (request.width, request.height)

    def render(self, requests: Sequence[RenderRequest]) -> list[np.ndarray]:
        directives = [_directives(request.prompt) for request in requests]
        delay = sum(found.get("sleep", 0.0) for found in directives)
        if delay:
            time.sleep(delay)
        for request, found in zip(requests, directives):
            if "crash" in found:
                os.kill(os.getpid(), signal.SIGKILL)
            if "raise" in found:
                raise RuntimeError(f"{request.key}: [placeholder:raise] asked the placeholder model to fail")
            if "oom" in found and len(requests) > 1:
                raise ModelOutOfMemory(f"{request.key}: [placeholder:oom] with a batch of {len(requests)}")
        return [self._image(request) for request in requests]

    @staticmethod
    def _image(request: RenderRequest) -> np.ndarray:
        fields = (request.prompt, request.negative_prompt, request.positive_prompt, request.width, request.height,
                  request.cfg, request.cfg_img, request.cfg_schedule, request.use_norm, request.timesteps_shift,
                  request.num_sampling_steps, request.seed)
        digest = hashlib.sha256(repr(fields).encode()).digest()
        if request.input_image is not None:
            digest = hashlib.sha256(digest + request.input_image).digest()
        start = np.frombuffer(digest[0:3], dtype=np.uint8).astype(np.float32)  # (3,) end colours
        end = np.frombuffer(digest[3:6], dtype=np.uint8).astype(np.float32)
        ramp, shade = _pattern(request.width, request.height, digest[6] % 16, 2 + digest[7] % 6)
        return ((start + (end - start) * ramp) * shade).astype(np.uint8)  # (H, W, 3)


def describe() -> ModelDescription:
    """The placeholder as `models.describe_model` reports it: its defaults and revision; sizes follow the
    manifest's rule (multiples of 16), and it has no context to run out of."""
    model = PlaceholderModel()
    return ModelDescription(name=model.info.name, family=model.info.family, revision=model.info.revision,
                            defaults=model.defaults(), down_factor=16, context_length=None, source="built in",
                            device=model.info.device, dtype=model.info.dtype)  # the same whatever it is given


@functools.lru_cache(maxsize=64)
def _pattern(width: int, height: int, angle: int, stripes: int) -> tuple[np.ndarray, np.ndarray]:
    """A gradient along one of 16 angles and a stripe shading, both (H, W, 1); cached: dry runs reuse few sizes."""
    theta = angle / 16 * np.pi
    xs = np.arange(width, dtype=np.float32)[None, :] / width  # (1, W)
    ys = np.arange(height, dtype=np.float32)[:, None] / height  # (H, 1)
    ramp = np.clip((np.cos(theta) * xs + np.sin(theta) * ys + 1.0) / 2.0, 0.0, 1.0)  # (H, W)
    shade = np.where(np.floor(ramp * stripes * 2) % 2 == 1, 0.8, 1.0).astype(np.float32)  # alternate stripes darker
    return ramp[..., None], shade[..., None]
