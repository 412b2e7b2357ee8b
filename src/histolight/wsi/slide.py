"""Whole-slide image access with explicit units.

Conventions used everywhere in histolight:

- *base px*: pixel coordinates at pyramid level 0 (``x`` to the right, ``y`` down).
- *level px*: pixel coordinates at a given pyramid level.
- *mpp*: microns per pixel (um/px); the base mpp is ``Slide.mpp``.
- Images are ``H x W x 3`` ``uint8`` RGB numpy arrays; transparent areas are white.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolight.errors import MissingMPPError, SlideError
from histolight.wsi.pixels import resize_area, resize_picture, rgba_to_rgb

log = logging.getLogger(__name__)

#: File extensions OpenSlide can open (lower case, without the dot).
SLIDE_EXTENSIONS = (
    "svs",
    "tif",
    "tiff",
    "ndpi",
    "vms",
    "vmu",
    "scn",
    "mrxs",
    "svslide",
    "bif",
    "dcm",
    "czi",
    "qptiff",
)

#: Long side (px) up to which a slide object keeps its finest thumbnail for :meth:`BaseSlide.overview`.
OVERVIEW_KEEP_PX = 2048

#: Base mpp values outside this range are treated as missing (e.g. TIFF resolution tags in dpi
#: of a screen image). Real scanners range roughly 0.1-2 um/px at level 0.
PLAUSIBLE_MPP = (0.02, 50.0)


def slide_name(path: str | os.PathLike) -> str:
    """Slide name used in tile ids and ROI file matching: the file name without its extension(s).

    ``a/b/CMU-1.svs`` -> ``CMU-1``; ``x.ome.tiff`` -> ``x``.
    """
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def level_origin(level_px: int, downsample: float) -> int:
    """The base-px coordinate that :meth:`BaseSlide.read_region` maps back to level px ``level_px``.

    ``ceil`` (not ``round``) keeps non-integer downsamples (e.g. 4.016) from landing one level px early.
    """
    return int(math.ceil(level_px * downsample - 1e-6))


@dataclass(frozen=True)
class ReadPlan:
    """How one read is served: a box of **level px** at one pyramid level, then a resize to the output size.

    Built by :meth:`BaseSlide.read_plan` (a base-px box at a target um/px, as :meth:`BaseSlide.read`) or
    :meth:`BaseSlide.region_plan` (level px from a base-px origin, as :meth:`BaseSlide.read_region`); executed by
    :meth:`BaseSlide.read_planned`. Tile grids build their reads from the same plans, so a tile is always the
    same pixels as the equivalent direct read.

    Attributes:
        level: pyramid level the pixels come from.
        x, y: top-left of the box in level px (parts outside the level read as white).
        w, h: box size in level px (>= 1).
        out_w, out_h: output size in px (the box is area-resized to it when different).
    """

    level: int
    x: int
    y: int
    w: int
    h: int
    out_w: int
    out_h: int

    @property
    def out_size(self) -> tuple[int, int]:
        """Output ``(w, h)`` in px."""
        return self.out_w, self.out_h


class BaseSlide:
    """Shared logic of every slide: level choice, reads at a target mpp, thumbnails.

    Subclasses implement :meth:`_read_level` and set ``level_dimensions`` (w, h per level),
    ``level_downsamples`` and ``_file_mpp``.
    """

    path: str
    name: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    _file_mpp: float | None
    _mpp_note: str = ""
    #: False: every read chooses level 0 (Slideflow's ``enable_downsample=False``, for slides whose downsampled levels
    #: are missing or unreliable); reads of an explicit level (:meth:`read_region`) are unaffected.
    enable_downsample: bool = True
    #: QC masks applied with :meth:`qc` (kept on this object; extraction of it drops what they mask too).
    qc_applied: tuple = ()

    def __init__(self, mpp: float | None = None):
        if mpp is not None:
            mpp = float(mpp)
            if not (mpp > 0 and math.isfinite(mpp)):
                raise SlideError(getattr(self, "path", "<memory>"), f"mpp override must be a positive number, got {mpp!r}")
        self._mpp_override = mpp

    # ------------------------------------------------------------------ geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(width, height)`` in base px."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float:
        """Base (level-0) microns per pixel: the override if given, else the file's value.

        Raises :class:`MissingMPPError` naming the slide when neither exists.
        """
        if self._mpp_override is not None:
            return self._mpp_override
        if self._file_mpp is None:
            err = MissingMPPError(self.path)
            if self._mpp_note:
                err.args = (f"{err.args[0]} ({self._mpp_note})",)
            raise err
        return self._file_mpp

    @property
    def has_mpp(self) -> bool:
        return self._mpp_override is not None or self._file_mpp is not None

    @property
    def mpp_source(self) -> str:
        """``'override'``, ``'file'`` or ``'missing'``."""
        if self._mpp_override is not None:
            return "override"
        return "file" if self._file_mpp is not None else "missing"

    def level_mpp(self, level: int) -> float:
        """Microns per pixel at ``level``."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample is <= ``downsample`` (never upsamples from a coarser level); always 0 when
        :attr:`enable_downsample` is False."""
        best = 0
        if not self.enable_downsample:
            return best
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-3):
                best = i
        return best

    def best_level_for_mpp(self, mpp: float) -> int:
        """Deepest level whose mpp is <= the target ``mpp`` (um/px)."""
        return self.best_level_for_downsample(mpp / self.mpp)

    def size_at_mpp(self, mpp: float) -> tuple[int, int]:
        """Whole-slide ``(width, height)`` in px when read at ``mpp``."""
        f = self.mpp / mpp
        w, h = self.dimensions
        return max(1, round(w * f)), max(1, round(h * f))

    # ------------------------------------------------------------------ reading
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read ``(w, h)`` level px whose top-left is at level px ``(x, y)``. Returns ``h x w x 3`` uint8."""
        raise NotImplementedError

    def read_plan(
        self,
        location: tuple[float, float],
        size: tuple[float, float],
        mpp: float,
        out_size: tuple[int, int] | None = None,
    ) -> ReadPlan:
        """How :meth:`read` serves the base-px box ``location`` (top-left) + ``size`` (w, h) at ``mpp`` um/px.

        The level is the deepest one at least as fine as ``mpp`` (:meth:`best_level_for_mpp`); the level-px box
        is the smallest one covering the base-px box (``floor`` of its start, ``ceil`` of its end, at least 1 px);
        the output is ``out_size`` (w, h) if given, else the box size scaled to ``mpp``.
        """
        bx, by = location
        bw, bh = size
        if out_size is None:
            f = self.mpp / mpp
            out_size = (max(1, round(bw * f)), max(1, round(bh * f)))
        level = self.best_level_for_mpp(mpp)
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(bx / ds)), int(math.floor(by / ds))
        lw = max(1, int(math.ceil((bx + bw) / ds)) - lx)
        lh = max(1, int(math.ceil((by + bh) / ds)) - ly)
        return ReadPlan(level, lx, ly, lw, lh, int(out_size[0]), int(out_size[1]))

    def region_plan(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> ReadPlan:
        """How :meth:`read_region` serves ``size`` (w, h) **level px** at ``level`` from ``location`` (top-left, **base
        px**): the level-px origin is ``floor(location / downsample)``; no resize."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range for {self.name} (0..{self.level_count - 1})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"read size must be positive, got {size}")
        ds = self.level_downsamples[level]
        x0 = int(math.floor(location[0] / ds + 1e-6))
        y0 = int(math.floor(location[1] / ds + 1e-6))
        return ReadPlan(level, x0, y0, w, h, w, h)

    def read_planned(self, plan: ReadPlan) -> np.ndarray:
        """Pixels of ``plan``: its level-px box (white outside the level) resized to ``plan.out_size`` (area
        interpolation when shrinking). Returns ``out_h x out_w x 3`` uint8 RGB."""
        level, x0, y0, w, h = plan.level, plan.x, plan.y, plan.w, plan.h
        lw, lh = self.level_dimensions[level]
        # clip to the level; pad the rest with white
        cx0, cy0 = max(0, x0), max(0, y0)
        cx1, cy1 = min(lw, x0 + w), min(lh, y0 + h)
        if cx0 == x0 and cy0 == y0 and cx1 == x0 + w and cy1 == y0 + h:
            img = self._read_level(level, x0, y0, w, h)
        else:
            img = np.full((h, w, 3), 255, np.uint8)
            if cx1 > cx0 and cy1 > cy0:
                img[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        return resize_area(img, plan.out_size)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide-style read: ``location`` = top-left in **base px**, ``size`` = ``(w, h)`` in **level px**.

        Areas outside the slide are white. Returns ``h x w x 3`` uint8 RGB. See :meth:`region_plan`.
        """
        return self.read_planned(self.region_plan(location, level, size))

    def read(
        self,
        location: tuple[float, float],
        size: tuple[float, float],
        mpp: float,
        out_size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """Read the base-px box ``location`` (top-left) + ``size`` (w, h) at ``mpp`` um/px.

        Reads from the deepest level that is at least as fine as ``mpp`` and resizes (area
        interpolation when shrinking). Output is ``out_size`` (w, h) if given, else the box size
        scaled to ``mpp``. Returns ``H x W x 3`` uint8. See :meth:`read_plan`.
        """
        return self.read_planned(self.read_plan(location, size, mpp, out_size))

    def size_at_downsample(self, downsample: float) -> tuple[int, int]:
        """Whole-slide ``(width, height)`` in px at ``downsample`` relative to level 0."""
        w, h = self.dimensions
        return max(1, round(w / downsample)), max(1, round(h / downsample))

    def iter_strips(
        self, mpp: float | None = None, strip_px: int = 1024, downsample: float | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(y0, strip)`` covering the whole slide at ``mpp`` um/px (or ``downsample``), ``strip_px`` rows at a time.

        Memory is bounded by one strip (plus the source rows it comes from), whatever the slide size.
        """
        ds_out = downsample if downsample is not None else mpp / self.mpp
        out_w, out_h = self.size_at_downsample(ds_out)
        level = self.best_level_for_downsample(ds_out)
        lw, lh = self.level_dimensions[level]
        sy = lh / out_h  # level rows per output row (>= ~1)
        for y0 in range(0, out_h, strip_px):
            y1 = min(out_h, y0 + strip_px)
            ly0 = int(math.floor(y0 * sy))
            ly1 = min(lh, max(ly0 + 1, int(math.ceil(y1 * sy))))
            yield y0, self.read_planned(ReadPlan(level, 0, ly0, lw, ly1 - ly0, out_w, y1 - y0))

    def thumbnail_downsample(
        self, mpp: float | None = None, max_size: int | None = None, downsample: float | None = None
    ) -> float:
        """Base px per output px of ``thumbnail(mpp=... | max_size=... | downsample=...)``."""
        if mpp is not None:
            return mpp / self.mpp
        if max_size is not None:
            return max(1.0, max(self.dimensions) / float(max_size))
        if downsample is not None:
            return float(downsample)
        raise ValueError("thumbnail needs mpp (um/px), max_size (px) or downsample")

    def thumbnail(self, mpp: float | None = None, max_size: int | None = None, *, downsample: float | None = None) -> np.ndarray:
        """Whole slide at ``mpp`` um/px, or fitting ``max_size`` px on its long side, or at ``downsample`` (base px
        per output px); the last two work without mpp. Size: :meth:`size_at_downsample`.

        Streams strips, so memory is the output plus one strip. Returns ``H x W x 3`` uint8 (kept for
        :meth:`overview` when it is small).
        """
        ds = self.thumbnail_downsample(mpp, max_size, downsample)
        out_w, out_h = self.size_at_downsample(ds)
        out = np.empty((out_h, out_w, 3), np.uint8)
        for y0, strip in self.iter_strips(downsample=ds):
            out[y0 : y0 + strip.shape[0]] = strip
        self._keep_overview(ds, out)
        return out

    # ------------------------------------------------------------------ overview: QC masks and report pictures
    def overview(self, mpp: float | None = None, max_size: int | None = None, *, downsample: float | None = None) -> np.ndarray:
        """A low-resolution picture of the whole slide for QC masks and report images, at least as fine as asked.

        Same arguments and output size as :meth:`thumbnail`, but from the cheapest source: the finest thumbnail or
        overview this slide object already read (:data:`OVERVIEW_KEEP_PX`), area-resized; else the file's own
        thumbnail image when it is fine enough (:meth:`stored_overview`, e.g. Aperio's), resized with
        :func:`resize_picture`; else :meth:`thumbnail`. So a slide's QC and its report share one low-resolution read.
        Its pixels can differ slightly from ``thumbnail()``'s (another source or resampling): use ``thumbnail()``
        where pixels must follow from the pyramid.
        """
        ds = self.thumbnail_downsample(mpp, max_size, downsample)
        out_w, out_h = self.size_at_downsample(ds)
        held = getattr(self, "_overview", None)
        if held is not None and held[0] <= ds * (1 + 1e-6):
            src = held[1]
        else:
            stored = self.stored_overview(ds)
            if stored is None:
                return self.thumbnail(downsample=ds)
            self._keep_overview(*stored)
            src = stored[1]
        return src if src.shape[:2] == (out_h, out_w) else resize_picture(src, (out_w, out_h))

    def stored_overview(self, downsample: float) -> tuple[float, np.ndarray] | None:
        """``(downsample, image)`` of a whole-slide image stored in the file that is at least as fine as
        ``downsample`` and cheaper to read than the pyramid level :meth:`thumbnail` would read; None here."""
        return None

    def _keep_overview(self, ds: float, img: np.ndarray) -> None:
        """Keep ``img`` (the whole slide at downsample ``ds``) for :meth:`overview` when it is small and finer than the
        one held."""
        held = getattr(self, "_overview", None)
        if max(img.shape[:2]) <= OVERVIEW_KEEP_PX and (held is None or ds < held[0]):
            self._overview = (float(ds), img)

    # ------------------------------------------------------------------ stored JPEG tiles
    def stored_jpeg(self, plan: ReadPlan) -> bytes | None:
        """The file's own JPEG bytes for ``plan`` when it reads exactly one whole stored JPEG tile without resizing
        (a standalone stream that decodes to the pixels of :meth:`read_planned`), else None. None here; see
        :meth:`Slide.stored_jpeg`."""
        return None

    def stored_tile_size(self, level: int) -> tuple[int, int] | None:
        """``(w, h)`` in level px of the stored JPEG tiles :meth:`stored_jpeg` can return at ``level``, or None."""
        return None

    # ------------------------------------------------------------------ QC kept on the slide
    def qc(self, method="otsu", *, tile_mpp: float | None = None):
        """Apply QC ``method`` to this slide and keep its mask (Slideflow's ``WSI.qc``); returns the combined mask.

        ``method``: a QC name (``'otsu'``, ``'blur'``, ``'gaussian'``, any registered name), a dict with ``name``, a
        QC object such as ``histolight.qc.GaussianV2()``, or a list of these. ``tile_mpp`` (um/px of the tiles to be
        extracted) sets the blur QC's default working resolution (4x it). Calls add up; :meth:`remove_qc` clears them.
        Extracting this slide object (:func:`histolight.extract.extract_slide`) drops what the kept masks drop,
        besides its own ``qc``. Returns a :class:`histolight.qc.QCMask` (``H x W`` bool, True = drop, at its
        ``mpp`` um/px) combining every kept mask; :attr:`qc_result` has the tissue fraction and blur burden.
        """
        from histolight.qc.combine import apply_qc, run_qc  # QC is a layer below; names resolve in its registry

        self.qc_applied = (*self.qc_applied, *apply_qc(self, method, tile_mpp=tile_mpp))
        self.qc_result = run_qc(self, self.qc_applied)
        return self.qc_result.mask

    @property
    def qc_mask(self):
        """The combined mask of the QC kept with :meth:`qc` (a :class:`histolight.qc.QCMask`), or None."""
        return self.qc_result.mask if self.qc_applied else None

    def remove_qc(self) -> None:
        """Forget the QC masks kept by :meth:`qc`."""
        self.qc_applied = ()
        self.qc_result = None

    # ------------------------------------------------------------------ misc
    def describe(self) -> dict:
        """Summary dict used by ``task=info``."""
        return {
            "slide": self.name,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "levels": self.level_count,
            "downsamples": ",".join(f"{d:g}" for d in self.level_downsamples),
            "mpp": round(self.mpp, 4) if self.has_mpp else None,
            "mpp_source": self.mpp_source,
        }

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g}" if self.has_mpp else "missing"
        return f"{type(self).__name__}({self.name!r}, {self.dimensions[0]}x{self.dimensions[1]} px, {self.level_count} levels, mpp={mpp})"


def _parse_mpp(props: dict) -> tuple[float | None, str]:
    """Base mpp from OpenSlide properties, with a note explaining why it is missing."""
    vals = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        v = props.get(key)
        if v is None:
            continue
        try:
            vals.append(float(v))
        except ValueError:
            return None, f"{key}={v!r} is not a number"
    if not vals:
        obj = props.get("openslide.objective-power")
        note = "the file has no openslide.mpp-x"
        if obj:
            note += f"; it says objective power {obj}x, which is often ~{10.0 / float(obj):.3g} um/px, but check your scanner"
        return None, note
    mpp = float(np.mean(vals))
    lo, hi = PLAUSIBLE_MPP
    if not (lo <= mpp <= hi):
        return (
            None,
            f"the file's mpp {mpp:g} um/px is implausible for a slide (expected {lo}-{hi}); likely resolution tags of a non-slide TIFF",
        )
    return mpp, ""


class Slide(BaseSlide):
    """A whole-slide image read through OpenSlide.

    Args:
        path: slide file.
        mpp: optional base microns-per-pixel override (used when the file has none or is wrong).
        fast: read tiled-JPEG TIFF pyramids (Aperio SVS, generic tiled TIFF) directly from their stored tiles
            (:mod:`histolight.wsi.tiff_tiles`: OpenSlide's pixels, several times faster) when the file allows it;
            OpenSlide otherwise. ``tile_reader`` is the direct reader or None, ``tile_reader_note`` says why.
        enable_downsample: False reads every region from level 0 (see :attr:`BaseSlide.enable_downsample`).

    Raises:
        SlideError: the file is missing, unsupported or corrupt (message has OpenSlide's reason).
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None, fast: bool = True, enable_downsample: bool = True):
        import openslide

        self.path = str(path)
        self.name = slide_name(path)
        if not os.path.exists(self.path):
            raise SlideError(self.path, "file not found")
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(self.path, f"unsupported or unrecognized format ({e or 'OpenSlide cannot read this file'})") from e
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"OpenSlide error: {e}") from e
        except Exception as e:
            raise SlideError(self.path, f"{type(e).__name__}: {e}") from e
        props = dict(self._osr.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor", "unknown")
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self._file_mpp, self._mpp_note = _parse_mpp(props)
        bg = props.get("openslide.background-color")
        self._background = tuple(int(bg[i : i + 2], 16) for i in (0, 2, 4)) if bg and len(bg) == 6 else (255, 255, 255)
        super().__init__(mpp)
        self.enable_downsample = bool(enable_downsample)
        self.tile_reader, self.tile_reader_note = None, "disabled (fast=False)"
        if fast:
            from histolight.wsi.tiff_tiles import open_tile_reader

            self.tile_reader, self.tile_reader_note = open_tile_reader(self._osr, self.path, self._background)

    @property
    def objective_power(self) -> float | None:
        v = self.properties.get("openslide.objective-power")
        try:
            return float(v) if v else None
        except ValueError:
            return None

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        if self.tile_reader is not None:
            from histolight.wsi.tiff_tiles import TileReadError

            try:
                return self.tile_reader.read_level(level, x, y, w, h)
            except TileReadError as e:  # a bad stored tile: let OpenSlide read it (or raise its SlideError)
                log.debug("%s: direct tile read failed (%s); using OpenSlide", self.name, e)
        ds = self.level_downsamples[level]
        try:
            img = self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except openslide.OpenSlideError as e:
            raise SlideError(
                self.path, f"reading pixels failed at level {level}, base ({round(x * ds)}, {round(y * ds)}): {e}"
            ) from e
        return rgba_to_rgb(np.asarray(img), self._background)

    def stored_jpeg(self, plan: ReadPlan) -> bytes | None:
        """The file's own JPEG bytes when ``plan`` is exactly one whole stored tile of a directly read level, without
        resizing (see :meth:`histolight.wsi.tiff_tiles.TiffTileReader.stored_jpeg`); None otherwise or when the
        stored tile cannot be read (the caller then decodes and re-encodes through :meth:`read_planned`)."""
        if self.tile_reader is None or plan.out_size != (plan.w, plan.h):
            return None
        from histolight.wsi.tiff_tiles import TileReadError

        try:
            return self.tile_reader.stored_jpeg(plan.level, plan.x, plan.y, plan.w, plan.h)
        except TileReadError as e:
            log.debug("%s: stored JPEG tile not usable (%s); decoding it instead", self.name, e)
            return None

    def stored_tile_size(self, level: int) -> tuple[int, int] | None:
        if self.tile_reader is None:
            return None
        lv = self.tile_reader.levels[level]
        return lv.tile_w, lv.tile_h

    def stored_overview(self, downsample: float) -> tuple[float, np.ndarray] | None:
        """The file's thumbnail image (associated image ``thumbnail``, e.g. Aperio's) when it covers the whole slide
        (its size is the level-0 size over one downsample, to a pixel), is at least as fine as ``downsample`` and
        coarser than the pyramid level :meth:`thumbnail` would read; else None."""
        if "thumbnail" not in self._associated_names():
            return None
        try:
            from openslide import lowlevel

            tw, th = lowlevel.get_associated_image_dimensions(self._osr._osr, "thumbnail")
        except Exception:  # noqa: BLE001 - no usable thumbnail: read the pyramid
            return None
        W, H = self.dimensions
        ds = (W / tw + H / th) / 2
        level_ds = self.level_downsamples[self.best_level_for_downsample(downsample)]
        if not (abs(round(W / ds) - tw) <= 1 and abs(round(H / ds) - th) <= 1 and level_ds < ds <= downsample * (1 + 1e-6)):
            return None
        try:
            img = rgba_to_rgb(np.asarray(self._osr.associated_images["thumbnail"]), self._background)
        except Exception:  # noqa: BLE001
            return None
        return ds, img

    def _associated_names(self) -> list[str]:
        try:
            return list(self._osr.associated_images)
        except Exception:  # noqa: BLE001
            return []

    def associated_images(self) -> dict[str, np.ndarray]:
        """Label, macro and thumbnail images stored in the file, as RGB arrays."""
        return {k: rgba_to_rgb(np.asarray(v)) for k, v in self._osr.associated_images.items()}

    def close(self) -> None:
        if getattr(self, "tile_reader", None) is not None:
            self.tile_reader.close()
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open ``path`` as a :class:`Slide` (raises :class:`SlideError` with the reason)."""
    return Slide(path, mpp=mpp)
