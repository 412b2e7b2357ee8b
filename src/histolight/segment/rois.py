"""Predicted masks -> labelled ROI polygons (holes kept) in base px; per-slide and per-cohort writers.

Polygons follow pixel edges: OpenCV traces the boundary pixel centres of each connected region
(``RETR_CCOMP``: outer boundaries and their holes), then the polygon is grown by half a pixel
(mitred) so it runs along the pixel edges, i.e. adjacent classes share boundaries. Objects and
holes smaller than ``min_area_mm2`` are dropped (holes filled); outlines are simplified with
``simplify_tolerance`` base px and scaled to level-0 coordinates.

The default area threshold scales with the prediction's resolution: :data:`AUTO_MIN_AREA_PX` prediction pixels
(0.01 mm^2 at 20 um/px, Slideflow's scale; 6.25 um^2 at 0.5 um/px, where nuclei are 20-100 um^2). How many objects
a threshold dropped is reported (a warning when it dropped every object).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import MultiPolygon, Polygon

from histolight.cohort import CohortResult, run_per_slide
from histolight.errors import HistolightError
from histolight.io.atomic import atomic_write_json
from histolight.roi import ROI, ROI_EXTENSIONS, write_rois
from histolight.roi.core import _polygonal
from histolight.utils.filesets import record_of, record_path

log = logging.getLogger(__name__)

#: default ``min_area_mm2``: objects smaller than this many prediction pixels (5 x 5 px) are dropped
AUTO_MIN_AREA_PX = 25


def auto_min_area_mm2(mpp: float) -> float:
    """The default ``min_area_mm2`` of a prediction at ``mpp`` um/px: :data:`AUTO_MIN_AREA_PX` of its pixels."""
    return AUTO_MIN_AREA_PX * float(mpp) ** 2 / 1e6


def mask_to_polygons(mask: np.ndarray) -> list[Polygon]:
    """Polygons (with holes) of a bool ``(H, W)`` mask, in mask px (pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)``)."""
    m = np.ascontiguousarray(mask.astype(np.uint8))
    if not m.any():
        return []
    contours, hier = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hier = hier[0]
    polys = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:  # a hole: handled with its parent
            continue
        ext = c[:, 0, :].astype(np.float64) + 0.5
        holes = []
        j = hier[i][2]
        while j != -1:
            h = contours[j][:, 0, :].astype(np.float64) + 0.5
            if len(h) >= 3:
                holes.append(h)
            j = hier[j][0]
        if len(ext) >= 3:
            outer = Polygon(ext)
            if not outer.is_valid:
                outer = _polygonal(shapely.make_valid(outer)) or Polygon()
            g = outer.buffer(0.5, join_style="mitre", mitre_limit=2.0)
        elif len(ext) == 2:  # a 1 px wide straight run of pixels
            g = shapely.LineString(ext).buffer(0.5, cap_style="square", join_style="mitre")
        else:  # a single pixel
            x, y = ext[0]
            g = shapely.box(x - 0.5, y - 0.5, x + 0.5, y + 0.5)
        for h in holes:
            hp = Polygon(h)
            if not hp.is_valid:
                hp = _polygonal(shapely.make_valid(hp))
            if hp is None or hp.is_empty:
                continue
            # the hole ring runs through the region's pixel centres around the hole: shrink it by half a pixel
            hole = hp.buffer(-0.5, join_style="mitre", mitre_limit=2.0)
            if not hole.is_empty:
                g = g.difference(hole)
        g = _polygonal(g)
        if g is None:
            continue
        polys.extend(g.geoms if isinstance(g, MultiPolygon) else [g])
    return polys


def _drop_small(poly: Polygon, min_area: float, min_hole: float) -> Polygon | None:
    if poly.area < min_area:
        return None
    if min_hole > 0 and poly.interiors:
        keep = [r for r in poly.interiors if Polygon(r).area >= min_hole]
        poly = Polygon(poly.exterior, keep)
    return poly


def masks_to_rois(
    masks: dict[str, np.ndarray],
    downsample: float,
    base_mpp: float,
    min_area_mm2: float | None = None,
    min_hole_mm2: float | None = None,
    simplify_tolerance: float | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    report: dict | None = None,
) -> list[ROI]:
    """ROIs from ``{label: bool (H, W) mask}``.

    Args:
        masks: one boolean mask per label, on a grid of ``downsample`` base px per pixel.
        downsample: base px per mask px (``model mpp / slide mpp``).
        base_mpp: the slide's level-0 um/px (for the area threshold).
        min_area_mm2: drop polygons smaller than this (mm^2; None = :func:`auto_min_area_mm2` of the mask's mpp).
        min_hole_mm2: fill holes smaller than this (default: ``min_area_mm2``).
        simplify_tolerance: Douglas-Peucker tolerance in base px (default: half a mask pixel).
        origin: base px of the mask's top-left corner.
        report: a dict that receives ``min_area_mm2`` (the threshold used), ``n_objects`` (connected regions found)
            and ``n_dropped`` (those smaller than the threshold).

    Returns: ROIs named ``<label>_<k>`` with (Multi)Polygon geometry in base px (one ROI per polygon).
    """
    px_area_mm2 = (downsample * base_mpp) ** 2 / 1e6  # mm^2 per mask pixel
    if min_area_mm2 is None:
        min_area_mm2 = auto_min_area_mm2(downsample * base_mpp)
    min_area = float(min_area_mm2) / px_area_mm2
    min_hole = float(min_area_mm2 if min_hole_mm2 is None else min_hole_mm2) / px_area_mm2
    tol = 0.5 * downsample if simplify_tolerance is None else float(simplify_tolerance)
    rois: list[ROI] = []
    n_objects = n_dropped = 0
    for label, mask in masks.items():
        k = 0
        for poly in sorted(mask_to_polygons(mask), key=lambda p: -p.area):
            n_objects += 1
            poly = _drop_small(poly, min_area, min_hole)
            if poly is None:
                n_dropped += 1
                continue
            g = shapely.affinity.affine_transform(poly, [downsample, 0, 0, downsample, origin[0], origin[1]])
            if tol > 0:
                g = g.simplify(tol, preserve_topology=True)
            g = _polygonal(g if g.is_valid else shapely.make_valid(g))
            if g is None or g.area <= 0:
                continue
            rois.append(ROI(f"{label}_{k}", g, label, "generated by histolight.segment"))
            k += 1
    if report is not None:
        report.update(min_area_mm2=float(min_area_mm2), n_objects=n_objects, n_dropped=n_dropped)
    return rois


def prediction_masks(pred: np.ndarray, cfg, output: str = "labels") -> dict[str, np.ndarray]:
    """``{label: bool mask}`` from a slide prediction (labels or probabilities) of a model with config ``cfg``."""
    thr = cfg.threshold
    if cfg.mode == "binary":
        m = pred > 0 if output == "labels" else pred > thr
        return {cfg.foreground_name: m}
    if cfg.mode == "multiclass":
        lab = pred if output == "labels" else pred.argmax(0)
        return {name: lab == i + 1 for i, name in enumerate(cfg.labels)}
    m = pred > 0 if output == "labels" else pred > thr
    return {name: m[i] for i, name in enumerate(cfg.labels)}


def generate_rois(
    slide,
    model,
    min_area_mm2: float | None = None,
    min_hole_mm2: float | None = None,
    simplify_tolerance: float | None = None,
    labels_pred: np.ndarray | None = None,
    report: dict | None = None,
) -> list[ROI]:
    """Segment ``slide`` with ``model`` (a :class:`SegmentModel`) and turn the prediction into ROIs.

    Returns the ROIs (base px, labelled by class: a binary model's single label, e.g. ``nucleus``, else ``tissue``).
    ``labels_pred`` reuses an existing label prediction; ``min_area_mm2`` None = :func:`auto_min_area_mm2` of the
    model's mpp; ``report`` receives the counts of :func:`masks_to_rois`. Objects dropped by the area threshold are
    logged, with a warning when it dropped every object.
    """
    cfg = model.config
    if labels_pred is None:
        labels_pred = model.run_slide_inference(slide, output="labels")
    ds = cfg.mpp / slide.mpp
    rep = {} if report is None else report
    masks = prediction_masks(labels_pred, cfg, "labels")
    rois = masks_to_rois(masks, ds, slide.mpp, min_area_mm2, min_hole_mm2, simplify_tolerance, report=rep)
    name = getattr(slide, "name", "slide")
    if rep["n_dropped"]:
        msg = "%s: %d of %d predicted objects are smaller than min_area_mm2=%g (%.3g prediction px) and were dropped"
        args = (name, rep["n_dropped"], rep["n_objects"], rep["min_area_mm2"], rep["min_area_mm2"] * 1e6 / cfg.mpp**2)
        if rois:
            log.info(msg, *args)
        else:
            log.warning(msg + ": no ROI is left; lower min_area_mm2 (task.min_area_mm2)", *args)
    return rois


def write_slide_rois(
    rois: Sequence[ROI], folder: str | os.PathLike, name: str, formats: Sequence[str] = ("csv", "geojson")
) -> list[Path]:
    """Write ``<folder>/<name>.csv`` (Slideflow) and/or ``.geojson`` (QuPath), atomically, as the slide's ROI set
    in ``folder``: the set is recorded in ``<folder>/.generated/<name>.json`` (:mod:`histolight.utils.filesets`; the
    lookup, :meth:`histolight.dataset.Dataset.roi_path`, accepts a recorded set side by side) and the slide's ROI
    files of other formats there are removed (the caller decides whether existing files may be replaced)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in ("csv", "geojson"):
            raise HistolightError(f"ROI format {fmt!r} is invalid: use csv and/or geojson")
        out.append(write_rois(rois, folder / f"{name}.{fmt}"))
    for old in _roi_files(folder, name):
        if old not in out:
            log.warning("replacing %s by %s", old, ", ".join(p.name for p in out))
            old.unlink()
    record = record_path(folder, name)
    record.parent.mkdir(exist_ok=True)
    atomic_write_json(record, record_of(out, folder))
    return out


def _roi_files(folder: Path, name: str) -> list[Path]:
    return [p for p in (folder / f"{name}{ext}" for ext in ROI_EXTENSIONS) if p.is_file()]


def _model_stamp(p: Path) -> tuple:
    """Modification times of a model path (its folder's files), so a model rewritten in place is reloaded."""
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    return tuple((f.name, f.stat().st_mtime_ns) for f in files if f.is_file())


_MODELS: dict[tuple, Any] = {}


def load_segment_model(model: Any, device: str | None = "auto"):
    """The :class:`~histolight.segment.model.SegmentModel` to run: ``model`` itself, or the model at path ``model``
    (folder, ``model.pth`` or ``.ckpt``) on ``device`` (``auto`` = cuda when available), loaded once per process.

    Per-slide functions call this in every slide worker, so a cohort loads the model once per process, not per
    slide. The cache holds the last model (keyed by resolved path, device and file times)."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    from histolight.segment.io import load_model_and_config
    from histolight.utils.device import resolve_device

    p = Path(model).expanduser().resolve()
    dev = resolve_device(device)
    key = (str(p), dev, _model_stamp(p) if p.exists() else None)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model_and_config(p, device=dev)[0]
    return _MODELS[key]


def slide_rois(
    name: str,
    dataset,
    model: Any,
    dest: str,
    formats: Sequence[str],
    overwrite: bool,
    into_dataset: bool,
    device: str | None = "auto",
    roi_kwargs: dict | None = None,
) -> dict:
    """Per-slide function of :func:`generate_dataset_rois`: segment slide ``name`` and write its ROI files.

    Returns its summary row: ``n_rois``, ``labels``, ``files`` (status ``skipped``/"exists" when the slide already has
    an ROI file in ``dest`` (any format: a generated file beside the user's would shadow it) or, writing into the
    dataset's ROI folder, in the dataset, and not ``overwrite``; ``empty`` when the model finds no region large
    enough)."""
    out = Path(dest)
    if not overwrite and (_roi_files(out, name) or (into_dataset and dataset.has_rois(name))):
        return {"status": "skipped", "reason": "exists"}
    m = load_segment_model(model, device)
    rep: dict = {}
    with dataset.open(name) as slide:
        rois = generate_rois(slide, m, **(roi_kwargs or {}), report=rep)
    files = write_slide_rois(rois, out, name, formats)
    return {
        "status": "done" if rois else "empty",
        "n_rois": len(rois),
        "n_dropped": rep.get("n_dropped"),  # None when a replaced generate_rois does not report its filter
        "min_area_mm2": rep.get("min_area_mm2"),
        "labels": ",".join(sorted({r.label for r in rois})) or None,
        "files": ",".join(str(f) for f in files),
    }


def generate_dataset_rois(
    dataset,
    model,
    dest: str | os.PathLike | None = None,
    overwrite: bool = False,
    formats: Sequence[str] = ("csv", "geojson"),
    slides: Sequence[str] | None = None,
    min_area_mm2: float | None = None,
    min_hole_mm2: float | None = None,
    simplify_tolerance: float | None = None,
    device: str | None = "auto",
    workers: int = 1,
    report_dir: str | os.PathLike | None = None,
    summary_name: str = "rois_report.csv",
    progress: bool = True,
) -> CohortResult:
    """Generate and write ROIs for every slide of ``dataset`` (Slideflow's ``Dataset.generate_rois``), on the
    cohort runner (:func:`histolight.cohort.run_per_slide`).

    Args:
        model: a :class:`SegmentModel` or a model path (folder / ``model.pth`` / ``.ckpt``; loaded once per process).
        dest: output folder (default: the dataset's first ROI folder).
        overwrite: also process slides that already have ROIs (any ROI file of the slide in ``dest``, and of the
            dataset when writing into its ROI folder), replacing the slide's ROI files in ``dest`` (other formats
            included). Without it they are skipped: generated ROIs never sit beside a user's file of that slide.
        formats: ``csv`` (Slideflow) and/or ``geojson`` (QuPath).
        device: where a model path is loaded (``auto`` = cuda when available).
        workers: slide worker processes.
        report_dir: folder of the summary CSV (``summary_name``) and of the slide claims; None = neither.

    Returns: the run's :class:`~histolight.cohort.CohortResult`; its table has one row per slide (``status``
    ``done``/``empty``/``skipped``/``failed``, ``reason``, ``n_rois``, ``n_dropped`` (objects under the area
    threshold), ``min_area_mm2`` (the threshold used; None = :func:`auto_min_area_mm2`), ``labels``, ``files``).
    """
    into_dataset = dest is None or any(Path(dest).resolve() == Path(d).resolve() for d in dataset.roi_dirs)
    if dest is None:
        if not dataset.roi_dirs:
            raise HistolightError("no ROI folder to write into: pass dest (task.dest) or configure dataset.rois")
        dest = dataset.roi_dirs[0]
    formats = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in formats if f not in ("csv", "geojson")]
    if bad or not formats:
        raise HistolightError(f"ROI formats {list(formats)} are invalid: use csv and/or geojson")
    load_segment_model(model, device)  # a bad model fails the run here, not every slide
    fn = functools.partial(
        slide_rois,
        dataset=dataset,
        model=model,
        dest=str(dest),
        formats=formats,
        overwrite=overwrite,
        into_dataset=into_dataset,
        device=device,
        roi_kwargs={"min_area_mm2": min_area_mm2, "min_hole_mm2": min_hole_mm2, "simplify_tolerance": simplify_tolerance},
    )
    names = list(slides) if slides is not None else dataset.names
    return run_per_slide(
        names, fn, out_dir=report_dir, workers=workers, summary_name=summary_name, desc="generate ROIs", progress=progress
    )
