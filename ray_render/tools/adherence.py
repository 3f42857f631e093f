"""Prompt adherence: does a model draw the colours a prompt asks for?

`evaluate` renders prompts held out from the tiny model's training (colour and shape combinations it never saw
together, from `ray_render.shapes`) with any model that `ray_render.models.load_model` opens, names each image's
object colour and background colour from its pixels (`classify`), and reports the accuracy for each guidance
scale asked for: by default the model's own cfg and cfg = 1 (guidance off), so the table shows what guidance buys.

    python -m ray_render.tools.adherence --model tiny
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ray_render.models import RenderRequest, load_model
from ray_render.models.nextstep import shapes

_PALETTE_NAMES = list(shapes.PALETTE)
_PALETTE_RGB = np.array([shapes.PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float32)  # (P, 3)
MIN_OBJECT_FRACTION = 0.01  # of the picture's pixels; fewer non-background pixels than this means "no object"


def classify(image: np.ndarray) -> tuple[str | None, str]:
    """Name the (object colour, background colour) of a (H, W, 3) uint8 picture of one shape on a plain ground.

    Each pixel takes the name of the nearest palette colour. The background is the most common name on the outer
    border ring (objects never reach it); the object is the most common other name inside the ring, or None when
    too few pixels differ from the background to make an object.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    pixels = image.astype(np.float32)
    distances = ((pixels[:, :, None, :] - _PALETTE_RGB[None, None]) ** 2).sum(axis=-1)  # (H, W, P)
    labels = distances.argmin(axis=-1)  # (H, W)
    b = max(1, round(shapes.BORDER * image.shape[0] / shapes.SIZE))
    ring = np.concatenate([labels[:b].ravel(), labels[-b:].ravel(), labels[b:-b, :b].ravel(),
                           labels[b:-b, -b:].ravel()])
    background = int(np.bincount(ring, minlength=len(_PALETTE_NAMES)).argmax())
    inner = labels[b:-b, b:-b].ravel()
    counts = np.bincount(inner[inner != background], minlength=len(_PALETTE_NAMES))
    if counts.sum() < MIN_OBJECT_FRACTION * labels.size:
        return None, _PALETTE_NAMES[background]
    return _PALETTE_NAMES[int(counts.argmax())], _PALETTE_NAMES[background]


def _render_all(model, requests: list[RenderRequest], batch_size: int) -> list[np.ndarray]:
    """Render requests in batches of compatible ones, keeping their order."""
    groups: dict = defaultdict(list)
    requests = [model.check(request) for request in requests]
    for index, request in enumerate(requests):
        groups[model.batch_key(request)].append(index)
    images: list[np.ndarray | None] = [None] * len(requests)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            for index, image in zip(chunk, model.render([requests[i] for i in chunk])):
                images[index] = image
    return images  # type: ignore[return-value]


