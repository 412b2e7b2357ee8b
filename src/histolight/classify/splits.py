"""Tile-level views of the patient splits of :mod:`histolight.training.splits` (shared with segmentation),
the checks a tile table must pass before training, and class-balancing weights.

A patient's tiles always land in one split: tiles of one patient are correlated (same stain, same scanner day,
often the same tumour), so splitting tiles or slides would leak.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from histolight.errors import ConfigError, HistolightError
from histolight.training.splits import SPLIT_METHODS, split_slides

log = logging.getLogger(__name__)

BALANCE_METHODS = ("none", "tile", "slide")


def split_patients(
    tiles: pd.DataFrame,
    method: str = "annotations",
    *,
    dataset: Any = None,
    column: str = "split",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    k: int = 5,
    fold: int = 0,
    seed: int = 0,
    allow_leakage: bool = False,
) -> pd.Series:
    """The split (``train``/``val``/``test``, or None = unused) of every tile, decided per patient.

    Args:
        tiles: labelled tiles with ``slide``, ``patient`` and ``label`` columns (index: tile id).
        method: ``annotations`` (the annotations CSV's ``column``: train/val/test per slide, compared
            case-insensitively; a patient with slides in two splits is a :class:`ConfigError` unless
            ``allow_leakage``), ``random`` (seeded patient shuffle; ``val_fraction``, ``test_fraction`` of
            patients), ``kfold`` (``test_fraction`` of patients held out first, the rest in ``k`` folds; fold
            ``fold`` is validation). Random and k-fold splits interleave patients by their majority label.
        dataset: the :class:`histolight.dataset.Dataset` (annotations) for ``annotations``.
    Returns:
        Series aligned with ``tiles.index``.
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(f"data.split.method={method!r} is invalid: must be one of {', '.join(SPLIT_METHODS)}")
    if tiles.empty:
        raise HistolightError("no labelled tiles to split (check the label source and the extracted tiles)")
    pairs = tiles[["slide", "patient"]].drop_duplicates()
    slide_patient = {str(s): str(p) for s, p in pairs.itertuples(index=False)}
    values = None
    if method == "annotations":
        ann = getattr(dataset, "annotations", None)
        if ann is None or column not in ann.columns:
            found = list(ann.columns) if ann is not None else "no annotations"
            raise ConfigError(
                f"data.split.column={column!r} is invalid: data.split.method=annotations needs that column in the "
                f"annotations CSV (found {found}); use data.split.method=random|kfold"
            )
        values = {s: dataset.column(s, column) for s in slide_patient}
    strata = tiles.groupby(tiles["patient"].astype(str))["label"].agg(lambda s: s.value_counts().index[0]).to_dict()
    split = split_slides(
        slide_patient,
        method,
        slide_values=values,
        column=column,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        k=k,
        fold=fold,
        seed=seed,
        strata=strata,
        allow_leakage=allow_leakage,
    )
    out = tiles["slide"].astype(str).map(split)
    out.name = "split"
    return out


def check_splits(tiles: pd.DataFrame, classes: Sequence[str], required: Sequence[str] = ("train", "val")) -> None:
    """Clear errors for empty splits and for classes without training tiles."""
    counts = tiles["split"].value_counts()
    for s in required:
        if counts.get(s, 0) == 0:
            have = {k: int(v) for k, v in counts.items()}
            raise HistolightError(
                f"the '{s}' split is empty (tiles per split: {have or 'none'}). Check the split column of the "
                "annotations, the split fractions, or that the label source labels tiles on those slides."
            )
    tr = tiles.loc[tiles["split"] == "train", "label"].value_counts()
    missing = [c for c in classes if tr.get(c, 0) == 0]
    if missing:
        raise HistolightError(
            f"class(es) {missing} have no training tiles (train tiles per class: "
            f"{ {k: int(v) for k, v in tr.items()} }). Every class in the label map must be present in the "
            "training split: change the split, or drop the class from data.labels."
        )


def balance_weights(labels: np.ndarray, slides: np.ndarray, method: str = "tile") -> np.ndarray | None:
    """Per-tile sampling weights (sum 1) for a weighted sampler, or None for ``none``.

    ``tile``: every class gets the same total weight, tiles within a class equally likely.
    ``slide``: every class the same weight, split equally across the slides that have tiles of it,
    then equally across that slide's tiles of the class, so a slide with 10,000 tiles weighs as much
    as one with 10.
    """
    if method not in BALANCE_METHODS:
        raise ConfigError(f"data.balance={method!r} is invalid: allowed {list(BALANCE_METHODS)}")
    if method == "none":
        return None
    labels = np.asarray(labels)
    df = pd.DataFrame({"y": labels, "s": np.asarray(slides)})
    n_classes = df["y"].nunique()
    if method == "tile":
        w = 1.0 / df.groupby("y")["y"].transform("size").to_numpy(np.float64)
    else:
        per_sc = df.groupby(["y", "s"])["y"].transform("size").to_numpy(np.float64)
        slides_per_class = df.groupby("y")["s"].transform("nunique").to_numpy(np.float64)
        w = 1.0 / (per_sc * slides_per_class)
    w = w / n_classes
    return w / w.sum()


__all__ = ["BALANCE_METHODS", "split_patients", "check_splits", "balance_weights"]
