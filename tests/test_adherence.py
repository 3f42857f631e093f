"""Prompt adherence: the colour classifier on ground truth, and the shipped tiny model on held-out prompts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from ray_render.models.nextstep import shapes
from ray_render.tools import adherence


def test_classifier_names_every_ground_truth_picture():
    wrong = []
    for (colour, background, shape), position, size in itertools.product(
            shapes.combos("all"), ("at the top left", "in the center", "at the bottom right"), ("small", "large")):
        scene = shapes.Scene(shape, colour, background, position, size, dx=-2, dy=2)
        if adherence.classify(shapes.render(scene)) != (colour, background):
            wrong.append(scene)
    assert not wrong


def test_classifier_tolerates_pixel_noise():
    images, _, scenes = shapes.make_batch(200, seed=3, split="all")
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 15, images.shape), 0, 255).astype(np.uint8)
    right = sum(adherence.classify(image) == (s.colour, s.background) for image, s in zip(noisy, scenes))
    assert right >= 196


def test_classifier_without_an_object():
    plain = np.zeros((64, 64, 3), np.uint8) + np.array(shapes.PALETTE["green"], np.uint8)
    assert adherence.classify(plain) == (None, "green")
    with pytest.raises(ValueError, match="RGB"):
        adherence.classify(plain[..., 0])


@pytest.fixture(scope="module")
def tiny_model():
    from ray_render.models import load_model

    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_report(tiny_model):
    """`ray-render eval`, the README's figures: 16 prompts for each held-out combination, at the model's cfg and 1."""
    return adherence.evaluate("tiny", model=tiny_model)


def test_shipped_tiny_model_draws_the_colours_held_out_prompts_ask_for(tiny_report):
    guided, unguided = tiny_report["results"]
    assert tiny_report["settings"]["width"] == tiny_report["settings"]["height"] == 64
    assert (guided["cfg"], unguided["cfg"]) == (tiny_report["settings"]["cfg"], 1.0) and guided["cfg"] > 1
    assert guided["object_accuracy"] >= 0.9 and guided["background_accuracy"] >= 0.9
    # Guidance must help prompt by prompt, beyond chance: far more prompts fixed by it than broken.
    versus = guided["vs_cfg_1"]
    assert guided["both_accuracy"] > unguided["both_accuracy"]
    assert versus["better"] > 2 * versus["worse"] and versus["p_value"] < 0.01


def test_paired_comparison_counts_only_disagreements():
    versus = adherence.paired_comparison([True, True, True, False, True, True, True],
                                         [True, False, False, False, False, False, True])
    assert versus == {"better": 4, "worse": 0, "p_value": pytest.approx(2 / 16)}
    assert adherence.paired_comparison([True, False], [False, True])["p_value"] == 1.0
    assert adherence.paired_comparison([True], [True]) == {"better": 0, "worse": 0, "p_value": 1.0}


def test_evaluation_is_reproducible_and_scores_each_cfg(tiny_model, tiny_report):
    prompts = shapes.heldout_prompts(per_combo=1)[:6]
    again = adherence.evaluate("tiny", prompts=prompts, cfg_values=[tiny_report["settings"]["cfg"]],
                               model=tiny_model, keep_images=True)
    twice = adherence.evaluate("tiny", prompts=prompts, cfg_values=[tiny_report["settings"]["cfg"]],
                               model=tiny_model, keep_images=True)
    first, second = again["images"], twice["images"]
    assert all(np.array_equal(a, b) for a, b in zip(*first.values(), *second.values()))
    assert again["results"][0]["cfg"] == tiny_report["settings"]["cfg"]
    scored = [adherence.classify(image) for image in next(iter(first.values()))]
    expected = np.mean([obj == s.colour for (s, _), (obj, _) in zip(prompts, scored)])
    assert again["results"][0]["object_accuracy"] == pytest.approx(expected)


def test_command_line_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "adherence.json"
    assert adherence.main(["--per-combo", "1", "--cfg", "1", "--steps", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out prompts" in printed and "background" in printed
    report = json.loads(out.read_text())
    assert report["num_prompts"] == len(shapes.HELDOUT) and report["settings"]["num_sampling_steps"] == 4
    assert [row["cfg"] for row in report["results"]] == [1.0]


def test_command_line_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        adherence.main(["--cfg", "0.5"])
    assert "--cfg must be >= 1" in capsys.readouterr().err
