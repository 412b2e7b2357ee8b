"""Slide predictions of a MIL model folder, with per-tile attention, evidence and heatmaps.

Per slide (one bag each, whole bag, on the cohort runner)::

    <dest>/attention/<slide>.parquet    loc_x, loc_y (tile centres, base px), score (the model's per-tile score:
                                        attention weight, or see histolight.mil.models), and for models whose
                                        logits add up over tiles evidence_<class> per class (log-odds units,
                                        histolight.mil.attention.evidence)
    <dest>/heatmaps/<slide>.png         over the slide thumbnail, each tile drawn at its location: the scores by rank
                                        (lowest blue .. highest red, jet colours) and, where known, the evidence for
                                        the predicted class (or ``evidence_class``: red for, white none, blue
                                        against), under a title (slide, prediction) and above the colour keys; only
                                        for slides whose file is known
    <dest>/montages/<slide>.png         the ``montage_tiles`` highest-scoring tiles, read back from the slide
    <dest>/predictions.parquet          slide, status, n_tiles, prob_<class>..., pred (+ label when known), and with
                                        ``roi_label``: top_roi_share = share of the top 10% tiles by score whose
                                        centre lies in a ROI of that class (histolight.mil.attention), roi_share_all
                                        = the same for all tiles (the chance level), and
                                        top_evidence_share = the same for the top 10% by evidence for
                                        evidence_class (the predicted class unless set)
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
from histolight.errors import ConfigError, HistolightError
from histolight.mil.attention import evidence, montage, roi_share
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


def _paint(thumb: np.ndarray, downsample: float, locs: np.ndarray, colours: np.ndarray, tile_base: float) -> np.ndarray:
    """``thumb`` (H, W, 3) uint8 with each tile (centre ``locs`` (N, 2), base px; side ``tile_base`` base px) in its
    colour ``colours`` (N, 3) blended 1:1; ``downsample`` = base px per thumbnail px."""
    h, w = thumb.shape[:2]
    colour = np.zeros((h, w, 3), np.float32)
    cover = np.zeros((h, w), bool)
    half = tile_base / 2 / downsample
    for (x, y), c in zip(locs / downsample, colours):
        x0, y0 = max(0, int(round(x - half))), max(0, int(round(y - half)))
        x1, y1 = min(w, int(round(x + half))), min(h, int(round(y + half)))
        colour[y0:y1, x0:x1] = c
        cover[y0:y1, x0:x1] = True
    out = thumb.copy()
    out[cover] = (0.5 * thumb[cover] + 0.5 * colour[cover]).astype(np.uint8)
    return out


def heatmap(thumb: np.ndarray, downsample: float, locs: np.ndarray, scores: np.ndarray, tile_base: float) -> np.ndarray:
    """``thumb`` (H, W, 3) uint8 with ``scores`` (N,) rank-scaled (:func:`rank_scale`) as jet colours blended (0.5)
    over the tiles at ``locs`` (N, 2) (centres, base px); ``downsample`` = base px per thumbnail px. Returns
    (H, W, 3) uint8."""
    import cv2

    v = (rank_scale(scores) * 255).astype(np.uint8)[:, None]
    colours = cv2.cvtColor(cv2.applyColorMap(v, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)[:, 0]
    return _paint(thumb, downsample, locs, colours.reshape(-1, 3), tile_base)


#: the colour key of :func:`evidence_map`
EVIDENCE_KEY = {"against": (40, 80, 220), "none": (255, 255, 255), "for": (220, 40, 40)}


def evidence_map(thumb: np.ndarray, downsample: float, locs: np.ndarray, values: np.ndarray, tile_base: float) -> np.ndarray:
    """Like :func:`heatmap` for signed ``values`` (N,) (evidence, log-odds): white at 0, towards red (for) or blue
    (against) in proportion to ``|value|``, full colour from the slide's 95th percentile of ``|value|`` up (a few
    extreme tiles do not wash out the rest)."""
    v = np.asarray(values, np.float64)
    m = float(np.quantile(np.abs(v), 0.95)) if len(v) else 0.0
    t = (np.clip(v / m, -1, 1) if m > 0 else np.zeros_like(v))[:, None]
    white, pos, neg = (np.asarray(EVIDENCE_KEY[k], np.float64) for k in ("none", "for", "against"))
    colours = np.where(t >= 0, white + t * (pos - white), white - t * (neg - white))
    return _paint(thumb, downsample, locs, colours, tile_base)


def _keys(evidence_for: str | None) -> np.ndarray:
    """The colour keys of a heatmap figure stacked, (H, W, 3) uint8."""
    keys = [legend_image(jet_key(), title="attention rank")]
    if evidence_for is not None:
        keys.append(legend_image(EVIDENCE_KEY, title=f"evidence for {evidence_for}"))
    w = max(k.shape[1] for k in keys)
    return np.vstack([np.pad(k, ((0, 0), (0, w - k.shape[1]), (0, 0)), constant_values=255) for k in keys])


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
    evidence_class: str | None = None,
) -> dict:
    """Predict slide ``name`` from its bag (see the module docstring); returns ``n_tiles``, ``prob_<class>``, ``pred``
    (+ ``top_roi_share``, ``roi_share_all``, ``top_evidence_share``, ``evidence_class`` when ``roi_label`` is set and
    the slide has a ROI file in ``roi_paths``). ``evidence_class``: the class whose evidence is drawn and measured (None = the
    predicted class)."""
    from histolight.io.images import write_png
    from histolight.io.tables import write_parquet
    from histolight.viz import titled

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
    classes = meta["labels"]
    probs = torch.softmax(out["logits"][0], 0).numpy()
    pred = classes[int(probs.argmax())]
    scores = out["scores"][0].numpy()
    table = pd.DataFrame({"loc_x": locs[:, 0], "loc_y": locs[:, 1], "score": scores})
    ev_class, ev = evidence_class or pred, None
    if ev_class not in classes:
        raise ConfigError(f"evidence_class={ev_class!r} is not a class of {model}: use one of {classes}")
    if out.get("contributions") is not None:
        contrib = out["contributions"][0].numpy()
        for i, c in enumerate(classes):
            table[f"evidence_{c}"] = evidence(contrib, i)
        ev = table[f"evidence_{ev_class}"].to_numpy()
    out_dir = Path(dest)
    (out_dir / "attention").mkdir(parents=True, exist_ok=True)
    write_parquet(table, out_dir / "attention" / f"{name}.parquet")
    path = (slide_paths or {}).get(name)
    if path:
        from histolight.wsi import Slide

        slide = Slide(path, mpp=(mpp or {}).get(name))
        thumb = slide.thumbnail(max_size=THUMB_PX)
        ds = slide.dimensions[0] / thumb.shape[1]
        size = tile_size_base(locs, (meta.get("geometry") or {}).get("tile_um"), slide.mpp)
        (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
        figs = [(heatmap(thumb, ds, locs, scores, size), "attention (tile score)")]
        if ev is not None:
            figs.append((evidence_map(thumb, ds, locs, ev, size), f"evidence for {ev_class}"))
        title = f"{name}: predicted {pred} ({float(probs.max()):.2f})"
        fig = titled(panels(figs, _keys(None if ev is None else ev_class)), title)
        write_png(out_dir / "heatmaps" / f"{name}.png", fig)
        if montage_tiles and slide.mpp:
            (out_dir / "montages").mkdir(parents=True, exist_ok=True)
            write_png(out_dir / "montages" / f"{name}.png", montage(slide, locs, scores, size, montage_tiles))
    res = {"n_tiles": int(x.shape[0]), **{f"prob_{c}": float(p) for c, p in zip(classes, probs)}, "pred": pred}
    roi = (roi_paths or {}).get(name)
    if roi_label and roi:
        from histolight.roi import read_rois

        rois = read_rois(roi)
        res["top_roi_share"] = roi_share(locs, scores, rois, roi_label)
        res["roi_share_all"] = roi_share(locs, scores, rois, roi_label, 1.0)
        if ev is not None:
            res.update(top_evidence_share=roi_share(locs, ev, rois, roi_label), evidence_class=ev_class)
    return res


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
    evidence_class: str | None = None,
) -> tuple[CohortResult, pd.DataFrame]:
    """Predict ``slides`` with the MIL model folder ``model`` from the bags in ``bags`` (default: the model's own
    bag folder). ``slide_paths`` (+ ``mpp`` overrides) enable heatmaps and (``montage_tiles`` > 0) montages of the
    top tiles; ``labels`` adds a ``label`` column; ``roi_paths`` (slide -> ROI file) + ``roi_label`` add
    ``top_roi_share`` and ``top_evidence_share``; ``evidence_class`` (one of the model's classes; None = each slide's
    predicted class) is the class whose evidence is drawn and measured.

    Returns the runner's result and the predictions table (also written to ``dest/predictions.parquet``)."""
    from histolight.io.tables import write_parquet

    _, meta = _model(str(model))
    if evidence_class is not None and evidence_class not in meta["labels"]:
        raise ConfigError(f"evidence_class={evidence_class!r} is not a class of {model}: use one of {meta['labels']}")
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
        evidence_class=evidence_class,
    )
    res = run_per_slide(list(slides), fn, out_dir=dest, workers=workers, desc="mil predict")
    pred = res.table[res.table["status"] == "done"].drop(columns=["reason"], errors="ignore").reset_index(drop=True)
    if labels is not None and len(pred):
        pred["label"] = [labels.get(s) for s in pred["slide"]]
    write_parquet(pred, Path(dest) / "predictions.parquet")
    return res, pred


__all__ = [
    "THUMB_PX",
    "EVIDENCE_KEY",
    "tile_size_base",
    "rank_scale",
    "jet_key",
    "heatmap",
    "evidence_map",
    "predict_slide",
    "predict",
]
