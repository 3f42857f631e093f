"""Quality scores: each score's definition on images whose answer is known, and the --min-quality re-render loop."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from ray_render.engine import quality
from ray_render.models.base import RenderRequest
from ray_render.output import schema


def scene(size: int = 128, seed: int = 0) -> np.ndarray:
    """A clean, colourful picture: coloured ellipses on a sky-blue background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (40, 110, 200))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x, y = (int(v) for v in rng.integers(0, size - 20, 2))
        w, h = (int(v) for v in rng.integers(8, size // 2, 2))
        draw.ellipse([x + 0.5, y + 0.5, x + w + 0.5, y + h + 0.5], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return np.asarray(image)


def jpeg(image: np.ndarray, quality_level: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality_level)
    return np.asarray(Image.open(buffer).convert("RGB"))


def blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def test_flat_image_scores_zero_everywhere():
    scores = quality.score(np.full((64, 48, 3), 117, np.uint8))
    assert scores == {"sharpness": 0.0, "colour_diversity": 0.0, "artefact_level": 0.0,
                      "phash": "0000000000000000", "quality_score": 0.0}
    assert not quality.passes(scores, 0.05)
    assert quality.passes(scores, None)  # no threshold: everything passes


def test_sharpness_is_the_variance_of_the_laplacian():
    # A one-pixel grey checkerboard: every interior Laplacian is +-4*255, so the variance is (4*255)^2.
    checker = ((np.indices((20, 20)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image = np.repeat(checker[:, :, None], 3, axis=2)
    assert quality.sharpness(image) == pytest.approx((4 * 255) ** 2, rel=1e-4)
    sharp = scene()
    assert quality.sharpness(blur(sharp, 3)) < quality.sharpness(blur(sharp, 1)) < quality.sharpness(sharp)


def test_colour_diversity_is_the_normalised_histogram_entropy():
    every_bin = np.array([[(r << 5, g << 5, b << 5) for r in range(8) for g in range(8) for b in range(8)]],
                         dtype=np.uint8).reshape(16, 32, 3)  # each of the 512 bins exactly once
    assert quality.colour_diversity(every_bin) == pytest.approx(1.0)
    halves = np.zeros((32, 32, 3), np.uint8)
    halves[:, 16:] = (255, 0, 0)  # two bins, equally full: 1 bit of 9
    assert quality.colour_diversity(halves) == pytest.approx(1 / 9)
    grey_ramp = np.repeat(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 8, axis=0), 3, axis=2)
    assert quality.colour_diversity(grey_ramp) == pytest.approx(3 / 9)  # 8 grey bins, equally full


def test_artefact_level_sees_blocks_and_noise_not_clean_pictures():
    rng = np.random.default_rng(1)
    blocks = np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    assert quality.artefact_level(blocks) > 0.9
    assert quality.artefact_level(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) == pytest.approx(1.0)
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], 64, axis=0), 3, axis=2)
    assert quality.artefact_level(ramp.astype(np.uint8)) < 0.05
    clean = scene(seed=3)
    assert quality.artefact_level(clean) < 0.2
    assert quality.artefact_level(jpeg(clean, 5)) > quality.artefact_level(clean) + 0.2


def test_perceptual_hash_matches_near_duplicates_only():
    a, b = scene(seed=4), scene(seed=5)
    hash_a = quality.perceptual_hash(a)
    assert len(hash_a) == 16 and int(hash_a, 16) >= 0
    assert quality.perceptual_hash(a) == hash_a  # deterministic
    resized = np.asarray(Image.fromarray(a).resize((96, 96), Image.Resampling.BILINEAR))
    for variant in (jpeg(a, 30), resized, blur(a, 1)):
        assert quality.hash_distance(hash_a, quality.perceptual_hash(variant)) <= quality.NEAR_DUPLICATE_BITS
    assert quality.hash_distance(hash_a, quality.perceptual_hash(b)) > quality.NEAR_DUPLICATE_BITS
    inverse = f"{int(hash_a, 16) ^ (2**64 - 1):016x}"
    assert quality.hash_distance(hash_a, inverse) == 64
    assert quality.perceptual_hash(np.zeros((1, 1, 3), np.uint8)) == "0000000000000000"  # tiny images work


def test_quality_score_follows_the_documented_formula_and_ranks_images():
    clean = scene(seed=6)
    scores = quality.score(clean)
    s = scores["sharpness"]
    expected = (0.6 * s / (s + 100) + 0.4 * scores["colour_diversity"]) * (1 - scores["artefact_level"])
    assert scores["quality_score"] == pytest.approx(expected)
    assert set(scores) == set(schema.QUALITY_COLUMNS)
    blurred, blocky = quality.score(blur(clean, 4)), quality.score(jpeg(clean, 5))
    assert 0.0 <= blurred["quality_score"] < scores["quality_score"] <= 1.0
    assert blocky["quality_score"] < scores["quality_score"]
    assert quality.passes(scores, 0.3) and not quality.passes(blurred, 0.3)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_bad_arrays_are_refused_with_their_shape(bad):
    with pytest.raises(ValueError, match="uint8 RGB array|non-empty"):
        quality.score(bad)


def test_min_quality_must_be_a_fraction():
    with pytest.raises(ValueError, match="from 0 to 1"):
        quality.passes({"quality_score": 0.5}, 1.5)


def test_rerender_seeds_are_deterministic_and_away_from_a_rows_own_seeds():
    seed = 123_456
    assert quality.rerender_seed(seed, 0) == seed
    retries = [quality.rerender_seed(seed, attempt) for attempt in range(1, 6)]
    assert retries == [quality.rerender_seed(seed, attempt) for attempt in range(1, 6)]
    assert len(set(retries)) == 5
    for value in retries:
        assert 0 <= value < 2**63
        assert abs(value - seed) > 64  # never another image of the same row (seed + k, k < 64)


def _flat_or_scene(request: RenderRequest) -> np.ndarray:
    # "Model": the original seeds give a blank image, re-render seeds a real picture.
    if request.seed < 1000:
        return np.full((request.height, request.width, 3), 90, np.uint8)
    return scene(size=request.width, seed=request.seed % 1000)


def test_failing_images_are_rerendered_with_new_seeds_in_one_batch():
    requests = [RenderRequest(key=f"r{i}#0", prompt="p", width=64, height=64, seed=i) for i in range(3)]
    good = RenderRequest(key="g#0", prompt="p", width=64, height=64, seed=5000)
    calls = []

    def render(batch):
        calls.append([r.seed for r in batch])
        return [_flat_or_scene(r) for r in batch]

    outcomes = quality.render_until_passing([*requests, good], render, min_quality=0.2, max_rerenders=2)
    assert calls[0] == [0, 1, 2, 5000]
    assert calls[1] == [quality.rerender_seed(i, 1) for i in range(3)]  # only the failures, together
    assert len(calls) == 2
    for request, outcome in zip(requests, outcomes):
        assert outcome.passed and outcome.renders == 2
        assert outcome.request.seed == quality.rerender_seed(request.seed, 1)  # the seed actually used
        assert outcome.request.key == request.key
        assert outcome.scores["quality_score"] >= 0.2
    assert outcomes[3].passed and outcomes[3].renders == 1 and outcomes[3].request == good
    assert set(outcomes[0].columns()) == set(schema.QUALITY_COLUMNS) | set(schema.RERENDER_COLUMNS)
    assert outcomes[0].columns()["quality_renders"] == 2 and outcomes[0].columns()["quality_passed"] is True


def test_an_image_that_never_passes_keeps_its_best_attempt():
    request = RenderRequest(key="r#0", prompt="p", width=32, height=32, seed=7)
    square_sides = {quality.rerender_seed(7, attempt): side for attempt, side in enumerate([0, 16, 6])}

    def picture(seed: int) -> np.ndarray:  # a red square on grey: the bigger the square, the higher the score
        image = np.full((32, 32, 3), 100, np.uint8)
        image[:square_sides[seed], :square_sides[seed]] = (250, 30, 30)
        return image

    [outcome] = quality.render_until_passing([request], lambda batch: [picture(r.seed) for r in batch],
                                             min_quality=0.99, max_rerenders=2)
    assert not outcome.passed and outcome.renders == 3
    best = max(square_sides, key=lambda seed: quality.score(picture(seed))["quality_score"])
    assert best == quality.rerender_seed(7, 1)
    assert outcome.request.seed == best
    assert np.array_equal(outcome.image, picture(best))


def test_without_min_quality_every_image_renders_once():
    calls = []

    def render(batch):
        calls.append(len(batch))
        return [np.zeros((16, 16, 3), np.uint8) for _ in batch]

    requests = [RenderRequest(key=f"r{i}#0", prompt="p", seed=i) for i in range(4)]
    outcomes = quality.render_until_passing(requests, render, min_quality=None, max_rerenders=3)
    assert calls == [4] and all(o.passed and o.renders == 1 for o in outcomes)
    with pytest.raises(ValueError, match="max_rerenders"):
        quality.render_until_passing(requests, render, min_quality=0.5, max_rerenders=-1)
