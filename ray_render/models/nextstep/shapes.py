"""Procedural pictures of one coloured shape on a plain background, with captions: the tiny model's training data.

Every picture is a `Scene` (shape, object colour, background colour, position, size). `render` draws it as a
64x64 uint8 RGB array, `caption` words it in one of a few templates, and `sample_scenes` draws scenes from a seed.
The (object colour, background colour, shape) combinations in `HELDOUT` never appear in training: the adherence
evaluation renders prompts made from them, so a model has to compose colours and shapes it only saw apart.

Pure numpy, no torch: the evaluation and its tests use this module without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64  # pixels per side of a rendered picture

# Colour names and their RGB values, far enough apart that the nearest palette entry names a pixel's colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "cyan": (40, 200, 215),
    "yellow": (245, 225, 50),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond")

# Where the object's centre lies: caption phrase -> (x, y) in pixels. Objects never reach the outer border ring,
# so the ring shows only the background (the colour classifier relies on it).
POSITIONS: dict[str, tuple[int, int]] = {
    "in the center": (32, 32),
    "on the left": (20, 32),
    "on the right": (44, 32),
    "at the top": (32, 20),
    "at the bottom": (32, 44),
    "at the top left": (20, 20),
    "at the top right": (44, 20),
    "at the bottom left": (20, 44),
    "at the bottom right": (44, 44),
}
# Size word -> half-extent in pixels. The largest object at a corner position still leaves a 4-pixel border.
SIZES: dict[str, int] = {"small": 8, "medium": 12, "large": 16}
BORDER = 2  # width in pixels of the outer ring that only ever shows the background

_SUPERSAMPLE = 4  # sub-pixels per side when drawing, for anti-aliased edges
_JITTER = 2  # the centre moves up to this many pixels from the named position, so positions are not one point


@dataclass(frozen=True)
class Scene:
    """What one picture shows. `dx`, `dy` nudge the centre away from the named position (pixels)."""

    shape: str
    colour: str
    background: str
    position: str = "in the center"
    size: str = "medium"
    dx: int = 0
    dy: int = 0

    @property
    def combo(self) -> tuple[str, str, str]:
        """The (object colour, background colour, shape) triple that the held-out split is defined over."""
        return (self.colour, self.background, self.shape)


def _heldout_combos() -> frozenset[tuple[str, str, str]]:
    # One combination in eight. For a given colour pair the residues of the four shapes differ, so every colour
    # pair is still seen in training with at least three shapes, and every colour as object and as background.
    combos = set()
    for i, colour in enumerate(COLOURS):
        for j, background in enumerate(COLOURS):
            for k, shape in enumerate(SHAPES):
                if colour != background and (i + 2 * j + 3 * k) % 8 == 0:
                    combos.add((colour, background, shape))
    return frozenset(combos)


HELDOUT: frozenset[tuple[str, str, str]] = _heldout_combos()


def combos(split: str) -> list[tuple[str, str, str]]:
    """The (colour, background, shape) triples of a split, sorted: "train", "heldout" or "all"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be one of train, heldout, all, got {split!r}")
    every = [(c, b, s) for c in COLOURS for b in COLOURS for s in SHAPES if c != b]
    if split == "all":
        return every
    return [combo for combo in every if (combo in HELDOUT) == (split == "heldout")]


def _shape_mask(scene: Scene) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by the object, (SIZE, SIZE) float32, from a supersampled drawing."""
    n = SIZE * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE  # sub-pixel centres in pixel units
    y, x = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.dx, cy + scene.dy
    r = float(SIZES[scene.size])
    u, v = x - cx, y - cy
    if scene.shape == "circle":
        inside = u * u + v * v <= r * r
    elif scene.shape == "square":
        inside = (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)  # 0.85: about the circle's area
    elif scene.shape == "triangle":
        # Apex up, base down; the half-width grows linearly from 0 at the apex to r at the base.
        inside = (v >= -r) & (v <= 0.8 * r) & (np.abs(u) <= (v + r) / 1.8)
    elif scene.shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= r
    else:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {scene.shape!r}")
    return inside.reshape(SIZE, _SUPERSAMPLE, SIZE, _SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: (SIZE, SIZE, 3) uint8 RGB, anti-aliased edges."""
    for name in (scene.colour, scene.background):
        if name not in PALETTE:
            raise ValueError(f"colour must be one of {', '.join(COLOURS)}, got {name!r}")
    alpha = _shape_mask(scene)[..., None]  # (H, W, 1)
    fg = np.array(PALETTE[scene.colour], dtype=np.float32)
    bg = np.array(PALETTE[scene.background], dtype=np.float32)
    return np.rint(alpha * fg + (1.0 - alpha) * bg).astype(np.uint8)


