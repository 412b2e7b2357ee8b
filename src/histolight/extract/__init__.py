"""Tile extraction: a cohort of WSIs -> one Slideflow-compatible TFRecord of tiles per slide.

Python API (``task=extract`` is a thin layer over it)::

    from histolight.extract import extract_tiles, get_tile_dataframe
    res = extract_tiles(dataset, tile_px=256, tile_um=128, outdir="tiles", qc=["otsu", "blur"])
    res.summary, res.tiles, res.report_path

Pieces: :mod:`~histolight.extract.grid` (tile grid in base px), :mod:`~histolight.extract.rois`
(ROI filtering and labels), :mod:`~histolight.extract.filters` (grayspace/whitespace),
:mod:`~histolight.extract.slide` (one slide -> TFRecord), :mod:`~histolight.extract.runner`
(cohort, workers, shards, resume), :mod:`~histolight.extract.report` (HTML report).
"""

from histolight.extract.config import ExtractConfig, load_extract_config, parse_tile_um, tile_dir_name
from histolight.extract.filters import grayspace_fraction, tile_reject_reason, whitespace_fraction
from histolight.extract.grid import TileGrid, make_grid, nearest_level
from histolight.extract.rois import ROIAssignment, assign_rois
from histolight.extract.runner import (
    ExtractionResult,
    SlideJob,
    extract_tiles,
    get_tile_dataframe,
    make_config,
    shard_slides,
)
from histolight.extract.slide import (
    REASONS,
    TABLE_COLUMNS,
    QCResult,
    SlidePlan,
    SlideResult,
    SlideSkipped,
    encode_tile,
    extract_slide,
    is_complete,
    plan_slide,
    run_qc,
)

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
    "SlideJob",
    "extract_tiles",
    "get_tile_dataframe",
    "make_config",
    "shard_slides",
    "REASONS",
    "TABLE_COLUMNS",
    "QCResult",
    "SlidePlan",
    "SlideResult",
    "SlideSkipped",
    "encode_tile",
    "extract_slide",
    "is_complete",
    "plan_slide",
    "run_qc",
]
