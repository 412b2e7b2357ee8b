"""The QC interface shared by extraction and segmentation.

A QC method is any callable ``qc(slide) -> QCMask``. The mask covers the whole slide at ``mpp``
um/px (shape ``(round(H0 * mpp0 / mpp), round(W0 * mpp0 / mpp))``) and is ``True`` where tissue
must be **dropped** (background, blur, pen, or whatever the method rejects). Methods combine with
:func:`histolight.qc.combine.run_qc` (logical OR after resizing to the finest mpp).
"""

from __future__ import annotations

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
        detector: how the mask was made when a method has several ways (e.g. Otsu's ``otsu-saturation`` on a
            brightfield slide, ``triangle-brightness`` on a dark-background one), else None.
    """

    mask: np.ndarray
    mpp: float
    name: str = "qc"
    parts: dict = field(default_factory=dict)
    detector: str | None = None

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
