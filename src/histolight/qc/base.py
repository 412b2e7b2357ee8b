"""The QC interface shared by extraction and segmentation.

A QC method is any callable ``qc(slide) -> QCMask``. The mask covers the whole slide at ``mpp``
um/px (shape ``(round(H0 * mpp0 / mpp), round(W0 * mpp0 / mpp))``) and is ``True`` where tissue
must be **dropped** (background, blur, pen, or whatever the method rejects). Methods combine with
:func:`combine` (logical OR after resizing to the finest mpp).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np


@dataclass
class QCMask:
    """A slide-level boolean mask.

    Attributes:
        mask: ``H x W`` bool, True = masked out (drop).
        mpp: um/px of the mask grid (level-0 px per mask px = ``mpp / slide.mpp``).
        name: method name (for reports).
        parts: named component masks at the same mpp (e.g. ``{"otsu": ..., "blur": ...}``).
    """

    mask: np.ndarray
    mpp: float
    name: str = "qc"
    parts: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mask.ndim != 2:
            raise ValueError(f"QC mask must be 2-D (H x W), got shape {self.mask.shape}")
        self.mask = self.mask.astype(bool, copy=False)

    def resized(self, shape_hw: tuple[int, int]) -> np.ndarray:
        """The mask resized (nearest) to ``shape_hw``."""
        if self.mask.shape == tuple(shape_hw):
            return self.mask
        return cv2.resize(self.mask.astype(np.uint8), (shape_hw[1], shape_hw[0]), interpolation=cv2.INTER_NEAREST) > 0


class QCMethod(Protocol):
    def __call__(self, slide) -> QCMask: ...


def combine(masks: Sequence[QCMask], name: str = "combined") -> QCMask:
    """OR of several QC masks on the finest grid among them; components kept in ``parts``."""
    if not masks:
        raise ValueError("combine() needs at least one mask")
    finest = min(masks, key=lambda m: m.mpp)
    shape = finest.mask.shape
    out = np.zeros(shape, bool)
    parts = {}
    for m in masks:
        r = m.resized(shape)
        out |= r
        parts[m.name] = r
        for k, v in m.parts.items():
            parts.setdefault(k, cv2.resize(v.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0)
    return QCMask(out, finest.mpp, name, parts)


QCCallable = Callable[[object], QCMask]
