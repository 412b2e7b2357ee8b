"""Pixel helpers of slide reading: resizing (tiles vs pictures) and RGBA compositing. ``H x W x C`` uint8 arrays."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def resize_area(img: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize ``img`` to ``(w, h)``: area interpolation when shrinking, bilinear when enlarging."""
    w, h = int(size_wh[0]), int(size_wh[1])
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrink = w <= img.shape[1] and h <= img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_picture(img: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize ``img`` to ``(w, h)`` for a picture (QC masks, reports, previews), cheaply: halvings by 2x2 averaging
    while it is at least twice the size, then bilinear. Close to :func:`resize_area`, several times faster for
    non-integer factors, not pixel-identical to it (so never used for tiles)."""
    w, h = int(size_wh[0]), int(size_wh[1])
    while img.shape[1] >= 2 * w and img.shape[0] >= 2 * h and min(img.shape[:2]) >= 4:
        hh, ww = img.shape[0] // 2, img.shape[1] // 2
        img = cv2.resize(img[: 2 * hh, : 2 * ww], (ww, hh), interpolation=cv2.INTER_AREA)  # exact 2x: the fast path
    if img.shape[1] == w and img.shape[0] == h:
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def rgba_to_rgb(rgba: np.ndarray, background: Sequence[int] = (255, 255, 255)) -> np.ndarray:
    """Composite an ``H x W x 4`` uint8 RGBA array over ``background``. Passes RGB through."""
    if rgba.ndim == 3 and rgba.shape[2] == 3:
        return rgba
    rgb = rgba[..., :3]
    a = rgba[..., 3]
    if a.min() == 255:
        return cv2.cvtColor(np.ascontiguousarray(rgba), cv2.COLOR_RGBA2RGB)  # drops alpha (a vectorised copy)
    af = a[..., None].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32)
    return (rgb.astype(np.float32) * af + bg * (1 - af) + 0.5).astype(np.uint8)
