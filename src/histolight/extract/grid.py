"""The tile grid of one slide, in base (level-0) px, and how each tile is read.

Two modes:

- **microns** (``tile_um`` a number): the tile footprint is ``extract_px = round(tile_um / slide.mpp)``
  base px; pixels come from the deepest pyramid level at least as fine as ``tile_um / tile_px`` um/px
  and are resized to exactly ``tile_px`` (area interpolation when shrinking) -- the same pixels as
  ``slide.read((x, y), (extract_px, extract_px), tile_um / tile_px, out_size=(tile_px, tile_px))``.
- **magnification** (``tile_um="10x"``, 10x = 1.0 um/px): a pyramid level within :data:`LEVEL_MATCH` (10%) of the
  target um/px (the nearest in log scale; ties go to the finer level) is read as stored, without resizing:
  ``tile_px`` level px, so ``extract_px = round(tile_px * downsample)`` -- the same pixels as
  ``slide.read_region((x, y), level, (tile_px, tile_px))``. Without such a level the tiles are read from the
  closest finer level and resized to the exact magnification, as in microns mode with
  ``extract_px = round(tile_px * target_mpp / slide.mpp)``; a slide without any level at or finer than the request
  is refused (upsampling) unless ``allow_upsample``.

Upsampling (``tile_px / extract_px`` output px per base px above 1) invents no detail: above :data:`WARN_UPSAMPLE`
(2x) it is logged, above ``max_upsample`` (default 4x) the slide is refused with a :class:`ConfigError` naming the
options, before any pixel is read, unless ``allow_upsample``. ``tile_mpp`` always records the real um/px of the
written tiles (``extract_px * slide.mpp / tile_px``).

Tile origins step by ``extract_px / stride_div`` base px (rounded); tiles must lie fully inside the
slide unless ``edge_tiles`` (then the last row/column reaching the border is kept and padded white).
``loc_x, loc_y = x + extract_px // 2, y + extract_px // 2`` is the tile centre in base px.

Reads go through the slide's :class:`~histolight.wsi.slide.ReadPlan` (:meth:`TileGrid.read_plan`), the same plan
``slide.read`` / ``slide.read_region`` use, so tiles cannot drift from direct reads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from histolight.errors import ConfigError
from histolight.units import mag_to_mpp
from histolight.wsi.slide import ReadPlan, resize_area

log = logging.getLogger(__name__)

#: A level whose um/px is within this factor of a magnification's is read as stored (no resizing).
LEVEL_MATCH = 1.1
#: Upsampling (output px per base px) above which a slide's extraction is logged as a warning.
WARN_UPSAMPLE = 2.0


def nearest_level(slide, mpp: float) -> int:
    """Pyramid level whose um/px is nearest to ``mpp`` in log scale (ties: the finer level); level 0 when the slide's
    ``enable_downsample`` is False."""
    best, best_d = 0, math.inf
    for lvl in range(slide.level_count if getattr(slide, "enable_downsample", True) else 1):
        d = abs(math.log(slide.level_mpp(lvl) / mpp))
        if d < best_d - 1e-9:
            best, best_d = lvl, d
    return best


def _positions(size: int, extract_px: int, stride: float, edge: bool) -> np.ndarray:
    """Tile origins (base px) along one axis of ``size`` px."""
    out = []
    k = 0
    while True:
        p = int(round(k * stride))
        if p + extract_px <= size:
            out.append(p)
        elif edge and p < size:
            out.append(p)
            break
        else:
            break
        if p + extract_px >= size:
            break
        k += 1
    return np.asarray(out, np.int64)


@dataclass
class TileGrid:
    """All candidate tiles of one slide (row-major: ``grid_y`` then ``grid_x``).

    Attributes:
        x, y: tile top-left in base px (int64, shape (n,)).
        grid_x, grid_y: column / row index of each tile.
        extract_px: tile footprint side in base px.
        stride_px: distance between tile origins in base px (before rounding).
        tile_px: output tile side in px.
        level: pyramid level the pixels come from.
        read_mpp: um/px requested from ``slide.read`` (microns mode), or the level's um/px.
        tile_mpp: effective um/px of the output tiles (``extract_px * slide.mpp / tile_px``).
        mag: target magnification (magnification mode) or None.
        slide_dims: slide ``(width, height)`` in base px.
        level_ds: downsample of ``level``.
        as_stored: tiles are ``tile_px`` level px of ``level`` read without resizing (magnification mode on a
            matching level); False: resized from the base-px footprint.
    """

    x: np.ndarray
    y: np.ndarray
    grid_x: np.ndarray
    grid_y: np.ndarray
    extract_px: int
    stride_px: float
    tile_px: int
    level: int
    read_mpp: float
    tile_mpp: float
    mag: float | None
    slide_dims: tuple[int, int]
    level_ds: float = 1.0
    as_stored: bool = False

    @property
    def upsample(self) -> float:
        """Output px per base px (``tile_px / extract_px``); above 1 the tiles are enlarged from the slide."""
        return self.tile_px / self.extract_px

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def loc_x(self) -> np.ndarray:
        """Tile centres, base px."""
        return self.x + self.extract_px // 2

    @property
    def loc_y(self) -> np.ndarray:
        return self.y + self.extract_px // 2

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the grid."""
        return (int(self.grid_y.max()) + 1 if len(self) else 0, int(self.grid_x.max()) + 1 if len(self) else 0)

    # ----------------------------------------------------------------- reading
    def read_plan(self, slide, i: int) -> ReadPlan:
        """How tile ``i`` is read: the slide's own read plan (:meth:`~histolight.wsi.slide.BaseSlide.read_plan` in
        microns mode, :meth:`~histolight.wsi.slide.BaseSlide.region_plan` in magnification mode)."""
        x, y = int(self.x[i]), int(self.y[i])
        if self.as_stored:
            return slide.region_plan((x, y), self.level, (self.tile_px, self.tile_px))
        e = self.extract_px
        return slide.read_plan((x, y), (e, e), self.read_mpp, out_size=(self.tile_px, self.tile_px))

    def read_tile(self, slide, i: int) -> np.ndarray:
        """Pixels of tile ``i``: ``tile_px x tile_px x 3`` uint8 (white outside the slide)."""
        return slide.read_planned(self.read_plan(slide, i))

    def read_run(self, slide, idx: list[int]) -> list[np.ndarray]:
        """Pixels of several tiles of one row (same ``y``), read as one level-px strip.

        Identical to ``[read_tile(slide, i) for i in idx]``; memory is one strip of the row span.
        """
        if len(idx) == 1:
            return [self.read_tile(slide, idx[0])]
        plans = [self.read_plan(slide, i) for i in idx]
        first = plans[0]
        span = max(p.x + p.w for p in plans) - first.x
        strip = slide.read_planned(replace(first, w=span, out_w=span, out_h=first.h))
        # tiles that are not resized are views into the strip (callers copy what they keep)
        return [resize_area(strip[:, p.x - first.x : p.x - first.x + p.w], p.out_size) for p in plans]

    def stored_jpegs(self, slide, idx: list[int]) -> list[bytes | None]:
        """Per tile of ``idx``: the slide's own JPEG bytes when the tile is exactly one stored JPEG tile read without
        resizing (:meth:`~histolight.wsi.slide.BaseSlide.stored_jpeg`: decodes to the pixels of :meth:`read_tile`),
        else None."""
        return [slide.stored_jpeg(self.read_plan(slide, i)) for i in idx]

    def stored_jpeg_problem(self, slide) -> tuple[str | None, bool]:
        """``(why, some)``: why tiles of this grid cannot all be copied from the slide's stored JPEG tiles (None when
        they can), and whether some of them still can (a grid only partly aligned to the stored tiles)."""
        if self.mag is None:
            return "tiles are resampled to tile_um (a magnification such as tile_um='20x' reads a level as stored)", False
        if not self.as_stored:
            return f"the slide has no pyramid level at {self.mag:g}x: tiles are resized from a finer level", False
        size = slide.stored_tile_size(self.level)
        if size is None:
            note = getattr(slide, "tile_reader_note", None)
            return "the slide is not read from stored JPEG tiles" + (f" ({note})" if note else ""), False
        if size != (self.tile_px, self.tile_px):
            return f"tile_px={self.tile_px} but the slide stores {size[0]}x{size[1]} px tiles at level {self.level}", False
        ds = self.level_ds
        ax = np.floor(np.unique(self.x) / ds + 1e-6).astype(np.int64) % size[0] == 0
        ay = np.floor(np.unique(self.y) / ds + 1e-6).astype(np.int64) % size[1] == 0
        if ax.all() and ay.all():
            return None, True
        why = (
            f"the grid is not aligned to the stored tiles at level {self.level} (downsample {ds:g}, step "
            f"{self.stride_px / ds:g} level px; stride_div=1 at an integer downsample aligns it)"
        )
        return why, bool(ax.any() and ay.any())

    def runs(self, idx: np.ndarray, max_px: int = 4096) -> list[list[int]]:
        """Group tile indices (row-major) into runs read at once: same row, touching or overlapping,
        spanning at most ``max_px`` level px (so memory stays bounded whatever the slide width)."""
        limit = max(self.extract_px, max_px * self.level_ds)  # base px
        out: list[list[int]] = []
        cur: list[int] = []
        for i in np.asarray(idx).tolist():
            if cur:
                j0, j = cur[0], cur[-1]
                if (
                    self.y[i] == self.y[j]
                    and self.x[i] <= self.x[j] + self.extract_px
                    and self.x[i] + self.extract_px - self.x[j0] <= limit
                ):
                    cur.append(i)
                    continue
                out.append(cur)
            cur = [i]
        if cur:
            out.append(cur)
        return out


