"""A slide-level label of the demo cohort that depends on slide content, for MIL: ``high_necrosis`` when necrosis
covers more than ``threshold`` of the tissue in the demo's ground-truth class mask, else ``low_necrosis``.

Reads ``<demo>/masks/<slide>.png`` (0 = background, values named by ``masks/labels.json``) and
``<demo>/annotations.csv`` (patient, split); writes a label table with ``slide, patient, split, <column>,
necrosis_fraction`` that :mod:`histolight.mil.data` reads. The default threshold 0.35 gives both classes in the
10-slide demo (5 / 5) and in a 40-slide one (23 high / 17 low).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from histolight.errors import HistolightError

HIGH, LOW = "high_necrosis", "low_necrosis"
DEFAULT_THRESHOLD = 0.35


def class_fractions(mask_png: str | os.PathLike, names: dict[int, str]) -> dict[str, float]:
    """Fraction of the tissue (mask > 0) of each class in the class mask ``mask_png`` (H, W) uint8."""
    import cv2

    mask = cv2.imread(str(mask_png), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise HistolightError(f"cannot read the class mask '{mask_png}'")
    counts = np.bincount(mask.ravel(), minlength=max(names) + 1)
    tissue = counts[1:].sum()
    return {name: float(counts[v] / tissue) if tissue else 0.0 for v, name in names.items() if v > 0}


def demo_labels(
    demo_root: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD, column: str = "necrosis_label"
) -> pd.DataFrame:
    """The label table of the demo cohort in ``demo_root`` (see the module docstring)."""
    root = Path(demo_root)
    ann = root / "annotations.csv"
    if not ann.is_file():
        raise HistolightError(f"'{ann}' is missing: generate the demo first (python run.py task=demo_data)")
    df = pd.read_csv(ann, dtype={"slide": str, "patient": str})
    names = {int(k): v for k, v in json.loads((root / "masks" / "labels.json").read_text()).items()}
    frac = [class_fractions(root / "masks" / f"{s}.png", names).get("necrosis", 0.0) for s in df["slide"]]
    df["necrosis_fraction"] = np.round(frac, 4)
    df[column] = np.where(df["necrosis_fraction"] > threshold, HIGH, LOW)
    return df[["slide", "patient", "split", column, "necrosis_fraction"]]


def write_demo_labels(
    demo_root: str | os.PathLike, dest: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD, column: str = "necrosis_label"
) -> Path:
    """Write :func:`demo_labels` as CSV to ``dest`` (atomically); returns ``dest``."""
    from histolight.io.atomic import atomic_write_text

    df = demo_labels(demo_root, threshold, column)
    atomic_write_text(dest, df.to_csv(index=False))
    return Path(dest)


__all__ = ["HIGH", "LOW", "DEFAULT_THRESHOLD", "class_fractions", "demo_labels", "write_demo_labels"]
