"""Feature bags for MIL models: see :mod:`histolight.features.extractor` (extractors, layout, the cohort loop)."""

from histolight.features.extractor import FeatureExtractor, build_extractor, extract_features, load_bag, load_extractor

__all__ = ["FeatureExtractor", "build_extractor", "load_extractor", "extract_features", "load_bag"]
