"""What a MIL training run reports beyond its metrics: the out-of-fold ROC curve, attention heatmaps of a few
out-of-fold slides, and both logged to the run's loggers (W&B: summary metrics, a ROC line plot, images).

Reads the run folder of :func:`histolight.mil.train` (``predictions.parquet``: one row per evaluated item, fold,
split, ``label``, ``prob_<class>``; each fold's ``model``). Writes ``roc.csv`` (``fpr, tpr, threshold``),
``attention_examples/{attention,heatmaps}/<slide>.*`` and, with a ROI label, ``roi_focus.csv`` and
``oof_attention/attention/<slide>.parquet`` into the run folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EXAMPLES = "attention_examples"


def out_of_fold(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The validation rows of ``<run_dir>/predictions.parquet`` (k-fold: every item once; empty when absent)."""
    p = Path(run_dir) / "predictions.parquet"
    if not p.is_file():
        return pd.DataFrame()
    pred = pd.read_parquet(p)
    return pred[pred["split"] == "val"].reset_index(drop=True)


def roc_points(pred: pd.DataFrame) -> pd.DataFrame:
    """ROC curve (``fpr, tpr, threshold``) of binary predictions: the second class (``prob_`` column order) is the
    positive one. Empty with fewer or more than two classes, or one class present."""
    from sklearn.metrics import roc_curve

    cols = [c for c in pred.columns if c.startswith("prob_")]
    if len(cols) != 2 or pred.empty:
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    y = (pred["label"] == cols[1][len("prob_") :]).to_numpy()
    if y.all() or not y.any():
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thr = roc_curve(y, pred[cols[1]].to_numpy())
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})


