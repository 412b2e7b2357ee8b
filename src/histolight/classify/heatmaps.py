"""Tile-classifier heatmaps: one picture per slide covering the whole slide at a fixed scale, a geometry sidecar, a legend.

In ``<out>/heatmaps/``:

- ``<slide>.png``: ``ceil(H / stride) * scale`` x ``ceil(W / stride) * scale`` px (``W x H`` the slide in base px,
  ``stride`` the base px between tile origins), so identical slides give identical pictures. Cell ``(i, j)``
  (``scale`` x ``scale`` px) covers base px ``[j * stride, (j + 1) * stride) x [i * stride, (i + 1) * stride)``;
  its colour is that of the most likely class (:func:`histolight.viz.label_color`, the colours of the segmentation
  outputs too), paler the less certain (:func:`cell_colors`; a mix of colours would invent hues: red + green =
  brown); white (:data:`histolight.viz.BACKGROUND`) where there is no tile.
- ``<slide>.json``: the geometry sidecar (:meth:`HeatmapGeometry.sidecar`): slide size in base px, base mpp,
  base px per heatmap pixel, origin, where the geometry came from.
- ``legend.json`` (class -> RGB) and ``legend.png`` (the colour key).

The geometry comes from the extraction summary beside the TFRecords (``meta/<slide>.json``: slide size, mpp,
tile size and stride); TFRecords without one (e.g. written by Slideflow) fall back to the extent and spacing of
the tile locations, and the sidecar says so (``geometry_source``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histolight.extract.layout import read_meta
from histolight.io.atomic import atomic_write_json
from histolight.io.images import write_png
from histolight.viz import label_colors, legend_image, palette

FROM_SUMMARY = "extraction summary"
FROM_LOCATIONS = "tile locations"


@dataclass(frozen=True)
class HeatmapGeometry:
    """Where a slide's heatmap lies: ``slide_dims`` (w, h base px), ``stride`` (base px between tile origins),
    ``tile_px`` (tile side, base px), ``mpp`` (base um/px, None when unknown), ``source`` (:data:`FROM_SUMMARY` or
    :data:`FROM_LOCATIONS`)."""

    slide_dims: tuple[int, int]
    stride: float
    tile_px: float
    mpp: float | None
    source: str

    def grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of tile cells covering the slide."""
        return math.ceil(self.slide_dims[1] / self.stride), math.ceil(self.slide_dims[0] / self.stride)

    def cells(self, loc_x: np.ndarray, loc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, col)`` of the cells holding tiles centred at base px ``(loc_x, loc_y)``."""
        rows, cols = self.grid()
        half = self.tile_px // 2
        c = np.rint((np.asarray(loc_x, np.float64) - half) / self.stride).astype(np.int64).clip(0, cols - 1)
        r = np.rint((np.asarray(loc_y, np.float64) - half) / self.stride).astype(np.int64).clip(0, rows - 1)
        return r, c

    def sidecar(self, slide: str, scale: int, classes: Sequence[str]) -> dict:
        """The ``<slide>.json`` content for a heatmap drawn ``scale`` px per cell."""
        rows, cols = self.grid()
        return {
            "slide": slide,
            "file": f"{slide}.png",
            "slide_dims": list(self.slide_dims),
            "mpp": self.mpp,
            "origin": [0, 0],
            "base_px_per_pixel": self.stride / scale,
            "stride_base_px": self.stride,
            "tile_base_px": self.tile_px,
            "px_per_tile": scale,
            "size": [cols * scale, rows * scale],
            "classes": list(classes),
            "colors": {k: list(v) for k, v in label_colors(classes).items()},
            "geometry_source": self.source,
            "layout": "pixel (i, j) covers base px [j*d, (j+1)*d) x [i*d, (i+1)*d) from origin, d = base_px_per_pixel",
        }


def _grid_step(v: np.ndarray) -> float | None:
    u = np.unique(v)
    d = np.diff(u)
    d = d[d > 0]
    return float(d.min()) if len(d) else None


def geometry_from_summary(meta: Mapping | None) -> HeatmapGeometry | None:
    """The geometry recorded by the extraction (``meta/<slide>.json``), None when it lacks the slide size or tile size."""
    if not meta or not meta.get("width") or not meta.get("height") or not meta.get("extract_px"):
        return None
    e = float(meta["extract_px"])
    div = float((meta.get("settings") or {}).get("stride_div") or 1)
    return HeatmapGeometry((int(meta["width"]), int(meta["height"])), e / div, e, meta.get("mpp"), FROM_SUMMARY)


def geometry_from_locations(loc_x: np.ndarray, loc_y: np.ndarray) -> HeatmapGeometry:
    """Geometry guessed from tile centres (base px): stride = the smallest spacing (tile side = stride), slide size =
    the tiles' extent; a lone tile is one cell reaching from the origin."""
    loc_x, loc_y = np.asarray(loc_x), np.asarray(loc_y)
    steps = [s for s in (_grid_step(loc_x), _grid_step(loc_y)) if s]
    stride = min(steps) if steps else max(1.0, 2.0 * float(min(loc_x.min(), loc_y.min())))
    dims = (math.ceil(loc_x.max() + stride / 2), math.ceil(loc_y.max() + stride / 2))
    return HeatmapGeometry(dims, stride, stride, None, FROM_LOCATIONS)


