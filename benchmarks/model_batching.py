"""Images/s of the NextStep runtime at batch 1, 4, 16 and 32, and the speedup of batching.

    python benchmarks/model_batching.py                              # tiny model on CPU
    python benchmarks/model_batching.py --model large-random --device cuda --width 512 --height 512 \
        --steps 50 --rows 32 --batch-sizes 1,8,32                    # NextStep-1-Large sizes, random weights

Prints a table and writes the figures as JSON (ray_render.models.nextstep.bench.measure_batching does the work).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ray_render.models.nextstep.bench import format_table, measure_batching


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help='"tiny", a snapshot, a repo id, a URL, or "large-random"')
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--noise", default="fast", choices=["fast", "reference"])
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--rows", type=int, default=64, help="rows rendered at each batch size")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--compile", default="auto", choices=["off", "on", "auto"],
                        help="compiled token steps (CUDA graphs on CUDA); auto: on for CUDA")
    parser.add_argument("--out", default="bench-results/model_batching.json")
    args = parser.parse_args(argv)
    result = measure_batching([int(b) for b in args.batch_sizes.split(",")], rows=args.rows, steps=args.steps,
                              model=args.model, device=args.device, dtype=args.dtype, noise=args.noise,
                              width=args.width, height=args.height, cfg=args.cfg, compile=args.compile)
    print(format_table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