# Caption templates: the position and size phrases are optional, so captions vary in length and word order.
_TEMPLATES = (
    "{a} {size}{colour} {shape}{position} on {a_bg} {background} background",
    "{a} {size}{colour} {shape} on {a_bg} {background} background{position}",
    "{background} background with {a} {size}{colour} {shape}{position}",
)


def caption(scene: Scene, template: int = 0, say_position: bool = True, say_size: bool = True) -> str:
    """Words for a scene, e.g. "a small red circle at the top left on a blue background"."""
    size = f"{scene.size} " if say_size and scene.size != "medium" else ""
    position = f" {scene.position}" if say_position else ""
    if template == 1 and say_position:
        position = f", {scene.position}"
    return _TEMPLATES[template].format(a=_article(size or scene.colour), size=size, colour=scene.colour,
                                       shape=scene.shape, position=position, a_bg=_article(scene.background),
                                       background=scene.background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sample_scenes(n: int, seed: int, split: str = "train") -> list[tuple[Scene, str]]:
    """`n` (scene, caption) pairs drawn from the combinations of `split`, deterministic for a seed.

    A caption leaves out the size or the position now and then; the scene still has one, drawn at random, so a
    short caption stands for every picture that fits it.
    """
    rng = np.random.default_rng(seed)
    pool = combos(split)
    positions, sizes = list(POSITIONS), list(SIZES)
    out = []
    for _ in range(n):
        colour, background, shape = pool[rng.integers(len(pool))]
        scene = Scene(shape=shape, colour=colour, background=background,
                      position=positions[rng.integers(len(positions))], size=sizes[rng.integers(len(sizes))],
                      dx=int(rng.integers(-_JITTER, _JITTER + 1)), dy=int(rng.integers(-_JITTER, _JITTER + 1)))
        text = caption(scene, template=int(rng.integers(len(_TEMPLATES))), say_position=bool(rng.random() < 0.8),
                       say_size=bool(rng.random() < 0.8))
        out.append((scene, text))
    return out


def make_batch(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[str], list[Scene]]:
    """`n` pictures (n, SIZE, SIZE, 3) uint8, their captions and scenes: `sample_scenes` rendered."""
    pairs = sample_scenes(n, seed, split)
    images = np.stack([render(scene) for scene, _ in pairs]) if pairs else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, [text for _, text in pairs], [scene for scene, _ in pairs]


def heldout_prompts(per_combo: int = 1, seed: int = 0) -> list[tuple[Scene, str]]:
    """Evaluation prompts: `per_combo` (scene, caption) pairs for each held-out combination, in a fixed order.

    Each names the size and the position, so one scene stands for the prompt's intent.
    """
    rng = np.random.default_rng(seed)
    positions, sizes = list(POSITIONS), list(SIZES)
    out = []
    for colour, background, shape in combos("heldout"):
        for _ in range(per_combo):
            scene = Scene(shape=shape, colour=colour, background=background,
                          position=positions[rng.integers(len(positions))], size=sizes[rng.integers(len(sizes))])
            out.append((scene, caption(scene, template=int(rng.integers(len(_TEMPLATES))))))
    return out


def corpus() -> list[str]:
    """Every word the captions use, in sentences: what the tokenizer is trained on."""
    lines = []
    for colour, background, shape in combos("all"):
        for position in POSITIONS:
            for size in SIZES:
                scene = Scene(shape=shape, colour=colour, background=background, position=position, size=size)
                lines.extend(caption(scene, template=t) for t in range(len(_TEMPLATES)))
    return lines
