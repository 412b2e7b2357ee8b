"""From a cohort to labelled, split tiles: extract (or reuse) TFRecords, label every tile, split by patient.

>>> tiles, info = prepare_tiles(dataset, tile_px=128, tile_um=64, tiles_root="outputs/work/tiles")
>>> tiles["split"] = split_patients(tiles, "annotations", dataset=dataset)

``tiles`` is indexed by tile id and has ``tfrecord, record, slide, loc_x, loc_y, label, patient``:
the records that exist in the TFRecords (after extraction QC), joined with their labels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from histolight.classify.data import find_tfrecords, index_tfrecords
from histolight.classify.labels import label_tiles
from histolight.errors import HistolightError

log = logging.getLogger(__name__)


@dataclass
class PreparedTiles:
    """Where the tiles came from: ``tile_dir``, the TFRecords, extraction metrics, counts."""

    tile_dir: Path | None
    tfrecords: list[str]
    extraction: dict = field(default_factory=dict)
    n_records: int = 0
    n_labelled: int = 0


def prepare_tiles(
    dataset,
    *,
    tile_px: int,
    tile_um: Any,
    tiles_root: str | os.PathLike | None = None,
    tfrecords: Any = None,
    extract: bool = True,
    extract_options: dict | None = None,
    label_source: str = "roi",
    label_column: str = "label",
    label_table: Any = None,
    roi_filter_method: Any = "center",
    classes: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, PreparedTiles]:
    """Labelled tiles of ``dataset`` stored in TFRecords.

    Args:
        tile_px, tile_um: tile geometry (px per tile side, and microns or a magnification such as ``"10x"``).
        tiles_root: root of extracted tiles: the tile folder is ``<tiles_root>/<dataset.name>/<px>px_<um>um``
            (:func:`histolight.io.tilestore.tile_folder`, where ``task=extract`` writes); slides without a
            TFRecord there are extracted first when ``extract`` (finished slides are reused). Ignored when
            ``tfrecords`` is given.
        tfrecords: explicit TFRecords (folder / glob / list), e.g. Slideflow's; nothing is extracted.
        extract_options: extra :func:`histolight.extract.extract_tiles` options (``qc``, ``roi_method``, ...).
        label_source, label_column, label_table, classes: see :func:`histolight.classify.labels.label_tiles`.
        roi_filter_method: ``label_source='roi'``: which tiles belong to an ROI (``center`` or a minimum
            covered fraction), from :func:`histolight.extract.get_tile_dataframe`.
    """
    opts = dict(extract_options or {})
    info = PreparedTiles(None, [])
    if tfrecords is None:
        from histolight.io.tilestore import tile_folder

        if tiles_root is None:
            raise HistolightError("prepare_tiles needs tiles_root (or tfrecords)")
        tile_dir = tile_folder(tiles_root, dataset.name, tile_px, tile_um)
        info.tile_dir = tile_dir
        if extract:
            from histolight.extract import extract_tiles

            res = extract_tiles(dataset, tile_px, tile_um, str(tiles_root), progress=progress, **opts)
            info.extraction = res.metrics()
            if res.failed:
                log.warning("extraction failed for %d slide(s): %s", len(res.failed), res.failed)
        if not tile_dir.is_dir():
            raise HistolightError(f"no extracted tiles in '{tile_dir}' (set data.extract=true to extract them)")
        files = find_tfrecords(tile_dir)
    else:
        files = find_tfrecords(tfrecords)
    files = [f for f in files if not os.path.basename(f).startswith(".")]
    info.tfrecords = files
    index = index_tfrecords(files, slides=dataset.names if dataset is not None else None)
    info.n_records = len(index)
    if index.empty:
        raise HistolightError(
            f"no tiles in the TFRecords ({len(files)} file(s) under {info.tile_dir or tfrecords}) for the slides of this dataset"
        )
    if label_source == "roi":
        from histolight.extract import get_tile_dataframe

        grid = get_tile_dataframe(
            dataset,
            tile_px,
            tile_um,
            roi_method="auto",
            roi_filter_method=roi_filter_method,
            stride_div=opts.get("stride_div", 1),
            edge_tiles=opts.get("edge_tiles", False),
            slides=sorted(index["slide"].unique()),
        )
        lab = label_tiles(grid, "roi", dataset=dataset, classes=classes)
        keep = [c for c in ("label", "patient", "roi_name") if c in lab.columns]
        tiles = index.join(lab[keep], how="inner")
        n_unmatched = int(len(index) - len(tiles))
        if n_unmatched:
            log.info(
                "labels (roi): %d of %d extracted tiles are outside labelled ROIs (%s) and are not used",
                n_unmatched,
                len(index),
                roi_filter_method,
            )
    else:
        tiles = label_tiles(index, label_source, dataset=dataset, column=label_column, table=label_table, classes=classes)
    info.n_labelled = len(tiles)
    if tiles.empty:
        raise HistolightError(
            f"no extracted tile has a label (label_source={label_source}); "
            "check the ROI labels / annotations column / label table and data.labels"
        )
    return tiles, info


__all__ = ["PreparedTiles", "prepare_tiles"]
