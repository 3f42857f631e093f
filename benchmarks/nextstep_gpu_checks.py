"""NextStep checks that need a CUDA device, on the tiny fixture (tests/fixtures/nextstep-tiny); the same run with
--device cpu checks the script itself.

    python benchmarks/nextstep_gpu_checks.py                     # cuda; writes $OUT/nextstep_gpu_checks.json
    python benchmarks/nextstep_gpu_checks.py --device cpu --out results.json
    python benchmarks/nextstep_gpu_checks.py --compiled          # check 2 only, with --compile on (CUDA graphs)

1. draws      `reference` noise against the official pipeline's single-prompt draws on the device: the official
              call seeds torch (torch.manual_seed(seed) seeds every device's generator) and draws one (1, 64)
              normal per site from the device's global generator, N * S of them in token order (the fixture
              README spells the order out). They must be bit-identical.
2. compute    the fixture's cases rendered on the device in float32 with the official CPU draws put in place of
              the device's own (the only thing that differs between devices), against the official tensors and
              PNGs: within 1e-4 and 1 per PNG value, as on CPU. TF32 is turned off for this.
3. rope       the fixture in bfloat16 on the device with the official bf16 RoPE frequencies (--rope-precision
              auto) and with fp32 ones: how far hidden states, tokens and pixels move. A figure, not a pass/fail.

With --compiled, check 2 alone with the token step compiled and replayed from CUDA graphs: the PNGs within 1 per
value (the tensors are reported). Exit status 0 when checks 1 and 2 pass. Prints a summary and writes every
figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ray_render.models.base import RenderRequest
from ray_render.models.nextstep import generate as generate_lib
from ray_render.models.nextstep import load_nextstep
from ray_render.models.nextstep.sampler import draws_per_token

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nextstep-tiny"
CASES = json.loads((FIXTURE / "reference" / "cases.json").read_text())["cases"]
ATOL = 1e-4


def case_request(name: str) -> RenderRequest:
    s = CASES[name]["settings"]
    return RenderRequest(key=name, prompt=s["caption"], negative_prompt=s["negative_prompt"] or "",
                         positive_prompt=s["positive_prompt"] or "", height=s["hw"][0], width=s["hw"][1],
                         cfg=s["cfg"], cfg_img=s["cfg_img"], cfg_schedule=s["cfg_schedule"], use_norm=s["use_norm"],
                         timesteps_shift=s["timesteps_shift"], num_sampling_steps=s["num_sampling_steps"],
                         seed=s["seed"])


def official_draws(device: str, seed: int, n_tokens: int, draws: int) -> torch.Tensor:
    """What the official pipeline draws for one caption: (N, S, 64) from the device's global generator."""
    torch.manual_seed(seed)
    sites = [torch.randn((1, 64), device=device) for _ in range(n_tokens * draws)]
    return torch.cat(sites).reshape(n_tokens, draws, 64).cpu()


def check_draws(device: str) -> dict:
    model = load_nextstep(str(FIXTURE), device=device, noise="reference")
    results = {}
    for name in sorted(CASES):
        request = model.check(case_request(name))
        _, trace = model.generate([request], trace=True)
        n_tokens, draws = trace.noise.shape[1], draws_per_token(request.num_sampling_steps)
        expected = official_draws(device, request.seed, n_tokens, draws)
        results[name] = {"identical": bool(torch.equal(trace.noise[0], expected)),
                         "max_abs_diff": float((trace.noise[0] - expected).abs().max())}
    return results


def check_compute(device: str, compile: str = "off") -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_nextstep(str(FIXTURE), device=device, noise="reference", compile=compile)
    drawn = generate_lib.noise_table
    results = {}
    for name in sorted(CASES):
        ref = load_file(str(FIXTURE / "reference" / f"{name}.safetensors"))
        official = torch.cat([ref["noise_init"], ref["noise_steps"][:, :, 0]], dim=1)  # (N, S, 64), CPU draws

        def fixture_noise(generator, n_tokens, draws, dim, mode, official=official):
            return official.to(generator.device)

        generate_lib.noise_table = fixture_noise  # the only device-dependent input, made equal
        try:
            images, trace = model.generate([model.check(case_request(name))], trace=True)
        finally:
            generate_lib.noise_table = drawn
        diffs = {
            "cond_hidden": float((torch.stack(trace.cond_hidden, 1) - ref["cond_hidden"]).abs().max()),
            "tokens": float((trace.tokens - ref["tokens"]).abs().max()),
            "latents": float((trace.latents[0] - ref["latents"]).abs().max()),
            "decoded": float((trace.decoded[0] - ref["decoded"]).abs().max()),
        }
        png = np.asarray(Image.open(FIXTURE / "reference" / f"{name}.png").convert("RGB")).astype(int)
        png_diff = int(np.abs(images[0].astype(int) - png).max())
        tensors_ok = all(v <= ATOL for v in diffs.values()) or compile == "on"  # compiled: the PNGs decide
        results[name] = {**diffs, "png_max_diff": png_diff, "pass": tensors_ok and png_diff <= 1}
    return results


def compare_rope(device: str) -> dict:
    dtype = "bfloat16" if device != "cpu" else "float32"
    official = load_nextstep(str(FIXTURE), device=device, dtype=dtype, noise="reference", rope_precision="bf16")
    fp32 = load_nextstep(str(FIXTURE), device=device, dtype=dtype, noise="reference", rope_precision="fp32")
    results = {"dtype": dtype}
    for name in sorted(CASES):
        request = official.check(case_request(name))
        a_images, a = official.generate([request], trace=True)
        b_images, b = fp32.generate([request], trace=True)
        results[name] = {
            "cond_hidden_max_diff": float((torch.stack(a.cond_hidden) - torch.stack(b.cond_hidden)).abs().max()),
            "tokens_max_diff": float((a.tokens - b.tokens).abs().max()),
            "png_max_diff": int(np.abs(a_images[0].astype(int) - b_images[0].astype(int)).max()),
            "png_mean_diff": float(np.abs(a_images[0].astype(int) - b_images[0].astype(int)).mean()),
        }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="JSON file (default: $OUT/nextstep_gpu_checks.json, else ./)")
    parser.add_argument("--compiled", action="store_true", help="check 2 only, with the token step compiled")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to check the script itself", file=sys.stderr)
        return 2
    if args.compiled:
        compute = check_compute(args.device, compile="on")
        ok = all(r["pass"] for r in compute.values())
        out = Path(args.out or Path(os.environ.get("OUT", ".")) / "nextstep_gpu_checks_compiled.json")
        out.write_text(json.dumps({"device": args.device, "compute_compiled": compute, "pass": ok}, indent=2) + "\n")
        print("compute (compiled)", json.dumps(compute))
        print(f"{'pass' if ok else 'FAIL'}; figures in {out}")
        return 0 if ok else 1
    result = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "draws": check_draws(args.device), "compute": check_compute(args.device),
              "rope": compare_rope(args.device)}
    ok = all(r["identical"] for r in result["draws"].values()) and all(r["pass"] for r in result["compute"].values())
    result["pass"] = ok
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "nextstep_gpu_checks.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for section in ("draws", "compute", "rope"):
        print(section, json.dumps(result[section]))
    print(f"{'pass' if ok else 'FAIL'}; figures in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
