"""A cohort: slides found in folders, their ROI files and a slide annotations table.

>>> ds = Dataset("data/demo/slides", rois="data/demo/rois", annotations="data/demo/annotations.csv")
>>> ds.names[:2], ds.rois("demo_000")[0].label
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from histolight.cohort import CohortResult, run_per_slide
from histolight.compat.slideflow import SlideflowDataset
from histolight.config.schema import check_cohort_name, default_cohort_name
from histolight.errors import ConfigError, HistolightError, ROIError
from histolight.roi import ROI, ROI_EXTENSIONS, read_rois
from histolight.utils.filesets import is_recorded_set, read_record, record_path
from histolight.wsi import SLIDE_EXTENSIONS, Slide, slide_name

log = logging.getLogger(__name__)


def roi_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """The ROI files of slide ``name`` in ``folder``, in lookup order (:data:`ROI_EXTENSIONS`)."""
    return [p for p in (Path(folder) / f"{name}{ext}" for ext in ROI_EXTENSIONS) if p.is_file()]


def _as_list(v) -> list:
    if v is None:
        return []
    if isinstance(v, (str, os.PathLike)):
        return [v]
    return list(v)


class Dataset(SlideflowDataset):
    """Slides, ROIs and annotations of one cohort.

    Args:
        slides: a folder (searched for :data:`SLIDE_EXTENSIONS`), a slide file, or a list of either.
        rois: folder(s) holding ``<slide>.geojson|.json|.csv`` ROI files (first match wins, in that order).
        annotations: CSV with at least a ``slide`` column; ``patient``, ``label``, ``split`` and an
            optional ``mpp`` (per-slide override, um/px) are used when present.
        mpp_override: base um/px applied to every slide (wins over the file and the CSV).
        recursive: search slide folders recursively.
        name: short cohort name used in output folders (``tiles/<name>/...``); default: the slide folder's base
            name (letters, digits, ``.``, ``_``, ``-``).
        include_detections: read QuPath cell/detection objects in GeoJSON ROI files as ROIs too (default: only
            annotations, the detections skipped with one warning per file; config key ``dataset.include_detections``).
    """

    def __init__(
        self,
        slides: str | os.PathLike | Sequence[str | os.PathLike],
        rois: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        annotations: str | os.PathLike | pd.DataFrame | None = None,
        mpp_override: float | None = None,
        recursive: bool = False,
        name: str | None = None,
        include_detections: bool = False,
    ):
        self.slide_sources = [Path(p) for p in _as_list(slides)]
        self.include_detections = bool(include_detections)
        self.name = check_cohort_name(name) if name else default_cohort_name(self.slide_sources)
        self.roi_dirs = [Path(p) for p in _as_list(rois)]
        self.mpp_override = mpp_override
        if mpp_override is not None and not float(mpp_override) > 0:
            raise ConfigError(f"mpp_override must be a positive number of um/px, got {mpp_override!r}")
        self._paths = self._discover(recursive)
        for d in self.roi_dirs:
            if not d.is_dir():
                raise ConfigError(
                    f"ROI folder '{d}' does not exist (set dataset.rois to a folder of <slide>.csv/.geojson files, or null)"
                )
        self.annotations = self._load_annotations(annotations)
        self._warn_orphan_rois()

    # ------------------------------------------------------------------ discovery
    def _discover(self, recursive: bool) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for src in self.slide_sources:
            if src.is_file():
                files = [src]
            elif src.is_dir():
                it = src.rglob("*") if recursive else src.iterdir()
                files = sorted(p for p in it if p.is_file() and _is_slide_file(p))
            else:
                raise ConfigError(f"slide source '{src}' does not exist (dataset.slides must be a folder or a slide file)")
            for p in files:
                name = slide_name(p)
                if name in found and found[name] != p:
                    raise HistolightError(
                        f"two slides share the name '{name}': {found[name]} and {p}. "
                        "Slide names (file names without extension) must be unique in a cohort."
                    )
                found[name] = p
        return dict(sorted(found.items()))

    def _load_annotations(self, ann) -> pd.DataFrame | None:
        if ann is None:
            return None
        if isinstance(ann, pd.DataFrame):
            df = ann.copy()
            src = "annotations DataFrame"
        else:
            src = str(ann)
            if not Path(ann).exists():
                raise ConfigError(f"annotations file '{ann}' does not exist (dataset.annotations)")
            try:
                df = pd.read_csv(ann, dtype={"slide": str, "patient": str})
            except Exception as e:
                raise HistolightError(f"{src}: cannot read CSV ({e})") from e
        df.columns = [str(c).strip() for c in df.columns]
        if "slide" not in df.columns:
            raise HistolightError(f"{src}: missing required column 'slide' (found {list(df.columns)})")
        if df["slide"].duplicated().any():
            dups = df.loc[df["slide"].duplicated(), "slide"].tolist()[:5]
            raise HistolightError(f"{src}: slides listed twice: {dups}")
        if "patient" not in df.columns:
            df["patient"] = df["slide"]
        df = df.set_index("slide", drop=False)
        missing = sorted(set(df.index) - set(self._paths))
        if missing:
            log.warning("%s: %d slide(s) in the annotations have no slide file: %s", src, len(missing), missing[:10])
        return df

    def _warn_orphan_rois(self) -> None:
        for d in self.roi_dirs:
            orphans = sorted(p.name for p in d.iterdir() if p.suffix.lower() in ROI_EXTENSIONS and p.stem not in self._paths)
            if orphans:
                log.warning("ROI folder %s: %d file(s) match no slide in the cohort (ignored): %s", d, len(orphans), orphans[:10])

    # ------------------------------------------------------------------ slides
    @property
    def names(self) -> list[str]:
        """Slide names, sorted."""
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __iter__(self):
        return iter(self.names)

    def path(self, name: str) -> Path:
        try:
            return self._paths[name]
        except KeyError:
            raise HistolightError(f"slide '{name}' is not in this cohort ({len(self)} slides)") from None

    def mpp_for(self, name: str) -> float | None:
        """The base um/px to force for ``name``: the global override, else the annotations' ``mpp`` column."""
        if self.mpp_override is not None:
            return float(self.mpp_override)
        df = self.annotations
        if df is not None and "mpp" in df.columns and name in df.index:
            v = df.at[name, "mpp"]
            if pd.notna(v):
                return float(v)
        return None

    def open(self, name: str) -> Slide:
        """Open slide ``name`` with its mpp override applied. Raises :class:`SlideError`."""
        return Slide(self.path(name), mpp=self.mpp_for(name))

    # ------------------------------------------------------------------ ROIs
    def roi_path(self, name: str) -> Path | None:
        """The ROI file of ``name`` in the first ROI folder holding one, or None.

        One slide's ROIs in two formats in one folder are ambiguous (which one did the user edit?): a
        :class:`ROIError` names both, unless they are one unchanged set written by histolight (recorded in
        ``<folder>/.generated/<slide>.json``, :mod:`histolight.utils.filesets`; then ``.geojson``, ``.json``,
        ``.csv`` in that order)."""
        for d in self.roi_dirs:
            found = roi_files(d, name)
            if len(found) > 1 and not is_recorded_set(read_record(record_path(d, name)), found, d):
                raise ROIError(
                    f"slide '{name}' has {len(found)} ROI files in '{d}': {' and '.join(p.name for p in found)} (not one "
                    f"set written by histolight, or edited since); keep the one to use and move the other(s) out of "
                    "the folder"
                )
            if found:
                return found[0]
        return None

    def has_rois(self, name: str) -> bool:
        return self.roi_path(name) is not None

    def rois(self, name: str | None = None, slide_dims: tuple[int, int] | None = None) -> list[ROI] | list[str]:
        """ROIs of slide ``name`` in base px (clipped to ``slide_dims`` (w, h) if given; [] when it has no ROI file).

        Without ``name`` (Slideflow's ``Dataset.rois()``): the paths (str) of the ROI files of this dataset's
        slides, in slide order, one per slide that has ROIs."""
        if name is None:
            return [str(p) for p in (self.roi_path(n) for n in self.names) if p is not None]
        p = self.roi_path(name)
        return [] if p is None else read_rois(p, slide_dims=slide_dims, include_detections=self.include_detections)

    # ------------------------------------------------------------------ annotations
    def patient(self, name: str) -> str:
        df = self.annotations
        if df is not None and name in df.index:
            return str(df.at[name, "patient"])
        return name

    def column(self, name: str, column: str):
        """Value of annotations ``column`` for slide ``name`` (None if absent)."""
        df = self.annotations
        if df is None or column not in df.columns or name not in df.index:
            return None
        v = df.at[name, column]
        return None if pd.isna(v) else v

    def filter(
        self,
        slides: Iterable[str] | Mapping[str, Any] | None = None,
        *,
        filters: Mapping[str, Any] | None = None,
        **column_values,
    ) -> Dataset:
        """A copy restricted to ``slides`` and to slides whose annotation columns hold one of the given values.

        Column filters come as Slideflow's dict (``filter({'slide': [...], 'label': ['tumor']})`` or
        ``filter(filters={...})``) and/or keywords (``split='train'``, ``split=['train', 'val']``); each maps a
        column to one value or a list, values compared as strings, columns combined with AND. The ``slide`` key
        selects slide names (no annotations needed). A column the annotations lack is a :class:`HistolightError`
        naming the columns there are."""
        if isinstance(slides, Mapping):
            if filters is not None:
                raise HistolightError("filter: give the column filters either as the first argument or as filters=, not both")
            slides, filters = None, slides
        wanted = {**dict(filters or {}), **column_values}
        keep = set(self.names if slides is None else slides)
        if "slide" in wanted:
            keep &= {str(v) for v in _as_list(wanted.pop("slide"))}
        ann = self.annotations
        for col, val in wanted.items():
            if ann is None or col not in ann.columns:
                have = list(ann.columns) if ann is not None else "no annotations table (dataset.annotations)"
                raise HistolightError(f"cannot filter by '{col}': no such annotations column (columns: {have}, and 'slide')")
            keep &= set(ann.index[ann[col].astype(str).isin({str(v) for v in _as_list(val)})])
        new = object.__new__(Dataset)
        new.__dict__.update(self.__dict__)
        new._paths = {k: v for k, v in self._paths.items() if k in keep}
        if self._paths and not new._paths:
            log.warning("filter(slides=%s, filters=%s) kept none of the %d slides", slides, wanted, len(self))
        return new

    # ------------------------------------------------------------------ summary
    def info(
        self,
        check_read: bool = True,
        workers: int = 1,
        report_dir: str | os.PathLike | None = None,
        summary_name: str = "slides.csv",
        progress: bool = True,
    ) -> CohortResult:
        """Describe every slide on the cohort runner (:func:`histolight.cohort.run_per_slide`).

        Returns the run's :class:`~histolight.cohort.CohortResult`; its ``table`` has one row per slide with
        :data:`INFO_COLUMNS` after the runner's ``slide, status, reason, seconds``. A slide that cannot be opened or
        read (``check_read``: decode a few pixels) or whose ROI file is broken is ``failed`` with the reason; a
        slide without mpp is ``done`` with a ``warning``. ``report_dir``: folder of the summary CSV.
        """
        fn = functools.partial(slide_info, dataset=self, check_read=check_read)
        res = run_per_slide(
            self.names, fn, out_dir=report_dir, workers=workers, summary_name=summary_name, desc="slide info", progress=progress
        )
        for c in INFO_COLUMNS:
            if c not in res.table.columns:
                res.table[c] = None
        for c in ("width", "height", "levels", "rois"):
            res.table[c] = pd.to_numeric(res.table[c]).astype("Int64")
        return res

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}: {len(self)} slides from {[str(s) for s in self.slide_sources]}, rois={[str(d) for d in self.roi_dirs]})"


