"""Patient-level train/val/test splits shared by segmentation and tile classification.

Slides of one patient are correlated (same stain batch, scanner day, often the same tumour), so a patient's
slides belong to one split. Three methods, all deciding per patient:

- ``annotations``: the slide annotations' split column (values compared case-insensitively after stripping
  blanks: ``" Train"`` is ``train``). A patient whose slides land in two splits is **refused** with a
  :class:`ConfigError` naming the patients and slides, unless ``data.allow_patient_leakage=true`` (then only a
  warning: validation metrics are optimistic).
- ``random``: a seeded shuffle of the patients; the last ``test_fraction`` of them test, the next
  ``val_fraction`` validation (optionally interleaved by a per-patient stratum such as the majority label, so
  the splits get a similar label mix).
- ``kfold``: ``test_fraction`` of the patients held out, the rest dealt into ``k`` folds; fold ``fold`` is
  validation.

Every function maps ``{slide: patient}`` to ``{slide: 'train' | 'val' | 'test' | None}`` (None = unused).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from histolight.errors import ConfigError, HistolightError

log = logging.getLogger(__name__)

SPLIT_METHODS = ("annotations", "random", "kfold")
SPLITS = ("train", "val", "test")
#: the config key that turns the leakage refusal into a warning (same key in every training stack)
LEAKAGE_KEY = "data.allow_patient_leakage"


def split_value(v: Any) -> str | None:
    """An annotation's split value, normalised: ``str(v).strip().lower()``; None / NaN / blank -> None."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    s = str(v).strip().lower()
    return s or None


def split_values(spec: Any) -> set[str]:
    """A split spec (one value or a list of values, e.g. ``data.train_split``) as a set of normalised values."""
    items = spec if isinstance(spec, (list, tuple, set)) else [spec]
    return {s for s in (split_value(v) for v in items) if s is not None}


def check_patient_leakage(
    slide_split: Mapping[str, str | None],
    slide_patient: Mapping[str, str],
    *,
    allow: bool = False,
    source: str = "the annotations' split column",
) -> list[str]:
    """Patients with slides in more than one split: a :class:`ConfigError`, or a warning with ``allow``.

    The message names every such patient (up to 10) with its slides per split and the override
    (``data.allow_patient_leakage=true``). Returns the leaking patients (sorted).
    """
    by_patient: dict[str, dict[str, list[str]]] = {}
    for s, sp in slide_split.items():
        if sp is None:
            continue
        by_patient.setdefault(str(slide_patient[s]), {}).setdefault(sp, []).append(s)
    leaks = sorted(p for p, d in by_patient.items() if len(d) > 1)
    if not leaks:
        return []

    def fmt(p: str) -> str:
        d = by_patient[p]
        order = [sp for sp in SPLITS if sp in d] + sorted(set(d) - set(SPLITS))
        return f"patient '{p}' (" + ", ".join(f"{sp}: {sorted(d[sp])}" for sp in order) + ")"

    more = f" and {len(leaks) - 10} more" if len(leaks) > 10 else ""
    msg = (
        f"patient leakage: {len(leaks)} patient(s) have slides in more than one split ({source}): "
        + "; ".join(fmt(p) for p in leaks[:10])
        + f"{more}. Put all slides of a patient in one split"
    )
    if not allow:
        raise ConfigError(f"{msg}, or set {LEAKAGE_KEY}=true to train anyway (validation metrics are then optimistic)")
    log.warning("%s (%s=true: training anyway; validation metrics are optimistic)", msg, LEAKAGE_KEY)
    return leaks


def annotation_split(
    slide_patient: Mapping[str, str],
    slide_values: Mapping[str, Any],
    *,
    roles: Mapping[str, Any] | None = None,
    allow_leakage: bool = False,
    column: str = "split",
) -> dict[str, str | None]:
    """Splits from each slide's annotation value.

    Args:
        slide_patient: ``{slide: patient}``.
        slide_values: ``{slide: value of the split column}`` (missing slides are unused).
        roles: ``{split: value or list of values}``, default ``{train: train, val: val, test: test}`` (e.g.
            segmentation's ``{train: data.train_split, val: data.val_split, test: test}``); values are compared
            after :func:`split_value`. Slides with other values are unused (logged).
        allow_leakage: only warn about patients in two splits (see :func:`check_patient_leakage`).
        column: the column's name, for messages.
    """
    roles = roles or {s: s for s in SPLITS}
    lookup: dict[str, str] = {}
    for role, spec in roles.items():
        for v in split_values(spec):
            lookup.setdefault(v, role)
    out: dict[str, str | None] = {}
    other: set[str] = set()
    for s in slide_patient:
        v = split_value(slide_values.get(s))
        out[s] = lookup.get(v) if v is not None else None
        if v is not None and v not in lookup:
            other.add(v)
    if other:
        log.info("split column '%s': slides with values %s are not used (used: %s)", column, sorted(other), sorted(lookup))
    check_patient_leakage(out, slide_patient, allow=allow_leakage, source=f"annotations column '{column}'")
    return out


