"""``task=segment``: run a trained segmentation model over the cohort's slides.

    python run.py task=segment task.model=outputs/<run> [task.split=test] [task.output=proba]

Per slide, in ``<run>/segment/``:

- ``<slide>.pred.png`` (``output=labels``): uint8 class map at the model's mpp, aligned to the slide
  (pixel ``(i, j)`` covers base px ``[j*d, (j+1)*d) x [i*d, (i+1)*d)``, ``d`` = model mpp / slide mpp).
  Binary: 0/255; multiclass: class index (0 = background); multilabel: bit ``i`` = label ``i``.
  ``output=proba``: ``<slide>.pred.tif`` (C, H, W) uint8 probabilities x 255 (binary: one channel).
- ``<slide>.pred.json``: mpp, downsample, slide dims, mode, class names, encoding.
- ``<slide>.overlay.png``: the slide at the model's mpp with the prediction blended in.
- ``rois/<slide>.csv`` + ``.geojson``: generated ROIs (Slideflow CSV, QuPath GeoJSON).

Failing slides are logged, skipped and listed in ``segment_report.csv``.
"""

from __future__ import annotations

import logging

import numpy as np
from omegaconf import DictConfig

from histolight.config import from_config
from histolight.errors import HistolightError

log = logging.getLogger(__name__)


def _png(path, img: np.ndarray) -> None:
    import cv2

    from histolight.io.atomic import atomic_write

    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.tobytes())


def _tif(path, arr: np.ndarray) -> None:
    import tifffile

    from histolight.io.atomic import atomic_write

    with atomic_write(path, "wb") as fh:
        tifffile.imwrite(fh, arr, compression="zlib", photometric="minisblack")


def run(cfg: DictConfig) -> dict:
    from histolight.segment.tasks import SegmentTask

    task = from_config(SegmentTask, cfg.task, "task")
    import pandas as pd
    from tqdm.auto import tqdm

    from histolight.io.atomic import atomic_write_json, atomic_write_text
    from histolight.segment.io import load_model_and_config
    from histolight.segment.model import overlay
    from histolight.segment.rois import generate_rois, write_slide_rois
    from histolight.segment.tasks import select_slides
    from histolight.tasks.common import load_dataset, output_dir

    ds = load_dataset(cfg)
    names = select_slides(ds, task.slides, task.split)
    model, scfg = load_model_and_config(task.model, device=task.device or _auto_device())
    out = output_dir(cfg) / "segment"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in tqdm(names, desc="segment slides"):
        row = {"slide": name, "status": "ok", "n_rois": None, "error": None}
        try:
            with ds.open(name) as slide:
                ds_factor = scfg.mpp / slide.mpp
                if task.output == "labels":
                    labels = model.run_slide_inference(slide, output="labels", strip_px=task.strip_px)
                    if scfg.mode == "multilabel":
                        img = np.zeros(labels.shape[1:], np.uint8)
                        for i in range(labels.shape[0]):
                            img |= (labels[i] > 0).astype(np.uint8) << i
                        enc = "bit i = labels[i]"
                    elif scfg.mode == "binary":
                        img, enc = (labels > 0).astype(np.uint8) * 255, "255 = foreground"
                    else:
                        img, enc = labels, "class index, 0 = background"
                    _png(out / f"{name}.pred.png", img)
                    pred_file = f"{name}.pred.png"
                else:
                    proba = model.run_slide_inference(slide, output="proba", strip_px=task.strip_px)
                    p = proba[None] if proba.ndim == 2 else proba
                    _tif(out / f"{name}.pred.tif", (p * 255 + 0.5).astype(np.uint8))
                    labels = model.to_labels(p)
                    enc, pred_file = "uint8 probability x 255, (C, H, W)", f"{name}.pred.tif"
                H, W = labels.shape[-2:]
                atomic_write_json(
                    out / f"{name}.pred.json",
                    {
                        "slide": name,
                        "file": pred_file,
                        "mpp": scfg.mpp,
                        "downsample": ds_factor,
                        "base_mpp": slide.mpp,
                        "slide_dims": list(slide.dimensions),
                        "size": [W, H],
                        "mode": scfg.mode,
                        "class_names": scfg.class_names,
                        "encoding": enc,
                        "model": str(task.model),
                    },
                )
                if task.overlay:
                    thumb = slide.read((0, 0), (W * ds_factor, H * ds_factor), scfg.mpp, out_size=(W, H))
                    _png(out / f"{name}.overlay.png", overlay(thumb, labels, scfg.n_classes))
                if task.rois:
                    rois = generate_rois(
                        slide,
                        model,
                        apply=True,
                        min_area_mm2=task.min_area_mm2,
                        min_hole_mm2=task.min_hole_mm2,
                        simplify_tolerance=task.simplify_tolerance,
                        labels_pred=labels,
                    )
                    write_slide_rois(rois, out / "rois", name, task.roi_formats)
                    row["n_rois"] = len(rois)
        except HistolightError as e:
            log.error("%s: segmentation failed, skipped: %s", name, e)
            row.update(status="failed", error=str(e))
        rows.append(row)
    df = pd.DataFrame(rows)
    atomic_write_text(output_dir(cfg) / "segment_report.csv", df.to_csv(index=False))
    n_ok = int((df["status"] == "ok").sum()) if len(df) else 0
    print(f"Segmented {n_ok}/{len(names)} slides into {out}")
    return {"n_slides": len(names), "n_ok": n_ok, "n_failed": len(names) - n_ok}


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
