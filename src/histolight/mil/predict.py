"""Slide predictions of a MIL model folder, with per-tile attention and attention heatmaps.

Per slide (one bag each, whole bag, on the cohort runner)::

    <dest>/attention/<slide>.parquet    loc_x, loc_y (tile centres, base px), score (the model's per-tile score:
                                        attention weight, or see histolight.mil.models)
    <dest>/heatmaps/<slide>.png         the scores (by rank: lowest blue .. highest red, jet colours) over the slide
                                        thumbnail, each tile drawn at its location, under a title (slide, prediction)
                                        and above a colour key; only for slides whose file is known
    <dest>/montages/<slide>.png         the ``montage_tiles`` highest-scoring tiles, read back from the slide
    <dest>/predictions.parquet          slide, status, n_tiles, prob_<class>..., pred (+ label when known), and with
                                        ``roi_label``: top_roi_share = share of the top 10% tiles by score whose
                                        centre lies in a ROI of that class (histolight.mil.attention)
    <dest>/slides.csv                   the runner's per-slide summary
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from histolight.cohort import CohortResult, SkipSlide, run_per_slide
from histolight.errors import HistolightError
from histolight.mil.attention import montage, roi_share
from histolight.mil.data import bag_paths, read_bag
from histolight.mil.training import load_mil_model
from histolight.viz import legend_image, panels

log = logging.getLogger(__name__)

#: long side of the heatmap thumbnails (px)
THUMB_PX = 1024


@functools.lru_cache(maxsize=2)
def _model(path: str):
    return load_mil_model(path)


def tile_size_base(locs: np.ndarray, tile_um: float | None, mpp: float | None) -> float:
    """Tile side in base px: ``tile_um / mpp`` when both are known, else the smallest spacing of the locations."""
    if tile_um and mpp:
        return float(tile_um) / float(mpp)
    steps = [np.diff(np.unique(locs[:, i])) for i in (0, 1)]
    steps = [s[s > 0].min() for s in steps if (s > 0).any()]
    return float(min(steps)) if steps else 256.0


def rank_scale(scores: np.ndarray) -> np.ndarray:
    """``scores`` (N,) -> their rank scaled to 0 (lowest) .. 1 (highest), ties averaged; 0.5 for one tile or all
    equal. Attention is heavy-tailed: ranks show its order where min-max scaling shows one hot tile."""
    import scipy.stats

    s = np.asarray(scores, np.float64)
    if len(s) < 2 or s.max() == s.min():
        return np.full_like(s, 0.5)
    return (scipy.stats.rankdata(s) - 1) / (len(s) - 1)


def jet_key(steps: int = 5) -> dict[str, tuple[int, int, int]]:
    """A colour key of :func:`heatmap`'s jet colours: ``{"lowest": rgb, ..., "highest": rgb}`` (``steps`` entries)."""
    import cv2

    v = np.linspace(0, 255, steps).astype(np.uint8)[:, None]
    rgb = cv2.cvtColor(cv2.applyColorMap(v, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[:, 0]
    names = ["lowest", *(f"{round(100 * i / (steps - 1))}%" for i in range(1, steps - 1)), "highest"]
    return {n: tuple(int(c) for c in col) for n, col in zip(names, rgb)}


def heatmap(thumb: np.ndarray, downsample: float, locs: np.ndarray, scores: np.ndarray, tile_base: float) -> np.ndarray:
    """``thumb`` (H, W, 3) uint8 with ``scores`` (N,) rank-scaled (:func:`rank_scale`) as jet colours blended (0.5)
    over the tiles at ``locs`` (N, 2) (centres, base px); ``downsample`` = base px per thumbnail px. Returns
    (H, W, 3) uint8."""
    import cv2

    h, w = thumb.shape[:2]
    s = rank_scale(scores)
    heat = np.zeros((h, w), np.float32)
    cover = np.zeros((h, w), bool)
    half = tile_base / 2 / downsample
    for (x, y), v in zip(locs / downsample, s):
        x0, y0 = max(0, int(round(x - half))), max(0, int(round(y - half)))
        x1, y1 = min(w, int(round(x + half))), min(h, int(round(y + half)))
        heat[y0:y1, x0:x1] = v
        cover[y0:y1, x0:x1] = True
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = thumb.copy()
    out[cover] = (0.5 * thumb[cover] + 0.5 * colour[cover]).astype(np.uint8)
    return out


def predict_slide(
    name: str,
    *,
    model: str,
    bags: str,
    dest: str,
    slide_paths: Mapping[str, str] | None = None,
    mpp: Mapping | None = None,
    montage_tiles: int = 0,
    roi_paths: Mapping[str, str] | None = None,
    roi_label: str | None = None,
) -> dict:
    """Predict slide ``name`` from its bag (see the module docstring); returns ``n_tiles``, ``prob_<class>``, ``pred``
    (+ ``top_roi_share`` when ``roi_label`` is set and the slide has a ROI file in ``roi_paths``)."""
    from histolight.io.images import write_png
    from histolight.io.tables import write_parquet

    if not bag_paths(bags, name)[0].is_file():
        raise SkipSlide(f"no bag ({bag_paths(bags, name)[0]} missing)")
    module, meta = _model(model)
    x, locs = read_bag(bags, name)
    if x.shape[1] != meta["model"]["in_dim"]:
        raise HistolightError(
            f"the bag of {name} has {x.shape[1]} features per tile; the model expects {meta['model']['in_dim']}"
        )
    if x.shape[0] == 0:
        return {"status": "empty", "reason": "the bag has no tiles", "n_tiles": 0}
    with torch.no_grad():
        out = module(x[None])
    probs = torch.softmax(out["logits"][0], 0).numpy()
    scores = out["scores"][0].numpy()
    out_dir = Path(dest)
    (out_dir / "attention").mkdir(parents=True, exist_ok=True)
    write_parquet(
        pd.DataFrame({"loc_x": locs[:, 0], "loc_y": locs[:, 1], "score": scores}), out_dir / "attention" / f"{name}.parquet"
    )
    path = (slide_paths or {}).get(name)
    if path:
        from histolight.wsi import Slide

        slide = Slide(path, mpp=(mpp or {}).get(name))
        thumb = slide.thumbnail(max_size=THUMB_PX)
        ds = slide.dimensions[0] / thumb.shape[1]
        size = tile_size_base(locs, (meta.get("geometry") or {}).get("tile_um"), slide.mpp)
        (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
        title = f"{name}: tile scores, predicted {meta['labels'][int(probs.argmax())]} ({float(probs.max()):.2f})"
        key = legend_image(jet_key(), title="score rank")
        write_png(out_dir / "heatmaps" / f"{name}.png", panels([(heatmap(thumb, ds, locs, scores, size), title)], key))
        if montage_tiles and slide.mpp:
            (out_dir / "montages").mkdir(parents=True, exist_ok=True)
            write_png(out_dir / "montages" / f"{name}.png", montage(slide, locs, scores, size, montage_tiles))
    classes = meta["labels"]
    out = {
        "n_tiles": int(x.shape[0]),
        **{f"prob_{c}": float(p) for c, p in zip(classes, probs)},
        "pred": classes[int(probs.argmax())],
    }
    roi = (roi_paths or {}).get(name)
    if roi_label and roi:
        from histolight.roi import read_rois

        out["top_roi_share"] = roi_share(locs, scores, read_rois(roi), roi_label)
    return out


def predict(
    model: str | os.PathLike,
    slides: Sequence[str],
    dest: str | os.PathLike,
    *,
    bags: str | os.PathLike | None = None,
    slide_paths: Mapping[str, str] | None = None,
    mpp: Mapping[str, float | None] | None = None,
    labels: Mapping[str, str] | None = None,
    workers: int = 1,
    montage_tiles: int = 0,
    roi_paths: Mapping[str, str] | None = None,
    roi_label: str | None = None,
) -> tuple[CohortResult, pd.DataFrame]:
    """Predict ``slides`` with the MIL model folder ``model`` from the bags in ``bags`` (default: the model's own
    bag folder). ``slide_paths`` (+ ``mpp`` overrides) enable heatmaps and (``montage_tiles`` > 0) montages of the
    top tiles; ``labels`` adds a ``label`` column; ``roi_paths`` (slide -> ROI file) + ``roi_label`` add
    ``top_roi_share``.

    Returns the runner's result and the predictions table (also written to ``dest/predictions.parquet``)."""
    from histolight.io.tables import write_parquet

    _, meta = _model(str(model))
    bags = str(bags or meta["data"]["bags"])
    fn = functools.partial(
        predict_slide,
        model=str(model),
        bags=bags,
        dest=str(dest),
        slide_paths=dict(slide_paths or {}),
        mpp=dict(mpp or {}),
        montage_tiles=montage_tiles,
        roi_paths=dict(roi_paths or {}),
        roi_label=roi_label,
    )
    res = run_per_slide(list(slides), fn, out_dir=dest, workers=workers, desc="mil predict")
    pred = res.table[res.table["status"] == "done"].drop(columns=["reason"], errors="ignore").reset_index(drop=True)
    if labels is not None and len(pred):
        pred["label"] = [labels.get(s) for s in pred["slide"]]
    write_parquet(pred, Path(dest) / "predictions.parquet")
    return res, pred


__all__ = ["THUMB_PX", "tile_size_base", "rank_scale", "jet_key", "heatmap", "predict_slide", "predict"]
