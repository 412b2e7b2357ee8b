"""What a MIL model attends to: the top-scoring tiles of a bag, a montage of them read back from the slide, the
share of them that lie in the ROIs of one class (is the attention on the tissue that decides the label?), and each
tile's evidence for a class (which class a tile counts for; attention only says how much it counts).

Tile locations are tile centres in base (level-0) px, ``(N, 2)`` ``(x, y)``; scores are the model's per-tile
scores ``(N,)`` (:mod:`histolight.mil.models`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: share of a bag's tiles counted as "top-attended" by :func:`roi_share`
TOP_FRACTION = 0.1


def top_tiles(scores: np.ndarray, fraction: float | None = None, n: int | None = None) -> np.ndarray:
    """Indices of the highest ``scores`` (N,), best first: ``n`` of them, or ``ceil(fraction * N)`` (at least one)."""
    s = np.asarray(scores, np.float64)
    k = n if n is not None else max(1, math.ceil((fraction if fraction is not None else TOP_FRACTION) * len(s)))
    return np.argsort(-s, kind="stable")[: min(k, len(s))]


def evidence(contributions: np.ndarray, cls: int) -> np.ndarray:
    """Each tile's evidence for class ``cls``: its contribution to that logit minus the mean of its contributions to
    the others, ``(N, C) -> (N,)`` (``contributions`` of :mod:`histolight.mil.models`). Summed over the bag (plus the
    same difference of the head's biases) it is the slide's ``logit_cls - mean(other logits)``: with two classes,
    the log-odds of ``cls``. Positive = the tile argues for ``cls``, negative = against. Needs ``C >= 2`` (MIL
    training refuses one class)."""
    c = np.asarray(contributions, np.float64)
    others = np.delete(c, cls, axis=1).mean(1)
    return c[:, cls] - others


def roi_share(locs: np.ndarray, scores: np.ndarray, rois: Sequence, label: str, fraction: float = TOP_FRACTION) -> float:
    """Share (0-1) of the top ``fraction`` of tiles by score whose centre lies inside a ROI labelled ``label``
    (``rois``: :class:`histolight.roi.ROI` objects, base px; holes excluded). NaN for an empty bag."""
    import shapely

    if len(scores) == 0:
        return float("nan")
    geoms = [r.geometry for r in rois if r.label == label]
    top = top_tiles(scores, fraction)
    if not geoms:
        return 0.0
    area = shapely.union_all(geoms)
    xy = np.asarray(locs, np.float64)[top]
    return float(shapely.contains_xy(area, xy[:, 0], xy[:, 1]).mean())


def montage(
    slide, locs: np.ndarray, scores: np.ndarray, tile_base: float, n: int = 16, tile_px: int = 128, cols: int | None = None
) -> np.ndarray:
    """The ``n`` highest-scoring tiles read from ``slide`` (a :class:`histolight.wsi.Slide`), each ``tile_base`` base
    px square around its centre, shown at ``tile_px`` px under a title ``#rank score``, in a grid of ``cols``
    columns (default ``ceil(sqrt(n))``) on white. Returns ``H x W x 3`` uint8."""
    from histolight.viz import titled

    idx = top_tiles(scores, n=n)
    mpp = float(slide.mpp) * tile_base / tile_px
    cells = []
    for rank, i in enumerate(idx, 1):
        x, y = locs[i]
        img = slide.read((x - tile_base / 2, y - tile_base / 2), (tile_base, tile_base), mpp, out_size=(tile_px, tile_px))
        cells.append(titled(img, f"#{rank} {float(scores[i]):.3g}", font_px=12, pad=3))
    cols = cols or max(1, math.ceil(math.sqrt(len(cells))))
    rows = math.ceil(len(cells) / cols)
    gap = 4
    ch, cw = max(c.shape[0] for c in cells), max(c.shape[1] for c in cells)
    out = np.full((rows * (ch + gap) - gap, cols * (cw + gap) - gap, 3), 255, np.uint8)
    for k, c in enumerate(cells):
        r, q = divmod(k, cols)
        out[r * (ch + gap) : r * (ch + gap) + c.shape[0], q * (cw + gap) : q * (cw + gap) + c.shape[1]] = c
    return out


__all__ = ["TOP_FRACTION", "top_tiles", "evidence", "roi_share", "montage"]
