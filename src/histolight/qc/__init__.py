"""Slide-level QC masks (True = drop). Methods are callables ``qc(slide) -> QCMask``.

Built-in: :class:`Otsu` (tissue; background masked; brightness on dark-background slides), :class:`GaussianV2`
(blur; :class:`Gaussian` the legacy one-pass version), :class:`StridedDL` (base class of deep-learning QC). Build from
config with :func:`build_qc` (``["otsu", "blur"]``, ``{"name": "segment", ...}``); add methods
with :func:`register_qc`. :func:`run_qc` applies methods to a slide and combines their masks (OR on the finest
grid, tissue fraction, blur burden).
"""

from histolight.qc.base import QCMask, QCMethod
from histolight.qc.blur import Blur, Gaussian, GaussianV2, blur_mask_image
from histolight.qc.combine import QCResult, blur_burden, run_qc
from histolight.qc.otsu import Otsu, background_kind, otsu_tissue
from histolight.qc.registry import QC_REGISTRY, build_qc, qc_names, qc_role, register_qc, validate_qc_spec
from histolight.qc.segment import Segment
from histolight.qc.strided import StridedDL

__all__ = [
    "QCMask",
    "QCMethod",
    "QCResult",
    "run_qc",
    "Otsu",
    "otsu_tissue",
    "background_kind",
    "GaussianV2",
    "Gaussian",
    "Blur",
    "blur_burden",
    "blur_mask_image",
    "QC_REGISTRY",
    "build_qc",
    "register_qc",
    "qc_names",
    "qc_role",
    "validate_qc_spec",
    "Segment",
    "StridedDL",
]
