"""Tile labels: where each tile's class comes from, and the fixed map between class names and indices.

Tile ids follow Slideflow: ``"{slide}-{loc_x}-{loc_y}"`` with ``loc_x, loc_y`` the tile centre in base px.

Label sources (``data.label_source``):

- ``roi`` (strong supervision): a tile's label is the label of the ROI it belongs to, as given by
  :func:`histolight.extract.get_tile_dataframe` (``roi_filter_method`` decides membership: ``center``
  or a minimum covered fraction). Tiles outside labelled ROIs are dropped.
- ``slide`` (weak supervision): every tile inherits its slide's value in an annotations column.
- ``table``: an explicit tile id -> label table (DataFrame, CSV or Parquet), like Slideflow's
  ``build_trainer(labels=df)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histolight.errors import ConfigError, HistolightError

log = logging.getLogger(__name__)

LABEL_SOURCES = ("roi", "slide", "table")


class UnknownLabelError(HistolightError):
    """A tile carries a label that is not in the model's label map."""

    def __init__(self, tile_id: str, label: Any, classes: Sequence[str], n_bad: int = 1):
        self.tile_id, self.label, self.classes = tile_id, label, list(classes)
        more = f" ({n_bad - 1} more tile(s) with unknown labels)" if n_bad > 1 else ""
        super().__init__(
            f"tile '{tile_id}' has label {label!r}, which is not in the model's label map {self.classes}{more}. "
            "The label map is fixed at training time; relabel these tiles or drop them before evaluating."
        )


def tile_id(slide: str, loc_x: int, loc_y: int) -> str:
    """Slideflow tile id ``"{slide}-{loc_x}-{loc_y}"`` (tile centre, base px)."""
    return f"{slide}-{int(loc_x)}-{int(loc_y)}"


def tile_ids(slides: Iterable[str], loc_x: Iterable[int], loc_y: Iterable[int]) -> list[str]:
    return [f"{s}-{int(x)}-{int(y)}" for s, x, y in zip(slides, loc_x, loc_y)]


class LabelMap:
    """Class names <-> indices, fixed when a model is trained and saved with it.

    >>> lm = LabelMap(["tumor", "stroma", "necrosis"]); lm.index("stroma"), lm.names[2]
    (1, 'necrosis')
    """

    def __init__(self, classes: Sequence[str]):
        classes = [str(c) for c in classes]
        if not classes:
            raise HistolightError("a label map needs at least one class")
        dups = sorted({c for c in classes if classes.count(c) > 1})
        if dups:
            raise HistolightError(f"label map classes must be unique (repeated: {dups})")
        self.names: list[str] = classes
        self._index = {c: i for i, c in enumerate(classes)}

    @classmethod
    def from_labels(cls, labels: Iterable[Any], classes: Sequence[str] | None = None) -> LabelMap:
        """The given ``classes`` (in that order), else the sorted distinct ``labels``."""
        if classes is not None:
            return cls(classes)
        found = sorted({str(v) for v in labels})
        if not found:
            raise HistolightError("no labelled tiles: cannot build a label map")
        return cls(found)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label: Any) -> bool:
        return str(label) in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and other.names == self.names

    def __repr__(self) -> str:
        return f"LabelMap({self.names})"

    def index(self, label: Any) -> int:
        try:
            return self._index[str(label)]
        except KeyError:
            raise HistolightError(f"label {label!r} is not in the label map {self.names}") from None

    def encode(self, labels: Sequence[Any] | pd.Series, tile_ids: Sequence[str] | None = None) -> np.ndarray:
        """Class indices (int64) of ``labels``; :class:`UnknownLabelError` names the first tile with an unknown label."""
        s = pd.Series(labels if not isinstance(labels, pd.Series) else labels.to_numpy(), dtype=object).astype(str)
        codes = s.map(self._index)
        bad = codes.isna().to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            if tile_ids is None and isinstance(labels, pd.Series):
                tile_ids = list(labels.index)
            tid = str(tile_ids[i]) if tile_ids is not None else f"#{i}"
            raise UnknownLabelError(tid, s.iloc[i], self.names, int(bad.sum()))
        return codes.to_numpy(dtype=np.int64)

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.names[int(i)] for i in indices]

    def to_dict(self) -> dict:
        return {"classes": list(self.names), "index": dict(self._index)}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        if "classes" in d:
            return cls(d["classes"])
        # {name: index}
        return cls([k for k, _ in sorted(d.items(), key=lambda kv: int(kv[1]))])


