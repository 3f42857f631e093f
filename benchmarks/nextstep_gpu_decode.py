"""Decode figures of NextStep-1-Large's architecture (random bf16 weights) on one CUDA device: seconds per image at
512x512 with guidance, batch 1, 8, 16 and 32, 50 and 28 steps, the token step compiled (CUDA graphs) and eager;
the memory planner's batch; peak memory; and the ratio to the memory-bandwidth bound.

    python benchmarks/nextstep_gpu_decode.py                  # writes $OUT/nextstep_gpu_decode.json
    python benchmarks/nextstep_gpu_decode.py --budget-s 300 --out figures.json

The bound of a render is its token steps' bytes (planner.bytes_read_per_token: the backbone's weights once, the
head's per-step weights once per sampling step, the keys and values cached so far) over the device's copy
bandwidth, measured first. A measurement renders one batch to compile and capture, then times a second render
of other rows, whole (prefill and VAE included). Measurements run in order of importance (compiled at batch 8
and 50 steps first) and none starts that the budget would not cover by its estimate; skipped ones are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ray_render.models.nextstep.bench import build_large_random, requests_for
from ray_render.models.nextstep.decoder import Decoder
from ray_render.models.nextstep.planner import bytes_read_per_token

SIDE = 512
# (compile, steps, batch) in order of importance: the goal's case, the batch sweep, eager, then 28 steps.
PLAN = [("on", 50, 8), ("on", 50, 32), ("on", 50, 16), ("on", 50, 1), ("off", 50, 8), ("off", 50, 1),
        ("on", 28, 8), ("on", 28, 32), ("on", 28, 16), ("on", 28, 1), ("off", 28, 8)]


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes per second of a device-to-device copy, counting what is read and what is written."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del src, dst
    return 2 * int(gib * 2**30) / seconds


def bound_s_per_image(model, requests, bandwidth: float) -> float:
    """The memory-bandwidth bound of rendering `requests` together, per image."""
    config, branches = model.config, model.parts.branches(requests[0])
    gh, gw = model.parts.grid(requests[0].height, requests[0].width)
    tokens = gh * gw
    prompt = max(model.parts.prompts.count(t) for r in requests for t in model.parts.texts(r)) + 8
    draws = requests[0].num_sampling_steps
    total = sum(bytes_read_per_token(config, model.parts.dtype.itemsize, draws, branches * len(requests), prompt + k)
                for k in range(tokens))
    return total / bandwidth / len(requests)


def measure(model, compile_mode: str, steps: int, batch: int, bandwidth: float) -> dict:
    requests = requests_for(batch, width=SIDE, height=SIDE, steps=steps, cfg=7.5)
    planned = model.max_batch(model.check(requests[0]))
    if batch > planned:
        return {"skipped": f"the planner's batch is {planned}"}
    started = time.perf_counter()
    model.render(requests)  # compiles (once per step shape) and captures this batch bucket's graphs
    torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    timed = requests_for(batch, width=SIDE, height=SIDE, steps=steps, cfg=7.5, start=1000)
    started = time.perf_counter()
    model.render(timed)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    bound = bound_s_per_image(model, timed, bandwidth)
    return {"compile": compile_mode, "steps": steps, "batch": batch, "planner_batch": planned,
            "first_call_s": round(first_s, 2), "s_per_image": round(wall / batch, 4),
            "host_ms_per_token_step": round(1000 * model.parts.decoder.last_run["wall_s"]
                                            / model.parts.decoder.last_run["tokens"], 3),
            "bound_s_per_image": round(bound, 4), "ratio_to_bound": round(wall / batch / bound, 3),
            "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON file (default: $OUT/nextstep_gpu_decode.json, else ./)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no measurement after this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "nextstep_gpu_decode.json")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": f"{SIDE}x{SIDE}", "cfg": 7.5,
              "copy_bandwidth_gb_s": None, "results": [], "skipped": []}

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    result["copy_bandwidth_gb_s"] = round(copy_bandwidth() / 1e9, 1)
    bandwidth = result["copy_bandwidth_gb_s"] * 1e9
    model = build_large_random(device="cuda", compile="on")
    result["free_after_loading_gib"] = round(model.free_bytes / 2**30, 2)
    result["batch_plan"] = model.info.settings["batch_plan"]
    decoders = {"on": model.parts.decoder}
    # (compile, steps) -> seconds of the last timed render: a next measurement in that group costs two renders
    # and a capture; the first in a group also a compile (minutes) or, eager, two slow renders.
    rendered: dict[tuple, float] = {}
    for compile_mode, steps, batch in PLAN:
        last = rendered.get((compile_mode, steps))
        estimate = 2 * last + 30 if last is not None else (240.0 if compile_mode == "on" else 120.0)
        if time.monotonic() + estimate > deadline:
            result["skipped"].append({"compile": compile_mode, "steps": steps, "batch": batch, "reason": "budget"})
            continue
        if compile_mode not in decoders:
            model.parts.decoder.release()
            decoders[compile_mode] = Decoder(model.parts.model, model.parts.device, compiled=compile_mode == "on")
        model.parts.decoder = decoders[compile_mode]
        try:
            figures = measure(model, compile_mode, steps, batch, bandwidth)
        except torch.OutOfMemoryError as e:
            figures = {"error": f"out of memory: {e}"[:300]}
            torch.cuda.empty_cache()
        if "s_per_image" in figures:
            rendered[(compile_mode, steps)] = figures["s_per_image"] * batch
        result["results"].append({"compile": compile_mode, "steps": steps, "batch": batch, **figures})
        print(json.dumps(result["results"][-1]), flush=True)
        save()
    save()
    print(f"figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
