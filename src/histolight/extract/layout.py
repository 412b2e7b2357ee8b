"""On-disk layout of a tile folder ``d`` (one tile geometry of one cohort), and the per-slide summary record.

::

    d/<slide>.tfrecords, d/<slide>.index.npz   records: image_raw, slide, loc_x, loc_y (Slideflow layout)
    d/meta/<slide>.parquet                     the slide's tile table (one row per record, same order)
    d/meta/<slide>.json                        summary (:class:`SlideResult`): counts per reason, blur burden, settings
    d/meta/<slide>.overlay.jpg, .tilemap.jpg, .samples.jpg   report images
    d/tiles/<slide>/<slide>-<loc_x>-<loc_y>.jpg   loose tiles (save_tiles=true)

Every file is written under a hidden temp name ``.<name>.tmp-<pid>-<token>`` and renamed; the TFRecord is renamed
last, so a slide is complete exactly when :func:`is_complete`. An interrupted slide leaves only hidden temp files
(:func:`clean_stale_temps` removes those of dead processes).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histolight.io.atomic import atomic_write_json
from histolight.io.tables import json_default

log = logging.getLogger(__name__)

#: Tile status codes, in the order filters are applied (index = code; 0 = kept / still a candidate).
REASONS = ("kept", "roi", "qc", "grayspace", "whitespace")
KEPT, ROI_R, QC_R, GRAY_R, WHITE_R = range(5)

#: Reason of a ``skipped`` slide whose complete outputs from an earlier run were kept.
ALREADY_EXTRACTED = "already extracted"

#: Version of the ``meta/<slide>.json`` format.
META_VERSION = 1

#: Report images of a slide, in ``meta/`` (``<slide><suffix>``).
REPORT_IMAGE_SUFFIXES = (".overlay.jpg", ".tilemap.jpg", ".samples.jpg")


# ---------------------------------------------------------------------------------------------- paths


def tfrecord_path(tile_dir: str | os.PathLike, name: str) -> Path:
    """``<tile_dir>/<name>.tfrecords``."""
    return Path(tile_dir) / f"{name}.tfrecords"


def meta_dir(tile_dir: str | os.PathLike) -> Path:
    """``<tile_dir>/meta``: per-slide tables, summaries and report images."""
    return Path(tile_dir) / "meta"


def meta_path(tile_dir: str | os.PathLike, name: str) -> Path:
    """``<tile_dir>/meta/<name>.json``: the slide's summary."""
    return meta_dir(tile_dir) / f"{name}.json"


def table_path(tile_dir: str | os.PathLike, name: str) -> Path:
    """``<tile_dir>/meta/<name>.parquet``: the slide's tile table."""
    return meta_dir(tile_dir) / f"{name}.parquet"


def loose_tiles_dir(tile_dir: str | os.PathLike, name: str) -> Path:
    """``<tile_dir>/tiles/<name>``: loose tile images (``save_tiles=true``)."""
    return Path(tile_dir) / "tiles" / name


def loose_tiles_temp(tile_dir: str | os.PathLike, name: str, token: str) -> Path:
    """Hidden temp folder filled with loose tiles before it is renamed to :func:`loose_tiles_dir`."""
    return Path(tile_dir) / "tiles" / f".{name}.tmp-{os.getpid()}-{token}"


def is_complete(tile_dir: str | os.PathLike, name: str) -> bool:
    """True when slide ``name`` was fully extracted into ``tile_dir`` (TFRecord + summary + table)."""
    return (
        tfrecord_path(tile_dir, name).is_file() and meta_path(tile_dir, name).is_file() and table_path(tile_dir, name).is_file()
    )


# ---------------------------------------------------------------------------------------------- leftovers


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(tile_dir: str | os.PathLike, name: str) -> int:
    """Remove temp files/folders of slide ``name`` left by dead processes (interrupted runs). Returns the count."""
    d = Path(tile_dir)
    pats = [
        d / f".{glob.escape(name)}.*tmp-*",
        meta_dir(d) / f".{glob.escape(name)}.*tmp-*",
        d / "tiles" / f".{glob.escape(name)}.tmp-*",
    ]
    n = 0
    for pat in pats:
        for p in glob.glob(str(pat)):
            tail = p.rsplit("tmp-", 1)[-1]
            try:
                pid = int(tail.split("-")[0])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            n += 1
    if n:
        log.info("%s: removed %d temp file(s) of an interrupted run", name, n)
    return n


