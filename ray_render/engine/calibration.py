"""The calibration table of `ray-render plan`: seconds per image on each kind of device, and where each figure
comes from (every estimate carries its entry's `origin`).

Two kinds of entry:

- **measured**: what `ray-render bench` measured on a machine (BENCHMARKS.md), for the model it ran: the tiny model
  and the placeholder on a 2-core CPU, exact at the measured shape and batch sizes (log-log between them). Other
  shapes are scaled from the measured one: the tiny model's time per image in proportion to image tokens x kernels
  per token (the backbone's, plus the head's once per sampling step: a model this small waits on kernel launches,
  not arithmetic, and guidance rows share them); the placeholder's (PNG encoding) in proportion to pixels.
- **bandwidth model**: NEXTSTEP.md's "Performance facts" for GPUs where nothing was measured. Per image token a batch
  of B images reads the backbone's weights once, the head's once per sampling step, and its KV cache; it computes
  2 x parameters FLOPs per guidance row. A token takes the longest of: those bytes at the GPU's memory bandwidth,
  those FLOPs at 80% of its dense bf16 peak (which reproduces NEXTSTEP.md's ceiling of about 34k images/hour on an
  H100 at 512x512), and the host's kernel dispatch in eager mode (34.7 ms a token for NextStep-1-Large at 50 steps,
  measured on the 2-core CPU machine, NEXTSTEP.md: about 4.4 us a kernel). The dispatch bound counts only when the
  job's token steps run eager (`--compile off`): compiled ones (the default on CUDA) are one CUDA-graph replay a
  token. B is the job's --batch-size, or fewer when the KV cache of B images does not fit next to the weights.
  These are bounds from a model, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray_render.models.base import ModelDescription

BYTES_BF16 = 2
PROMPT_TOKENS = 64  # text tokens assumed per row (prompt, image prefix): the KV cache beyond the image's tokens
COMPUTE_EFFICIENCY = 0.8  # of the dense bf16 peak; reproduces NEXTSTEP.md's 34k images/hour on an H100
MEMORY_USABLE = 0.92  # of the GPU's memory, the rest for the CUDA context and the allocator
ACTIVATION_OVERHEAD = 1.05  # on top of the KV cache per image (NEXTSTEP.md: 1024x1024 batch 16 about 55 GB)
# Host time per kernel launched in eager mode: 34.7 ms for the 7,960 kernels of a NextStep-1-Large token at 50 steps
# (NEXTSTEP.md), of which about 2,100 in the 48-layer backbone and 117 per step of the 12-layer head.
HOST_SECONDS_PER_KERNEL = 34.7e-3 / 7960
KERNELS_PER_BACKBONE_LAYER = 2100 / 48
KERNELS_PER_HEAD_LAYER_STEP = 117 / 12


@dataclass(frozen=True)
class RowShape:
    """What decides one image's cost: its tokens, sampling steps and guidance rows (1, 2 with cfg, 3 with cfg_img)."""

    width: int
    height: int
    tokens: int
    steps: int
    branches: int
    edit: bool = False  # an edit row's prompt also holds the input image's tokens


@dataclass(frozen=True)
class Gpu:
    """A GPU of the bandwidth model, from its vendor's spec sheet."""

    name: str
    memory_gb: float
    bandwidth_tb_s: float
    bf16_tflops: float  # dense


GPUS = (
    Gpu("H100", 80, 3.35, 989),  # H100 SXM5 80 GB
    Gpu("H200", 141, 4.8, 989),
    Gpu("B200", 180, 8.0, 2250),
    Gpu("A100-80GB", 80, 2.039, 312),  # A100 SXM4 80 GB
    Gpu("L40S", 48, 0.864, 362),
)
BANDWIDTH_ORIGIN = ("bandwidth model (NEXTSTEP.md Performance facts; {gpu}: {memory:g} GB, {bw:g} TB/s, {tf:g} "
                    "TFLOPS bf16 from the spec sheet), not measured")


