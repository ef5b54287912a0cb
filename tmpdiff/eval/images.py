"""Image grids from model-space samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tmpdiff.formats.atomic import atomic_path


def grid_image(images: np.ndarray, rows: int, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W) or (N, H, W, 3) into `rows` rows, upscaled by `scale` (nearest), with dark padding."""
    n, h, w = images.shape[:3]
    cols = -(-n // rows)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    hh, ww = h * scale, w * scale
    canvas = np.full((rows * (hh + pad) + pad, cols * (ww + pad) + pad, *images.shape[3:]), 40, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (hh + pad), pad + c * (ww + pad)
        canvas[y : y + hh, x : x + ww] = big[i]
    return canvas


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write a uint8 array as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
