"""Blur (out-of-focus) detection in the style of Slideflow's ``qc.GaussianV2``.

At ``mpp`` um/px (default: 4x the tile mpp), the slide is converted to grey (ITU-R 709 luma, 0-1),
filtered with the 4-neighbour Laplacian, made absolute, smoothed with a Gaussian of ``sigma``
px, and pixels whose response is ``<= threshold`` are masked (True = blurred *or* featureless,
which includes the glass background; :func:`histolight.qc.combine.blur_burden` intersects it with a tissue mask).

The slide is processed in overlapping blocks (``block_px`` output px plus a margin of
``4 * sigma + 2`` px on each side, enough for both filters), so memory is bounded by one block
whatever the slide size; the stitched result equals the one-shot computation up to resampling
at block seams. Units follow ``slide.mpp``, so an mpp override is honoured.

On a dark-background (fluorescence) slide (:func:`histolight.qc.otsu.background_kind`) the grey image is the
brightness (max of R, G, B) instead of luma: a DAPI channel shown in blue has a luma of at most 0.07, so every edge
would fall under the threshold and all tissue would count as blurred.

:class:`Gaussian` is Slideflow's legacy ``qc.Gaussian``: the same filter on the whole slide read at once.
"""

from __future__ import annotations

import copy
import logging
import math

import cv2
import numpy as np

from histolight.qc.base import QCMask

log = logging.getLogger(__name__)

_LUMA = np.array([0.2125, 0.7154, 0.0721], np.float32)  # skimage.color.rgb2gray weights


def blur_response(rgb: np.ndarray, sigma: float, gray: str = "luma") -> np.ndarray:
    """Gaussian-smoothed absolute Laplacian of the grey image (float32, grey scale 0-1); ``gray`` is ``'luma'``
    (ITU-R 709) or ``'max'`` (brightness: max of R, G, B, for dark-background slides)."""
    if gray == "max":
        gray = rgb.max(axis=2).astype(np.float32) / 255.0
    else:
        gray = (rgb.astype(np.float32) @ _LUMA) / 255.0
    lap = np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT))
    if sigma > 0:
        lap = cv2.GaussianBlur(lap, (0, 0), float(sigma), borderType=cv2.BORDER_REFLECT)
    return lap


def blur_mask_image(rgb: np.ndarray, sigma: float = 3, threshold: float = 0.02, gray: str = "luma") -> np.ndarray:
    """Blur mask (True = blurred/featureless) of one ``H x W x 3`` uint8 image, as Slideflow's ``Gaussian``."""
    return blur_response(rgb, sigma, gray) <= threshold


def _gray_mode(background: str, slide) -> str:
    """``'max'`` (brightness) on a dark-background slide, else ``'luma'``."""
    if background == "auto":
        from histolight.qc.otsu import background_kind

        background = background_kind(slide)[0]
    return "max" if background == "dark" else "luma"


def _check(mpp, tile_mpp, sigma, threshold, background) -> None:
    for key, v in (("mpp", mpp), ("tile_mpp", tile_mpp)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"blur {key} must be a positive number of um/px, got {v!r}")
    if not (isinstance(sigma, (int, float)) and sigma >= 0):
        raise ValueError(f"blur sigma must be >= 0 px, got {sigma!r}")
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"blur threshold must be >= 0, got {threshold!r}")
    if background not in ("auto", "light", "dark"):
        raise ValueError(f"blur background={background!r} is invalid: must be 'auto', 'light' or 'dark'")


