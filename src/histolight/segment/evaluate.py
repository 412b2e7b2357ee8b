"""Evaluation of a segmentation model against ROI masks, as in the U-Net blog: per slide and per class TP / FP /
TN / FN, Dice and IoU, a confusion matrix, and validation panels (image | truth | argmax | raw probability).

Resolution: predictions and truth are compared **at the model's mpp** (``cfg.mpp``; the slide's grid
``slide.size_at_mpp(cfg.mpp)``, truth rasterized from the ROI polygons on that grid), not at the base resolution:
at 0.5-1 um/px the model grid is already within 2x of the base grid, and full resolution would multiply the cost
by ``(mpp / base_mpp)^2`` without a finer prediction. Slides are processed in blocks of ``block_px`` px (with half
a tile of context on each side), so memory is one block whatever the slide size.

Outputs of :func:`evaluate_slides` (``dest``)::

    per_slide.csv        slide, split, class, tp, fp, tn, fn, dice, iou (pixels at cfg.mpp)
    per_class.csv        the same summed over the slides of each split (and ``all``)
    confusion.csv        multiclass / binary: rows = truth class, columns = predicted class, pixels (all slides)
    confusion.png        the row-normalised confusion matrix as a picture
    panels/<slide>_<k>.png   image | truth | argmax | raw probability of validation windows
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback

from histolight.io.atomic import atomic_write_text
from histolight.io.images import write_png

log = logging.getLogger(__name__)


def confusion(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray, mode: str, n: int) -> np.ndarray:
    """Pixel counts: binary / multiclass ``(n, n)`` (rows truth, columns prediction, int64) of class maps
    ``(H, W)``; multilabel ``(n, 2, 2)`` (one 2 x 2 matrix per label) of ``(n, H, W)`` 0/1 maps."""
    v = valid > 0
    if mode == "multilabel":
        out = np.zeros((n, 2, 2), np.int64)
        for k in range(n):
            t, p = truth[k][v].astype(np.int64), pred[k][v].astype(np.int64)
            out[k] = np.bincount(t * 2 + p, minlength=4).reshape(2, 2)
        return out
    t, p = truth[v].astype(np.int64), pred[v].astype(np.int64)
    return np.bincount(t * n + p, minlength=n * n).reshape(n, n)


def class_rows(cm: np.ndarray, names: Sequence[str], mode: str) -> list[dict]:
    """Per class TP / FP / TN / FN, Dice and IoU (None when the class is absent from truth and prediction)."""
    rows = []
    total = int(cm[0].sum()) if mode == "multilabel" else int(cm.sum())
    for k, name in enumerate(names):
        if mode == "multilabel":
            tn, fp, fn, tp = (int(x) for x in cm[k].ravel())
        else:
            tp = int(cm[k, k])
            fp = int(cm[:, k].sum()) - tp
            fn = int(cm[k, :].sum()) - tp
            tn = total - tp - fp - fn
        den = 2 * tp + fp + fn
        rows.append(
            {
                "class": name,
                "tp": tp,
                "fp": fp,
                "tn": tn,
                "fn": fn,
                "dice": 2 * tp / den if den else None,
                "iou": tp / (tp + fp + fn) if den else None,
            }
        )
    return rows


def probability_map(proba: np.ndarray, mode: str) -> np.ndarray:
    """``(H, W)`` float in [0, 1]: the foreground probability (binary), ``1 - p(background)`` (multiclass) or the
    highest label probability (multilabel)."""
    if mode == "binary":
        return proba if proba.ndim == 2 else proba[0]
    if mode == "multiclass":
        return 1.0 - proba[0]
    return proba.max(0)


def heatmap(p: np.ndarray) -> np.ndarray:
    """``(H, W)`` probabilities -> ``(H, W, 3)`` uint8 RGB (viridis)."""
    import cv2

    g = np.clip(p * 255 + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(g, cv2.COLORMAP_VIRIDIS)[..., ::-1].copy()


def eval_panel(image: np.ndarray, truth: np.ndarray, labels: np.ndarray, proba: np.ndarray, class_names, mode: str):
    """``[image | truth | argmax | raw probability]`` under titles with the class legend (:func:`histolight.viz.panels`),
    ``H x W x 3`` uint8."""
    from histolight import viz

    parts = [
        (image, "image"),
        (viz.colorize(truth, class_names), "truth"),
        (viz.colorize(labels, class_names), "argmax"),
        (heatmap(probability_map(proba, mode)), "probability"),
    ]
    return viz.panels(parts, viz.legend_image(viz.label_colors(class_names)))


def confusion_picture(cm: np.ndarray, names: Sequence[str], cell: int = 64) -> np.ndarray:
    """The row-normalised ``(n, n)`` confusion matrix as an RGB picture with class names and fractions."""
    import cv2

    n = len(names)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    margin = 110
    img = np.full((margin + n * cell, margin + n * cell, 3), 255, np.uint8)
    for i in range(n):
        for j in range(n):
            y, x = margin + i * cell, margin + j * cell
            v = float(frac[i, j])
            img[y : y + cell, x : x + cell] = (255 * (1 - v), 255 * (1 - 0.6 * v), 255)
            cv2.putText(img, f"{v:.2f}", (x + 8, y + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        cv2.putText(img, str(names[i])[:12], (4, margin + i * cell + cell // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(img, str(names[i])[:8], (margin + i * cell + 4, margin - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "truth \\ pred", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    return img


def slide_confusion(model, handles, sp, block_px: int = 1024) -> np.ndarray:
    """Confusion counts (:func:`confusion`) of ``model`` on slide ``sp`` (:class:`~.patches.SlidePatches`) at the
    model's mpp, block by block (``block_px`` px at cfg.mpp plus half a tile of context each side)."""
    from histolight.segment.patches import rasterize_window

    cfg = model.config
    slide = handles.get(sp)
    W, H = slide.size_at_mpp(cfg.mpp)
    d = cfg.mpp / sp.base_mpp  # base px per model px
    halo = cfg.tile_px // 2
    n = cfg.n_classes
    cm = None
    for by in range(0, H, block_px):
        for bx in range(0, W, block_px):
            bw, bh = min(block_px, W - bx), min(block_px, H - by)
            x0, y0 = bx - halo, by - halo
            img = slide.read(
                (x0 * d, y0 * d), ((bw + 2 * halo) * d, (bh + 2 * halo) * d), cfg.mpp, out_size=(bw + 2 * halo, bh + 2 * halo)
            )
            lab = model.run_tiled_inference(img, output="labels")[..., halo : halo + bh, halo : halo + bw]
            truth = rasterize_window(sp, bx * d, by * d, (bw * d, bh * d), (bw, bh), cfg.mode, cfg.labels)
            c = confusion(lab, truth, np.ones((bh, bw), np.uint8), cfg.mode, n)
            cm = c if cm is None else cm + c
    return cm


