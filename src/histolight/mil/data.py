"""Feature bags + labels -> MIL training items, patient-level splits and a Lightning datamodule.

Bags are read only through their files (Slideflow's layout, written by ``task=features``)::

    <bags>/<slide>.pt           float32 tensor (N, D): one row per tile (read with torch.load(weights_only=True))
    <bags>/<slide>.index.npz    arr_0 = (N, 2) tile locations (loc_x, loc_y) in base px
    <bags>/bags_config.json     optional; ``num_features`` = D, ``tile_px``, ``tile_um``, ...

Labels come from a table (CSV or Parquet) with ``slide``, ``patient`` (default: the slide) and a label column.
An *item* is one bag to classify: a slide (``level='slide'``) or all slides of a patient pooled into one bag
(``level='patient'``). Slides without a bag or a label are skipped with a reason (:attr:`Items.skipped`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch

from histolight.errors import ConfigError, HistolightError

log = logging.getLogger(__name__)

CONFIG_NAME = "bags_config.json"


# ---------------------------------------------------------------------------------------------- bag files


def bag_paths(bags: str | os.PathLike, slide: str) -> tuple[Path, Path]:
    """``(<bags>/<slide>.pt, <bags>/<slide>.index.npz)``."""
    return Path(bags) / f"{slide}.pt", Path(bags) / f"{slide}.index.npz"


def read_bag(bags: str | os.PathLike, slide: str, locations: bool = True) -> tuple[torch.Tensor, np.ndarray | None]:
    """``(features (N, D) float32, locations (N, 2) int64 base px or None)`` of ``slide``'s bag.

    The index is optional when ``locations=False``; a bag that is not a 2-D tensor, or whose index has another
    number of rows, is a :class:`HistolightError`."""
    pt, idx = bag_paths(bags, slide)
    try:
        x = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged or unsafe files
        raise HistolightError(f"cannot read the bag '{pt}' ({type(e).__name__}: {e})") from None
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise HistolightError(
            f"'{pt}' is not a bag: expected a 2-D tensor (tiles x features), got {getattr(x, 'shape', type(x))}"
        )
    loc = None
    if locations:
        if not idx.is_file():
            raise HistolightError(f"'{idx}' is missing: the tile locations of bag '{pt}'")
        with np.load(idx) as z:
            loc = np.asarray(z["arr_0"]).astype(np.int64)
        if loc.ndim != 2 or loc.shape != (x.shape[0], 2):
            raise HistolightError(f"'{idx}' holds {loc.shape} locations for {x.shape[0]} tiles in '{pt}' (expected (N, 2))")
    return x.float(), loc


def bags_config(bags: str | os.PathLike) -> dict:
    """The folder's ``bags_config.json`` as a dict (empty when absent)."""
    p = Path(bags) / CONFIG_NAME
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise HistolightError(f"'{p}' is not valid JSON ({e})") from None


def bag_width(bags: str | os.PathLike, slides: Sequence[str] = ()) -> int:
    """The feature width D: ``num_features`` of ``bags_config.json``, else the width of the first bag in ``slides``."""
    n = bags_config(bags).get("num_features")
    if isinstance(n, int) and n > 0:
        return n
    for s in slides:
        if bag_paths(bags, s)[0].is_file():
            return int(read_bag(bags, s, locations=False)[0].shape[1])
    raise HistolightError(f"no bags in '{bags}': cannot tell the feature width (no bags_config.json num_features)")


# ---------------------------------------------------------------------------------------------- labels -> items


