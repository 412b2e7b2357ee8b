"""What a MIL training run reports beyond its metrics: the out-of-fold ROC curve, attention heatmaps of a few
out-of-fold slides, and both logged to the run's loggers (W&B: summary metrics, a ROC line plot, images).

Reads the run folder of :func:`histolight.mil.train` (``predictions.parquet``: one row per evaluated item, fold,
split, ``label``, ``prob_<class>``; each fold's ``model``). Writes ``roc.csv`` (``fpr, tpr, threshold``) and
``attention_examples/{attention,heatmaps}/<slide>.*`` into the run folder.
"""

from __future__ import annotations

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


def attention_examples(run_dir: str | os.PathLike, dataset: Any, bags: str | os.PathLike, n: int = 4) -> list[tuple[str, str]]:
    """Heatmaps of up to ``n`` out-of-fold slides (:func:`pick_examples`), each by the fold model that validated it,
    into ``<run_dir>/attention_examples``. ``dataset``: a :class:`histolight.dataset.Dataset` (slide files).
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
        res = predict_slide(r.id, model=str(model), bags=str(bags), dest=str(dest), slide_paths=paths, mpp=mpp)
        png = dest / "heatmaps" / f"{r.id}.png"
        if png.is_file():
            out.append((str(png), f"{r.id} (fold {r.fold}): {r.label}, predicted {res['pred']}"))
    return out


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


__all__ = ["EXAMPLES", "out_of_fold", "roc_points", "pick_examples", "attention_examples", "log_run"]