def slide_geometry(tfrecord_dir: str | os.PathLike, name: str, pred: pd.DataFrame) -> HeatmapGeometry:
    """Geometry of slide ``name``: from its extraction summary in ``tfrecord_dir``, else from ``pred``'s locations."""
    return geometry_from_summary(read_meta(tfrecord_dir, name)) or geometry_from_locations(pred["loc_x"], pred["loc_y"])


def cell_colors(proba: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """``(N, 3)`` float RGB of tiles with class probabilities ``proba`` ``(N, K)``: the most likely class's colour,
    mixed with white by its certainty ``c`` = ``0.3 + 0.7 * (p_max - 1/K) / (1 - 1/K)`` (full colour at p_max = 1)."""
    k = max(2, len(classes))
    pmax = proba.max(1, initial=0.0)
    c = (0.3 + 0.7 * np.clip((pmax - 1 / k) / (1 - 1 / k), 0, 1))[:, None]
    col = palette(classes).astype(np.float32)[proba.argmax(1)]
    return col * c + 255.0 * (1 - c)


def heatmap_image(
    pred: pd.DataFrame, classes: Sequence[str], geometry: HeatmapGeometry | None = None, scale: int = 4
) -> np.ndarray:
    """``H x W x 3`` uint8 heatmap of one slide's tiles (``loc_x, loc_y, prob_<class>...``), laid out by ``geometry``
    (default: from the tile locations), ``scale`` px per tile cell; format in the module docstring."""
    g = geometry or geometry_from_locations(pred["loc_x"], pred["loc_y"])
    rows, cols = g.grid()
    img = np.full((rows, cols, 3), 255, np.float32)
    r, c = g.cells(pred["loc_x"].to_numpy(), pred["loc_y"].to_numpy())
    img[r, c] = cell_colors(pred[[f"prob_{k}" for k in classes]].to_numpy(np.float32), classes)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, 0), scale, 1)
    return img


def write_heatmap(
    pred: pd.DataFrame, classes: Sequence[str], outdir: str | os.PathLike, name: str, geometry: HeatmapGeometry, scale: int
) -> Path:
    """Write ``<outdir>/<name>.png`` and its geometry sidecar ``<name>.json``; returns the PNG path."""
    out = Path(outdir)
    write_png(out / f"{name}.png", heatmap_image(pred, classes, geometry, scale))
    atomic_write_json(out / f"{name}.json", geometry.sidecar(name, scale, classes))
    return out / f"{name}.png"


def write_legend(classes: Sequence[str], outdir: str | os.PathLike) -> Path:
    """``<outdir>/legend.json`` (class -> RGB) and ``legend.png`` (the colour key); returns the JSON path."""
    out = Path(outdir)
    colors = label_colors(classes)
    atomic_write_json(out / "legend.json", {k: list(v) for k, v in colors.items()})
    key = {**colors, "no tile": (255, 255, 255)}
    write_png(out / "legend.png", legend_image(key, title="most likely class (paler = less certain)"))
    return out / "legend.json"


def write_heatmaps(
    pred: pd.DataFrame,
    classes: Sequence[str],
    outdir: str | os.PathLike,
    scale: int = 4,
    geometries: Mapping[str, HeatmapGeometry] | None = None,
) -> list[Path]:
    """One heatmap + sidecar per slide of ``pred`` (geometry from ``geometries[slide]``, else the tile locations)
    and the legend, into ``outdir``; returns the PNG paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for slide, df in pred.groupby("slide"):
        g = (geometries or {}).get(slide) or geometry_from_locations(df["loc_x"], df["loc_y"])
        paths.append(write_heatmap(df, classes, outdir, str(slide), g, scale))
    write_legend(classes, outdir)
    return paths


__all__ = [
    "HeatmapGeometry",
    "geometry_from_summary",
    "geometry_from_locations",
    "slide_geometry",
    "cell_colors",
    "heatmap_image",
    "write_heatmap",
    "write_heatmaps",
    "write_legend",
]