def remove_outputs(tile_dir: str | os.PathLike, name: str) -> None:
    """Delete a slide's TFRecord first (so it stops looking complete), then its index, meta and loose tiles."""
    d = Path(tile_dir)
    for p in (tfrecord_path(d, name), d / f"{name}.index.npz", d / f"{name}.index", d / f"{name}.index.npy"):
        p.unlink(missing_ok=True)
    for suffix in (".json", ".parquet", *REPORT_IMAGE_SUFFIXES):
        (meta_dir(d) / f"{name}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(loose_tiles_dir(d, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- summary


@dataclass
class SlideResult:
    """Summary of one slide's extraction, stored as ``meta/<slide>.json`` (JSON-able via :meth:`to_dict`).

    Counts are tiles; ``width``/``height``/``extract_px`` base px; ``mpp``/``tile_mpp`` um/px; fractions 0-1;
    ``seconds`` wall time. ``table`` (the slide's tile table) is kept in memory only.
    :func:`is_extracted` tells whether a summary row has outputs (extracted now or earlier).
    """

    slide: str
    status: str  # done | empty | skipped | failed (histolight.cohort.STATUSES)
    reason: str | None = None
    grid_tiles: int = 0
    kept: int = 0
    rejected_roi: int = 0
    rejected_qc: int = 0
    rejected_grayspace: int = 0
    rejected_whitespace: int = 0
    tissue_fraction: float | None = None
    blur_burden: float | None = None
    blur_flagged: bool = False
    roi_mode: str | None = None
    n_rois: int | None = None
    width: int | None = None
    height: int | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    level: int | None = None
    extract_px: int | None = None
    tile_mpp: float | None = None
    qc: str | None = None
    tissue_detector: str | None = None
    seconds: float = 0.0
    tfrecord: str | None = None
    normalizer: str | None = None
    settings: dict = field(default_factory=dict, repr=False)
    table: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Every field but ``table`` (keys: :func:`summary_columns`)."""
        return {k: getattr(self, k) for k in summary_columns()}


def summary_columns() -> list[str]:
    """The fields of :class:`SlideResult` stored in its JSON and in the cohort summary (all but ``table``)."""
    return [f.name for f in dataclasses.fields(SlideResult) if f.name != "table"]


def is_extracted(row: dict) -> bool:
    """Whether a summary row (a :class:`SlideResult` dict) has a finished extraction: ``done``/``empty``, or
    ``skipped`` because an earlier run had extracted it."""
    st = row.get("status")
    reason = row.get("reason")
    return st in ("done", "empty") or (st == "skipped" and isinstance(reason, str) and reason.startswith(ALREADY_EXTRACTED))


def write_meta(tile_dir: str | os.PathLike, res: SlideResult) -> None:
    """Write ``meta/<slide>.json`` (atomically) with :data:`META_VERSION`."""
    atomic_write_json(meta_path(tile_dir, res.slide), {"version": META_VERSION, **res.to_dict()}, default=json_default)


def settings_conflicts(tile_dir: str | os.PathLike, settings: dict) -> tuple[dict, list[str]]:
    """What the complete slides of ``tile_dir`` were extracted with that differs from ``settings``
    (:meth:`~histolight.extract.config.ExtractConfig.settings`): ``({key: (recorded, new)}, [slides])``, empty when
    they all match (or the folder holds no histolight slide). A setting a slide's meta does not record (added to
    histolight after it was extracted) is not compared."""
    diff: dict = {}
    slides: list[str] = []
    for p in sorted(meta_dir(tile_dir).glob("*.json")):
        name = p.name[: -len(".json")]
        meta = read_meta(tile_dir, name) if not name.startswith(".") else None
        if meta is None or not is_complete(tile_dir, name):
            continue
        prev = meta.get("settings") or {}
        keys = {k: (prev[k], v) for k, v in settings.items() if k in prev and prev[k] != v}  # keys it recorded
        if keys:
            slides.append(name)
            for k, pair in keys.items():
                diff.setdefault(k, pair)
    return diff, slides


def read_meta(tile_dir: str | os.PathLike, name: str) -> dict | None:
    """The summary JSON of a slide (None if absent/unreadable)."""
    try:
        return json.loads(meta_path(tile_dir, name).read_text())
    except (OSError, ValueError):
        return None
