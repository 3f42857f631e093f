"""Edit inputs: the encoded bytes of a row's input image -> the uint8 RGB pixels the VAE encodes.

As the official pipeline prepares them: its `load_image` applies the EXIF orientation, turns LA into RGBA,
composites RGBA on white and converts to RGB; its example then resizes the image to the output size (bicubic).
`crop` centre-crops to the output's aspect ratio before resizing, so a picture of another shape is not stretched.
The `<image>` string of the prompt is sized from the pixels this returns (see generate.py), as the official code
sizes it from the input image.

numpy and PIL only: this runs once per request in `check`, before any tensor exists.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from ray_render.config import EDIT_INPUTS  # ("resize", "crop"): the job option's values

# The image modes the official loader accepts; others (16-bit "I;16", float "F", ...) are refused as it does.
SUPPORTED_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK")


class InputImageError(ValueError):
    """The input image cannot be used; the message says why (the caller names the row and the field)."""


def decode_input_image(data: bytes, width: int, height: int, mode: str = "resize") -> np.ndarray:
    """`data` (PNG, JPEG, WebP, ...) -> (height, width, 3) uint8 RGB, prepared as the module docstring says."""
    from PIL import Image, ImageOps

    if mode not in EDIT_INPUTS:
        raise ValueError(f"edit_input must be one of {', '.join(EDIT_INPUTS)}, got {mode!r}")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise InputImageError(f"not a readable PNG/JPEG/WebP image ({e})") from None
    if img.mode not in SUPPORTED_MODES:
        raise InputImageError(f"image mode {img.mode} is not supported; use one of {', '.join(SUPPORTED_MODES)} "
                              "(8-bit images)")
    img = _rgb_on_white(img)
    if mode == "crop":
        img = _crop_to_aspect(img, width / height)
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()  # (H, W, 3)


def _rgb_on_white(img):
    """RGB, with any alpha channel composited on a white background (the official `to_rgb`)."""
    from PIL import Image

    if img.mode == "LA":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
    with warnings.catch_warnings():
        # A palette image with a transparent entry converts to RGB as the official loader converts it, which PIL
        # warns about on every call.
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


def _crop_to_aspect(img, target: float):
    """The largest centred crop of `img` whose width / height is `target`."""
    w, h = img.size
    if abs(w / h - target) <= 1e-6:
        return img
    if w / h > target:
        cw = round(h * target)
        return img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    ch = round(w / target)
    return img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
