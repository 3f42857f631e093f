"""The token loop's static state in eager mode: the KV cache kept across calls, and attention that reads only
the filled window of it."""

from __future__ import annotations

import pytest
import torch
from test_nextstep_conformance import FIXTURE, assert_images_close

from ray_render.models.base import RenderRequest
from ray_render.models.nextstep import load_nextstep
from ray_render.models.nextstep.backbone import decode


def rows(n: int, prompt: str = "a red cube", start: int = 0) -> list[RenderRequest]:
    return [RenderRequest(key=f"r{i}", prompt=f"{prompt} {i}", seed=i, cfg=3.0, num_sampling_steps=4)
            for i in range(start, start + n)]


@pytest.fixture
def model():
    return load_nextstep(str(FIXTURE), device="cpu")


def test_the_kv_cache_is_allocated_once_and_reused_across_calls(model):
    decoder = model.parts.decoder
    model.render(rows(3))
    held, keys = decoder._buffers, decoder._buffers.keys[0].data_ptr()
    smaller = model.render(rows(2, start=10))  # fewer images: a view of the same buffers
    assert decoder._buffers is held and decoder._buffers.keys[0].data_ptr() == keys
    # Nothing the earlier, larger call left in the cache reaches this one.
    fresh = load_nextstep(str(FIXTURE), device="cpu").render(rows(2, start=10))
    for a, b in zip(smaller, fresh):
        assert_images_close(a, b)
    # A call that needs more slots (a longer prompt) gets larger buffers, which later calls keep using.
    model.render(rows(1, prompt="a very long caption about a fluffy orange cat on a blue chair in a garden " * 3))
    grown = decoder._buffers
    assert grown is not held and grown.shape.capacity > held.shape.capacity
    model.render(rows(2))
    assert decoder._buffers is grown


def test_a_decode_step_reads_only_its_window(model):
    # Slots past the window hold NaN: a step that read them, even under a zero weight, would return NaN.
    w = model.parts.decoder.weights
    rows_, window, capacity = 2, 16, 40
    gen = torch.Generator().manual_seed(0)
    shape = (rows_, w.kv_heads, capacity, w.head_dim)
    keys = [torch.randn(shape, generator=gen) for _ in w.layers]
    values = [torch.randn(shape, generator=gen) for _ in w.layers]
    bias = torch.zeros(rows_, 1, 1, capacity)
    bias[0, 0, 0, :3] = float("-inf")  # row 0 is left-padded by three slots
    embeds, position = torch.randn(rows_, model.config.hidden_size, generator=gen), torch.tensor([window - 1])
    slot_before = keys[0][:, :, window - 1].clone()
    with torch.inference_mode():
        clean = decode(w, embeds, position, [k.clone() for k in keys], [v.clone() for v in values],
                       bias[..., :window])
        for t in (*keys, *values):
            t[:, :, window:] = float("nan")
        poisoned = decode(w, embeds, position, keys, values, bias[..., :window])
    assert torch.isfinite(poisoned).all()
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)
    assert not torch.equal(keys[0][:, :, window - 1], slot_before)  # it wrote its own key at `position`


def test_the_token_loop_reads_nothing_back_to_the_host(model, monkeypatch):
    # On CUDA every read of a tensor's value on the host (.item(), bool(), int(), .tolist(), .cpu()) waits for the
    # GPU to drain; the token loop must have none, so that the host runs ahead of the kernels it queues.
    decoder, reads = model.parts.decoder, []
    original_loop = decoder._loop

    def host_read(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"the token loop read a tensor on the host: {name}")
        return read

    def guarded_loop(*args, **kwargs):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, host_read(name))
            original_loop(*args, **kwargs)

    monkeypatch.setattr(decoder, "_loop", guarded_loop)
    images = model.render(rows(2))
    assert len(images) == 2 and not reads