def check_upsampling(
    name: str, upsample: float, tile_mpp: float, slide_mpp: float, max_upsample: float = 4.0, allow_upsample: bool = False
) -> None:
    """Refuse (:class:`ConfigError`) tiles enlarged more than ``max_upsample`` times (``upsample`` = output px per
    base px) unless ``allow_upsample``; log a warning above :data:`WARN_UPSAMPLE`."""
    if upsample > max_upsample * (1 + 1e-6) and not allow_upsample:
        raise ConfigError(
            f"slide '{name}': max_upsample={max_upsample:g} is exceeded: tiles at {tile_mpp:.3g} um/px from a slide "
            f"scanned at {slide_mpp:.3g} um/px are enlarged {upsample:.3g}x (no detail is gained). Use a larger tile_um "
            f"(or a smaller tile_px), raise max_upsample, or set allow_upsample=true to extract them anyway"
        )
    if upsample > WARN_UPSAMPLE:
        log.warning(
            "%s: tiles at %.3g um/px are upsampled %.3gx from the slide's %.3g um/px (no detail is gained)",
            name,
            tile_mpp,
            upsample,
            slide_mpp,
        )


def make_grid(
    slide,
    tile_px: int,
    tile_um: float | None = None,
    mag: float | None = None,
    stride_div: float = 1,
    edge_tiles: bool = False,
    *,
    max_upsample: float = 4.0,
    allow_upsample: bool = False,
) -> TileGrid:
    """The tile grid of ``slide`` (see module docstring). Needs ``slide.mpp`` (raises MissingMPPError).

    Raises :class:`ConfigError` when the tiles would be upsampled beyond ``max_upsample`` (or, in magnification
    mode, when no level is at or finer than the request) and ``allow_upsample`` is False.
    """
    if (tile_um is None) == (mag is None):
        raise ValueError("give exactly one of tile_um (microns) or mag (magnification)")
    W, H = slide.dimensions
    mpp = slide.mpp
    as_stored = False
    if mag is not None:
        target = mag_to_mpp(mag)
        level = nearest_level(slide, target)
        lvl_mpp = slide.level_mpp(level)
        as_stored = abs(math.log(lvl_mpp / target)) <= math.log(LEVEL_MATCH)
        if as_stored:
            ds = slide.level_downsamples[level]
            extract_px = max(1, int(round(tile_px * ds)))
            read_mpp = lvl_mpp
        else:
            extract_px = max(1, int(round(tile_px * target / mpp)))
            read_mpp = target
            level = slide.best_level_for_mpp(read_mpp)
            ds = slide.level_downsamples[level]
            if tile_px / extract_px > LEVEL_MATCH and not allow_upsample:
                raise ConfigError(
                    f"slide '{slide.name}': tile_um={mag:g}x ({target:.3g} um/px) is finer than every level of the "
                    f"slide (level 0 is {mpp:.3g} um/px = {mag * target / mpp:.3g}x). Use a magnification the slide "
                    "has, or set allow_upsample=true to enlarge its tiles"
                )
            log.info(
                "%s: no pyramid level at %gx; tiles are read from level %d (%.3g um/px) and resized to %.4g um/px",
                slide.name,
                mag,
                level,
                slide.level_mpp(level),
                extract_px * mpp / tile_px,
            )
    else:
        extract_px = max(1, int(round(tile_um / mpp)))
        read_mpp = tile_um / tile_px
        level = slide.best_level_for_mpp(read_mpp)
        ds = slide.level_downsamples[level]
    tile_mpp = extract_px * mpp / tile_px
    if not as_stored:
        check_upsampling(slide.name, tile_px / extract_px, tile_mpp, mpp, max_upsample, allow_upsample)
    stride = extract_px / float(stride_div)
    xs = _positions(W, extract_px, stride, edge_tiles)
    ys = _positions(H, extract_px, stride, edge_tiles)
    gy, gx = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    gx, gy = gx.ravel().astype(np.int64), gy.ravel().astype(np.int64)
    return TileGrid(
        x=xs[gx] if len(xs) else np.zeros(0, np.int64),
        y=ys[gy] if len(ys) else np.zeros(0, np.int64),
        grid_x=gx,
        grid_y=gy,
        extract_px=extract_px,
        stride_px=stride,
        tile_px=int(tile_px),
        level=level,
        read_mpp=read_mpp,
        tile_mpp=tile_mpp,
        mag=mag,
        slide_dims=(W, H),
        level_ds=float(ds),
        as_stored=as_stored,
    )
