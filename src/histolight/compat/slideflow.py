"""Slideflow-named facades, in one place, over histolight's native API.

Users coming from Slideflow call ``dataset.extract_tiles(tile_px=..., tile_um=...)``,
``dataset.get_tile_dataframe(...)``, ``dataset.generate_rois(model)`` and pass ``qc='both'``. Those names live
here and only forward to the native functions (:func:`histolight.extract.extract_tiles`,
:func:`histolight.extract.get_tile_dataframe`, :func:`histolight.segment.rois.generate_dataset_rois`, and the
QC registry's alias table), so the native API stays the one implementation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from histolight.errors import ConfigError
from histolight.qc.registry import register_qc_alias

# Slideflow's ``qc='both'``: Otsu tissue + Gaussian blur. Registered when histolight is imported (its package
# __init__ imports this module), so it also holds in spawned worker processes.
register_qc_alias("both", ["otsu", "blur"])


class SlideflowDataset:
    """Mixin of :class:`histolight.dataset.Dataset`: Slideflow's ``Dataset`` methods by their Slideflow names."""

    def extract_tiles(self, tile_px: int | None = None, tile_um: Any = None, **options):
        """Tiles into Slideflow-compatible TFRecords under ``<outdir>/<dataset name>/<tile_px>px_<tile_um>um``.

        Same options as :func:`histolight.extract.extract_tiles` (Slideflow's names: ``qc``, ``roi_method``,
        ``stride_div``, ``grayspace_fraction``, ``normalizer``, ``dry_run``, ...). Returns an ``ExtractionResult``."""
        from histolight.extract import extract_tiles

        return extract_tiles(self, tile_px, tile_um, **options)

    def get_tile_dataframe(self, *args, **kwargs):
        """Tile table indexed by tile id ``{slide}-{loc_x}-{loc_y}`` (see :func:`histolight.extract.get_tile_dataframe`)."""
        from histolight.extract import get_tile_dataframe

        return get_tile_dataframe(self, *args, **kwargs)

    def split(
        self,
        val_fraction: float = 0.2,
        method: str = "random",
        *,
        labels: str | None = None,
        k: int = 5,
        fold: int = 0,
        seed: int = 0,
        column: str = "split",
        allow_leakage: bool = False,
    ):
        """Slideflow's ``train, val = dataset.split(val_fraction=0.3)``: two datasets, split **by patient** (the
        annotations' ``patient`` column; every slide its own patient without one) with
        :func:`histolight.training.splits.split_slides`.

        ``method``: ``random`` (seeded; ``val_fraction`` of the patients, at least one; Slideflow's ``'fixed'``),
        ``kfold`` (fold ``fold`` of ``k``; Slideflow's ``'k-fold'``) or ``annotations`` (the annotations'
        ``column``: ``train`` / ``val``; a patient in both is refused unless ``allow_leakage``). ``labels``: an
        annotations column whose values are spread evenly over the splits (per patient, its first slide's value).
        """
        from histolight.training.splits import names_in, split_slides

        method = _SPLIT_ALIASES.get(method, method)
        patients = {s: self.patient(s) for s in self.names}
        values = None
        if method == "annotations":
            if self.annotations is None or column not in self.annotations.columns:
                raise ConfigError(f"split(method='annotations') needs an annotations column '{column}' (or method='random')")
            values = {s: self.column(s, column) for s in self.names}
        strata = None
        if labels is not None:
            if self.annotations is None or labels not in self.annotations.columns:
                raise ConfigError(f"split(labels={labels!r}): no such annotations column")
            strata = {}
            for s, p in patients.items():
                strata.setdefault(p, self.column(s, labels))
        split = split_slides(
            patients,
            method,
            slide_values=values,
            column=column,
            val_fraction=val_fraction,
            k=k,
            fold=fold,
            seed=seed,
            strata=strata,
            allow_leakage=allow_leakage,
        )
        return self.filter(names_in(split, "train")), self.filter(names_in(split, "val"))

    def tfrecord_report(
        self,
        tile_px: int,
        tile_um: Any,
        dest: str | os.PathLike | None = None,
        pdf: bool = False,
        *,
        outdir: str = "tiles",
        **kwargs,
    ):
        """Slideflow's ``dataset.tfrecord_report()``: a report on this dataset's TFRecords in
        ``<outdir>/<dataset name>/<tile_px>px_<tile_um>um`` (``outdir`` as given to :meth:`extract_tiles`), written to
        ``dest`` (default: that TFRecords folder) by :func:`histolight.extract.tfreport.tfrecord_report`.

        ``pdf=True`` also prints it to PDF (needs Chromium); other keywords (``samples``, ``verify``, ``workers``,
        ``title``, ``progress``) go to that function. Returns its ``TFRecordReport`` (result, ``html``, ``pdf``)."""
        from histolight.extract.tfreport import tfrecord_report
        from histolight.io.tilestore import tile_folder

        folder = tile_folder(outdir, self.name, tile_px, tile_um)
        return tfrecord_report(folder, folder if dest is None else dest, pdf=pdf, **kwargs)

    def generate_rois(self, model, dest=None, overwrite: bool = False, **kwargs):
        """Write ROIs predicted by a segmentation model (a model folder or a loaded model) as Slideflow CSV +
        QuPath GeoJSON per slide (see :func:`histolight.segment.rois.generate_dataset_rois`)."""
        from histolight.segment.rois import generate_dataset_rois

        return generate_dataset_rois(self, model, dest=dest, overwrite=overwrite, **kwargs)

    def generate_feature_bags(self, extractor, outdir, **options):
        """Feature bags of this dataset's slides into ``outdir`` (Slideflow's name; see
        :func:`histolight.features.extract_features`): ``extractor`` is a built extractor, a registry name or a list
        of them (one pass over the tiles, ``outdir`` a list then). Tiles come from ``tfrecords=`` when given, else
        straight from the slides (``tile_px``, ``tile_um``, ``extract={qc: ...}``). Returns the ``CohortResult``."""
        from histolight.features import extract_features

        return extract_features(extractor, options.pop("tfrecords", None), outdir, dataset=self, **options)


