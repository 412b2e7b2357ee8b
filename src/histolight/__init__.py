"""histolight: whole-slide images and annotations to trained models."""

import histolight.compat.slideflow  # noqa: F401 - registers the Slideflow-named aliases (qc='both')
from histolight.errors import ConfigError, HistolightError, MissingMPPError, ROIError, SlideError

__version__ = "0.1.0"

__all__ = ["HistolightError", "SlideError", "MissingMPPError", "ROIError", "ConfigError", "__version__"]
