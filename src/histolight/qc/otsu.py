"""Otsu tissue detection (Slideflow's ``qc.Otsu``): background is masked.

The slide is read at a low resolution (by default its lowest pyramid level, but no finer than
:data:`MIN_MPP` um/px and no larger than ``max_px`` on its long side), converted to HSV, the saturation
channel is median-blurred (kernel 7) and thresholded with Otsu's method. Pixels at or below the threshold
(unsaturated: glass, white background) are masked (``True`` = drop).

Dark-background slides (fluorescence) are recognised first (:func:`background_kind`: the vendor metadata when it
records an excitation filter, else the picture's median brightness below :data:`DARK_BRIGHTNESS`). There the black
background is as unsaturated as tissue between nuclei is saturated noise, so saturation cannot tell them apart;
tissue is instead what is brighter than the background: the median-blurred brightness (max of R, G, B: a
fluorescence channel may be shown in any colour) on a log scale, thresholded with the triangle method (the
background is one narrow peak at the dark end; tissue autofluorescence and stained nuclei are a long tail). The mask's
``detector`` says which ran: ``otsu-saturation`` or ``triangle-brightness``.

The picture comes from :meth:`~histolight.wsi.slide.BaseSlide.overview`, so the slide's report images reuse it, and
a slide stored without a coarse pyramid level (e.g. a single-level scan region) is not decoded in full when the file
carries its own thumbnail image.
"""

from __future__ import annotations

import contextlib
import logging
import re

import cv2
import numpy as np

from histolight.qc.base import QCMask

log = logging.getLogger(__name__)

#: Default floor of the working resolution, um/px: the lowest pyramid level of a typical 40x scan (downsample 16 at
#: 0.25 um/px) is used as is; a slide without coarse levels is not thresholded at full resolution (a 128 um tile is
#: still 32 mask px wide).
MIN_MPP = 4.0


#: Median brightness (HSV value, 0-255) of a slide's low-resolution picture below which its background is dark.
#: Brightfield slides (glass and stained tissue) stay far above it, fluorescence scans far below.
DARK_BRIGHTNESS = 64

#: Vendor properties that say a slide was scanned in fluorescence (an excitation filter or wavelength).
_FLUORESCENCE_HINT = re.compile(r"excitation|\bfluorescen(ce|t)\b", re.IGNORECASE)


def metadata_fluorescence(properties: dict) -> str | None:
    """The first vendor property (``key``) saying the slide is a fluorescence scan, or None (e.g. Hamamatsu NDPI's
    ``ExcitationName=...``; OME ``ExcitationWavelength``; an ``IlluminationType``/``AcquisitionMode`` of fluorescence)."""
    for k, v in properties.items():
        if k.startswith("openslide.") or k.startswith("tiff."):
            continue
        if "excitation" in k.lower() or _FLUORESCENCE_HINT.search(str(v)[:4096]):
            return k
    return None


def background_kind(slide, rgb: np.ndarray | None = None) -> tuple[str, str]:
    """``(kind, why)``: kind ``'dark'`` (fluorescence) or ``'light'`` (brightfield) background of ``slide``; why
    names the evidence (a vendor property, or the median brightness of ``rgb``, a low-resolution ``H x W x 3`` uint8
    picture of the whole slide; read with :meth:`overview` when None). Remembered on the slide object."""
    held = getattr(slide, "_background_kind", None)
    if held is not None:
        return held
    key = metadata_fluorescence(getattr(slide, "properties", None) or {})
    if key is not None:
        out = ("dark", f"vendor property {key[:40]!r}")
    else:
        if rgb is None:
            rgb = slide.overview(downsample=lowres_downsample(slide, min_mpp=MIN_MPP))
        v = float(np.median(rgb.max(axis=2)))
        out = ("dark" if v < DARK_BRIGHTNESS else "light", f"median brightness {v:.0f} (dark below {DARK_BRIGHTNESS})")
    with contextlib.suppress(AttributeError):
        slide._background_kind = out
    return out


def bright_tissue(rgb: np.ndarray, median: int = 7) -> tuple[np.ndarray, int]:
    """Tissue mask of a dark-background (fluorescence) ``H x W x 3`` uint8 image: ``(tissue, threshold)``, tissue
    True where the median-blurred brightness (max of R, G, B) is above the triangle threshold of its log histogram;
    ``threshold`` in brightness units 0-255."""
    v = np.ascontiguousarray(rgb.max(axis=2))
    if median and median > 1 and min(v.shape) >= 2:
        v = cv2.medianBlur(v, int(median) | 1)
    scale = 255.0 / np.log(256.0)
    lg = (np.log1p(v.astype(np.float32)) * scale).astype(np.uint8)
    thr, _ = cv2.threshold(lg, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_TRIANGLE)
    return lg > thr, int(round(float(np.expm1(thr / scale))))