@dataclass(frozen=True)
class Measured:
    """Images per second that `ray-render bench` measured for one model on one machine, at a reference shape."""

    device: str
    model: str  # the model it ran: "tiny" (and copies of it, by revision) or "placeholder"
    images_per_s: dict  # batch size -> images/s of one actor
    shape: RowShape  # what the measured images were
    origin: str


MEASURED = (
    Measured("cpu-2core", "tiny", {1: 9.4, 4: 26.5, 16: 41.0, 32: 50.3}, RowShape(64, 64, 16, 20, 2),
             "measured: ray-render bench, actor suite (tiny model, one actor, 64x64, 20 steps, cfg 3), "
             "BENCHMARKS.md 2026-11-21 on a 2-core AMD EPYC VM; other shapes scaled by tokens x kernels per token"),
    Measured("cpu-2core", "placeholder", {1: 1051.0}, RowShape(64, 64, 16, 2, 1),
             "measured: ray-render bench, orchestration suite (placeholder model, 2 actors, 64x64 PNG, steady "
             "2,020-2,190 rows/s), BENCHMARKS.md 2026-11-21 on a 2-core AMD EPYC VM; scaled by pixels"),
)


@dataclass
class Estimate:
    """One device's estimate for a whole plan."""

    gpu: str
    seconds_per_image: float | None  # None: the model does not fit this device
    gpu_hours: float | None  # device-hours: seconds per image x images, over every device of this kind
    batch_size: int  # the batch the estimate assumes (the job's, or what fits)
    limit: str  # what bounds it: "measured", "memory bandwidth", "compute", "host dispatch (eager)", "does not fit"
    origin: str
    usd: float | None = None  # with --price

    def to_dict(self) -> dict:
        data = {"gpu": self.gpu, "seconds_per_image": _round(self.seconds_per_image),
                "gpu_hours": _round(self.gpu_hours), "batch_size": self.batch_size, "limit": self.limit,
                "origin": self.origin}
        if self.usd is not None:
            data["usd"] = _round(self.usd)
        return data


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def estimates(model: ModelDescription, shapes: dict[RowShape, int], batch_size: int, tiny_revision: str | None,
              prices: dict[str, float] | None = None, compiled: bool = True) -> list[Estimate]:
    """An Estimate per device that applies to `model`: its measured entries, then (for a model with an
    architecture) every GPU of the bandwidth model. `shapes` counts images per RowShape; `compiled`: whether
    token steps on a GPU are compiled and captured (the job's --compile is not off)."""
    prices = {name.lower(): usd for name, usd in (prices or {}).items()}
    images = sum(shapes.values())
    found: list[Estimate] = []
    for entry in MEASURED:
        if entry.model == model.family or (entry.model == "tiny" and model.revision is not None
                                           and model.revision == tiny_revision):
            seconds = sum(count * measured_seconds(entry, shape, batch_size, model.architecture)
                          for shape, count in shapes.items())
            found.append(Estimate(entry.device, seconds / images, seconds / 3600, batch_size, "measured",
                                  entry.origin))
    if model.architecture:
        for gpu in GPUS:
            found.append(_bandwidth_estimate(gpu, model.architecture, shapes, batch_size, compiled))
    for estimate in found:
        price = prices.get(estimate.gpu.lower())
        if price is not None and estimate.gpu_hours is not None:
            estimate.usd = estimate.gpu_hours * price
    return found


def kernels_per_token(arch: dict, steps: int) -> float:
    """Kernels one image token launches: the backbone's layers once, the head's layers once per sampling step."""
    return KERNELS_PER_BACKBONE_LAYER * arch["layers"] + KERNELS_PER_HEAD_LAYER_STEP * arch["head_layers"] * steps


