"""Everything decided about a slide before its tile pixels are read: grid, ROI mode, QC, and tile-table rows.

:func:`plan_slide` builds a :class:`SlidePlan`: the tile grid (base px), the ROI decision
(:func:`resolve_roi_mode`), the slide's QC (:func:`histolight.qc.combine.run_qc`) and, per tile, the QC-masked
fraction of its footprint (:func:`qc_tile_fraction`) and a status code (:data:`~histolight.extract.layout.REASONS`).
:func:`tile_table` turns a plan and the kept tiles into the slide's tile table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from histolight.cohort import SkipSlide
from histolight.extract.config import ExtractConfig
from histolight.extract.grid import TileGrid, make_grid
from histolight.extract.layout import KEPT, QC_R, ROI_R
from histolight.extract.rois import ROIAssignment, assign_rois
from histolight.qc.combine import QCResult, run_qc
from histolight.roi import ROI

log = logging.getLogger(__name__)

#: Columns of a tile table (``get_tile_dataframe`` returns the first 8, indexed by ``tile_id``).
TABLE_COLUMNS = ["loc_x", "loc_y", "grid_x", "grid_y", "roi_name", "roi_desc", "label", "slide"]
EXTRA_COLUMNS = ["tile_id", "record", "x", "y", "size_base", "qc_fraction", "roi_fraction"]


class SlideSkipped(SkipSlide):
    """The slide cannot be extracted under the chosen settings (e.g. ``roi_method=inside`` without ROIs): the cohort
    runner records it as ``skipped`` with this reason."""


@dataclass
class SlidePlan:
    """Everything decided before reading tile pixels.

    ``status`` per tile uses :data:`~histolight.extract.layout.REASONS` codes (0 = still a candidate / kept);
    ``qc_fraction`` is the QC-masked fraction (0-1) of each tile's footprint; ``rois`` are in base px.
    """

    grid: TileGrid
    roi_mode: str
    rois: list[ROI]
    assign: ROIAssignment | None
    status: np.ndarray
    qc_fraction: np.ndarray
    qc: QCResult
    notes: list[str] = field(default_factory=list)

    @property
    def qc_names(self) -> list[str]:
        return self.qc.names

    @property
    def tissue_fraction(self) -> float | None:
        return self.qc.tissue_fraction

    @property
    def blur_burden(self) -> float | None:
        return self.qc.blur_burden

    @property
    def candidates(self) -> np.ndarray:
        """Indices of the tiles still kept (status 0), row-major."""
        return np.flatnonzero(self.status == KEPT)


def resolve_roi_mode(roi_method: str, has_roi_file: bool, n_rois: int, name: str, roi_file: str | None = None) -> str:
    """``'inside'``, ``'outside'``, ``'whole'`` or ``'ignore'``; raises :class:`SlideSkipped` with the reason."""
    where = f" ({roi_file})" if roi_file else ""
    if roi_method == "ignore":
        return "ignore"
    if roi_method == "auto":
        if not has_roi_file:
            return "whole"
        if n_rois == 0:
            raise SlideSkipped(
                f"slide '{name}': its ROI file{where} has no ROI inside the slide (all outside or invalid); "
                "fix the ROI coordinates (level-0 px), remove the file to extract the whole slide, or use roi_method=ignore"
            )
        return "inside"
    if not has_roi_file:
        raise SlideSkipped(
            f"slide '{name}': roi_method={roi_method} but the slide has no ROI file; "
            "add <slide>.csv/.geojson to dataset.rois or use roi_method=auto"
        )
    if roi_method == "inside" and n_rois == 0:
        raise SlideSkipped(f"slide '{name}': roi_method=inside but its ROI file{where} has no ROI inside the slide")
    if roi_method == "outside" and n_rois == 0:
        log.warning(
            "slide '%s': roi_method=outside but its ROI file%s has no ROI inside the slide: every tile is outside", name, where
        )
    return roi_method


def qc_tile_fraction(mask: np.ndarray, slide_dims: tuple[int, int], grid: TileGrid) -> np.ndarray:
    """Masked fraction (0-1) of each tile's footprint (area outside the slide counts as masked).

    ``mask`` is ``h x w`` bool covering the whole slide (True = drop); ``slide_dims`` is ``(width, height)`` in
    base px. Works one grid row at a time (column sums of the row's mask strip), so extra memory is one mask row
    of int64, not a full integral image.
    """
    n = len(grid)
    out = np.zeros(n)
    if n == 0:
        return out
    h, w = mask.shape
    sx, sy = w / slide_dims[0], h / slide_dims[1]  # mask px per base px
    e = grid.extract_px
    x0 = np.round(grid.x * sx).astype(np.int64)
    y0 = np.round(grid.y * sy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((grid.x + e) * sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((grid.y + e) * sy).astype(np.int64))
    total = ((x1 - x0) * (y1 - y0)).astype(np.float64)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    order = np.lexsort((grid.x, grid.y))
    rows = np.split(order, np.flatnonzero(np.diff(grid.y[order])) + 1)
    for idx in rows:
        a, b = int(cy0[idx[0]]), int(cy1[idx[0]])
        if b <= a:
            continue  # the row lies outside the mask: fully masked
        prefix = np.zeros(w + 1, np.int64)
        np.cumsum(np.count_nonzero(~mask[a:b], axis=0), out=prefix[1:])
        out[idx] = prefix[cx1[idx]] - prefix[cx0[idx]]
    return 1.0 - out / total


def plan_slide(
    slide,
    cfg: ExtractConfig,
    rois: Sequence[ROI] | None,
    *,
    roi_file: str | None = None,
    qc_methods: Sequence[Callable] | None = None,
    apply_qc: bool = True,
) -> SlidePlan:
    """Grid, ROI decision and QC for ``slide`` (no tile pixels read).

    Args:
        rois: the slide's ROIs in base px (already clipped), or None when it has no ROI file.
        roi_file: the ROI file's path (messages only).
        qc_methods: prebuilt QC callables (default: built from ``cfg.qc`` with the tile um/px). Masks kept on the
            slide object by :meth:`~histolight.wsi.slide.BaseSlide.qc` are applied too.
        apply_qc: False to skip QC (geometry-only tile tables).

    Raises :class:`SlideSkipped` when the ROI settings rule the slide out.
    """
    name = slide.name
    grid = make_grid(
        slide,
        cfg.tile_px,
        cfg.um,
        cfg.mag,
        cfg.stride_div,
        cfg.edge_tiles,
        max_upsample=cfg.max_upsample,
        allow_upsample=cfg.allow_upsample,
    )
    has_file = rois is not None
    rois = list(rois or [])
    mode = resolve_roi_mode(cfg.roi_method, has_file, len(rois), name, roi_file)
    n = len(grid)
    status = np.zeros(n, np.int8)
    assign = None
    if mode in ("inside", "outside"):
        assign = assign_rois(grid, rois, cfg.roi_filter_method)
        status[~assign.inside if mode == "inside" else assign.inside] = ROI_R
        if mode == "outside":
            assign.roi[:] = -1
    notes = []
    if n == 0:
        W, H = slide.dimensions
        notes.append(
            f"the tile footprint ({grid.extract_px}x{grid.extract_px} base px = {cfg.tile_um} "
            f"{'um' if cfg.mag is None else ''}) does not fit in the slide ({W}x{H} px); "
            "use a smaller tile_um or edge_tiles=true"
        )
    qc = QCResult()
    qc_fraction = np.zeros(n)
    if apply_qc:
        if qc_methods is None:
            from histolight.qc.registry import build_qc

            qc_methods = build_qc(cfg.qc, tile_mpp=grid.tile_mpp, key="qc", plugins=getattr(cfg, "qc_plugins", None))
        qc = run_qc(slide, [*getattr(slide, "qc_applied", ()), *qc_methods])
        if qc.mask is not None and n:
            qc_fraction = qc_tile_fraction(qc.mask.mask, slide.dimensions, grid)
            status[(status == KEPT) & (qc_fraction > cfg.filter_threshold)] = QC_R
    return SlidePlan(grid, mode, rois, assign, status, qc_fraction, qc, notes)


def tile_table(plan: SlidePlan, idx: np.ndarray, name: str) -> pd.DataFrame:
    """Tile-table rows of slide ``name`` for tiles ``idx`` of ``plan`` (in record order).

    Columns: ``tile_id``, :data:`TABLE_COLUMNS`, then the rest of :data:`EXTRA_COLUMNS`; positions
    (``loc_x/loc_y`` = tile centre, ``x/y`` = top-left, ``size_base`` = footprint) in base px.
    """
    grid = plan.grid
    lx, ly = grid.loc_x[idx], grid.loc_y[idx]
    roi_name = [None] * len(idx)
    roi_desc = [None] * len(idx)
    label = [None] * len(idx)
    if plan.assign is not None and len(idx):
        for k, r in enumerate(plan.assign.roi[idx].tolist()):
            if r >= 0:
                roi = plan.rois[r]
                roi_name[k], roi_desc[k], label[k] = roi.name, roi.description, roi.label
    roi_frac = plan.assign.fraction[idx] if plan.assign is not None else np.zeros(len(idx))
    cols = {
        "tile_id": pd.Series([f"{name}-{x}-{y}" for x, y in zip(lx.tolist(), ly.tolist())], dtype=object),
        "slide": pd.Series([name] * len(idx), dtype=object),
        "loc_x": lx.astype(np.int64),
        "loc_y": ly.astype(np.int64),
        "grid_x": grid.grid_x[idx].astype(np.int64),
        "grid_y": grid.grid_y[idx].astype(np.int64),
        "roi_name": pd.Series(roi_name, dtype=object),
        "roi_desc": pd.Series(roi_desc, dtype=object),
        "label": pd.Series(label, dtype=object),
        "record": np.arange(len(idx), dtype=np.int64),
        "x": grid.x[idx].astype(np.int64),
        "y": grid.y[idx].astype(np.int64),
        "size_base": np.full(len(idx), grid.extract_px, np.int64),
        "qc_fraction": plan.qc_fraction[idx].astype(np.float32) if len(plan.qc_fraction) else np.zeros(len(idx), np.float32),
        "roi_fraction": roi_frac.astype(np.float32),
    }
    order = ["tile_id", *TABLE_COLUMNS, *[c for c in EXTRA_COLUMNS if c != "tile_id"]]
    return pd.DataFrame({c: cols[c] for c in order})  # built in column order: no reindexing copy
