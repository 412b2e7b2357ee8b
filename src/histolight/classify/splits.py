"""Patient-level train/val/test splits (seeded, optionally k-fold) and class-balancing weights.

A patient's tiles always land in one split: tiles of one patient are correlated (same stain, same
scanner day, often the same tumour), so splitting tiles or slides would leak.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from histolight.errors import ConfigError, HistolightError

log = logging.getLogger(__name__)

SPLIT_METHODS = ("annotations", "random", "kfold")
SPLITS = ("train", "val", "test")
BALANCE_METHODS = ("none", "tile", "slide")


def _rng_order(items: Sequence[str], seed: int) -> list[str]:
    items = sorted(items)
    perm = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in perm]


def _stratified_order(patients: pd.DataFrame, seed: int) -> list[str]:
    """Patients shuffled (seeded), then interleaved across their majority label so that taking
    every k-th patient gives each fold a similar label mix."""
    order = _rng_order(patients.index.tolist(), seed)
    major = patients["major"].to_dict()
    groups: dict[str, list[str]] = {}
    for p in order:
        groups.setdefault(str(major[p]), []).append(p)
    out: list[str] = []
    queues = [groups[g] for g in sorted(groups)]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


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
) -> pd.Series:
    """The split (``train``/``val``/``test``, or None = unused) of every tile, decided per patient.

    Args:
        tiles: labelled tiles with ``slide``, ``patient`` and ``label`` columns (index: tile id).
        method: ``annotations`` (the annotations CSV's ``column``: train/val/test per slide; a patient
            must not have slides in two splits), ``random`` (seeded patient shuffle; ``val_fraction``,
            ``test_fraction`` of patients), ``kfold`` (``test_fraction`` of patients held out first, the rest
            in ``k`` label-stratified folds; fold ``fold`` is validation).
    Returns:
        Series aligned with ``tiles.index``.
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(f"data.split.method={method!r} is invalid: allowed {list(SPLIT_METHODS)}")
    if tiles.empty:
        raise HistolightError("no labelled tiles to split (check the label source and the extracted tiles)")
    pat = tiles.groupby("patient")["label"].agg(lambda s: s.value_counts().index[0]).rename("major").to_frame()
    patients = pat.index.astype(str).tolist()
    assign: dict[str, str | None] = {}
    if method == "annotations":
        if dataset is None or getattr(dataset, "annotations", None) is None:
            raise ConfigError(
                "data.split.method=annotations needs an annotations CSV with a split column "
                "(or use data.split.method=random|kfold)"
            )
        if column not in dataset.annotations.columns:
            raise ConfigError(
                f"data.split.column={column!r} is not a column of the annotations "
                f"(found {list(dataset.annotations.columns)}); use data.split.method=random|kfold"
            )
        slide_split = {s: dataset.column(s, column) for s in tiles["slide"].astype(str).unique()}
        slide_split = {s: (str(v).strip().lower() if v is not None else None) for s, v in slide_split.items()}
        by_patient: dict[str, set] = {}
        for s, p in tiles[["slide", "patient"]].drop_duplicates().itertuples(index=False):
            by_patient.setdefault(str(p), set()).add(slide_split[str(s)])
        for p, vals in by_patient.items():
            vals = {v for v in vals if v in SPLITS}
            if len(vals) > 1:
                raise HistolightError(
                    f"patient '{p}' has slides in several splits {sorted(vals)} (annotations column '{column}'); "
                    "put all slides of a patient in one split"
                )
            assign[p] = vals.pop() if vals else None
        unused = sorted({v for v in slide_split.values() if v not in SPLITS and v is not None})
        if unused:
            log.info("split column '%s': values %s are not train/val/test; those slides are not used", column, unused)
    else:
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"data.split.{name}={v!r} is invalid: must be in [0, 1)")
        n = len(patients)
        n_test = int(round(test_fraction * n)) if test_fraction > 0 else 0
        if test_fraction > 0:
            n_test = max(1, n_test)
        order = _stratified_order(pat, seed)
        test = set(order[len(order) - n_test :]) if n_test else set()
        rest = [p for p in order if p not in test]
        if method == "random":
            n_val = max(1, int(round(val_fraction * n))) if val_fraction > 0 else 0
            val = set(rest[len(rest) - n_val :]) if n_val else set()
        else:
            if not (isinstance(k, int) and k >= 2):
                raise ConfigError(f"data.split.k={k!r} is invalid: k-fold needs an integer k >= 2")
            if not (isinstance(fold, int) and 0 <= fold < k):
                raise ConfigError(f"data.split.fold={fold!r} is invalid: must be an integer in [0, {k - 1}]")
            if len(rest) < k:
                raise HistolightError(f"{k}-fold split needs at least {k} patients outside the test set; there are {len(rest)}")
            val = {p for i, p in enumerate(rest) if i % k == fold}
        for p in patients:
            assign[p] = "test" if p in test else "val" if p in val else "train"
    out = tiles["patient"].astype(str).map(assign)
    out.name = "split"
    check_no_leakage(tiles.assign(split=out))
    return out


def check_no_leakage(tiles: pd.DataFrame) -> None:
    """Raise when a patient has tiles in more than one split."""
    t = tiles[tiles["split"].notna()]
    n = t.groupby("patient")["split"].nunique()
    if (n > 1).any():
        p = n[n > 1].index[0]
        raise HistolightError(
            f"patient leakage: patient '{p}' has tiles in splits {sorted(t.loc[t['patient'] == p, 'split'].unique())}"
        )


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


__all__ = ["SPLIT_METHODS", "SPLITS", "BALANCE_METHODS", "split_patients", "check_no_leakage", "check_splits", "balance_weights"]
