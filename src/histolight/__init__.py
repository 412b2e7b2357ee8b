"""histolight: whole-slide images and annotations to trained models."""

from histolight.errors import ConfigError, HistolightError, MissingMPPError, ROIError, SlideError

__version__ = "0.1.0"

__all__ = ["HistolightError", "SlideError", "MissingMPPError", "ROIError", "ConfigError", "__version__"]
