"""Where a compiled token step's time goes on the CPU (BENCHMARKS.md, section 6): the generated kernels and the aten
ops of one render, by self time, from torch.profiler with inductor's kernel profile.

    python benchmarks/decode_profile.py --layers 8 --blocks 3 --steps 10 --side 256

The bench's deep-narrow random model (bench.deep_narrow) at the given depth, compiled as `--compile on` compiles
it, batch 8 with guidance, one thread: one render to compile, five to time (the median token step is printed),
then one profiled render. A shallower model than the bench's compiles in about two minutes and runs the same
kinds of kernels; the attention window grows with `--side` (256 image tokens at 256x256).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from ray_render.models.nextstep.bench import deep_narrow, requests_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--rows", type=int, default=30, help="table rows to print")
    args = parser.parse_args()
    torch.set_num_threads(1)
    requests = requests_for(8, width=args.side, height=args.side, steps=args.steps, cfg=7.5)
    # Read when the step compiles: each generated kernel then shows as its own event (graph_0_cpp_fused_...,
    # graph_0_gemm_...), at the cost of a profiler check per kernel call in the timed renders too.
    torch._inductor.config.cpp.enable_kernel_profile = True
    model = deep_narrow(args.layers, args.blocks, "on")
    started = time.perf_counter()
    model.render(requests)
    print(f"first render (compiles): {time.perf_counter() - started:.1f} s")
    steps_ms = []
    for _ in range(5):
        model.render(requests)
        run = model.parts.decoder.last_run
        steps_ms.append(1000 * run["wall_s"] / run["tokens"])
    print(f"token step: median {statistics.median(steps_ms):.3f} ms over 5 renders")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.render(requests)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
