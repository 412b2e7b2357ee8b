"""Per-tile pixel filters (Slideflow's grayspace and whitespace filters), computed on the tile itself.

- grayspace: fraction of pixels whose HSV saturation (0-1 scale) is below ``grayspace_threshold``;
  the tile is dropped when that fraction exceeds ``grayspace_fraction`` (defaults 0.05 and 0.6).
- whitespace: fraction of pixels whose mean RGB is above ``whitespace_threshold`` (0-255); dropped when
  it exceeds ``whitespace_fraction`` (defaults 230 and 1.0, i.e. off).
"""

from __future__ import annotations

import cv2
import numpy as np


def grayspace_fraction(img: np.ndarray, threshold: float = 0.05) -> float:
    """Fraction of pixels of an ``H x W x 3`` uint8 RGB tile with HSV saturation < ``threshold`` (0-1)."""
    sat = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)[:, :, 1]
    return float(np.count_nonzero(sat < threshold * 255.0)) / sat.size


def whitespace_fraction(img: np.ndarray, threshold: float = 230) -> float:
    """Fraction of pixels of an RGB tile whose mean over R, G, B is > ``threshold`` (0-255)."""
    s = img.sum(axis=2, dtype=np.uint16)
    return float(np.count_nonzero(s > 3.0 * threshold)) / s.size


def tile_reject_reason(
    img: np.ndarray,
    grayspace_threshold: float = 0.05,
    grayspace_fraction_max: float = 0.6,
    whitespace_threshold: float = 230,
    whitespace_fraction_max: float = 1.0,
) -> str | None:
    """``'grayspace'``, ``'whitespace'`` or None (kept). A filter with fraction 1.0 never rejects."""
    if grayspace_fraction_max < 1.0 and grayspace_fraction(img, grayspace_threshold) > grayspace_fraction_max:
        return "grayspace"
    if whitespace_fraction_max < 1.0 and whitespace_fraction(img, whitespace_threshold) > whitespace_fraction_max:
        return "whitespace"
    return None
