"""ROIs: labelled polygons in base px, read/written as Slideflow CSV and QuPath GeoJSON."""

from histolight.roi.core import (
    DETECTION_TYPES,
    ROI,
    ROI_EXTENSIONS,
    clean_geometry,
    clip_to_slide,
    log_repairs,
    nest_holes,
    rasterize_rois,
    read_csv_rois,
    read_geojson_rois,
    read_rois,
    rois_to_csv,
    rois_to_geojson,
    write_csv_rois,
    write_geojson_rois,
    write_rois,
)

__all__ = [
    "DETECTION_TYPES",
    "ROI",
    "ROI_EXTENSIONS",
    "clean_geometry",
    "clip_to_slide",
    "log_repairs",
    "nest_holes",
    "rasterize_rois",
    "read_csv_rois",
    "read_geojson_rois",
    "read_rois",
    "rois_to_csv",
    "rois_to_geojson",
    "write_csv_rois",
    "write_geojson_rois",
    "write_rois",
]