def _ordered_patients(patients: Iterable[str], seed: int, strata: Mapping[str, Any] | None) -> list[str]:
    """Patients in a seeded random order; with ``strata``, interleaved across strata (round robin) so that any
    contiguous block or every k-th patient has a similar stratum mix."""
    items = sorted({str(p) for p in patients})
    order = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    if not strata:
        return order
    groups: dict[str, list[str]] = {}
    for p in order:
        groups.setdefault(str(strata.get(p)), []).append(p)
    queues = [groups[g] for g in sorted(groups)]
    out: list[str] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _check_fraction(key: str, v: Any) -> None:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
        raise ConfigError(f"{key}={v!r} is invalid: must be a fraction in [0, 1)")


def _n_of(fraction: float, n: int) -> int:
    """Patients for a fraction: at least one when the fraction is positive (and patients are left for training)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(round(fraction * n))))


def random_split(
    slide_patient: Mapping[str, str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    strata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """A seeded patient-level split: ``test_fraction`` / ``val_fraction`` of the patients (>= 1 each when > 0)."""
    _check_fraction("data.split.val_fraction", val_fraction)
    _check_fraction("data.split.test_fraction", test_fraction)
    order = _ordered_patients(slide_patient.values(), seed, strata)
    n_test = _n_of(test_fraction, len(order))
    test = set(order[len(order) - n_test :]) if n_test else set()
    rest = [p for p in order if p not in test]
    n_val = _n_of(val_fraction, len(rest))
    val = set(rest[len(rest) - n_val :]) if n_val else set()
    if len(order) < 2 and (val_fraction > 0 or test_fraction > 0):
        log.warning("only %d patient: every slide goes to training", len(order))
    return {s: ("test" if p in test else "val" if p in val else "train") for s, p in slide_patient.items()}


def kfold_split(
    slide_patient: Mapping[str, str],
    *,
    k: int = 5,
    fold: int = 0,
    test_fraction: float = 0.0,
    seed: int = 0,
    strata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Fold ``fold`` of ``k`` patient folds is validation; ``test_fraction`` of the patients is held out first."""
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 2):
        raise ConfigError(f"data.split.k={k!r} is invalid: k-fold needs an integer k >= 2")
    if not (isinstance(fold, int) and not isinstance(fold, bool) and 0 <= fold < k):
        raise ConfigError(f"data.split.fold={fold!r} is invalid: must be an integer in [0, {k - 1}]")
    _check_fraction("data.split.test_fraction", test_fraction)
    order = _ordered_patients(slide_patient.values(), seed, strata)
    n_test = _n_of(test_fraction, len(order))
    test = set(order[len(order) - n_test :]) if n_test else set()
    rest = [p for p in order if p not in test]
    if len(rest) < k:
        raise HistolightError(f"{k}-fold split needs at least {k} patients outside the test set; there are {len(rest)}")
    if strata:  # deal each stratum's patients round the folds in turn (stable: the seeded order within a stratum)
        rest = sorted(rest, key=lambda p: str(strata.get(p)))
    val = {p for i, p in enumerate(rest) if i % k == fold}
    return {s: ("test" if p in test else "val" if p in val else "train") for s, p in slide_patient.items()}


def split_slides(
    slide_patient: Mapping[str, str],
    method: str = "annotations",
    *,
    slide_values: Mapping[str, Any] | None = None,
    roles: Mapping[str, Any] | None = None,
    column: str = "split",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    k: int = 5,
    fold: int = 0,
    seed: int = 0,
    strata: Mapping[str, Any] | None = None,
    allow_leakage: bool = False,
) -> dict[str, str | None]:
    """``{slide: split}`` by ``method`` (see the module docstring); ``slide_values`` is needed for ``annotations``."""
    if method not in SPLIT_METHODS:
        raise ConfigError(f"data.split.method={method!r} is invalid: must be one of {', '.join(SPLIT_METHODS)}")
    if method == "annotations":
        if slide_values is None:
            raise ConfigError(
                f"data.split.method=annotations needs an annotations CSV with a '{column}' column "
                "(or use data.split.method=random|kfold)"
            )
        return annotation_split(slide_patient, slide_values, roles=roles, allow_leakage=allow_leakage, column=column)
    if method == "random":
        return dict(random_split(slide_patient, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, strata=strata))
    return dict(kfold_split(slide_patient, k=k, fold=fold, test_fraction=test_fraction, seed=seed, strata=strata))


def names_in(split: Mapping[str, str | None], which: str, order: Sequence[str] | None = None) -> list[str]:
    """Slides of split ``which``, in ``order`` (default: sorted)."""
    names = order if order is not None else sorted(split)
    return [s for s in names if split.get(s) == which]


__all__ = [
    "SPLIT_METHODS",
    "SPLITS",
    "LEAKAGE_KEY",
    "split_value",
    "split_values",
    "check_patient_leakage",
    "annotation_split",
    "random_split",
    "kfold_split",
    "split_slides",
    "names_in",
]
