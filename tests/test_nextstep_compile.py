"""The compiled token step (`--compile on`) on the CPU: the images eager mode renders, and one compile for every
position of an image (and, as on CUDA, every batch size). Compiling a step shape takes about a minute on a small
machine (weights frozen into the graph, its matmuls generated and tuned), so these tests are few: two fixture
cases and one deep-narrow model."""

from __future__ import annotations

import numpy as np
import pytest
from test_nextstep_conformance import FIXTURE, assert_images_close, case_request, png
from torch._dynamo.utils import counters

from ray_render.models.base import RenderRequest
from ray_render.models.nextstep import decoder as decoder_lib
from ray_render.models.nextstep import load_nextstep
from ray_render.models.nextstep.bench import deep_narrow, requests_for
from ray_render.models.nextstep.decoder import Decoder


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled_fixture():
    # Length bucket 16: the 16 tokens of a 64x64 image cross a window boundary, so positions change the window.
    return load_nextstep(str(FIXTURE), device="cpu", noise="reference", compile="on", length_bucket=16)


@pytest.mark.parametrize("name", ["B", "C"])
def test_compiled_step_renders_the_official_pngs_with_one_compile(compiled_fixture, name):
    model = compiled_fixture
    request = model.check(case_request(name))
    before = compiled_graphs()
    images, trace = model.generate([request], trace=True)
    assert compiled_graphs() == before + 1  # one graph for the whole image, every window and position
    assert_images_close(images[0], png(FIXTURE / "reference" / f"{name}.png"))
    decoder, length = model.parts.decoder, trace.input_ids.shape[1]
    assert decoder.compiled and decoder.last_run["tokens"] == 16
    assert len({decoder.window(length + k) for k in range(16)}) == 2  # the attention window did move
    # Another row of the same shape (a prompt longer by several length buckets, another seed and cfg) reuses the
    # graph and the buffers: the cache was sized for the prompts the memory planner allows for.
    held = decoder._buffers
    other = model.check(RenderRequest(key="o", prompt="a lighthouse in a storm, oil on canvas, " * 8, seed=3,
                                      cfg=request.cfg + 1, num_sampling_steps=request.num_sampling_steps,
                                      cfg_schedule=request.cfg_schedule, use_norm=request.use_norm,
                                      timesteps_shift=request.timesteps_shift))
    model.render([other])
    assert compiled_graphs() == before + 1 and decoder._buffers is held


def test_deep_narrow_model_compiled_renders_as_eager_at_every_batch_size():
    # Deep enough that rounding differences pass through several layers; the full depth is the bench's (a compile
    # of 48 layers takes minutes).
    eager = deep_narrow(layers=4, blocks=2, compile="off")
    compiled = deep_narrow(layers=4, blocks=2, compile="on")  # the same seed: the same weights
    # As on CUDA: the batch size dynamic, so that one compile serves every batch bucket.
    compiled.parts.decoder = Decoder(compiled.parts.model, compiled.parts.device, compiled=True, dynamic_batch=True)
    requests = requests_for(3, width=64, height=64, steps=4, cfg=7.5)
    before = compiled_graphs()
    a, b = np.stack(eager.render(requests)).astype(int), np.stack(compiled.render(requests)).astype(int)
    diff = np.abs(a - b)
    assert np.percentile(diff, 99) <= 2, f"p99 difference {np.percentile(diff, 99)}, max {diff.max()}"
    assert a.std() > 10  # images, not a constant that any two renders would share
    pair = compiled.render(requests[:2])  # batch bucket 2 after 4 (3 padded): the same graph
    assert compiled_graphs() == before + 1
    assert np.percentile(np.abs(np.stack(pair).astype(int) - a[:2]), 99) <= 2


def test_a_step_that_fails_to_compile_renders_eager_and_says_so(monkeypatch, caplog):
    # Only inductor's own matmul templates allowed and no frozen weights: inductor finds no kernel for a matmul
    # and raises, a real compile failure.
    monkeypatch.setattr(decoder_lib, "CPU_COMPILE_OPTIONS",
                        {"max_autotune": True, "max_autotune_gemm_backends": "CPP"})
    model = load_nextstep(str(FIXTURE), device="cpu", noise="reference", compile="on")
    image = model.render([model.check(case_request("A"))])[0]
    assert_images_close(image, png(FIXTURE / "reference" / "A.png"))  # rendered eager: the official image
    assert "compiling the token step failed" in caplog.text and not model.compiled
    assert model.info.settings["compile"] == "off" and "NoValidChoicesError" in model.info.settings["compile_fallback"]
