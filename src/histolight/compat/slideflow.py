"""Slideflow-named facades, in one place, over histolight's native API.

Users coming from Slideflow call ``dataset.extract_tiles(tile_px=..., tile_um=...)``,
``dataset.get_tile_dataframe(...)``, ``dataset.generate_rois(model)`` and pass ``qc='both'``. Those names live
here and only forward to the native functions (:func:`histolight.extract.extract_tiles`,
:func:`histolight.extract.get_tile_dataframe`, :func:`histolight.segment.rois.generate_dataset_rois`, and the
QC registry's alias table), so the native API stays the one implementation.
"""

from __future__ import annotations

from typing import Any

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
