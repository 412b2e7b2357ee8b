"""Tile extraction: a cohort of WSIs -> one Slideflow-compatible TFRecord of tiles per slide.

Python API (``task=extract`` is a thin layer over it)::

    from histolight.extract import extract_tiles, get_tile_dataframe
    res = extract_tiles(dataset, tile_px=256, tile_um=128, outdir="tiles", qc=["otsu", "blur"])
    res.summary, res.tiles, res.report_path      # in tiles/<dataset.name>/256px_128um/

Pieces: :mod:`~histolight.extract.config` (validated options, normalizer), :mod:`~histolight.extract.grid`
(tile grid in base px, reads through the slide's read plan), :mod:`~histolight.extract.rois` (ROI filtering and
labels), :mod:`~histolight.extract.filters` (grayspace/whitespace), :mod:`~histolight.extract.plan` (grid + ROI
mode + QC per slide, tile-table rows), :mod:`~histolight.extract.layout` (files of a tile folder, completeness,
per-slide summary), :mod:`~histolight.extract.slide` (one slide -> TFRecord: the per-tile loop),
:mod:`~histolight.extract.runner` (cohort on :func:`histolight.cohort.run_per_slide`: workers, shards, resume),
:mod:`~histolight.extract.report` (HTML report), :mod:`~histolight.extract.tfreport` (:func:`tfrecord_report`: a
report on any folder of TFRecords, HTML and PDF). QC masks are combined by :func:`histolight.qc.run_qc`.
"""

from histolight.extract.config import ExtractConfig, load_extract_config, parse_tile_um, tile_dir_name
from histolight.extract.filters import grayspace_fraction, tile_reject_reason, whitespace_fraction
from histolight.extract.grid import TileGrid, make_grid, nearest_level
from histolight.extract.layout import REASONS, SlideResult, is_complete
from histolight.extract.plan import TABLE_COLUMNS, SlidePlan, SlideSkipped, plan_slide
from histolight.extract.rois import ROIAssignment, assign_rois
from histolight.extract.runner import ExtractionResult, extract_tiles, get_tile_dataframe, make_config
from histolight.extract.slide import extract_slide
from histolight.extract.tfreport import html_to_pdf, tfrecord_report

__all__ = [
    "ExtractConfig",
    "load_extract_config",
    "parse_tile_um",
    "tile_dir_name",
    "grayspace_fraction",
    "whitespace_fraction",
    "tile_reject_reason",
    "TileGrid",
    "make_grid",
    "nearest_level",
    "ROIAssignment",
    "assign_rois",
    "ExtractionResult",
    "extract_tiles",
    "get_tile_dataframe",
    "make_config",
    "REASONS",
    "TABLE_COLUMNS",
    "SlidePlan",
    "SlideResult",
    "SlideSkipped",
    "extract_slide",
    "is_complete",
    "plan_slide",
    "tfrecord_report",
    "html_to_pdf",
]