#: the columns of :meth:`Dataset.info` after the runner's ``slide, status, reason, seconds`` (mpp in um/px, size in base px)
INFO_COLUMNS = ["vendor", "width", "height", "levels", "mpp", "mpp_source", "rois", "roi_file", "roi_labels", "warning", "path"]


def slide_info(name: str, dataset: Dataset, check_read: bool = True) -> dict:
    """Per-slide function of :meth:`Dataset.info`: vendor, size (base px), levels, mpp (um/px), ROI count and labels.

    Raises :class:`~histolight.errors.SlideError` when the slide cannot be opened or (``check_read``) its pixels
    cannot be decoded: the cohort runner records a ``failed`` row with the reason. A broken ROI file gives a
    ``failed`` row that still describes the slide."""
    row: dict = {"path": str(dataset.path(name)), "warning": None}
    with dataset.open(name) as s:
        row.update(s.describe())
        if check_read:  # decode a few pixels: files that open may still fail here
            lvl = s.level_count - 1
            s.read_region((0, 0), lvl, (min(64, s.level_dimensions[lvl][0]), min(64, s.level_dimensions[lvl][1])))
        if not s.has_mpp:
            row["warning"] = f"no mpp: {s._mpp_note}; set dataset.mpp_override or an mpp column"
        dims = s.dimensions
    p = dataset.roi_path(name)
    row["roi_file"] = p.name if p else None
    try:
        rois = dataset.rois(name, slide_dims=dims)
    except ROIError as e:  # the slide is described; its ROI file must be fixed
        return {**row, "status": "failed", "reason": str(e)}
    row.update(rois=len(rois), roi_labels=",".join(sorted({r.label for r in rois if r.label})) or None)
    return row


def _is_slide_file(p: Path) -> bool:
    n = p.name.lower()
    if n.startswith("."):
        return False
    return any(n.endswith("." + ext) for ext in SLIDE_EXTENSIONS)
