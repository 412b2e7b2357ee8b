"""Project exception types. Every error a user can cause derives from `HistolightError`."""

from __future__ import annotations


class HistolightError(Exception):
    """Base class for errors caused by user input (files, configs)."""


class SlideError(HistolightError):
    """A slide cannot be opened or read. Carries the path and the underlying reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read slide '{self.path}': {self.reason}")


class MissingMPPError(SlideError):
    """The slide has no microns-per-pixel and none was given."""

    def __init__(self, path):
        super().__init__(
            path,
            "no microns-per-pixel (mpp) in the file. Pass one with `mpp=<um/px>` "
            "(config: dataset.mpp_override=<um/px>, or an `mpp` column in the slide annotations CSV).",
        )


class ROIError(HistolightError):
    """An ROI file is malformed or holds invalid geometry."""


class ConfigError(HistolightError, ValueError):
    """A configuration value is invalid. Message names the key, the value and what is allowed."""
