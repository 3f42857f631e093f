"""The procedural shape pictures the tiny model is trained on: determinism, the held-out split, drawing, captions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ray_render.models.nextstep import shapes


def test_batches_are_deterministic_per_seed():
    images_a, captions_a, scenes_a = shapes.make_batch(24, seed=5)
    images_b, captions_b, scenes_b = shapes.make_batch(24, seed=5)
    images_c, captions_c, _ = shapes.make_batch(24, seed=6)
    assert images_a.shape == (24, shapes.SIZE, shapes.SIZE, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b) and captions_a == captions_b and scenes_a == scenes_b
    assert captions_a != captions_c and not np.array_equal(images_a, images_c)


def test_training_never_shows_a_heldout_combination():
    _, _, scenes = shapes.make_batch(3000, seed=1, split="train")
    seen = {scene.combo for scene in scenes}
    assert not seen & shapes.HELDOUT
    assert len(seen) == len(shapes.combos("train"))  # 3000 draws reach every training combination


def test_heldout_split_is_learnable_from_its_parts():
    train = set(shapes.combos("train"))
    assert shapes.HELDOUT and set(shapes.combos("heldout")) == shapes.HELDOUT
    assert train.isdisjoint(shapes.HELDOUT) and len(train) + len(shapes.HELDOUT) == len(shapes.combos("all"))
    for colour, background, shape in shapes.HELDOUT:
        # The pair is seen with other shapes, and each part is seen in other combinations.
        assert sum((colour, background, s) in train for s in shapes.SHAPES) >= len(shapes.SHAPES) - 1
        assert any(c == colour and s == shape for c, _, s in train)
        assert any(b == background and s == shape for _, b, s in train)


def test_heldout_prompts_name_their_scene():
    prompts = shapes.heldout_prompts(per_combo=2, seed=0)
    assert len(prompts) == 2 * len(shapes.HELDOUT)
    assert prompts == shapes.heldout_prompts(per_combo=2, seed=0)
    for scene, text in prompts:
        assert scene.combo in shapes.HELDOUT
        assert f"{scene.colour} " in text and f"{scene.background} background" in text and scene.shape in text
        assert scene.position in text
        assert scene.size in text or scene.size == "medium"


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_objects_stay_inside_the_border_and_show_both_colours(shape):
    for position, size in itertools.product(shapes.POSITIONS, shapes.SIZES):
        for dx, dy in ((-2, -2), (2, 2)):  # the extreme jitter
            scene = shapes.Scene(shape, "red", "blue", position, size, dx, dy)
            image = shapes.render(scene)
            b = shapes.BORDER
            ring = np.concatenate([image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
                                   image[:, :b].reshape(-1, 3), image[:, -b:].reshape(-1, 3)])
            assert (ring == shapes.PALETTE["blue"]).all(), (scene, "object reaches the border ring")
            solid = (image == shapes.PALETTE["red"]).all(axis=-1).sum()
            assert solid >= 60, (scene, solid)  # even the smallest triangle has a solid interior


def test_positions_and_sizes_are_where_the_caption_says():
    left = shapes.render(shapes.Scene("square", "white", "black", "on the left", "small"))
    right = shapes.render(shapes.Scene("square", "white", "black", "on the right", "small"))
    big = shapes.render(shapes.Scene("square", "white", "black", "in the center", "large"))

    def centre_x(image):
        return np.argwhere((image == shapes.PALETTE["white"]).all(-1))[:, 1].mean()

    def area(image):
        return (image != shapes.PALETTE["black"]).any(-1).sum()

    assert centre_x(left) < shapes.SIZE / 2 < centre_x(right)
    assert area(big) > 3 * area(left)


def test_caption_words():
    scene = shapes.Scene("triangle", "green", "white", "at the top right", "large")
    assert shapes.caption(scene) == "a large green triangle at the top right on a white background"
    assert shapes.caption(scene, template=2, say_size=False) == \
        "white background with a green triangle at the top right"
    assert shapes.caption(scene, template=1, say_position=False) == "a large green triangle on a white background"
    words = set(" ".join(shapes.corpus()).replace(",", " ").split())
    assert set(shapes.COLOURS) | set(shapes.SHAPES) | {"small", "large"} <= words  # "medium" goes unsaid


def test_bad_scene_values_are_named():
    with pytest.raises(ValueError, match="shape must be one of"):
        shapes.render(shapes.Scene("hexagon", "red", "blue"))
    with pytest.raises(ValueError, match="colour must be one of"):
        shapes.render(shapes.Scene("circle", "teal", "blue"))
    with pytest.raises(ValueError, match="split must be one of"):
        shapes.combos("test")
