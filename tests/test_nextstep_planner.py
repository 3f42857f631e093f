"""The memory planner with NextStep-1-Large's real sizes (a pure function: no GPU needed), and how the planned
batch reaches the job record and the engine's batching."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict

import pytest

from ray_render.models import max_batch
from ray_render.models.base import RenderRequest
from ray_render.models.nextstep import load_nextstep
from ray_render.models.nextstep.bench import large_config
from ray_render.models.nextstep.planner import bytes_read_per_token, plan_batch, weight_bytes

GB = 10**9
LARGE = large_config()  # Qwen2.5-14B backbone, 1536 x 12 head


def free_after_loading(card_bytes: int = 80 * GB, context_bytes: int = 2 * GB) -> int:
    """What an 80 GB GPU has left once the bf16 weights and the CUDA context are in."""
    return card_bytes - weight_bytes(LARGE, 2) - context_bytes


def test_large_weights_are_the_published_size():
    assert weight_bytes(LARGE, 2) == pytest.approx(28.35 * GB, rel=0.01)  # "bf16 weights about 28 GB"


@pytest.mark.parametrize("width, height, branches, edit", [(1024, 1024, 2, False), (512, 512, 3, True)])
def test_large_on_80_gb_fits_16_but_not_32(width, height, branches, edit):
    # NEXTSTEP.md: text to image at 1024x1024 fits batch 16 (about 55 GB) but not 32 (about 81 GB); editing at
    # 512x512 (three branches, prompts carrying the input image) fits 16 (about 49 GB) but not 32.
    plan = plan_batch(LARGE, 2, free_after_loading(), width, height, branches, edit=edit)
    assert 16 <= plan.batch < 32
    # The estimate behind it is the KV cache in the main: 1.6-1.8 GB per image at 1024x1024 with guidance.
    if not edit:
        assert 1.6 * GB < plan.kv_bytes_per_image < 1.8 * GB


def test_smaller_images_and_more_memory_plan_larger_batches():
    free = free_after_loading()
    t2i_512 = plan_batch(LARGE, 2, free, 512, 512, 2).batch
    assert t2i_512 > plan_batch(LARGE, 2, free, 1024, 1024, 2).batch
    assert plan_batch(LARGE, 2, free, 512, 512, 1).batch > t2i_512  # no guidance rows
    assert plan_batch(LARGE, 2, free_after_loading(141 * GB), 512, 512, 2).batch > t2i_512  # an H200
    assert plan_batch(LARGE, 2, 10 * GB, 1024, 1024, 2).batch <= 3
    assert plan_batch(LARGE, 2, GB, 1024, 1024, 2).batch == 0  # not even one: the engine's back-off decides


def test_bandwidth_bound_at_batch_8_is_about_10_ms_on_an_h100():
    # NEXTSTEP.md: about 10-11 ms per image token at batch 8 with guidance (16 rows), 50 steps, 3.35 TB/s.
    read = bytes_read_per_token(LARGE, 2, steps=50, rows=16, filled_slots=1100)
    assert 9e-3 < read / 3.35e12 < 12e-3


def test_cpu_models_set_no_batch_limit(tiny_cpu_model):
    request = tiny_cpu_model.check(RenderRequest(key="r", prompt="a cat"))
    assert tiny_cpu_model.free_bytes is None and max_batch(tiny_cpu_model, request) is None
    assert "batch_plan" not in tiny_cpu_model.info.settings


def test_a_memory_budget_bounds_batches_and_is_kept_in_the_record(caplog):
    model = load_nextstep("tiny", device="cpu")  # its own: plan_for changes the model
    with caplog.at_level(logging.INFO, logger="ray_render.models.nextstep.image_model"):
        record = model.plan_for(3 * 2**30)  # the fixed reserve (2 GiB), the VAE and room for images
    assert "memory planner" in caplog.text  # logged when an actor loads its model on CUDA
    # The model's default size at each branch count, then every shape asked for.
    assert set(record["batches"]) == {"64x64, 1 branch, 20 steps", "64x64, 2 branches, 20 steps"}
    wide = model.check(RenderRequest(key="w", prompt="a cat", width=256, height=128, cfg=3.0))
    limit = max_batch(model, wide)
    assert limit == record["batches"]["256x128, 2 branches, 50 steps"] >= 1
    assert limit < max_batch(model, model.check(RenderRequest(key="s", prompt="a cat", cfg=3.0)))
    assert model.info.settings["batch_plan"] is record  # what the engine writes into the job record
    json.dumps(asdict(model.info))
    images = model.render([wide] * 2)  # a render under the plan
    assert images[0].shape == (128, 256, 3)


@pytest.fixture(scope="module")
def tiny_cpu_model():
    return load_nextstep("tiny", device="cpu")
