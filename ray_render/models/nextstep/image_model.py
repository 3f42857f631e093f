"""NextStepImageModel: `base.ImageModel` for NextStep checkpoints (text to image, and editing an input image).

`check` validates a request and decodes its input image, once; `render` runs generate.py's loop on requests that
passed it. Loading is loading.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ray_render.config import check_render_param
from ray_render.models.base import ModelInfo, ModelOutOfMemory, RenderRequest, RowError, check_edit_tags
from ray_render.models.nextstep import vae as vae_lib
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.generate import Parts, Trace, generate
from ray_render.models.nextstep.images import InputImageError, decode_input_image
from ray_render.models.nextstep.model import NextStepModel
from ray_render.models.nextstep.prompts import IMAGE_TAG, PromptBuilder

SMALL_MODEL_HIDDEN = 1024  # at or below this width, CPU renders run on one thread (see _cpu_threads)
PROMPT_FIELDS = ("prompt", "negative_prompt", "positive_prompt")
# Tokens of the image prefix, beyond the longest row, that a render adds: <|image_area|>, h, *, w digits, boi.
PREFIX_ALLOWANCE = 8


class NextStepImageModel:
    """base.ImageModel for NextStep checkpoints: defaults, check, batch_key, render (see base.py)."""

    def __init__(self, model: NextStepModel, vae, tokenizer, config: NextStepConfig, vae_config: dict,
                 info: ModelInfo, defaults: dict, noise: str = "fast", has_encoder: bool = True,
                 edit_input: str = "resize", cpu_threads: int | None = None, vae_batch: int | None = None,
                 cuda_graphs: bool = False) -> None:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        prompts = PromptBuilder(tokenizer, config.boi, config.eoi, config.image_placeholder_id, pad_id,
                                add_bos_text=config.version == "1.1")
        self.parts = Parts(model=model, vae=vae, prompts=prompts, config=config,
                           vae_settings=vae_lib.vae_settings(vae_config), noise=noise, device=device, dtype=dtype,
                           vae_batch=vae_batch or (4 if device.type == "cuda" else 16), cuda_graphs=cuda_graphs)
        self.info, self.config, self.noise, self.has_encoder = info, config, noise, has_encoder
        self.edit_input = edit_input
        self._defaults = dict(defaults)
        # A literal control token in a prompt would shift the image placeholders or end the text early.
        self.control_tokens = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special})
        if cpu_threads is None and device.type == "cpu" and config.hidden_size <= SMALL_MODEL_HIDDEN:
            cpu_threads = 1  # tiny matmuls gain nothing from threads and lose a lot to contention
        self.cpu_threads = cpu_threads

    @property
    def cuda_graphs(self) -> bool:
        return self.parts.cuda_graphs

    # base.ImageModel ---------------------------------------------------------------------------------------------

    def defaults(self) -> dict:
        return dict(self._defaults)

    @property
    def input_image_tag(self) -> str | None:
        """`<image>` when this snapshot can edit (its VAE has an encoder), else None: see base.ImageModel."""
        return IMAGE_TAG if self.has_encoder else None

    def check(self, request: RenderRequest) -> RenderRequest:
        """The request to render, with its input image decoded into `input_pixels`; RowError naming the field and
        the allowed values when this model cannot render it."""
        def fail(msg: str):
            raise RowError(f"{request.key}: {msg}")

        for name in PROMPT_FIELDS:
            if not isinstance(getattr(request, name), str):
                fail(f"{name} must be a string, got {type(getattr(request, name)).__name__}")
        for name in ("width", "height", "cfg", "cfg_img", "cfg_schedule", "use_norm", "timesteps_shift",
                     "num_sampling_steps"):
            try:
                check_render_param(name, getattr(request, name))
            except ValueError as e:
                fail(str(e))
        down = self.parts.down_factor
        for name in ("width", "height"):
            if getattr(request, name) % down:
                fail(f"{name} must be a multiple of {down} for this model, got {getattr(request, name)}")
        if isinstance(request.seed, bool) or not isinstance(request.seed, (int, np.integer)) \
                or not -(2**63) <= int(request.seed) < 2**64:
            fail(f"seed must be an integer from -2**63 to 2**64-1, got {request.seed!r}")
        for name in PROMPT_FIELDS:
            for token in self.control_tokens:
                if token in getattr(request, name):
                    fail(f"{name} contains the control token {token!r}; remove it (control tokens are the model's "
                         "own markup, not text)")
        if request.input_image is not None and not self.has_encoder:
            fail("input_image: this model's VAE has no encoder, so it cannot edit images; "
                 "remove input_image and <image> or use an editing model (e.g. NextStep-1-Large-Edit)")
        check_edit_tags(request, IMAGE_TAG)
        if request.input_image is not None:
            try:
                pixels = decode_input_image(request.input_image, int(request.width), int(request.height),
                                            self.edit_input)
            except InputImageError as e:
                fail(f"input_image: {e}")
            request = dataclasses.replace(request, input_pixels=pixels)
        gh, gw = self.parts.grid(request.height, request.width)
        longest = max(self.parts.prompts.count(t) for t in self.parts.texts(request))
        if longest + PREFIX_ALLOWANCE + gh * gw > self.config.max_position_embeddings:
            fail(f"prompt plus {gh * gw} image tokens exceeds the model's context of "
                 f"{self.config.max_position_embeddings} tokens; shorten the prompt or render smaller")
        return request

    def batch_key(self, request: RenderRequest) -> Hashable:
        """(token count, sampling steps, guidance branches, edit or not)."""
        return self.parts.batch_key(request)

    def max_batch(self, request: RenderRequest) -> int | None:
        """No model-imposed bound yet: the job's batch size applies, and out-of-memory halves it."""
        return None

    def render(self, requests: Sequence[RenderRequest]) -> list[np.ndarray]:
        """One (height, width, 3) uint8 image per checked request, in order."""
        images, _ = self.generate(requests)
        return images

    # Rendering ---------------------------------------------------------------------------------------------------

    def generate(self, requests: Sequence[RenderRequest], trace: bool = False) -> tuple[list[np.ndarray],
                                                                                        Trace | None]:
        """Render checked requests and optionally keep the intermediate tensors (see generate.Trace)."""
        if not requests:
            return [], None
        kept = Trace() if trace else None
        device = self.parts.device
        try:
            with torch.inference_mode(), _cpu_threads(self.cpu_threads if device.type == "cpu" else None):
                return generate(self.parts, list(requests), kept), kept
        except torch.OutOfMemoryError as e:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise ModelOutOfMemory(f"out of device memory rendering {len(requests)} images of "
                                   f"{requests[0].width}x{requests[0].height}; retry with a smaller batch") from e


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