def read_table(path: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """A label table (CSV / Parquet / DataFrame) with a ``slide`` column (``patient`` defaults to the slide)."""
    if isinstance(path, pd.DataFrame):
        df = path.copy()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data.annotations='{p}' does not exist (a CSV/Parquet with slide, patient and labels)")
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    if "slide" not in df.columns:
        raise ConfigError(f"the label table needs a 'slide' column (columns: {list(df.columns)})")
    df["slide"] = df["slide"].astype(str)
    df["patient"] = df["patient"].astype(str) if "patient" in df.columns else df["slide"]
    return df.drop_duplicates("slide").reset_index(drop=True)


@dataclass
class Item:
    """One bag to classify: ``id`` (slide or patient), its ``slides``, ``patient`` and ``label`` (class name)."""

    id: str
    slides: list[str]
    patient: str
    label: str


@dataclass
class Items:
    """The usable items, the class names (label order) and the skipped slides (``slide, reason``)."""

    items: list[Item]
    classes: list[str]
    skipped: pd.DataFrame


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or str(v).strip() == ""


def build_items(
    table: pd.DataFrame,
    bags: str | os.PathLike,
    *,
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    level: str = "slide",
) -> Items:
    """Items from a label table and a bag folder (see the module docstring).

    Skipped with a reason: slides without a bag, without a label, with a label outside ``labels``, and (patient
    level) patients whose slides disagree. Fewer than two classes left is a :class:`ConfigError` naming the
    labels found.
    """
    if label_column not in table.columns:
        raise ConfigError(
            f"data.label_column='{label_column}' is not a column of the label table (columns: {list(table.columns)})"
        )
    skipped: list[tuple[str, str]] = []
    ok: list[tuple[str, str, str]] = []
    for slide, patient, lab in zip(table["slide"], table["patient"], table[label_column]):
        if _blank(lab):
            skipped.append((slide, f"no label (column '{label_column}' is empty)"))
        elif labels is not None and str(lab) not in labels:
            skipped.append((slide, f"label '{lab}' is not in data.labels {list(labels)}"))
        elif not bag_paths(bags, slide)[0].is_file():
            skipped.append((slide, f"no bag ({bag_paths(bags, slide)[0]} missing)"))
        else:
            ok.append((slide, str(patient), str(lab)))
    items: list[Item] = []
    if level == "slide":
        items = [Item(s, [s], p, lab) for s, p, lab in ok]
    else:
        by_patient: dict[str, list[tuple[str, str]]] = {}
        for s, p, lab in ok:
            by_patient.setdefault(p, []).append((s, lab))
        for p, rows in sorted(by_patient.items()):
            found = sorted({lab for _, lab in rows})
            if len(found) > 1:
                skipped += [(s, f"patient '{p}' has slides labelled {found}") for s, _ in rows]
            else:
                items.append(Item(p, [s for s, _ in rows], p, found[0]))
    found = sorted({it.label for it in items})
    if len(found) < 2:
        raise ConfigError(
            f"MIL training needs at least two classes; the usable {level}s of column '{label_column}' have "
            f"{found or 'no labels'} ({len(items)} {level}s, {len(skipped)} slides skipped)"
        )
    classes = list(labels) if labels is not None else found
    skipped_df = pd.DataFrame(skipped, columns=["slide", "reason"])
    for slide, reason in skipped[:20]:
        log.warning("slide %s skipped: %s", slide, reason)
    return Items(items, classes, skipped_df)


def item_splits(
    items: Sequence[Item],
    table: pd.DataFrame,
    *,
    method: str,
    fold: int | None = None,
    k: int = 5,
    column: str = "split",
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    allow_leakage: bool = False,
) -> dict[str, str | None]:
    """``{item id: 'train' | 'val' | 'test' | None}`` with :func:`histolight.training.splits.split_slides`:
    patient-level (no patient in two splits or folds); random / k-fold interleave patients by label."""
    from histolight.training.splits import split_slides

    patient = {it.id: it.patient for it in items}
    strata = {it.patient: it.label for it in items}
    values = None
    if method == "annotations":
        if column not in table.columns:
            raise ConfigError(f"data.split.method=annotations needs a '{column}' column in the label table")
        col = dict(zip(table["slide"], table[column]))
        values = {}
        for it in items:
            vals = sorted({str(col.get(s)) for s in it.slides})
            if len(vals) > 1:
                raise ConfigError(f"patient '{it.patient}': its slides {it.slides} have split values {vals}")
            values[it.id] = col.get(it.slides[0])
    out = split_slides(
        patient,
        method,
        slide_values=values,
        column=column,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        k=k,
        fold=fold or 0,
        seed=seed,
        strata=strata,
        allow_leakage=allow_leakage,
    )
    val = {it.label for it in items if out.get(it.id) == "val"}
    if len(val) == 1:
        log.warning("fold %s: every validation item is '%s' (AUROC undefined); try another data.split.k or seed", fold, *val)
    return out


# ---------------------------------------------------------------------------------------------- torch data


class BagDataset(torch.utils.data.Dataset):
    """Items as ``{"x": (n, D) float32, "y": long, "index": int}``; ``n`` = the bag's tiles, or at most
    ``max_tiles`` drawn at random without replacement (fresh each epoch) when ``max_tiles`` is set."""

    def __init__(self, items: Sequence[Item], bags: str | os.PathLike, classes: Sequence[str], max_tiles: int | None = None):
        self.items, self.bags, self.max_tiles = list(items), str(bags), max_tiles
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.items)

    def features(self, i: int) -> torch.Tensor:
        """All tiles of item ``i`` (its slides' bags concatenated): (N, D)."""
        return torch.cat([read_bag(self.bags, s, locations=False)[0] for s in self.items[i].slides])

    def __getitem__(self, i: int) -> dict:
        x = self.features(i)
        if self.max_tiles is not None and x.shape[0] > self.max_tiles:
            x = x[torch.randperm(x.shape[0])[: self.max_tiles]]
        return {"x": x, "y": self.class_index[self.items[i].label], "index": i}