#: Slideflow's ``val_strategy`` names for :meth:`SlideflowDataset.split` methods
_SPLIT_ALIASES = {"fixed": "random", "k-fold": "kfold"}


class WSI:
    """Slideflow's ``sf.WSI(path, tile_px, tile_um, rois=...)`` for the calls that need one slide with a tile
    geometry: :meth:`get_tile_dataframe`. It answers the three cohort questions the native
    :func:`histolight.extract.get_tile_dataframe` asks (``names``, ``open``, ``rois``), so that one function
    computes both the per-slide and the per-dataset tile tables.

    Args:
        path: the slide file. tile_px, tile_um: tile size in px and in um (or a magnification such as ``"10x"``).
        rois: an ROI file (Slideflow CSV or QuPath GeoJSON, coordinates in base px) or None.
        roi_method, roi_filter_method, stride_div, edge_tiles: as for :func:`histolight.extract.extract_tiles`.
        mpp: base um/px for a slide whose file does not record it. include_detections: see
            :func:`histolight.roi.read_rois`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tile_px: int,
        tile_um: Any,
        rois: str | os.PathLike | None = None,
        *,
        roi_method: str = "auto",
        roi_filter_method: Any = "center",
        stride_div: Any = 1,
        edge_tiles: bool = False,
        mpp: float | None = None,
        include_detections: bool = False,
    ):
        from histolight.wsi import Slide, slide_name

        self.path, self.name, self.mpp = Path(path), slide_name(path), mpp
        self.tile_px, self.tile_um = tile_px, tile_um
        self.roi_file = Path(rois) if rois is not None else None
        if self.roi_file is not None and not self.roi_file.is_file():
            raise ConfigError(f"rois={str(rois)!r} is not a file (expected a Slideflow ROI CSV or a QuPath GeoJSON)")
        self.options = dict(
            roi_method=roi_method, roi_filter_method=roi_filter_method, stride_div=stride_div, edge_tiles=edge_tiles
        )
        self.include_detections = include_detections
        with Slide(self.path, mpp=mpp) as s:  # fail here, not later, on a slide that cannot be opened
            self.dimensions = s.dimensions

    @property
    def names(self) -> list[str]:
        return [self.name]

    def open(self, name: str):
        """The slide, opened (a context manager)."""
        from histolight.wsi import Slide

        return Slide(self.path, mpp=self.mpp)

    def roi_path(self, name: str) -> Path | None:
        return self.roi_file

    def rois(self, name: str, slide_dims: tuple[int, int] | None = None) -> list:
        """The slide's ROIs in base px (clipped to ``slide_dims`` (w, h) if given); [] without an ROI file."""
        from histolight.roi import read_rois

        if self.roi_file is None:
            return []
        return read_rois(self.roi_file, slide_dims=slide_dims, include_detections=self.include_detections)

    def get_tile_dataframe(self):
        """The slide's tile grid after ROI filtering (no QC), indexed by tile id ``{slide}-{loc_x}-{loc_y}``, with
        ``loc_x, loc_y`` (tile centre, base px), ``grid_x, grid_y``, ``roi_name, roi_desc, label`` and ``slide``."""
        from histolight.extract import get_tile_dataframe

        return get_tile_dataframe(self, self.tile_px, self.tile_um, **self.options)

    def __repr__(self) -> str:
        return f"WSI({str(self.path)!r}, tile_px={self.tile_px}, tile_um={self.tile_um!r}, rois={self.roi_file})"
