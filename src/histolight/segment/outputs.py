"""Whole-slide segmentation outputs: the prediction format, and :func:`segment_slides` over a cohort.

Per slide, in the output folder:

- ``<slide>.pred.png`` (``output="labels"``): the class map for programs (it looks black in an image viewer: the
  values are class indices) at the model's mpp, aligned to the slide: pixel
  ``(i, j)`` covers base px ``[j*d, (j+1)*d) x [i*d, (i+1)*d)`` with ``d`` = model mpp / slide mpp (the slide's
  ``size_at_mpp`` grid). Encoding (:data:`ENCODINGS`): binary 0/255; multiclass the class index (0 = background);
  multilabel a bitmask, bit ``i`` = label ``i`` (uint8 up to 8 labels, uint16 up to 16).
- ``<slide>.pred.tif`` (``output="proba"``): ``(C, H, W)`` uint8 probabilities x 255 (binary: one channel).
- ``<slide>.pred_color.png``: the same prediction for people: each class in its colour (:mod:`histolight.viz`,
  the colours of every histolight picture; background white), pixel-aligned with ``pred.png``.
- ``<slide>.pred.json``: the sidecar: slide, file, color_file, mpp, downsample, base_mpp, slide_dims (w, h base
  px), size (w, h px), mode, class_names, colors (class -> RGB), encoding, model.
- ``<slide>.overlay.png``: two titled panels, the slide at the model's mpp and the same with the predicted classes
  tinted in their colours, over a colour legend.
- ``<slide>.full.tif`` (``out_mpp``; ``output="proba"``: ``<slide>.full.<class>.tif``): the prediction at ``out_mpp``
  (e.g. the slide's own resolution) as a tiled, pyramidal TIFF (:mod:`histolight.segment.pyramid`).
- ``rois/<slide>.csv`` / ``.geojson``: ROIs generated from the prediction (Slideflow CSV, QuPath GeoJSON).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histolight.cohort import CohortResult, run_per_slide
from histolight.errors import HistolightError
from histolight.io.atomic import atomic_write_json
from histolight.io.images import write_png, write_tif
from histolight.segment.pyramid import predict_slide
from histolight.segment.rois import generate_rois, load_segment_model, write_slide_rois
from histolight.viz import blend_labels, colorize, label_colors, legend_image, panels

OUTPUTS = ("labels", "proba")

#: how each mode's label map is stored in ``<slide>.pred.png``
ENCODINGS = {
    "binary": "255 = foreground",
    "multiclass": "class index, 0 = background",
    "multilabel": "bit i = labels[i]",
}
PROBA_ENCODING = "uint8 probability x 255, (C, H, W)"


def encode_labels(labels: np.ndarray, mode: str) -> np.ndarray:
    """The ``<slide>.pred.png`` image of a label prediction: binary/multiclass ``(H, W)``, multilabel ``(N, H, W)``
    -> ``(H, W)`` uint8 (uint16 for a multilabel model with 9-16 labels); see :data:`ENCODINGS`."""
    if mode == "binary":
        return (labels > 0).astype(np.uint8) * 255
    if mode == "multiclass":
        return labels.astype(np.uint8)
    n = labels.shape[0]
    if n > 16:
        raise HistolightError(f"a multilabel model with {n} labels cannot be stored as a PNG bitmask (at most 16)")
    dtype = np.uint8 if n <= 8 else np.uint16
    img = np.zeros(labels.shape[1:], dtype)
    for i in range(n):
        img |= (labels[i] > 0).astype(dtype) << i
    return img


def overlay_picture(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], name: str, mpp: float) -> np.ndarray:
    """The ``<slide>.overlay.png`` picture of slide ``name``: ``image`` (``H x W x 3`` at the prediction's ``mpp``,
    um/px) and the same with ``labels`` (binary/multiclass ``(H, W)`` indexing ``class_names``, multilabel
    ``(N, H, W)``) tinted in their colours, side by side under titles, over a legend of ``class_names``; text scaled
    with the image."""
    fg = labels.any(0) if labels.ndim == 3 else labels > 0
    tinted = blend_labels(image, colorize(labels, class_names), fg)
    font = int(np.clip(max(image.shape[:2]) / 32, 14, 48))
    key = legend_image(label_colors(class_names), title="classes", font_px=font, max_width=2 * image.shape[1])
    titles = (f"{name}: slide at {mpp:g} um/px", f"{name}: predicted classes")
    return panels(list(zip((image, tinted), titles)), key, gap=font, font_px=font)


def write_prediction(out: Path, name: str, slide, model, output: str, strip_px: int | None, model_ref: str | None, out_mpp=None):
    """Segment ``slide`` and write ``<name>.pred.png|tif``, ``<name>.pred_color.png`` + ``<name>.pred.json`` into ``out``
    (and, with ``out_mpp``, the full-resolution TIFF files of :func:`histolight.segment.pyramid.predict_slide`).

    Returns ``(labels, meta)``: the label prediction at the model's mpp (binary/multiclass ``(H, W)``, multilabel
    ``(N, H, W)``) and the sidecar dict."""
    cfg = model.config
    if output == "labels":
        labels, full = predict_slide(slide, model, "labels", strip_px, out_mpp, out, name, lambda a: encode_labels(a, cfg.mode))
        write_png(out / f"{name}.pred.png", encode_labels(labels, cfg.mode))
        pred_file, enc = f"{name}.pred.png", ENCODINGS[cfg.mode]
    elif output == "proba":
        proba, full = predict_slide(slide, model, "proba", strip_px, out_mpp, out, name)
        p = proba[None] if proba.ndim == 2 else proba
        write_tif(out / f"{name}.pred.tif", (p * 255 + 0.5).astype(np.uint8))
        labels = model.to_labels(p)
        pred_file, enc = f"{name}.pred.tif", PROBA_ENCODING
    else:
        raise HistolightError(f"output={output!r} is invalid: must be one of {OUTPUTS}")
    write_png(out / f"{name}.pred_color.png", colorize(labels, cfg.class_names))
    H, W = labels.shape[-2:]
    meta = {
        "slide": name,
        "file": pred_file,
        "color_file": f"{name}.pred_color.png",
        "mpp": cfg.mpp,
        "downsample": cfg.mpp / slide.mpp,
        "base_mpp": slide.mpp,
        "slide_dims": list(slide.dimensions),
        "size": [W, H],
        "mode": cfg.mode,
        "class_names": cfg.class_names,
        "colors": {k: list(v) for k, v in label_colors(cfg.class_names).items()},
        "encoding": enc,
        "model": model_ref,
        "full_resolution": full,
    }
    atomic_write_json(out / f"{name}.pred.json", meta)
    return labels, meta


def segment_slide(
    name: str,
    dataset,
    model: Any,
    out: str,
    output: str = "labels",
    overlay: bool = True,
    rois: bool = True,
    roi_formats: Sequence[str] = ("csv", "geojson"),
    strip_px: int | None = None,
    device: str | None = "auto",
    roi_kwargs: dict | None = None,
    out_mpp: float | str | None = None,
) -> dict:
    """Per-slide function of :func:`segment_slides`: prediction, sidecar, overlay and ROIs of slide ``name``.

    Returns its summary row: ``file`` (the prediction), ``size`` (``WxH`` px at the model's mpp), ``n_rois``,
    ``n_dropped`` (objects under the ROI area threshold)."""
    m = load_segment_model(model, device)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    model_ref = str(model) if isinstance(model, (str, os.PathLike)) else None
    with dataset.open(name) as slide:
        labels, meta = write_prediction(folder, name, slide, m, output, strip_px, model_ref, out_mpp)
        W, H = meta["size"]
        if overlay:
            d = meta["downsample"]
            thumb = slide.read((0, 0), (W * d, H * d), m.config.mpp, out_size=(W, H))
            write_png(folder / f"{name}.overlay.png", overlay_picture(thumb, labels, m.config.class_names, name, m.config.mpp))
        rep: dict = {}
        found = generate_rois(slide, m, labels_pred=labels, report=rep, **(roi_kwargs or {})) if rois else None
    if found is not None:
        write_slide_rois(found, folder / "rois", name, roi_formats)
    n_rois = None if found is None else len(found)
    return {"file": str(folder / meta["file"]), "size": f"{W}x{H}", "n_rois": n_rois, "n_dropped": rep.get("n_dropped")}


def segment_slides(
    dataset,
    model: Any,
    out: str | os.PathLike,
    slides: Sequence[str] | None = None,
    *,
    output: str = "labels",
    overlay: bool = True,
    rois: bool = True,
    roi_formats: Sequence[str] = ("csv", "geojson"),
    strip_px: int | None = None,
    roi_kwargs: dict | None = None,
    device: str | None = "auto",
    out_mpp: float | str | None = None,
    workers: int = 1,
    report_dir: str | os.PathLike | None = None,
    summary_name: str = "segment_report.csv",
    progress: bool = True,
) -> CohortResult:
    """Segment every slide of ``dataset`` (or ``slides``) with ``model`` into folder ``out`` (format: module docstring),
    on the cohort runner (:func:`histolight.cohort.run_per_slide`).

    Args:
        model: a :class:`~histolight.segment.model.SegmentModel`, or a model path (loaded once per process on ``device``).
        output: ``labels`` (PNG class map) or ``proba`` (TIFF of probabilities).
        overlay, rois: also write the overlay PNG / the ROIs (``roi_formats``; options ``roi_kwargs``, see
            :func:`~histolight.segment.rois.masks_to_rois`).
        strip_px: rows per inference strip at the model's mpp (bounds memory; None = the model's default).
        out_mpp: also write the prediction at this um/px (``base``: the slide's level-0 grid) as pyramidal TIFF
            files, streamed (:func:`histolight.segment.pyramid.predict_slide`); None = not.
        workers: slide worker processes.
        report_dir: folder of the summary CSV (``summary_name``) and of the slide claims; None = neither.
    """
    if output not in OUTPUTS:
        raise HistolightError(f"output={output!r} is invalid: must be one of {OUTPUTS}")
    load_segment_model(model, device)  # a bad model fails the run here, not every slide
    fn = functools.partial(
        segment_slide,
        dataset=dataset,
        model=model,
        out=str(out),
        output=output,
        overlay=overlay,
        rois=rois,
        roi_formats=list(roi_formats),
        strip_px=strip_px,
        device=device,
        roi_kwargs=roi_kwargs,
        out_mpp=out_mpp,
    )
    names = list(slides) if slides is not None else dataset.names
    return run_per_slide(
        names, fn, out_dir=report_dir, workers=workers, summary_name=summary_name, desc="segment", progress=progress
    )


__all__ = ["ENCODINGS", "OUTPUTS", "encode_labels", "overlay_picture", "write_prediction", "segment_slide", "segment_slides"]
