"""Synthetic test images for the app tests (no real data is committed or needed)."""

from __future__ import annotations

import io

import numpy as np


def synthetic_cell(seed: int = 0, size: int = 360) -> np.ndarray:
    """A stained-smear-like single-cell image: (size, size, 3) uint8 RGB.

    Light pink background, a few pale pink red cells, a lilac cytoplasm disc in the centre with a
    purple nucleus inside it, plus mild noise so it is not flat.
    """
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (236, 214, 222), np.uint8)
    for _ in range(6):
        c = tuple(int(v) for v in rng.integers(20, size - 20, 2))
        r = int(rng.integers(28, 40))
        cv2.circle(img, c, r, (222, 170, 180), -1, lineType=cv2.LINE_AA)
        cv2.circle(img, c, max(r // 3, 4), (230, 195, 203), -1, lineType=cv2.LINE_AA)
    ctr = (size // 2 + int(rng.integers(-8, 9)), size // 2 + int(rng.integers(-8, 9)))
    cv2.circle(img, ctr, int(size * 0.17), (196, 170, 214), -1, lineType=cv2.LINE_AA)   # cytoplasm
    cv2.ellipse(img, ctr, (int(size * 0.1), int(size * 0.08)), float(rng.integers(0, 180)), 0, 360,
                (104, 52, 140), -1, lineType=cv2.LINE_AA)                                 # nucleus
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
