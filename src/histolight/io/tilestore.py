"""Where tiles live and what a tile folder holds.

One layout for every writer and reader: ``<tiles_root>/<cohort>/<tile_px>px_<tile_um>um/<slide>.tfrecords``
(``..._10x`` for a magnification), where ``<cohort>`` is the dataset's short name. :func:`tile_folder` is the
only place that builds that path; :func:`find_tfrecords` / :func:`index_tfrecords` list what a folder holds
(ours or Slideflow's) from the index files, without decoding.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histolight.config.schema import check_cohort_name
from histolight.errors import ConfigError, HistolightError
from histolight.io.tfrecord import TFRecordReader
from histolight.units import tile_dir_name

log = logging.getLogger(__name__)


def tile_folder(tiles_root: str | os.PathLike, cohort: str, tile_px: int, tile_um: Any) -> Path:
    """``<tiles_root>/<cohort>/<tile_px>px_<tile_um>um``: the one place a tile folder path is built."""
    return Path(tiles_root) / check_cohort_name(cohort) / tile_dir_name(tile_px, tile_um)


TFRECORD_EXTENSIONS = (".tfrecords", ".tfrecord")


def tfrecord_slide_name(path: str | os.PathLike) -> str:
    """Slide name of a TFRecord file: the file name without ``.tfrecords`` (Slideflow convention)."""
    name = os.path.basename(os.fspath(path))
    for ext in TFRECORD_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def find_tfrecords(src: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """TFRecord files from a folder, a glob pattern, a file, or a list of those (sorted, unique)."""
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    out: list[str] = []
    for it in items:
        s = os.fspath(it)
        if os.path.isdir(s):
            out += [
                str(p)
                for p in Path(s).iterdir()
                if p.is_file() and p.name.lower().endswith(TFRECORD_EXTENSIONS) and not p.name.startswith(".")
            ]
        elif os.path.isfile(s):
            out.append(s)
        elif any(c in s for c in "*?["):
            out += [p for p in glob.glob(s) if p.lower().endswith(TFRECORD_EXTENSIONS)]
        else:
            raise ConfigError(f"TFRecords '{s}' not found (expected a folder of <slide>.tfrecords, a file or a glob)")
    return sorted(dict.fromkeys(out))


def index_tfrecords(paths: Sequence[str | os.PathLike], slides: Sequence[str] | None = None) -> pd.DataFrame:
    """The tiles stored in ``paths``: one row per record, from each file's index (built if missing).

    Returns a DataFrame indexed by tile id ``"{slide}-{loc_x}-{loc_y}"`` with columns ``tfrecord``
    (path), ``record`` (record number in the file), ``slide``, ``loc_x``, ``loc_y`` (tile centre, base px).
    ``slides`` restricts to those slide names.
    """
    keep = None if slides is None else set(slides)
    frames = []
    for p in paths:
        p = os.fspath(p)
        slide = tfrecord_slide_name(p)
        if keep is not None and slide not in keep:
            continue
        r = TFRecordReader(p, verify=False)
        n = len(r)
        if n == 0:
            continue
        locs = r.locations
        r.close()
        if locs is None:
            raise HistolightError(f"TFRecord '{p}' has records without loc_x/loc_y; tiles cannot be matched to labels")
        frames.append(
            pd.DataFrame(
                {
                    "tfrecord": p,
                    "record": np.arange(n, dtype=np.int64),
                    "slide": slide,
                    "loc_x": locs[:, 0].astype(np.int64),
                    "loc_y": locs[:, 1].astype(np.int64),
                }
            )
        )
    if not frames:
        return pd.DataFrame(
            {
                "tfrecord": pd.Series(dtype=object),
                "record": pd.Series(dtype=np.int64),
                "slide": pd.Series(dtype=object),
                "loc_x": pd.Series(dtype=np.int64),
                "loc_y": pd.Series(dtype=np.int64),
            },
            index=pd.Index([], name="tile_id", dtype=object),
        )
    df = pd.concat(frames, ignore_index=True)
    df.index = pd.Index(df["slide"].astype(str) + "-" + df["loc_x"].astype(str) + "-" + df["loc_y"].astype(str), name="tile_id")
    dup = df.index.duplicated()
    if dup.any():
        log.warning("%d duplicate tile id(s) across TFRecords (kept the first), e.g. %s", int(dup.sum()), df.index[dup][0])
        df = df[~dup]
    return df