def measured_seconds(entry: Measured, shape: RowShape, batch_size: int, arch: dict | None = None) -> float:
    """Seconds per image of `shape` at `batch_size`, from the entry's measured rates (log-log between batch sizes),
    scaled from the measured shape (see the module docstring)."""
    points = sorted(entry.images_per_s.items())
    if batch_size <= points[0][0] or len(points) == 1:
        rate = points[0][1] if batch_size <= points[0][0] else points[-1][1]
    elif batch_size >= points[-1][0]:
        rate = points[-1][1]
    else:
        (b0, r0), (b1, r1) = next((p, q) for p, q in zip(points, points[1:]) if p[0] <= batch_size <= q[0])
        share = (math.log(batch_size) - math.log(b0)) / (math.log(b1) - math.log(b0))
        rate = math.exp(math.log(r0) + share * (math.log(r1) - math.log(r0)))
    ref = entry.shape
    if entry.model == "placeholder" or not arch:
        scale = (shape.width * shape.height) / (ref.width * ref.height)
    else:
        scale = shape.tokens * kernels_per_token(arch, shape.steps) / (ref.tokens * kernels_per_token(arch, ref.steps))
    return scale / rate


def max_batch(gpu: Gpu, arch: dict, shape: RowShape) -> int:
    """Images of `shape` whose KV cache (and activations) fit next to the bf16 weights; 0 when not even one does."""
    weights = BYTES_BF16 * (arch["backbone_params"] + arch["head_params"] + arch.get("embedding_params", 0))
    per_image = shape.branches * _kv_per_position(arch) * _context(shape) * ACTIVATION_OVERHEAD
    return max(0, int((gpu.memory_gb * 1e9 * MEMORY_USABLE - weights) // per_image))


def token_bounds(gpu: Gpu, arch: dict, shape: RowShape, batch: int, compiled: bool = False) -> dict[str, float]:
    """Seconds one token step of a batch of `batch` images takes at best, by what bounds it: reading the weights
    and KV cache, the arithmetic, and in eager mode the host launching the kernels (a compiled step is one graph
    replay: its launch is no bound)."""
    read = (BYTES_BF16 * (arch["backbone_params"] + shape.steps * arch["head_params"])
            + batch * shape.branches * _kv_per_position(arch) * (_context(shape) - shape.tokens / 2))
    flops = batch * 2 * shape.branches * (arch["backbone_params"] + shape.steps * arch["head_params"])
    bounds = {"memory bandwidth": read / (gpu.bandwidth_tb_s * 1e12),
              "compute": flops / (gpu.bf16_tflops * 1e12 * COMPUTE_EFFICIENCY)}
    if not compiled:
        bounds["host dispatch (eager)"] = kernels_per_token(arch, shape.steps) * HOST_SECONDS_PER_KERNEL
    return bounds


def _kv_per_position(arch: dict) -> float:
    return 2 * arch["layers"] * arch["kv_width"] * BYTES_BF16  # K and V, one guidance row


def _context(shape: RowShape) -> int:
    """Tokens in the KV cache at the end of an image: the prompt, an edit's input image, the image."""
    return PROMPT_TOKENS + shape.tokens * (2 if shape.edit else 1)


def _bandwidth_estimate(gpu: Gpu, arch: dict, shapes: dict[RowShape, int], batch_size: int,
                        compiled: bool) -> Estimate:
    origin = BANDWIDTH_ORIGIN.format(gpu=gpu.name, memory=gpu.memory_gb, bw=gpu.bandwidth_tb_s, tf=gpu.bf16_tflops)
    seconds, limits, batches = 0.0, {}, []
    for shape, count in shapes.items():
        fits = max_batch(gpu, arch, shape)
        if fits < 1:
            return Estimate(gpu.name, None, None, 0, "does not fit", origin)
        batch = min(batch_size, fits)
        batches.append(batch)
        bounds = token_bounds(gpu, arch, shape, batch, compiled)
        limit = max(bounds, key=bounds.get)
        limits[limit] = limits.get(limit, 0) + count
        seconds += count * shape.tokens * bounds[limit] / batch
    images = sum(shapes.values())
    return Estimate(gpu.name, seconds / images, seconds / 3600, min(batches), max(limits, key=limits.get), origin)
