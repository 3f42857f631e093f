"""Encoding rendered images and storing them under their keys."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from ray_render import storage
from ray_render.config import IMAGE_FORMATS
from ray_render.output.layout import image_url


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode a (height, width, 3) uint8 RGB array. PNG bytes depend only on the pixels (no timestamps)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected a (height, width, 3) uint8 array, got {array.shape} {array.dtype}")
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_image(root: str, shard_id: str, attempt_id: str, row_id: str, image_index: int, fmt: str, data: bytes,
                storage_options: dict | None = None) -> str:
    """Store encoded image bytes at their key under the attempt that rendered them; returns the image's full URL.
    Private writes: readers find an attempt's images through its metadata, which is written after they are stored
    and committed after that (output/commits.py)."""
    url = image_url(root, shard_id, attempt_id, row_id, image_index, fmt)
    storage.write_bytes(url, data, storage_options, private=True)
    return url
