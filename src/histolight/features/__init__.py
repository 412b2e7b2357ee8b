"""Feature extraction: tiles -> feature vectors -> per-slide feature bags for MIL (Slideflow's API and layout).

- :func:`list_extractors`, :func:`build_feature_extractor` (alias ``build_extractor``): the registry
  (:mod:`histolight.features.registry`); weights only from local files, strictly (:mod:`histolight.features.weights`).
- :class:`FeatureExtractor`: ``ext(batch)``, ``ext('x.tfrecords')``, ``ext(slide)``, ``ext.transform``.
- :func:`extract_features` (the cohort loop, TFRecords or slides), :class:`DatasetFeatures`, :func:`rebuild_extractor`,
  :func:`load_bag` (:mod:`histolight.features.bags`).
"""

from histolight.features.bags import DatasetFeatures, extract_features, load_bag, rebuild_extractor
from histolight.features.extractor import FeatureExtractor
from histolight.features.registry import build_extractor, build_feature_extractor, list_extractors

__all__ = [
    "FeatureExtractor",
    "list_extractors",
    "build_feature_extractor",
    "build_extractor",
    "extract_features",
    "DatasetFeatures",
    "rebuild_extractor",
    "load_bag",
]