def collate_bags(batch: Sequence[Mapping]) -> dict:
    """Bags of different sizes -> ``{"x": (B, N_max, D) zero-padded, "mask": (B, N_max) bool (True = tile),
    "y": (B,) long, "index": (B,) long}``."""
    n = max(b["x"].shape[0] for b in batch)
    d = batch[0]["x"].shape[1]
    x = torch.zeros(len(batch), n, d)
    mask = torch.zeros(len(batch), n, dtype=torch.bool)
    for i, b in enumerate(batch):
        x[i, : b["x"].shape[0]] = b["x"]
        mask[i, : b["x"].shape[0]] = True
    y = torch.tensor([b["y"] for b in batch], dtype=torch.long)
    return {"x": x, "mask": mask, "y": y, "index": torch.tensor([b["index"] for b in batch], dtype=torch.long)}


def balanced_sampler(labels: Sequence[str]) -> torch.utils.data.WeightedRandomSampler:
    """Draws items with probability ~ 1 / (items of their class): every class equally likely per draw (torch's
    global RNG, seeded by the run)."""
    counts = Counter(labels)
    w = torch.tensor([1.0 / counts[lab] for lab in labels], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(w, len(labels), replacement=True)


class BagDataModule(L.LightningDataModule):
    """Train/val loaders (and :meth:`eval_dataloader` for any split) over the items of one split assignment.

    Training bags are subsampled to ``max_tiles`` and (``balance``) drawn class-balanced; evaluation uses whole bags.
    """

    def __init__(
        self,
        items: Sequence[Item],
        splits: Mapping[str, str | None],
        bags: str | os.PathLike,
        classes: Sequence[str],
        *,
        max_tiles: int | None = 512,
        batch_size: int = 1,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        balance: bool = True,
    ):
        super().__init__()
        self.items, self.splits, self.bags, self.classes = list(items), dict(splits), bags, list(classes)
        self.max_tiles, self.batch_size, self.eval_batch_size = max_tiles, batch_size, eval_batch_size
        self.num_workers, self.balance = num_workers, balance
        if not self.of_split("train"):
            raise HistolightError("no training bags: every usable item is in val/test (check data.split)")

    def of_split(self, split: str) -> list[Item]:
        return [it for it in self.items if self.splits.get(it.id) == split]

    def has_split(self, split: str) -> bool:
        return bool(self.of_split(split))

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and sd (D,) over every tile of the training bags (sd floored at 1e-6)."""
        ds = BagDataset(self.of_split("train"), self.bags, self.classes)
        total, sq, n = 0.0, 0.0, 0
        for i in range(len(ds)):
            x = ds.features(i).double()
            total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + x.shape[0]
        mean = total / max(n, 1)
        sd = (sq / max(n, 1) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
        return mean.float(), sd.float()

    def summary(self) -> pd.DataFrame:
        """Items per split and class."""
        df = pd.DataFrame({"split": [self.splits.get(it.id) for it in self.items], "label": [it.label for it in self.items]})
        return df.dropna().groupby(["split", "label"]).size().unstack(fill_value=0)

    def _loader(self, items: list[Item], train: bool) -> torch.utils.data.DataLoader:
        ds = BagDataset(items, self.bags, self.classes, self.max_tiles if train else None)
        sampler = balanced_sampler([it.label for it in items]) if train and self.balance else None
        return torch.utils.data.DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_bags,
        )

    def train_dataloader(self):
        return self._loader(self.of_split("train"), True)

    def val_dataloader(self):
        return self._loader(self.of_split("val"), False) if self.has_split("val") else []

    def eval_dataloader(self, split: str):
        return self._loader(self.of_split(split), False)


__all__ = [
    "bag_paths",
    "read_bag",
    "bags_config",
    "bag_width",
    "read_table",
    "Item",
    "Items",
    "build_items",
    "item_splits",
    "BagDataset",
    "collate_bags",
    "balanced_sampler",
    "BagDataModule",
]
