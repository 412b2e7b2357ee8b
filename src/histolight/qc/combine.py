"""Combining a slide's QC masks: one OR mask on the finest grid, the tissue fraction and the blur burden.

:func:`run_qc` applies QC methods (callables ``qc(slide) -> QCMask``) to a slide and returns a :class:`QCResult`.
A method's *role* (:func:`histolight.qc.registry.qc_role`) says what its mask means: ``tissue`` (True =
background, e.g. Otsu), ``blur`` (True = blurred or featureless, e.g. GaussianV2) or none (any other drop mask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from histolight.errors import HistolightError
from histolight.qc.base import QCMask
from histolight.qc.registry import build_qc, qc_role

#: Long side (px) of the QC part masks kept for the report.
REPORT_MASK_PX = 1024


@dataclass
class Precomputed:
    """A QC mask already computed for a slide, used as a QC method (:meth:`histolight.wsi.Slide.qc` keeps these)."""

    mask: QCMask
    role: str | None = None

    @property
    def name(self) -> str:
        return self.mask.name

    def __call__(self, slide) -> QCMask:
        return self.mask


def apply_qc(slide, method: Any, *, tile_mpp: float | None = None, key: str = "method") -> list[Precomputed]:
    """Run the QC ``method`` spec (names, dicts, QC objects; :func:`~histolight.qc.registry.build_qc`) on ``slide``
    now; its masks, each with its role, to combine later with :func:`run_qc`."""
    out = []
    for m in build_qc(method, tile_mpp=tile_mpp, key=key):
        r = _checked(m, m(slide))
        out.append(Precomputed(r, qc_role(m, r.name)))
    return out


def _checked(method: Any, r: Any) -> QCMask:
    if not isinstance(r, QCMask):
        raise HistolightError(f"QC method {method!r} returned {type(r).__name__}, expected histolight.qc.QCMask")
    return r


@dataclass
class QCResult:
    """Outcome of the slide's QC methods.

    Attributes:
        mask: the OR of all masks on the finest grid among them (its ``mpp`` in um/px; None without QC methods).
        tissue_fraction: tissue share of the slide's area, 0-1 (needs a ``tissue`` method such as Otsu).
        blur_burden: blurred share of the tissue, 0-1 (:func:`blur_burden`; needs a ``tissue`` and a ``blur`` method).
        names: the methods' mask names, in order.
        tissue_detector: what found the tissue (the ``detector`` of the tissue masks, e.g. ``otsu-saturation``, or
            their names), None without a tissue method.
        preview: ``tissue_background`` / ``blur`` masks (``H x W`` bool) shrunk to at most :data:`REPORT_MASK_PX`
            px on the long side (for reports).
    """

    mask: QCMask | None = None
    tissue_fraction: float | None = None
    blur_burden: float | None = None
    names: list[str] = field(default_factory=list)
    preview: dict = field(default_factory=dict)
    tissue_detector: str | None = None


def blur_burden(blur: np.ndarray, background: np.ndarray) -> float:
    """Fraction of tissue that is blurred: ``|blur & tissue| / |tissue|`` with ``tissue = ~background``.

    Both masks ``H x W`` bool on the same grid (True = blurred / True = background). 0 when there is no tissue.
    """
    tissue = ~background
    n = int(np.count_nonzero(tissue))
    return float(np.count_nonzero(blur & tissue)) / n if n else 0.0


def _union(masks: Sequence[QCMask], shape: tuple[int, int]) -> np.ndarray | None:
    """OR of ``masks`` resized (nearest) to ``shape`` (h, w); None for no masks."""
    if not masks:
        return None
    if len(masks) == 1:
        return masks[0].resized(shape)
    out = np.zeros(shape, bool)
    for m in masks:
        out |= m.resized(shape)
    return out


def run_qc(slide, methods: Sequence[Callable]) -> QCResult:
    """Apply QC ``methods`` to ``slide`` and combine them (see :class:`QCResult`).

    Raises :class:`HistolightError` when a method returns something other than a :class:`QCMask`.
    """
    if not methods:
        return QCResult()
    masks: list[tuple[str | None, QCMask]] = []
    for m in methods:
        r = _checked(m, m(slide))
        masks.append((qc_role(m, r.name), r))
    finest = min((m for _, m in masks), key=lambda m: m.mpp)
    shape = finest.mask.shape
    combined = _union([m for _, m in masks], shape)
    background = _union([m for r, m in masks if r == "tissue"], shape)
    blur = _union([m for r, m in masks if r == "blur"], shape)
    tissue_fraction = burden = None
    if background is not None:
        tissue_fraction = float(background.size - np.count_nonzero(background)) / background.size
        if blur is not None:
            burden = blur_burden(blur, background)
    f = min(1.0, REPORT_MASK_PX / max(shape))
    small = (max(1, round(shape[1] * f)), max(1, round(shape[0] * f)))
    preview = {
        key: cv2.resize(v.astype(np.uint8), small, interpolation=cv2.INTER_NEAREST) > 0
        for key, v in (("tissue_background", background), ("blur", blur))
        if v is not None
    }
    names = [m.name for _, m in masks]
    detectors = [m.detector or m.name for r, m in masks if r == "tissue"]
    return QCResult(
        QCMask(combined, finest.mpp, "+".join(names)),
        tissue_fraction,
        burden,
        names,
        preview,
        "+".join(dict.fromkeys(detectors)) or None,
    )