class GaussianV2:
    """Strided Laplacian-of-Gaussian blur detection (Slideflow ``GaussianV2`` defaults: sigma 3, threshold 0.02).

    Args:
        mpp: um/px to work at. Default: ``4 * tile_mpp`` when extraction gives the tile mpp, else
            ``4 * slide.mpp``.
        sigma: Gaussian sigma in working px.
        threshold: response at or below which a pixel is blurred (grey levels 0-1).
        tile_mpp: the extraction's tile um/px (set by the QC registry, also for an object passed in ``qc=[...]``:
            :meth:`for_tile_mpp`; used for the default ``mpp``).
        block_px: working block size (output px per side) that bounds memory.
        background: ``'auto'`` (detect), ``'light'`` (brightfield: luma) or ``'dark'`` (fluorescence: brightness).

    Returns a :class:`QCMask` named ``blur`` (True = blurred or featureless).
    """

    name = "blur"
    role = "blur"

    def __init__(
        self,
        mpp: float | None = None,
        sigma: float = 3,
        threshold: float = 0.02,
        *,
        tile_mpp: float | None = None,
        block_px: int = 1024,
        background: str = "auto",
    ):
        _check(mpp, tile_mpp, sigma, threshold, background)
        self.background = background
        if int(block_px) < 16:
            raise ValueError(f"blur block_px must be >= 16, got {block_px!r}")
        self.mpp = mpp
        self.sigma = float(sigma)
        self.threshold = float(threshold)
        self.tile_mpp = tile_mpp
        self.block_px = int(block_px)

    def __repr__(self) -> str:
        return f"GaussianV2(mpp={self.mpp!r}, sigma={self.sigma:g}, threshold={self.threshold:g}, tile_mpp={self.tile_mpp!r})"

    def for_tile_mpp(self, tile_mpp: float) -> GaussianV2:
        """This method for tiles of ``tile_mpp`` um/px: a copy with that ``tile_mpp`` when neither ``mpp`` nor
        ``tile_mpp`` was set (so the default works at 4x the tile um/px), else itself."""
        if self.mpp is not None or self.tile_mpp is not None:
            return self
        bound = copy.copy(self)
        bound.tile_mpp = float(tile_mpp)
        return bound

    def working_mpp(self, slide) -> float:
        """The um/px the mask is computed at for ``slide``."""
        if self.mpp is not None:
            return float(self.mpp)
        return 4.0 * float(self.tile_mpp if self.tile_mpp is not None else slide.mpp)

    def __call__(self, slide) -> QCMask:
        mpp = self.working_mpp(slide)
        ds = mpp / slide.mpp  # base px per working px
        if ds < 1:
            log.warning(
                "%s: blur QC at %.3g um/px is finer than the slide (%.3g um/px); using level 0", slide.name, mpp, slide.mpp
            )
            ds, mpp = 1.0, slide.mpp
        out_w, out_h = slide.size_at_downsample(ds)
        sx, sy = slide.dimensions[0] / out_w, slide.dimensions[1] / out_h  # base px per mask px, per axis
        mask = np.zeros((out_h, out_w), bool)
        gray = _gray_mode(self.background, slide)
        margin = int(math.ceil(4 * self.sigma)) + 2
        B = self.block_px
        for by in range(0, out_h, B):
            for bx in range(0, out_w, B):
                x0, y0 = max(0, bx - margin), max(0, by - margin)
                x1, y1 = min(out_w, bx + B + margin), min(out_h, by + B + margin)
                img = slide.read((x0 * sx, y0 * sy), ((x1 - x0) * sx, (y1 - y0) * sy), mpp, out_size=(x1 - x0, y1 - y0))
                m = blur_mask_image(img, self.sigma, self.threshold, gray)
                ex, ey = min(out_w, bx + B), min(out_h, by + B)
                mask[by:ey, bx:ex] = m[by - y0 : ey - y0, bx - x0 : ex - x0]
        return QCMask(mask, slide.mpp * ds, self.name, detector=f"laplacian-{gray}")


class Gaussian(GaussianV2):
    """Slideflow's legacy ``qc.Gaussian``: the blur mask of the whole slide read at once at ``mpp`` um/px (default
    4x the tile um/px, else 4x the slide's). Same arguments and result as :class:`GaussianV2` up to resampling (one
    picture instead of blocks); memory is the whole picture, so prefer :class:`GaussianV2` on large slides."""

    def __init__(self, mpp=None, sigma=3, threshold=0.02, *, tile_mpp=None, background="auto"):
        super().__init__(mpp, sigma, threshold, tile_mpp=tile_mpp, background=background)

    def __repr__(self) -> str:
        return super().__repr__().replace("GaussianV2(", "Gaussian(", 1)

    def __call__(self, slide) -> QCMask:
        mpp = max(self.working_mpp(slide), slide.mpp)
        img = slide.thumbnail(downsample=mpp / slide.mpp)
        gray = _gray_mode(self.background, slide)
        return QCMask(blur_mask_image(img, self.sigma, self.threshold, gray), mpp, self.name, detector=f"laplacian-{gray}")


#: Short alias.
Blur = GaussianV2
