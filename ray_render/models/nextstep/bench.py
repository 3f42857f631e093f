"""Figures for the NextStep runtime: images per second against batch size, the token step eager against
compiled, and a full-size random model for GPUs.

`measure_batching` renders the same number of distinct rows (own prompt, own seed) at each batch size and
reports images/s and the speedup over batch 1; `ray-render bench` and benchmarks/model_batching.py call it.
`measure_decode` renders one batch with an eager and a compiled copy of the same random model, side by side,
and reports host time and dispatched ops per token step (`ray-render bench --suite decode`).
`build_large_random` builds the NextStep-1-Large architecture (14B backbone, 157M head, f8ch16 VAE) with random
weights directly on a CUDA device, so batching can be measured on a GPU without downloading the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from ray_render.models.base import RenderRequest

# Special ids of the embedded tiny tokenizer, used by the random large model (its tokenizer).
_TINY_SPECIAL_IDS = {"boi": 801, "eoi": 802, "image_placeholder_id": 803, "pad_token_id": 799, "eos_token_id": 798,
                     "bos_token_id": None}
_PROMPTS = ["a red cube on a wooden table", "three golden stars above a dark mountain at night",
            "a fluffy orange cat sleeping on a blue chair in a sunny garden, watercolor",
            "a lighthouse on a cliff during a storm", "a bowl of ramen, studio photo",
            "an astronaut riding a horse on the moon", "a city skyline at dusk, oil painting",
            "a small robot reading a book in a library"]


def requests_for(n: int, *, width: int, height: int, steps: int, cfg: float, start: int = 0,
                 **params) -> list[RenderRequest]:
    """`n` distinct rows: different prompts and seeds, the same batch key."""
    return [RenderRequest(key=f"bench-{i}", prompt=f"{_PROMPTS[i % len(_PROMPTS)]}, variation {i}", seed=i,
                          width=width, height=height, num_sampling_steps=steps, cfg=cfg, **params)
            for i in range(start, start + n)]


def measure_batching(batch_sizes: Sequence[int] = (1, 4, 16, 32), rows: int = 64, steps: int | None = None, *,
                     model="tiny", device: str = "cpu", dtype: str = "auto", noise: str = "fast",
                     width: int | None = None, height: int | None = None, cfg: float | None = None,
                     warmup: int = 1, compile: str = "auto", **render_params) -> dict:
    """Images/s at each batch size for `rows` rows (at least one full batch each), plus the speedup over the
    smallest batch size. `model`: a name for load_nextstep ("tiny", a path, ...), "large-random" (see
    build_large_random; CUDA only), or an already loaded ImageModel. Unset width/height/steps/cfg take the
    model's defaults."""
    if isinstance(model, str):
        name = model
        if model == "large-random":
            model = build_large_random(device=device if device != "cpu" else "cuda", noise=noise, compile=compile)
        else:
            from ray_render.models.nextstep import load_nextstep

            model = load_nextstep(model, device=device, dtype=dtype, noise=noise, compile=compile)
    else:
        name = model.info.name
    d = model.defaults()
    width, height = width or d.get("width", 64), height or d.get("height", 64)
    steps, cfg = steps or d.get("num_sampling_steps", 12), cfg if cfg is not None else d.get("cfg", 3.0)
    results = []
    for b in batch_sizes:
        n_batches = max(1, rows // b)
        for w in range(warmup):
            model.render(requests_for(b, width=width, height=height, steps=steps, cfg=cfg, start=10_000 + w * b,
                                      **render_params))
        batches = [requests_for(b, width=width, height=height, steps=steps, cfg=cfg, start=i * b, **render_params)
                   for i in range(n_batches)]
        _sync(model)
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            model.render(batch)
        _sync(model)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        images = n_batches * b
        results.append({"batch_size": b, "images": images, "seconds": round(wall, 4),
                        "cpu_seconds": round(cpu, 4), "images_per_s": round(images / wall, 3),
                        "ms_per_image": round(1000 * wall / images, 2)})
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup"] = round(r["images_per_s"] / base, 2)
    return {
        "benchmark": "model_batching", "model": name, "revision": model.info.revision, "device": model.info.device,
        "dtype": model.info.dtype, "noise": getattr(model, "noise", noise), "width": width, "height": height,
        "steps": steps, "cfg": cfg, "rows": rows, "torch_threads": getattr(model, "cpu_threads", None)
        or torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": _load_average(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if model.info.device.startswith("cuda") else None,
        "compiled": bool(getattr(model, "compiled", False)),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results,
    }


# Widths of the deep-narrow model: NextStep-1-Large's depth (48 layers, 12 head blocks) at widths so small that
# the CPU's arithmetic is a small part of a step, so what is measured is the host's cost of running the step:
# what a GPU would wait on.
NARROW = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
          "fm_head_dim": 32}


