"""NextStepImageModel: `base.ImageModel` for NextStep checkpoints (text to image, and editing an input image).

`check` validates a request and decodes its input image, once; `render` runs generate.py's loop on requests that
passed it. Loading is loading.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ray_render.config import check_render_param
from ray_render.models.base import ModelInfo, ModelOutOfMemory, RenderRequest, RowError, check_edit_tags
from ray_render.models.nextstep import vae as vae_lib
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.decoder import Decoder, resolve_compile
from ray_render.models.nextstep.generate import Parts, Trace, generate
from ray_render.models.nextstep.images import InputImageError, decode_input_image
from ray_render.models.nextstep.model import NextStepModel
from ray_render.models.nextstep.planner import BatchPlan, plan_batch
from ray_render.models.nextstep.prompts import IMAGE_TAG, PromptBuilder

logger = logging.getLogger(__name__)

SMALL_MODEL_HIDDEN = 1024  # at or below this width, CPU renders run on one thread (see _cpu_threads)
PROMPT_FIELDS = ("prompt", "negative_prompt", "positive_prompt")
# Tokens of the image prefix, beyond the longest row, that a render adds: <|image_area|>, h, *, w digits, boi.
PREFIX_ALLOWANCE = 8


class NextStepImageModel:
    """base.ImageModel for NextStep checkpoints: defaults, check, batch_key, render (see base.py)."""

    def __init__(self, model: NextStepModel, vae, tokenizer, config: NextStepConfig, vae_config: dict,
                 info: ModelInfo, defaults: dict, noise: str = "fast", has_encoder: bool = True,
                 edit_input: str = "resize", cpu_threads: int | None = None, vae_batch: int | None = None,
                 compile: str = "auto", length_bucket: int | None = None) -> None:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        prompts = PromptBuilder(tokenizer, config.boi, config.eoi, config.image_placeholder_id, pad_id,
                                add_bos_text=config.version == "1.1")
        decoder = Decoder(model, device, resolve_compile(compile, device), length_bucket)
        self.parts = Parts(model=model, vae=vae, prompts=prompts, config=config,
                           vae_settings=vae_lib.vae_settings(vae_config), noise=noise, device=device, dtype=dtype,
                           vae_batch=vae_batch or (4 if device.type == "cuda" else 16), decoder=decoder)
        self.info, self.config, self.noise, self.has_encoder = info, config, noise, has_encoder
        self.edit_input = edit_input
        self._defaults = dict(defaults)
        # A literal control token in a prompt would shift the image placeholders or end the text early.
        self.control_tokens = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special})
        if cpu_threads is None and device.type == "cpu" and config.hidden_size <= SMALL_MODEL_HIDDEN:
            cpu_threads = 1  # tiny matmuls gain nothing from threads and lose a lot to contention
        self.cpu_threads = cpu_threads
        # The memory planner plans against the device memory free now, with the model loaded (CUDA only: a CPU
        # has no device memory limit to plan against, and the job's batch size applies as it is).
        self.free_bytes: int | None = None
        self._plans: dict[tuple, BatchPlan] = {}
        free = _free_device_bytes(device)
        if free is not None:
            self.plan_for(free)

    def plan_for(self, free_bytes: int) -> dict:
        """Plan batches against `free_bytes` of device memory from now on (measured after loading on CUDA; a
        smaller budget leaves room for something else on the device): the largest batch of the model's default
        size at each guidance branch count is logged and kept in `info.settings["batch_plan"]`, with every shape
        planned later. Returns that record."""
        self.free_bytes, self._plans = int(free_bytes), {}
        self.info.settings["batch_plan"] = {"free_bytes": self.free_bytes, "batches": {}}
        d = self._defaults
        for branches in (1, 2, 3) if self.has_encoder and d.get("cfg_img", 1.0) > 1 else (1, 2):
            self._plan(int(d["width"]), int(d["height"]), branches, branches == 3, int(d["num_sampling_steps"]))
        logger.info("memory planner: %.1f GiB of device memory to plan against; largest batches: %s",
                    self.free_bytes / 2**30, self.info.settings["batch_plan"]["batches"])
        return self.info.settings["batch_plan"]

    @property
    def compiled(self) -> bool:
        """Whether token steps are compiled (and, on CUDA, replayed from CUDA graphs)."""
        return self.parts.decoder.compiled

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
        """The memory planner's largest batch for requests like this one on CUDA (at least 1: a single image that
        does not fit fails as out of memory); None on other devices."""
        if self.free_bytes is None:
            return None
        gh, gw = self.parts.grid(request.height, request.width)
        branches = self.parts.branches(request)
        plan = self._plan(gw * self.parts.down_factor, gh * self.parts.down_factor, branches,
                          request.input_image is not None, int(request.num_sampling_steps))
        return max(1, plan.batch)

    def _plan(self, width: int, height: int, branches: int, edit: bool, steps: int) -> BatchPlan:
        key = (width, height, branches, edit, steps)
        if key not in self._plans:
            vae = self.parts.vae_settings
            plan = plan_batch(self.config, self.parts.dtype.itemsize, self.free_bytes, width, height, branches,
                              edit=edit, steps=steps, down_factor=self.parts.down_factor, vae_channels=vae["ch"],
                              vae_batch=self.parts.vae_batch, length_bucket=self.parts.decoder.length_bucket)
            self._plans[key] = plan
            label = f"{width}x{height}, {branches} branch{'es' if branches > 1 else ''}{', edit' if edit else ''}"
            self.info.settings["batch_plan"]["batches"][f"{label}, {steps} steps"] = plan.batch
        return self._plans[key]

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
                images = generate(self.parts, list(requests), kept, batch_limit=self.max_batch(requests[0]))
            if self.parts.decoder.fallback and "compile_fallback" not in self.info.settings:
                # Compiling failed and steps run eager now: the record says so (shard commits carry it).
                self.info.settings.update(compile="off", compile_fallback=self.parts.decoder.fallback)
            return images, kept
        except torch.OutOfMemoryError as e:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            raise ModelOutOfMemory(f"out of device memory rendering {len(requests)} images of "
                                   f"{requests[0].width}x{requests[0].height}; retry with a smaller batch") from e


def _free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device now, after releasing what torch's allocator caches; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(device)[0])


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