def pick_examples(pred: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to ``n`` out-of-fold items, ``ceil(n / classes)`` per true class, the most confidently right first."""
    if pred.empty or n <= 0:
        return pred.iloc[:0]
    per = math.ceil(n / max(1, pred["label"].nunique()))
    conf = pred.apply(lambda r: r.get(f"prob_{r['label']}", np.nan), axis=1)
    picked = pred.assign(conf=conf).sort_values("conf", ascending=False).groupby("label", sort=True).head(per)
    return picked.head(n)


def attention_examples(
    run_dir: str | os.PathLike, dataset: Any, bags: str | os.PathLike, n: int = 4, evidence_class: str | None = None
) -> list[tuple[str, str]]:
    """Heatmaps of up to ``n`` out-of-fold slides (:func:`pick_examples`), each by the fold model that validated it,
    into ``<run_dir>/attention_examples``, with the evidence for ``evidence_class`` (None = the predicted class).
    ``dataset``: a :class:`histolight.dataset.Dataset` (slide files).
    Returns ``[(png path, caption)]``; items that are not a slide of ``dataset`` are left out."""
    from histolight.mil.predict import predict_slide

    run = Path(run_dir)
    out = []
    for r in pick_examples(out_of_fold(run), n).itertuples():
        if r.id not in dataset.names:
            continue
        model = run / (f"fold_{r.fold}" if r.fold >= 0 else "") / "model"
        dest = run / EXAMPLES
        paths, mpp = {r.id: str(dataset.path(r.id))}, {r.id: dataset.mpp_for(r.id)}
        opts = {"slide_paths": paths, "mpp": mpp, "evidence_class": evidence_class}
        res = predict_slide(r.id, model=str(model), bags=str(bags), dest=str(dest), **opts)
        png = dest / "heatmaps" / f"{r.id}.png"
        if png.is_file():
            out.append((str(png), f"{r.id} (fold {r.fold}): {r.label}, predicted {res['pred']}"))
    return out


def check_evidence_class(evidence_class: str | None, data: Any) -> None:
    """Before training: refuse a ``task.evidence_class`` that is not a label of ``data`` (a
    :class:`histolight.mil.config.BagDataConfig`: ``data.labels``, else the values of its label column)."""
    from histolight.errors import ConfigError
    from histolight.mil.data import read_table

    if evidence_class is None:
        return
    labels = data.labels
    if labels is None:
        table = read_table(data.annotations)
        if data.label_column not in table:
            return  # training names the missing column
        labels = sorted(table[data.label_column].dropna().astype(str).unique())
    if evidence_class not in labels:
        raise ConfigError(
            f"task.evidence_class={evidence_class!r} is not a label of {data.label_column!r}: use one of {list(labels)}"
        )


def roi_focus(
    run_dir: str | os.PathLike, dataset: Any, bags: str | os.PathLike, roi_label: str, evidence_class: str | None = None
) -> dict[str, float]:
    """Is the attention on the tissue that decides the label? Every out-of-fold slide is predicted by the fold model
    that validated it (no figures; per-tile attention and evidence in ``<run_dir>/oof_attention/attention``), and
    its share of top-10% tiles (by attention, and by evidence for ``evidence_class``, default its predicted class)
    lying in ``roi_label`` ROIs goes into ``<run_dir>/roi_focus.csv``. Items that are not a slide of ``dataset``
    with a ROI file are left out; a slide whose ROI file or bag cannot be read gets a ``reason`` row and a warning.
    Returns the means over slides: ``oof/top_roi_share``, ``oof/top_evidence_share`` (models with tile evidence),
    ``oof/roi_share_all`` (the share of all tiles: the chance level), also added to ``<run_dir>/metrics.json``."""
    from histolight.errors import HistolightError
    from histolight.io.atomic import atomic_write_json, atomic_write_text
    from histolight.mil.predict import predict_slide

    run, rows = Path(run_dir), []
    for r in out_of_fold(run).itertuples():
        roi = dataset.roi_path(r.id) if r.id in dataset.names else None
        if roi is None:
            continue
        model = run / (f"fold_{r.fold}" if r.fold >= 0 else "") / "model"
        opts = {"roi_paths": {r.id: str(roi)}, "roi_label": roi_label, "evidence_class": evidence_class}
        try:
            res = predict_slide(r.id, model=str(model), bags=str(bags), dest=str(run / "oof_attention"), **opts)
        except (HistolightError, OSError, ValueError) as e:  # one unreadable ROI file or bag: noted, the rest measured
            log.warning("attention focus of %s not measured: %s", r.id, e)
            res = {"status": "failed", "reason": str(e)}
        rows.append({"slide": r.id, "fold": r.fold, "label": r.label, **res})
    if not rows:
        return {}
    table = pd.DataFrame(rows)
    atomic_write_text(run / "roi_focus.csv", table.to_csv(index=False))
    cols = ("top_roi_share", "top_evidence_share", "roi_share_all")
    means = {f"oof/{c}": float(table[c].mean()) for c in cols if c in table and table[c].notna().any()}
    metrics = run / "metrics.json"
    if metrics.is_file():
        atomic_write_json(metrics, {**json.loads(metrics.read_text()), **means})
    return means


def log_run(loggers: Sequence, run_dir: str | os.PathLike, result: dict, images: Sequence[tuple[str, str]] = ()) -> None:
    """Write ``<run_dir>/roc.csv`` and log the run's summary metrics, ROC curve and ``images`` (``[(png, caption)]``)
    to the W&B loggers among ``loggers`` (others keep the files on disk); logging never fails the run."""
    from histolight.io.atomic import atomic_write_text

    roc = roc_points(out_of_fold(run_dir))
    if len(roc):
        atomic_write_text(Path(run_dir) / "roc.csv", roc.to_csv(index=False))
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
    for lg in loggers:
        if type(lg).__name__ != "WandbLogger":
            continue
        try:
            import wandb

            run = lg.experiment
            run.summary.update(scalars)
            if len(roc):
                table = wandb.Table(dataframe=roc[["fpr", "tpr"]])
                run.log({"roc/out_of_fold": wandb.plot.line(table, "fpr", "tpr", title="ROC (out-of-fold)")})
            if images:
                lg.log_image("attention", [p for p, _ in images], caption=[c for _, c in images])
        except Exception as e:  # noqa: BLE001 - logging must not fail a finished training
            log.warning("could not log the MIL results to W&B: %s", e)


__all__ = [
    "EXAMPLES",
    "out_of_fold",
    "roc_points",
    "pick_examples",
    "attention_examples",
    "check_evidence_class",
    "roi_focus",
    "log_run",
]
