"""The figures module behind `ray-render bench` and benchmarks/model_batching.py: it runs and reports what it
measured (timings themselves are measured by the benchmark, not asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_render.models.nextstep.bench import build_large_random, format_table, large_config, measure_batching

TINY_VAE = json.loads((Path(__file__).parent / "fixtures" / "nextstep-tiny" / "vae" / "config.json").read_text())


def test_measure_batching_reports_each_batch_size():
    result = measure_batching((1, 2), rows=2, steps=2, model="tiny", device="cpu")
    assert [r["batch_size"] for r in result["results"]] == [1, 2]
    assert [r["images"] for r in result["results"]] == [2, 2]
    assert all(r["images_per_s"] > 0 for r in result["results"])
    assert result["results"][0]["speedup"] == 1.0
    assert (result["model"], result["device"], result["width"], result["steps"]) == ("tiny", "cpu", 64, 2)
    json.dumps(result)  # written as JSON by the script
    assert "speedup" in format_table(result)


def test_large_random_builder_runs_at_reduced_size_on_cpu():
    # The full-size build is for CUDA; the same code path at toy sizes must render.
    full = large_config()
    assert (full.hidden_size, full.num_hidden_layers, full.fm_head_dim) == (5120, 48, 1536)
    model = build_large_random(device="cpu", dtype=torch.float32, vae_config=TINY_VAE, hidden_size=64,
                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, fm_head_dim=32, fm_head_layers=1)
    assert model.config.vocab_size == 152064
    result = measure_batching((2,), rows=2, steps=2, model=model, width=64, height=32)
    assert result["results"][0]["images"] == 2 and result["model"] == "large-random"
