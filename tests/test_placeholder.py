"""The placeholder model: deterministic pictures without a model, and its fault-drill directives."""

from __future__ import annotations

import numpy as np
import pytest

from ray_render.models import ModelOutOfMemory, RenderRequest, RowError, load_model
from ray_render.models.placeholder import PlaceholderModel


def request(key="r#0", prompt="a red circle on a blue background", **settings) -> RenderRequest:
    return RenderRequest(key=key, prompt=prompt, **{"width": 64, "height": 64, "num_sampling_steps": 2, **settings})


def test_load_model_gives_the_placeholder():
    model = load_model("placeholder")
    assert model.info.family == "placeholder"
    assert model.info.revision == "placeholder-1"
    defaults = model.defaults()
    assert (defaults["width"], defaults["height"], defaults["num_sampling_steps"]) == (64, 64, 2)


def test_a_request_renders_the_same_pixels_whatever_its_batch():
    model = PlaceholderModel()
    target = request(seed=7)
    alone = model.render([target])[0]
    others = [request(key=f"o{i}#0", prompt=f"a green square {i}", seed=i) for i in range(5)]
    in_batch = model.render(others[:2] + [target] + others[2:])[2]
    assert alone.dtype == np.uint8 and alone.shape == (64, 64, 3)
    np.testing.assert_array_equal(alone, in_batch)


@pytest.mark.parametrize("change", [{"seed": 8}, {"prompt": "a blue square"}, {"cfg": 3.0},
                                    {"input_image": b"\x89PNG other"}])
def test_different_requests_give_different_pictures(change):
    model = PlaceholderModel()
    base = model.render([request(seed=7)])[0]
    changed = model.render([request(**{"seed": 7, **change})])[0]
    assert not np.array_equal(base, changed)


def test_image_size_follows_the_request():
    (image,) = PlaceholderModel().render([request(width=128, height=48)])
    assert image.shape == (48, 128, 3)


def test_batch_key_groups_by_size():
    model = PlaceholderModel()
    assert model.batch_key(request(seed=1)) == model.batch_key(request(seed=2, prompt="other"))
    assert model.batch_key(request(width=32)) != model.batch_key(request(width=64))


def test_directives_drill_faults():
    model = PlaceholderModel()
    with pytest.raises(RuntimeError, match="placeholder:raise"):
        model.render([request(), request(key="bad#0", prompt="x [placeholder:raise]")])
    with pytest.raises(ModelOutOfMemory):
        model.render([request(), request(key="big#0", prompt="x [placeholder:oom]")])
    assert len(model.render([request(key="big#0", prompt="x [placeholder:oom]")])) == 1  # fits alone
    with pytest.raises(RowError, match="placeholder:invalid"):
        model.check(request(prompt="x [placeholder:invalid]"))
    model.check(request())  # an ordinary request passes