def otsu_tissue(rgb: np.ndarray, median: int = 7, min_threshold: int = 0) -> tuple[np.ndarray, int]:
    """Tissue mask of an ``H x W x 3`` uint8 RGB image.

    Returns ``(tissue, threshold)``: ``tissue`` is ``H x W`` bool (True = tissue, i.e. saturation
    above Otsu's threshold on the median-blurred HSV saturation), ``threshold`` in 0-255.
    ``min_threshold`` (0-255) is a floor for the threshold, so a blank slide is not half "tissue".
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
    sat = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]
    if median and median > 1 and min(sat.shape) >= 2:
        sat = cv2.medianBlur(sat, int(median) | 1)
    thr, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(int(thr), int(min_threshold))
    return sat > thr, thr


def lowres_downsample(
    slide, mpp: float | None = None, level: int | None = None, max_px: int = 4096, min_mpp: float | None = None
) -> float:
    """Downsample (relative to level 0) at which a low-resolution QC pass reads ``slide``.

    ``mpp`` (um/px) wins; else pyramid ``level`` (default: the lowest-resolution level, coarsened to ``min_mpp``
    um/px when it is finer and the slide's mpp is known); the result is then coarsened so the long side is at most
    ``max_px``.
    """
    if mpp is not None:
        ds = float(mpp) / slide.mpp
    else:
        lvl = slide.level_count - 1 if level is None else int(level)
        if not 0 <= lvl < slide.level_count:
            raise ValueError(f"level {level} out of range for {slide.name} (0..{slide.level_count - 1})")
        ds = float(slide.level_downsamples[lvl])
        if level is None and min_mpp and slide.has_mpp:
            ds = max(ds, float(min_mpp) / slide.mpp)
    if max_px:
        ds = max(ds, max(slide.dimensions) / float(max_px))
    return max(ds, 1e-6)


class Otsu:
    """Otsu's thresholding on HSV saturation at low resolution; background masked.

    Args:
        mpp: um/px to work at (default: the slide's lowest pyramid level, see ``level``).
        level: pyramid level to work at when ``mpp`` is None (default: the last, lowest-resolution, but no finer than
            ``min_mpp``).
        max_px: cap on the long side of the working image (px).
        min_mpp: floor of the default working resolution in um/px (:data:`MIN_MPP`; None = the lowest level as is).
        median: median-blur kernel (px, odd).
        min_threshold: floor for Otsu's threshold on saturation (0-255; 0 = pure Otsu as in Slideflow).
        background: ``'auto'`` (:func:`background_kind`), ``'light'`` (brightfield: Otsu on saturation) or
            ``'dark'`` (fluorescence: triangle threshold on brightness, :func:`bright_tissue`).

    Calling it on a slide returns a :class:`QCMask` named ``otsu`` (True = background).
    """

    name = "otsu"
    role = "tissue"

    def __init__(
        self,
        mpp: float | None = None,
        level: int | None = None,
        max_px: int = 4096,
        median: int = 7,
        min_threshold: int = 0,
        min_mpp: float | None = MIN_MPP,
        background: str = "auto",
    ):
        if background not in ("auto", "light", "dark"):
            raise ValueError(f"otsu background={background!r} is invalid: must be 'auto', 'light' or 'dark'")
        self.background = background
        if mpp is not None and not float(mpp) > 0:
            raise ValueError(f"otsu mpp must be a positive number of um/px, got {mpp!r}")
        if not 0 <= int(min_threshold) <= 255:
            raise ValueError(f"otsu min_threshold must be in 0..255, got {min_threshold!r}")
        self.mpp = mpp
        self.level = level
        self.max_px = int(max_px)
        self.median = int(median)
        self.min_threshold = int(min_threshold)
        if min_mpp is not None and not float(min_mpp) > 0:
            raise ValueError(f"otsu min_mpp must be a positive number of um/px or null, got {min_mpp!r}")
        self.min_mpp = min_mpp

    def __repr__(self) -> str:
        return (
            f"Otsu(mpp={self.mpp!r}, level={self.level!r}, max_px={self.max_px}, median={self.median}, "
            f"min_mpp={self.min_mpp!r}, background={self.background!r})"
        )

    def __call__(self, slide) -> QCMask:
        ds = lowres_downsample(slide, self.mpp, self.level, self.max_px, self.min_mpp)
        img = slide.overview(downsample=ds)
        kind, why = (self.background, "set") if self.background != "auto" else background_kind(slide, img)
        if kind == "dark":
            tissue, thr = bright_tissue(img, self.median)
            detector = "triangle-brightness"
            log.info("%s: dark background (%s): tissue = brightness above %d (triangle threshold)", slide.name, why, thr)
        else:
            tissue, thr = otsu_tissue(img, self.median, self.min_threshold)
            detector = "otsu-saturation"
        log.debug("%s: %s threshold %d at downsample %.3g (%dx%d px)", slide.name, detector, thr, ds, img.shape[1], img.shape[0])
        m = QCMask(~tissue, slide.mpp * ds, self.name, detector=detector)
        m.threshold = thr  # type: ignore[attr-defined]
        return m
