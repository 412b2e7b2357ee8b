"""ROI filtering of a tile grid, and the ROI (name, description, label) each tile carries.

``roi_filter_method``:

- ``'center'``: a tile is inside when its centre (``loc_x, loc_y``) lies strictly inside an ROI (holes
  excluded). It carries that ROI; if ROIs overlap there, the smallest one (the most specific).
- a float ``f`` in (0, 1): a tile is inside when the fraction of its footprint covered by the union
  of ROIs (holes excluded) exceeds ``f``. It carries the ROI covering most of it.

``roi_method='inside'`` keeps inside tiles; ``'outside'`` keeps the others (they carry no ROI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from histolight.extract.grid import TileGrid
from histolight.roi import ROI


@dataclass
class ROIAssignment:
    """Per tile: ``inside`` (bool), ``roi`` index into the ROI list (-1 = none), ``fraction`` inside ROIs."""

    inside: np.ndarray
    roi: np.ndarray
    fraction: np.ndarray


def assign_rois(grid: TileGrid, rois: Sequence[ROI], method: str | float) -> ROIAssignment:
    """Which tiles of ``grid`` are inside ``rois`` under ``method`` (``'center'`` or a float)."""
    n = len(grid)
    roi_idx = np.full(n, -1, np.int64)
    frac = np.zeros(n, np.float64)
    if n == 0 or not rois:
        return ROIAssignment(np.zeros(n, bool), roi_idx, frac)
    geoms = np.array([r.geometry for r in rois], dtype=object)
    areas = shapely.area(geoms)
    tree = shapely.STRtree(geoms)
    if method == "center":
        pts = shapely.points(grid.loc_x.astype(float), grid.loc_y.astype(float))
        ti, ri = tree.query(pts, predicate="within")
        # the smallest containing ROI wins: assign in order of decreasing area, so smaller overwrite
        order = np.argsort(-areas[ri], kind="stable")
        roi_idx[ti[order]] = ri[order]
        inside = roi_idx >= 0
        frac = inside.astype(np.float64)  # not computed in centre mode
        return ROIAssignment(inside, roi_idx, frac)
    thr = float(method)
    e = float(grid.extract_px)
    boxes = shapely.box(grid.x.astype(float), grid.y.astype(float), grid.x + e, grid.y + e)
    ti, ri = tree.query(boxes, predicate="intersects")
    if len(ti):
        inter = shapely.area(shapely.intersection(boxes[ti], geoms[ri]))
        # the ROI covering most of each tile (ties: the earlier ROI)
        order = np.lexsort((-ri, inter))  # ascending area, so the largest is written last
        roi_idx[ti[order]] = ri[order]
        hit = np.unique(ti)
        union = shapely.union_all(geoms)
        frac[hit] = shapely.area(shapely.intersection(boxes[hit], union)) / (e * e)
    inside = frac > thr
    roi_idx[~inside] = -1
    return ROIAssignment(inside, roi_idx, frac)