def check_classes(labels: Iterable[Any], source: str = "the labelled tiles") -> None:
    """Refuse to train on fewer than two classes: a one-class classifier learns nothing (accuracy 1.0, AUROC
    undefined). The :class:`HistolightError` lists the labels found with their tile counts."""
    counts = pd.Series(list(labels), dtype=object).astype(str).value_counts()
    if len(counts) >= 2:
        return
    found = {str(k): int(v) for k, v in counts.items()}
    raise HistolightError(
        f"a tile classifier needs at least 2 classes, but {source} have {len(counts)}: {found or 'no labels'}. "
        "Label tiles of a second class (ROI labels, the annotations' label column or the label table; see "
        "data.label_source) or check data.labels, which keeps only the listed classes."
    )


# ------------------------------------------------------------------------------------------ label tables


def read_label_table(src: str | os.PathLike | pd.DataFrame | pd.Series, column: str = "label") -> pd.Series:
    """A tile id -> label Series from a DataFrame/Series, CSV/TSV or Parquet file.

    The tile id is taken from a ``tile_id``/``tile``/``id`` column, else from ``slide, loc_x, loc_y``
    columns, else from the index (as in Slideflow's ``labels=df`` with tile-id index). The label is
    ``column`` (default ``label``).
    """
    where = "label table"
    if isinstance(src, pd.Series):
        s = src.copy()
        s.index = s.index.astype(str)
        return s.rename("label")
    if isinstance(src, pd.DataFrame):
        df = src.copy()
    else:
        p = Path(src)
        where = f"label table '{p}'"
        if not p.exists():
            raise ConfigError(f"{where} does not exist (data.label_table)")
        try:
            if p.suffix.lower() in (".parquet", ".pq"):
                df = pd.read_parquet(p)
            else:
                df = pd.read_csv(
                    p,
                    sep="\t" if p.suffix.lower() in (".tsv", ".tab") else ",",
                    dtype={"slide": str, "tile_id": str, "tile": str, "id": str},
                )
        except Exception as e:
            raise HistolightError(f"{where}: cannot read ({type(e).__name__}: {e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    if column not in df.columns:
        raise HistolightError(f"{where}: no label column '{column}' (found {list(df.columns)}); set data.label_column")
    for idc in ("tile_id", "tile", "id"):
        if idc in df.columns:
            ids = df[idc].astype(str)
            break
    else:
        if {"slide", "loc_x", "loc_y"} <= set(df.columns):
            ids = pd.Series(tile_ids(df["slide"].astype(str), df["loc_x"], df["loc_y"]), index=df.index)
        else:
            ids = pd.Series(df.index.astype(str), index=df.index)
    out = pd.Series(df[column].to_numpy(), index=pd.Index(ids.to_numpy(), name="tile_id"), name="label")
    out = out[out.notna()]
    if out.index.duplicated().any():
        dup = out.index[out.index.duplicated()][0]
        raise HistolightError(f"{where}: tile id '{dup}' is listed more than once")
    return out


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v).strip() != ""


