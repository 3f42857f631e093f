#!/usr/bin/env bash
# The GPU checks of the NextStep runtime, as one prepared command of at most 8 minutes on one CUDA device; every
# figure lands as JSON under $OUT (the device machine's output folder; ./gpu-results elsewhere).
#
#   1. benchmarks/nextstep_gpu_checks.py (about 1-2 min): the tiny fixture on CUDA: reference draws bit for bit,
#      the official tensors and PNGs in float32 (TF32 off), bf16 drift against fp32 RoPE.
#   2. the same fixture cases rendered with --compile on (CUDA graphs) against the official PNGs (within 1).
#   3. benchmarks/nextstep_gpu_decode.py (at most ~5.5 min): NextStep-1-Large's architecture, random bf16 weights,
#      512x512 with guidance, 50 and 28 steps, batch 1/8/16/32, compiled (CUDA graphs) and eager: s/image, the
#      planner's batch, max_memory_allocated, the ratio to the memory-bandwidth bound.
#
# Needs torch with CUDA, transformers, diffusers, safetensors, tokenizers, pillow and numpy: where one is missing,
# carry it as a wheel (the device machines' image has no diffusers) and put it on PYTHONPATH before this runs.
# Run from the repository root: bash benchmarks/gpu_check.sh
set -u
OUT="${OUT:-./gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
status=0
timeout 150 python3 benchmarks/nextstep_gpu_checks.py --out "$OUT/nextstep_gpu_checks.json" || status=1
timeout 90 python3 benchmarks/nextstep_gpu_checks.py --compiled --out "$OUT/nextstep_gpu_checks_compiled.json" \
  || status=1
timeout 360 python3 benchmarks/nextstep_gpu_decode.py --budget-s 300 --out "$OUT/nextstep_gpu_decode.json" \
  || status=1
exit $status
