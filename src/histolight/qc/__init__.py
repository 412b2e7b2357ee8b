"""Slide-level QC masks (True = drop). Methods are callables ``qc(slide) -> QCMask``."""
from histolight.qc.base import QCMask, QCMethod, combine

__all__ = ["QCMask", "QCMethod", "combine"]
