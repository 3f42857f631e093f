"""The token loop of a render call: step buffers and KV cache kept across calls, and the token step run eager,
compiled, or (compiled, on CUDA) replayed from CUDA graphs.

One `Decoder` lives with the model for the life of the actor. Per call it hands out `StepBuffers` for the call's
shape, reusing the ones it holds when they are large enough (a batch of fewer images uses a prefix view of them),
so the KV cache is allocated once per (batch bucket, length bucket) and not per call. Then it runs the token
step once per image token:

- eager (`compile` off): `TokenStep` called as Python;
- compiled (`compile` on): `torch.compile(TokenStep, fullgraph=True)`, compiled once per step shape (and, on the
  CPU, batch bucket), the attention window a dynamic size, so the positions of an image never recompile;
- on CUDA, compiled steps are captured in a CUDA graph per (batch bucket, attention window), once per actor: a
  token is one graph replay, whatever the depth of the model and the number of sampling steps.

Compiled steps need fixed shapes, so a batch is padded up to a bucket (a power of two, at most the memory
planner's batch): the padding rows repeat the last request and are dropped. Eager steps take any batch as is.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch._inductor.config

from ray_render.models.nextstep.backbone import BackboneWeights
from ray_render.models.nextstep.model import NextStepModel
from ray_render.models.nextstep.planner import PREFIX_TOKENS, PROMPT_TOKENS
from ray_render.models.nextstep.step import StepBuffers, StepShape, TokenStep

logger = logging.getLogger(__name__)

COMPILE_MODES = ("off", "on", "auto")
LENGTH_BUCKET = {"cuda": 128, "cpu": 64}  # attention windows and cache lengths are multiples of this
# Compiled steps on the CPU: weights frozen into the graph so inductor generates the matmuls itself instead of
# calling into aten for each (at decode sizes the call, not the arithmetic, is the cost). The price: a compile
# several times longer (each matmul shape is tuned) and the weights held a second time, packed for those matmuls.
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
RECOMPILE_LIMIT = 64  # step shapes x batch buckets one actor may compile (torch's default of 8 is too few)
PROFILE_RANGE = "nextstep.decode"  # the token loop, as torch.profiler names it (the bench counts ops inside)


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether token steps are compiled: "auto" compiles on CUDA (where the launches, not the arithmetic, would
    bound a step) and runs eager elsewhere."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return device.type == "cuda" if mode == "auto" else mode == "on"


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Decoder:
    """Runs the token steps of render calls on one model; holds what is reused across calls."""

    def __init__(self, model: NextStepModel, device: torch.device, compiled: bool,
                 length_bucket: int | None = None, dynamic_batch: bool | None = None) -> None:
        self.model, self.device, self.compiled = model, device, compiled
        # Compiled steps with a dynamic batch size: one compile serves every batch bucket. On by default on CUDA,
        # where a compile of a full-size step takes minutes; off on the CPU, whose generated matmuls want fixed
        # sizes.
        self.dynamic_batch = compiled and (device.type == "cuda" if dynamic_batch is None else dynamic_batch)
        self.weights = BackboneWeights(model.backbone)
        self.length_bucket = length_bucket or LENGTH_BUCKET.get(device.type, 64)
        self.graphs_enabled = compiled and device.type == "cuda"
        self._buffers: StepBuffers | None = None  # the buffers of the largest batch of the current shape
        self._views: dict[int, StepBuffers] = {}  # images -> a prefix view of _buffers
        self._steps: dict[tuple, TokenStep] = {}  # (branches, version) -> step (compiled when `compiled`)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (images, window) -> captured step
        self._pool = None  # memory pool shared by the captured graphs (they never run concurrently)
        self.fallback: str | None = None  # why compiling failed, when it did: steps then run eager
        self.last_run: dict = {}  # tokens, wall_s and cpu_s of the last token loop: host time, before any sync
        if compiled:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

    # Shapes ------------------------------------------------------------------------------------------------------

    def batch_bucket(self, images: int, limit: int | None = None) -> int:
        """Images per step for a call of `images`: as given in eager mode; else the next power of two, capped by
        `limit` (the memory planner's batch), so that a few compiled shapes serve every batch size."""
        if not self.compiled:
            return images
        bucket = 1 << (images - 1).bit_length()
        return max(images, min(bucket, limit)) if limit else bucket

    def capacity(self, prompt_length: int, tokens: int) -> int:
        """Cache slots for a call: the prompt and every token fed back (the last one too: its step runs whole),
        rounded up to the length bucket, plus one spare slot so that no attention window is the whole cache (a
        window is then always a strided view, one layout for one compiled graph).

        Compiled steps get room for prompts as long as the memory planner budgets for: the cache length is a
        static size of the compiled step, so a later call's longer prompt would otherwise grow the cache, compile
        the step again (minutes at full size) and capture its graphs again."""
        if self.compiled:
            prompt_length = max(prompt_length, PROMPT_TOKENS + PREFIX_TOKENS)
        return round_up(prompt_length + tokens, self.length_bucket) + 1

    def window(self, position: int) -> int:
        """Slots the step at cache `position` attends to: the filled ones, rounded up to the length bucket."""
        return round_up(position + 1, self.length_bucket)

    # Buffers -----------------------------------------------------------------------------------------------------

    def buffers(self, shape: StepShape, time_width: int, pos_embed: bool) -> StepBuffers:
        """Buffers for `shape`: the ones held when they fit (same step shape, at least as many images and slots),
        else new ones as large as both, which drops what was captured on the old ones."""
        held = self._buffers
        same = held is not None and dataclasses.replace(held.shape, images=shape.images,
                                                        capacity=shape.capacity) == shape
        if same and held.shape.images >= shape.images and held.shape.capacity >= shape.capacity:
            return self._view(shape.images)
        grown = shape
        if same:
            grown = dataclasses.replace(shape, images=max(shape.images, held.shape.images),
                                        capacity=max(shape.capacity, held.shape.capacity))
        self.release()
        self._buffers = StepBuffers(self.model, self.weights, grown, time_width, pos_embed, self.dynamic_batch)
        return self._view(shape.images)

    def _view(self, images: int) -> StepBuffers:
        if images not in self._views:
            self._views[images] = self._buffers.view(images)
        return self._views[images]

    def release(self) -> None:
        """Free the buffers, the KV cache and the graphs captured on them."""
        self._buffers, self._views, self._graphs = None, {}, {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # The token loop ----------------------------------------------------------------------------------------------

    def step(self, branches: int, version: str) -> TokenStep:
        key = (branches, version)
        if key not in self._steps:
            step = TokenStep(self.model, self.weights, branches, version)
            if self.compiled:
                step = torch.compile(step, fullgraph=True, dynamic=False)
            self._steps[key] = step
        return self._steps[key]

    def prepare(self, b: StepBuffers, branches: int, version: str, windows: list[int]) -> None:
        """Before the call's prefill: capture the CUDA graphs of windows not captured yet (warm-up runs scribble
        on the buffers, which the call then fills)."""
        for window in sorted(set(windows)):
            if not self.graphs_enabled:  # eager, or compiling failed
                return
            if (b.shape.images, window) not in self._graphs:
                graph = self._capture((branches, version), b, window)
                if graph is not None:
                    self._graphs[(b.shape.images, window)] = graph

    def _call(self, key: tuple, b: StepBuffers, bias: torch.Tensor) -> None:
        """One step, with a call of a compiled step that may compile: should compiling fail, the step runs eager
        from then on (images then differ from compiled ones by a rounding step; `fallback` says why) rather than
        fail the render."""
        if not self.compiled:
            self.step(*key)(b, bias)
            return
        try:
            # The options are read while compiling (torch.compile's own options= does not reach freezing).
            with torch._inductor.config.patch(CPU_COMPILE_OPTIONS if self.device.type == "cpu" else {}):
                self.step(*key)(b, bias)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - compiling is an optimisation: never fail a render over it
            logger.error("compiling the token step failed; running it eager from now on: %s: %s",
                         type(e).__name__, str(e)[:500])
            self.fallback = f"{type(e).__name__}: {str(e)[:200]}"
            self.compiled = self.graphs_enabled = self.dynamic_batch = False
            self._steps, self._graphs = {}, {}
            self.step(*key)(b, bias)

    def _capture(self, key: tuple, b: StepBuffers, window: int) -> torch.cuda.CUDAGraph | None:
        """The step for `window` captured in a CUDA graph, or None when compiling it failed."""
        bias = b.window(window)

        def safe_state() -> None:  # every key visible and an in-range position: warm-ups stay finite
            b.bias.zero_()
            b.token_index.zero_()
            b.position.fill_(window - 1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: compiles, autotunes, allocates workspaces
            for _ in range(2):
                safe_state()
                self._call(key, b, bias)
        torch.cuda.current_stream().wait_stream(side)
        if not self.graphs_enabled:
            return None
        safe_state()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.step(*key)(b, bias)
        return graph

    def run(self, b: StepBuffers, branches: int, version: str, prompt_length: int, tokens: int,
            on_token=None) -> None:
        """Decode `tokens` tokens from the state the prefill left in `b`; `on_token(k, before)` is called
        before (before=True) and after each step when given (traces)."""
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.profiler.record_function(PROFILE_RANGE):
            self._loop((branches, version), b, prompt_length, tokens, on_token)
        self.last_run = {"tokens": tokens, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}

    def _loop(self, key: tuple, b: StepBuffers, prompt_length: int, tokens: int, on_token) -> None:
        for k in range(tokens):
            window = self.window(prompt_length + k)
            if on_token:
                on_token(k, True)
            if self.graphs_enabled:
                self._graphs[(b.shape.images, window)].replay()
            elif k == 0:
                self._call(key, b, b.window(window))
            elif self.compiled:
                # The guards were checked at token 0; from there on only the window changes, and it is dynamic.
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    self.step(*key)(b, b.window(window))
            else:
                self.step(*key)(b, b.window(window))
            if on_token:
                on_token(k, False)