def _write_csv(path: Path, rows: list[dict]) -> None:
    import pandas as pd

    atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


def evaluate_slides(
    model,
    slides: Sequence,
    dest: str | os.PathLike,
    splits: dict[str, str] | None = None,
    n_panels: int = 4,
    block_px: int = 1024,
    loggers: Sequence = (),
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` (:class:`~histolight.segment.model.SegmentModel`) on ``slides``
    (:class:`~.patches.SlidePatches`, with validation windows for the panels) and write the files of the module
    docstring into ``dest``.

    Args:
        splits: ``{slide: split name}`` (e.g. ``val``, ``test``), the ``split`` column; default ``eval``.
        n_panels: validation windows drawn per slide as panels (0 = none).
        loggers: Lightning loggers; panels go to those that take images (W&B ``log_image``, TensorBoard).

    Returns: ``{f"{split}/dice_<class>", f"{split}/iou_<class>"}`` over each split's slides (and ``all``).
    """
    from tqdm.auto import tqdm

    from histolight.segment.patches import SlideHandles, read_crop

    cfg = model.config
    names = cfg.class_names
    dest = Path(dest)
    (dest / "panels").mkdir(parents=True, exist_ok=True)
    splits = splits or {}
    handles = SlideHandles()
    per_slide, totals, panels = [], {}, []
    was = model.training
    model.eval()
    for sp in tqdm(slides, desc="evaluate", disable=not progress):
        split = splits.get(sp.name, "eval")
        cm = slide_confusion(model, handles, sp, block_px)
        for key in (split, "all"):
            totals[key] = cm if key not in totals else totals[key] + cm
        per_slide += [{"slide": sp.name, "split": split, **r} for r in class_rows(cm, names, cfg.mode)]
        for k, (x0, y0) in enumerate(sp.windows[:n_panels]):
            image, truth, _ = read_crop(handles, sp, x0, y0, cfg, size=cfg.tile_px)
            proba = model.run_tiled_inference(image)
            pic = eval_panel(image, truth, model.to_labels(proba), proba, names, cfg.mode)
            write_png(dest / "panels" / f"{sp.name}_{k}.png", pic)
            panels.append((f"{sp.name}_{k}", pic))
    model.train(was)
    _write_csv(dest / "per_slide.csv", per_slide)
    per_class, metrics = [], {}
    for split, cm in totals.items():
        for r in class_rows(cm, names, cfg.mode):
            per_class.append({"split": split, **r})
            for m in ("dice", "iou"):
                if r[m] is not None:
                    metrics[f"{split}/{m}_{r['class']}"] = float(r[m])
    _write_csv(dest / "per_class.csv", per_class)
    if cfg.mode != "multilabel" and "all" in totals:
        cm = totals["all"]
        rows = [{"truth": names[i], **{names[j]: int(cm[i, j]) for j in range(len(names))}} for i in range(len(names))]
        _write_csv(dest / "confusion.csv", rows)
        write_png(dest / "confusion.png", confusion_picture(cm, names))
    log_images(loggers, "eval/panels", panels, "image | truth | argmax | probability")
    return metrics


def log_images(loggers: Sequence, key: str, images: list[tuple[str, np.ndarray]], caption: str, step: int = 0) -> None:
    """Send ``(name, H x W x 3 uint8)`` pictures to the loggers that take images (W&B, TensorBoard); a logger that
    fails only logs a warning."""
    for lg in loggers or ():
        try:
            if hasattr(lg, "log_image"):
                lg.log_image(key=key, images=[im for _, im in images], caption=[f"{n}: {caption}" for n, _ in images], step=step)
            elif hasattr(getattr(lg, "experiment", None), "add_image"):
                for n, im in images:
                    lg.experiment.add_image(f"{key}/{n}", im, step, dataformats="HWC")
        except Exception as e:  # noqa: BLE001 - never fail a run over a picture
            log.warning("could not log %s to %s: %s", key, type(lg).__name__, e)


class SaveInputs(Callback):
    """Lightning callback (``debug=inputs``): the first ``n_batches`` augmented training batches of the first epoch
    as pictures ``<dest>/batch<k>.png``, each sample ``image | mask`` (masks coloured by class), one row per sample."""

    def __init__(self, dest: str | os.PathLike, n_batches: int = 2):
        super().__init__()
        self.dest = Path(dest)
        self.n_batches = int(n_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch > 0 or batch_idx >= self.n_batches:
            return
        from histolight import viz

        names = pl_module.config.class_names
        rows = []
        for i in range(batch["image"].shape[0]):
            im = (batch["image"][i].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
            m = batch["mask"][i].cpu().numpy().astype(np.uint8)
            gap = np.full((im.shape[0], 4, 3), 255, np.uint8)
            rows.append(np.concatenate([im, gap, viz.colorize(m, names)], 1))
            rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
        self.dest.mkdir(parents=True, exist_ok=True)
        write_png(self.dest / f"batch{batch_idx}.png", np.concatenate(rows[:-1], 0))


__all__ = ["confusion", "class_rows", "eval_panel", "evaluate_slides", "log_images", "SaveInputs", "slide_confusion"]