def label_tiles(
    tiles: pd.DataFrame,
    source: str = "roi",
    *,
    dataset: Any = None,
    column: str = "label",
    table: Any = None,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Give each tile its label; drop tiles without one.

    Args:
        tiles: the tile table from ``get_tile_dataframe()`` (index: tile id; columns ``slide, loc_x,
            loc_y`` and, for ``source='roi'``, ``label`` = the tile's ROI label or null).
        source: ``roi`` | ``slide`` | ``table`` (see module docstring).
        dataset: the :class:`histolight.dataset.Dataset` (``slide`` source: annotations; patients).
        column: annotations column (``slide``) or table column (``table``) holding the label.
        table: tile id -> label (DataFrame / Series / path) for ``source='table'``.
        classes: keep only tiles whose label is one of these (others are dropped and counted in the log).

    Returns:
        DataFrame indexed by tile id with ``slide, loc_x, loc_y, label, patient`` (+ ``roi_name`` when present),
        label as ``str``.
    """
    if source not in LABEL_SOURCES:
        raise ConfigError(f"data.label_source={source!r} is invalid: allowed {list(LABEL_SOURCES)}")
    for c in ("slide", "loc_x", "loc_y"):
        if c not in tiles.columns:
            raise HistolightError(f"tile table has no '{c}' column (found {list(tiles.columns)})")
    df = tiles.copy()
    if df.index.name != "tile_id" or not len(df) or not isinstance(df.index[0], str):
        df.index = pd.Index(tile_ids(df["slide"].astype(str), df["loc_x"], df["loc_y"]), name="tile_id")
    n0 = len(df)
    if source == "roi":
        if "label" not in df.columns:
            raise HistolightError("label_source=roi needs the tile table's 'label' column (the ROI label)")
        lab = df["label"]
        why = "outside labelled ROIs"
    elif source == "slide":
        ann = getattr(dataset, "annotations", None)
        if ann is None:
            raise ConfigError("data.label_source=slide needs an annotations CSV (dataset.annotations) with one label per slide")
        if column not in ann.columns:
            raise ConfigError(f"data.label_column={column!r} is not a column of the annotations (found {list(ann.columns)})")
        lab = df["slide"].astype(str).map(ann[column])
        why = f"on slides without a '{column}' annotation"
    else:
        if table is None:
            raise ConfigError("data.label_source=table needs data.label_table (a CSV/Parquet of tile id -> label)")
        t = read_label_table(table, column=column or "label")
        lab = pd.Series(df.index, index=df.index).map(t)
        missing_in_tiles = len(t.index.difference(df.index))
        if missing_in_tiles:
            log.warning(
                "label table: %d tile id(s) match no extracted tile (ignored), e.g. %s",
                missing_in_tiles,
                list(t.index.difference(df.index)[:3]),
            )
        why = "not in the label table"
    keep = lab.map(_present).astype(bool).to_numpy()
    df["label"] = lab.where(keep, None)
    df = df[keep].copy()
    df["label"] = df["label"].astype(str).str.strip()
    if n0 - len(df):
        log.info("labels (%s): dropped %d of %d tiles %s", source, n0 - len(df), n0, why)
    if classes is not None:
        ok = df["label"].isin([str(c) for c in classes])
        if (~ok).any():
            counts = df.loc[~ok, "label"].value_counts().to_dict()
            log.info("labels: dropped %d tiles with labels not in %s: %s", int((~ok).sum()), list(classes), counts)
        df = df[ok].copy()
    if dataset is not None and hasattr(dataset, "patient"):
        pmap = {s: dataset.patient(s) for s in df["slide"].astype(str).unique()}
        df["patient"] = df["slide"].astype(str).map(pmap)
    elif "patient" not in df.columns:
        df["patient"] = df["slide"].astype(str)
    df["loc_x"] = df["loc_x"].astype(np.int64)
    df["loc_y"] = df["loc_y"].astype(np.int64)
    return df


__all__ = [
    "LABEL_SOURCES",
    "LabelMap",
    "UnknownLabelError",
    "check_classes",
    "label_tiles",
    "read_label_table",
    "tile_id",
    "tile_ids",
]