def evaluate(model_name: str = "tiny", prompts: Sequence[tuple[shapes.Scene, str]] | None = None,
             cfg_values: Sequence[float] | None = None, *, per_combo: int = 16, seed: int = 0,
             num_sampling_steps: int | None = None, batch_size: int = 32, device: str = "auto",
             noise: str = "fast", model=None, keep_images: bool = False, verbose: bool = False) -> dict:
    """Render each prompt once per guidance scale and score the colours.

    `prompts` are (scene, caption) pairs, the scene saying which colours are expected; by default `per_combo`
    prompts for each held-out combination (`shapes.heldout_prompts`). `cfg_values` defaults to the model's own
    cfg and 1.0. Prompt i renders with seed `seed + i` at every cfg, so the rows differ only in guidance. Other
    settings are the model's defaults. An already loaded `model` may be passed instead of loading `model_name`.

    Returns {"model", "num_prompts", "settings", "results": [{"cfg", "object_accuracy",
    "background_accuracy", "both_accuracy", "seconds"}, ...]} and, with `keep_images`, "images" per cfg. When
    cfg 1 is among the scales, every other row also has "vs_cfg_1" (`paired_comparison`): whether guidance helps
    is judged prompt by prompt, not from two accuracies alone.
    """
    if model is None:
        model = load_model(model_name, device=device, noise=noise)
    pairs = list(prompts) if prompts is not None else shapes.heldout_prompts(per_combo=per_combo, seed=seed)
    if not pairs:
        raise ValueError("no prompts to evaluate")
    defaults = {k: v for k, v in model.defaults().items() if k in RenderRequest.__dataclass_fields__}
    if num_sampling_steps is not None:
        defaults["num_sampling_steps"] = num_sampling_steps
    if cfg_values is None:
        cfg_values = [float(defaults.get("cfg", RenderRequest.cfg)), 1.0]
    report: dict = {"model": model_name, "num_prompts": len(pairs), "prompts": "held-out" if prompts is None
                    else "given", "settings": defaults, "results": []}
    if keep_images:
        report["images"] = {}
    correct: dict[float, list[bool]] = {}  # cfg -> per prompt, both colours right
    for cfg in cfg_values:
        requests = [RenderRequest(**{**defaults, "key": f"adherence-{i}", "prompt": text, "cfg": float(cfg),
                                     "seed": seed + i}) for i, (_, text) in enumerate(pairs)]
        started = time.perf_counter()
        images = _render_all(model, requests, batch_size)
        seconds = time.perf_counter() - started
        found = [classify(image) for image in images]
        object_ok = [obj == scene.colour for (scene, _), (obj, _) in zip(pairs, found)]
        background_ok = [bg == scene.background for (scene, _), (_, bg) in zip(pairs, found)]
        both_ok = [a and b for a, b in zip(object_ok, background_ok)]
        report["results"].append({
            "cfg": float(cfg),
            "object_accuracy": float(np.mean(object_ok)),
            "background_accuracy": float(np.mean(background_ok)),
            "both_accuracy": float(np.mean(both_ok)),
            "seconds": round(seconds, 2),
        })
        correct[float(cfg)] = both_ok
        if keep_images:
            report["images"][float(cfg)] = images
        if verbose:
            for (scene, text), (obj, bg) in zip(pairs, found):
                mark = "ok " if (obj, bg) == (scene.colour, scene.background) else "BAD"
                print(f"  cfg {cfg:g} {mark} {text!r}: object {obj}, background {bg}")
    if 1.0 in correct:
        for row in report["results"]:
            if row["cfg"] != 1.0:
                row["vs_cfg_1"] = paired_comparison(correct[row["cfg"]], correct[1.0])
    return report


def paired_comparison(guided: Sequence[bool], unguided: Sequence[bool]) -> dict:
    """Compare two scorings of the same prompts with the same seeds: how many prompts only the guided render got
    right, how many only the unguided one, and the two-sided sign test's p-value on those (ties say nothing)."""
    better = sum(g and not u for g, u in zip(guided, unguided))
    worse = sum(u and not g for g, u in zip(guided, unguided))
    n, k = better + worse, min(better, worse)
    p_value = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"better": better, "worse": worse, "p_value": p_value}


def format_table(report: dict) -> str:
    """The report as a small fixed-width table."""
    lines = [f"prompt adherence of {report['model']!r} on {report['num_prompts']} {report['prompts']} prompts "
             f"({report['settings'].get('width')}x{report['settings'].get('height')}, "
             f"{report['settings'].get('num_sampling_steps')} steps)",
             f"{'cfg':>6} {'object':>8} {'background':>11} {'both':>6} {'seconds':>8}  "
             f"against cfg 1 (same prompts and seeds)"]
    for row in report["results"]:
        versus = row.get("vs_cfg_1")
        paired = (f"  right only here {versus['better']}, only at cfg 1 {versus['worse']}, "
                  f"sign test p = {versus['p_value']:.2g}" if versus else "")
        lines.append(f"{row['cfg']:>6g} {row['object_accuracy']:>8.1%} {row['background_accuracy']:>11.1%} "
                     f"{row['both_accuracy']:>6.1%} {row['seconds']:>8.1f}{paired}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`ray-render eval`: print the adherence table (and write it as JSON with --json)."""
    parser = argparse.ArgumentParser(prog="ray-render eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="model to evaluate (default: the embedded tiny model)")
    parser.add_argument("--cfg", type=float, action="append", dest="cfg_values",
                        help="guidance scale to evaluate; repeat for several (default: the model's cfg and 1)")
    parser.add_argument("--per-combo", type=int, default=16,
                        help="prompts per held-out combination (default 16: 448 prompts)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt i is seed + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report to this file")
    parser.add_argument("--verbose", action="store_true", help="print every prompt and what was seen")
    args = parser.parse_args(argv)
    if args.per_combo < 1:
        parser.error(f"--per-combo must be >= 1, got {args.per_combo}")
    for cfg in args.cfg_values or []:
        if cfg < 1:
            parser.error(f"--cfg must be >= 1 (1 turns guidance off), got {cfg}")
    report = evaluate(args.model, cfg_values=args.cfg_values, per_combo=args.per_combo, seed=args.seed,
                      num_sampling_steps=args.steps, batch_size=args.batch_size, device=args.device,
                      verbose=args.verbose)
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