def deep_narrow(layers: int = 48, blocks: int = 12, compile: str = "off", seed: int = 0,
                length_bucket: int | None = None, **overrides):
    """A random NextStep model of `layers` backbone layers and `blocks` head blocks at NARROW widths, on the CPU
    with the embedded tiny model's VAE. The same seed gives the same weights whatever `compile` is."""
    vae_config = json.loads((_tiny_dir() / "vae" / "config.json").read_text())
    return build_large_random(device="cpu", dtype=torch.float32, seed=seed, vae_config=vae_config, compile=compile,
                              length_bucket=length_bucket, num_hidden_layers=layers, fm_head_layers=blocks,
                              **{**NARROW, **overrides})


def measure_decode(layers: int = 48, blocks: int = 12, steps: int = 50, batch: int = 8, side: int = 256,
                   cfg: float = 7.5, repeat: int = 3) -> dict:
    """The token step eager and compiled on the same model and requests (`batch` images with guidance, `steps`
    sampling steps, `side` x `side`): host time and dispatched ops per token step, per image, the images'
    difference. Each round renders with both, in turn (alternating which goes first); the figures are the
    medians of the rounds, the ratio that of the per-round ratios."""
    requests = requests_for(batch, width=side, height=side, steps=steps, cfg=cfg)
    models, first_call_s, images = {}, {}, {}
    for mode in ("eager", "compiled"):
        models[mode] = deep_narrow(layers, blocks, "on" if mode == "compiled" else "off")
        started = time.perf_counter()
        images[mode] = models[mode].render(requests)  # the compiled model compiles here, once
        first_call_s[mode] = round(time.perf_counter() - started, 2)
    rounds = []
    for r in range(repeat):
        figures = {}
        for mode in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            started, cpu = time.perf_counter(), time.process_time()
            models[mode].render(requests)
            run = models[mode].parts.decoder.last_run
            figures[mode] = {"render_s": time.perf_counter() - started, "render_cpu_s": time.process_time() - cpu,
                             "step_ms": 1000 * run["wall_s"] / run["tokens"],
                             "step_cpu_ms": 1000 * run["cpu_s"] / run["tokens"], "tokens": run["tokens"]}
        rounds.append(figures)
    result = {}
    for mode in ("eager", "compiled"):
        runs = [r[mode] for r in rounds]
        tokens = runs[0]["tokens"]
        median = {k: statistics.median(run[k] for run in runs) for k in ("render_s", "step_ms", "step_cpu_ms")}
        result[mode] = {"first_call_s": first_call_s[mode], "ms_per_token_step": round(median["step_ms"], 3),
                        "cpu_ms_per_token_step": round(median["step_cpu_ms"], 3),
                        "s_per_image": round(median["render_s"] / batch, 4),
                        "ops_per_token_step": dispatched_ops_per_token(models[mode], requests), "tokens": tokens}
    eager, compiled = np.stack(images["eager"]).astype(int), np.stack(images["compiled"]).astype(int)
    diff = np.abs(eager - compiled)
    ratios = {"token step": round(statistics.median(r["eager"]["step_ms"] / r["compiled"]["step_ms"]
                                                    for r in rounds), 2),
              "per image": round(statistics.median(r["eager"]["render_s"] / r["compiled"]["render_s"]
                                                   for r in rounds), 2)}
    return {"benchmark": "decode", "layers": layers, "head_blocks": blocks, "widths": NARROW, "steps": steps,
            "batch": batch, "size": f"{side}x{side}", "cfg": cfg, "rounds": repeat, "device": "cpu",
            "torch_threads": models["eager"].cpu_threads or torch.get_num_threads(), "torch": torch.__version__,
            "eager": result["eager"], "compiled": result["compiled"], "ratios": ratios,
            "image_diff": {"max": int(diff.max()), "p99": float(np.percentile(diff, 99)),
                           "mean": round(float(diff.mean()), 4)},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# Side of the images an eager model's ops are counted on (see dispatched_ops_per_token).
EAGER_PROFILE_SIDE = 64


def dispatched_ops_per_token(model, requests) -> float:
    """Calls into torch's dispatcher (aten ops called from Python or from a compiled graph's wrapper, not the ops
    they call in turn) per token step of one render, counted by torch.profiler inside the decoder's token loop.

    The profiler keeps every op it records, and an eager token step at full depth dispatches thousands: a 256x256
    render (2 million ops with their children) would take more memory than the machine has. So an eager model
    renders the same rows at EAGER_PROFILE_SIDE (16 tokens): its ops per step do not depend on the image's size,
    only the attention window's length does. A compiled model dispatches few ops per step, and another size would
    be another compile: it renders the rows as given."""
    from torch.profiler import ProfilerActivity, profile

    from ray_render.models.nextstep.decoder import PROFILE_RANGE

    if not getattr(model, "compiled", False):
        requests = [dataclasses.replace(r, width=min(r.width, EAGER_PROFILE_SIDE),
                                        height=min(r.height, EAGER_PROFILE_SIDE)) for r in requests]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.render(requests)
    events = prof.events()
    ranges = [e for e in events if e.name == PROFILE_RANGE]

    def inside(e) -> bool:
        return any(r.time_range.start <= e.time_range.start and e.time_range.end <= r.time_range.end
                   for r in ranges)

    top = [e for e in events if e.name.startswith("aten::") and inside(e)
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return round(len(top) / model.parts.decoder.last_run["tokens"], 1)


def format_decode_table(result: dict) -> str:
    """measure_decode's figures as a plain-text table."""
    head = (f"{result['layers']} layers, {result['head_blocks']} head blocks, widths {result['widths']['hidden_size']}"
            f"/{result['widths']['fm_head_dim']}, batch {result['batch']} with guidance, {result['steps']} steps, "
            f"{result['size']}, {result['device']}")
    lines = [head, f"{'mode':>9} {'ms/token step':>14} {'cpu ms/step':>12} {'ops/step':>9} {'s/image':>8} "
                   f"{'first call s':>13}"]
    for mode in ("eager", "compiled"):
        r = result[mode]
        lines.append(f"{mode:>9} {r['ms_per_token_step']:>14.2f} {r['cpu_ms_per_token_step']:>12.2f} "
                     f"{r['ops_per_token_step']:>9.0f} {r['s_per_image']:>8.3f} {r['first_call_s']:>13.1f}")
    d = result["image_diff"]
    lines.append(f"compiled vs eager: {result['ratios']['token step']:.2f}x per token step, "
                 f"{result['ratios']['per image']:.2f}x per image; images differ by at most {d['max']} "
                 f"(99th percentile {d['p99']:.0f}, mean {d['mean']:.3f})")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The results as a plain-text table."""
    head = (f"{result['model']} on {result['device']} ({result['dtype']}), {result['width']}x{result['height']}, "
            f"{result['steps']} steps, cfg {result['cfg']}, threads {result['torch_threads']}")
    lines = [head, f"{'batch':>6} {'images':>7} {'seconds':>9} {'images/s':>9} {'ms/image':>9} {'speedup':>8}"]
    for r in result["results"]:
        lines.append(f"{r['batch_size']:>6} {r['images']:>7} {r['seconds']:>9.3f} {r['images_per_s']:>9.2f} "
                     f"{r['ms_per_image']:>9.1f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def _sync(model) -> None:
    if model.info.device.startswith("cuda"):
        torch.cuda.synchronize()


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# The full-size architecture with random weights ------------------------------------------------------------------

def large_config(**overrides):
    """NextStep-1-Large sizes (Qwen2.5-14B backbone, 1536x12 head), with the tiny tokenizer's special ids."""
    from ray_render.models.nextstep.config import NextStepConfig

    return NextStepConfig(**{**_TINY_SPECIAL_IDS, "vae_name_or_path": None, **overrides})


@torch.no_grad()
def build_large_random(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, noise: str = "fast",
                       seed: int = 0, vae_config: dict | None = None, compile: str = "auto",
                       length_bucket: int | None = None, **config_overrides):
    """A NextStepImageModel of the real NextStep-1-Large sizes with random weights, allocated on `device`.

    No weights file: the modules are created on the meta device and materialised in `dtype` on the device, then
    filled with normal(0, 0.02) (norm gains 1), the VAE's from the same generator. The tokenizer is the embedded
    tiny one (its ids are below the real vocabulary size), so prompts tokenize to a similar length as with the
    real tokenizer. The VAE is the released f8ch16 architecture, random (or `vae_config`). Keyword overrides change
    config sizes (tests build a small one on CPU). The images are noise; the timings are what they measure.
    """
    from ray_render.models.base import ModelInfo
    from ray_render.models.nextstep import snapshot as snap
    from ray_render.models.nextstep import vae as vae_lib
    from ray_render.models.nextstep.image_model import NextStepImageModel
    from ray_render.models.nextstep.loading import build_model, resolve_device
    from ray_render.models.nextstep.resolve import tiny_dir

    dev = resolve_device(device)
    config = large_config(**config_overrides)
    model = build_model(config, dev, dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or "in_ln.weight" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    vae_config = dict(vae_config or vae_lib.VAE_DEFAULTS)
    vae = torch.nn.Module.to(vae_lib.build_autoencoder(vae_config), device=dev, dtype=dtype).eval()
    for name, p in vae.named_parameters():  # from the same generator: one seed, one model, the VAE included
        if p.dim() > 1:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        else:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
    tokenizer = snap.load_tokenizer(tiny_dir())
    info = ModelInfo(name="large-random", family="nextstep", revision=f"random-{seed}", device=str(dev),
                     dtype=str(dtype).replace("torch.", ""))
    defaults = {"width": 512, "height": 512, "num_sampling_steps": 50, "cfg": 7.5, "use_norm": True}
    return NextStepImageModel(model, vae, tokenizer, config, vae_config, info, defaults, noise=noise,
                              compile=compile, length_bucket=length_bucket)


def _tiny_dir():
    from ray_render.models.nextstep.resolve import tiny_dir

    return tiny_dir()


def cuda_available() -> bool:
    """Whether this process sees a CUDA device (the gpu suite needs one)."""
    return torch.cuda.is_available()
