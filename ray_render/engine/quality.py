"""Cheap per-image quality scores, and the `--min-quality` re-render loop that uses them.

The scores catch the failures a batch job most often ships without anyone looking: blank or flat images, blurry
images, blocky or noisy images (latent-patch seams, heavy compression, a diverged sampler) and near-duplicates.
They are not an aesthetic model. Everything here is numpy on one (H, W, 3) uint8 RGB array, about 50 ms for a
1024x1024 image on one CPU core, so an actor can score every image it renders.

Scores (the metadata column names):

- `sharpness`: variance of the 4-neighbour Laplacian of the luma (0-255 scale). Flat or blurry images score
  near 0; about 100 is the usual "in focus" threshold for photographs.
- `colour_diversity`: entropy of a 512-bin colour histogram (3 bits per channel) divided by its maximum, in
  [0, 1]. One flat colour is 0; a grey ramp about 0.33; a varied colour image 0.5-0.9.
- `artefact_level`: the larger of two defects, each in [0, 1].
  Blockiness: how much more often a seam (a luma step more than 2 levels above the mean of the steps beside it)
  falls on the 8-pixel grid than off it; JPEG and the VAE's 8- and 16-pixel latent patches leave seams there.
  Clean images are near 0, JPEG at quality 5 from 0.15 (mostly flat pictures) to 0.4 (busy ones), images made
  of flat 8x8 blocks near 1.
  Noisiness: 2 * (0.5 - rho) clipped at 0, where rho is the luma's correlation between neighbouring pixels
  (natural images have rho > 0.8, so 0; white noise, what a diverged sampler draws, has rho near 0, so 1).
- `phash`: a 64-bit difference hash as 16 hex digits (luma area-resized to 8x9, one bit per horizontal
  neighbour pair). Near-duplicates differ in few bits: `hash_distance(a, b) <= 10` of 64 is a good threshold.
- `quality_score`, in [0, 1]:

      quality_score = (0.6 * s / (s + 100) + 0.4 * colour_diversity) * (1 - artefact_level),  s = sharpness

  so a flat image scores 0, a sharp colourful clean one approaches 1, and artefacts scale everything down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

SHARPNESS_HALF = 100.0  # the sharpness that maps to 0.5 in quality_score: the classic blur threshold
SHARPNESS_WEIGHT = 0.6
COLOUR_WEIGHT = 0.4
BLOCK = 8  # pixels: the JPEG block and the VAE's downsampling factor
SEAM_STEP = 2.0  # luma levels a step must exceed its neighbours' mean by to count as a seam
NEAR_DUPLICATE_BITS = 10  # hash_distance at or below this: likely the same picture
_SEED_STEP = 0x9E3779B97F4A7C15  # odd 64-bit constant: retry seeds land far from every row's seed + k

Request = TypeVar("Request")


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"quality scores need an (H, W, 3) uint8 RGB array, got a {described}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"quality scores need a non-empty image, got shape {image.shape}")
    return image


def _luma(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]  # ITU-R BT.601, (H, W)


def _sharpness(gray: np.ndarray) -> float:
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    laplacian = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:]
                 - 4.0 * gray[1:-1, 1:-1])  # (H-2, W-2)
    return float(laplacian.var(dtype=np.float64))


def _colour_diversity(image: np.ndarray) -> float:
    bins = image >> 5  # 8 levels per channel
    codes = (bins[..., 0].astype(np.uint16) << 6) | (bins[..., 1].astype(np.uint16) << 3) | bins[..., 2]
    counts = np.bincount(codes.ravel(), minlength=512)
    probabilities = counts[counts > 0] / codes.size
    entropy = float(-(probabilities * np.log2(probabilities)).sum()) + 0.0  # + 0.0: no "-0.0" in the metadata
    # A small image cannot fill 512 bins; normalise by what its pixel count allows.
    most = np.log2(min(512, codes.size))
    return float(np.clip(entropy / most, 0.0, 1.0)) if most > 0 else 0.0


def _blockiness(gray: np.ndarray) -> float:
    rates = []
    for steps in (np.abs(np.diff(gray, axis=1)), np.abs(np.diff(gray, axis=0)).T):  # (H, W-1) and (W, H-1)
        if steps.shape[1] < 2 * BLOCK - 1:
            continue  # under two blocks in this direction: no border inside the image
        # A seam: a step clearly larger than the mean of the steps beside it.
        seam = steps[:, 1:-1] > (steps[:, :-2] + steps[:, 2:]) / 2 + SEAM_STEP  # (rows, positions 1..n-2)
        border = (np.arange(1, steps.shape[1] - 1) % BLOCK) == BLOCK - 1  # the step from pixel 8k+7 to 8k+8
        rates.append((seam[:, border].mean(), seam[:, ~border].mean()))
    if not rates:
        return 0.0
    across, inside = np.mean(rates, axis=0)
    return float(np.clip(across - inside, 0.0, 1.0))


def _noisiness(gray: np.ndarray) -> float:
    variance = float(gray.var(dtype=np.float64))
    if variance == 0.0 or gray.size < 4:
        return 0.0
    # For a stationary signal E[(x[i+1] - x[i])^2] = 2 var (1 - rho), so rho follows from the mean squared step.
    squared_steps = [np.mean(np.diff(gray, axis=axis) ** 2, dtype=np.float64)
                     for axis in (0, 1) if gray.shape[axis] > 1]
    rho = 1.0 - float(np.mean(squared_steps)) / (2.0 * variance)
    return float(np.clip(2.0 * (0.5 - rho), 0.0, 1.0))


def _artefact_level(gray: np.ndarray) -> float:
    return max(_blockiness(gray), _noisiness(gray))


def _area_resize(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of each cell of a rows x cols grid over the image (box filter); tiny images are upsampled first."""
    if gray.shape[0] < rows:
        gray = np.repeat(gray, -(-rows // gray.shape[0]), axis=0)
    if gray.shape[1] < cols:
        gray = np.repeat(gray, -(-cols // gray.shape[1]), axis=1)
    row_edges = np.linspace(0, gray.shape[0], rows + 1).astype(int)
    col_edges = np.linspace(0, gray.shape[1], cols + 1).astype(int)
    sums = np.add.reduceat(np.add.reduceat(gray.astype(np.float64), row_edges[:-1], axis=0), col_edges[:-1], axis=1)
    areas = np.outer(np.diff(row_edges), np.diff(col_edges))
    return sums / areas  # (rows, cols)


def _perceptual_hash(gray: np.ndarray) -> str:
    small = _area_resize(gray, 8, 9)
    bits = (small[:, 1:] > small[:, :-1]).ravel()  # 64 bits, row by row
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian of the luma; 0 for images smaller than 3x3."""
    return _sharpness(_luma(_check_image(image)))


def colour_diversity(image: np.ndarray) -> float:
    """Normalised entropy of the 3-bit-per-channel colour histogram, in [0, 1]."""
    return _colour_diversity(_check_image(image))


def artefact_level(image: np.ndarray) -> float:
    """The larger of blockiness and noisiness, in [0, 1] (see the module docstring)."""
    return _artefact_level(_luma(_check_image(image)))


def perceptual_hash(image: np.ndarray) -> str:
    """64-bit difference hash as 16 lowercase hex digits."""
    return _perceptual_hash(_luma(_check_image(image)))


def hash_distance(a: str, b: str) -> int:
    """Number of differing bits between two `phash` values (0 = same picture, 64 = opposite)."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def combine(sharpness_value: float, colour: float, artefact: float) -> float:
    """The documented quality_score formula (see the module docstring)."""
    sharp = sharpness_value / (sharpness_value + SHARPNESS_HALF)
    return float(np.clip((SHARPNESS_WEIGHT * sharp + COLOUR_WEIGHT * colour) * (1.0 - artefact), 0.0, 1.0))


def score(image: np.ndarray) -> dict:
    """All scores of one image, keyed by the output.schema.QUALITY_COLUMNS names."""
    gray = _luma(_check_image(image))
    values = {
        "sharpness": _sharpness(gray),
        "colour_diversity": _colour_diversity(image),
        "artefact_level": _artefact_level(gray),
        "phash": _perceptual_hash(gray),
    }
    values["quality_score"] = combine(values["sharpness"], values["colour_diversity"], values["artefact_level"])
    return values


def passes(scores: dict, min_quality: float | None) -> bool:
    """True if the image is good enough for a job run with `--min-quality` (None: every image passes)."""
    if min_quality is None:
        return True
    if not 0.0 <= min_quality <= 1.0:
        raise ValueError(f"min_quality must be from 0 to 1, got {min_quality}")
    return scores["quality_score"] >= min_quality


def rerender_seed(seed: int, attempt: int) -> int:
    """The seed of re-render `attempt` (1, 2, ...) of an image first rendered with `seed`.

    Deterministic, so a retried shard re-renders exactly the same images, and far from seed + k, so a re-render
    never repeats another image of the same row.
    """
    if attempt == 0:
        return seed
    return (seed + attempt * _SEED_STEP) % (1 << 63)


@dataclass(frozen=True)
class Outcome:
    """The image kept for one request after the re-render loop."""

    request: object  # the request that rendered `image`: its seed is the seed actually used
    image: np.ndarray
    scores: dict
    renders: int  # how many times this request was rendered (1 = first try kept)
    passed: bool  # False: no attempt reached min_quality; the best-scoring one is kept

    def columns(self) -> dict:
        """The metadata columns this outcome fills: output.schema.QUALITY_COLUMNS and RERENDER_COLUMNS."""
        return {**self.scores, "quality_passed": self.passed, "quality_renders": self.renders}


def render_until_passing(requests: Sequence[Request], render: Callable[[list[Request]], list[np.ndarray]],
                         min_quality: float | None, max_rerenders: int) -> list[Outcome]:
    """Render `requests` (objects with a `seed` field, such as RenderRequest) and re-render, each time with
    `rerender_seed(seed, n)`, those that fail `passes(scores, min_quality)`, at most `max_rerenders` times.

    `render` renders a list of requests in one call, in order (the actor's batched render). Re-renders of a batch
    go out together, so they keep the batch's shape. Returns one Outcome per request, in order; an image that
    never passes keeps its best-scoring attempt with `passed=False`.
    """
    if max_rerenders < 0:
        raise ValueError(f"max_rerenders must be 0 or more, got {max_rerenders}")
    best: list[Outcome | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    for attempt in range(max_rerenders + 1):
        if not pending:
            break
        batch = [dataclasses.replace(requests[i], seed=rerender_seed(requests[i].seed, attempt)) for i in pending]
        images = render(batch)
        if len(images) != len(batch):
            raise RuntimeError(f"render returned {len(images)} images for {len(batch)} requests")
        still_failing = []
        for index, request, image in zip(pending, batch, images):
            scores = score(image)
            ok = passes(scores, min_quality)
            previous = best[index]
            if previous is None or ok or scores["quality_score"] > previous.scores["quality_score"]:
                best[index] = Outcome(request, image, scores, attempt + 1, ok)
            else:
                best[index] = dataclasses.replace(previous, renders=attempt + 1)
            if not ok:
                still_failing.append(index)
        pending = still_failing
    return best  # type: ignore[return-value]
