"""Schemas of the segmentation tasks' ``task`` sections and helpers shared by the Hydra tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolight.config.schema import check, is_pos_int

log = logging.getLogger(__name__)


def _opt_list(key: str, v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    check(isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), key, v, "must be null, a name or a list of names")
    return list(v)


def _area(key: str, v: Any) -> None:
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, key, v, "must be an area >= 0 in mm^2")


@dataclass
class ExportMasksTask:
    name: str = "export_masks"
    dest: str | None = None
    overwrite: bool = False
    slides: Any = None

    def __post_init__(self):
        self.slides = _opt_list("slides", self.slides)


@dataclass
class TrainSegTask:
    name: str = "train_seg"
    monitor: str = "val/miou"
    monitor_mode: str = "max"
    overwrite: bool = False
    n_overlays: int = 3
    overlay_every: int = 5

    def __post_init__(self):
        check(self.monitor_mode in ("min", "max"), "monitor_mode", self.monitor_mode, "must be min or max")
        check(isinstance(self.n_overlays, int) and self.n_overlays >= 0, "n_overlays", self.n_overlays, "must be an integer >= 0")
        check(
            isinstance(self.overlay_every, int) and self.overlay_every >= 0,
            "overlay_every",
            self.overlay_every,
            "must be an integer >= 0 (0 = never)",
        )


@dataclass
class RoiOptions:
    min_area_mm2: float = 0.01
    min_hole_mm2: float | None = None
    simplify_tolerance: float | None = None

    def _check_roi(self):
        _area("min_area_mm2", self.min_area_mm2)
        if self.min_hole_mm2 is not None:
            _area("min_hole_mm2", self.min_hole_mm2)
        check(
            self.simplify_tolerance is None
            or (isinstance(self.simplify_tolerance, (int, float)) and self.simplify_tolerance >= 0),
            "simplify_tolerance",
            self.simplify_tolerance,
            "must be null (half a mask pixel) or a tolerance >= 0 in base px",
        )


@dataclass
class SegmentTask(RoiOptions):
    name: str = "segment"
    model: str | None = None
    slides: Any = None
    split: Any = None
    output: str = "labels"
    overlay: bool = True
    rois: bool = True
    roi_formats: list = field(default_factory=lambda: ["csv", "geojson"])
    device: str | None = None
    strip_px: int | None = None

    def __post_init__(self):
        check(
            isinstance(self.model, str) and self.model not in ("", "???"),
            "model",
            self.model,
            "must be a trained model folder (task.model=outputs/<run>), e.g. from experiment=seg_multiclass",
        )
        check(Path(self.model).exists(), "model", self.model, "does not exist")
        self.slides = _opt_list("slides", self.slides)
        self.split = _opt_list("split", self.split)
        check(self.output in ("labels", "proba"), "output", self.output, "must be labels or proba")
        self.roi_formats = _opt_list("roi_formats", self.roi_formats) or []
        for f in self.roi_formats:
            check(f in ("csv", "geojson"), "roi_formats", self.roi_formats, "entries must be csv or geojson")
        check(self.strip_px is None or is_pos_int(self.strip_px), "strip_px", self.strip_px, "must be null or a positive integer")
        self._check_roi()


@dataclass
class GenerateRoisTask(RoiOptions):
    name: str = "generate_rois"
    model: str | None = None
    dest: str | None = None
    overwrite: bool = False
    formats: list = field(default_factory=lambda: ["csv", "geojson"])
    slides: Any = None
    split: Any = None
    device: str | None = None

    def __post_init__(self):
        check(
            isinstance(self.model, str) and self.model not in ("", "???"),
            "model",
            self.model,
            "must be a trained model folder (task.model=outputs/<run>)",
        )
        check(Path(self.model).exists(), "model", self.model, "does not exist")
        self.formats = _opt_list("formats", self.formats) or []
        check(
            bool(self.formats) and all(f in ("csv", "geojson") for f in self.formats),
            "formats",
            self.formats,
            "must list csv and/or geojson",
        )
        self.slides = _opt_list("slides", self.slides)
        self.split = _opt_list("split", self.split)
        self._check_roi()


def select_slides(ds, slides: list[str] | None, split: list[str] | None) -> list[str]:
    """Slide names of ``ds`` restricted to ``slides`` and/or annotation ``split`` values."""
    from histolight.errors import ConfigError

    names = ds.names
    if slides:
        unknown = [s for s in slides if s not in names]
        if unknown:
            raise ConfigError(f"task.slides: {unknown} are not in the cohort ({len(names)} slides)")
        names = [n for n in names if n in slides]
    if split:
        names = [n for n in ds.filter(split=split).names if n in names]
    return names


def wandb_sweep_settings(cfg) -> dict:
    """W&B ``group``/``name`` for the runs of a Hydra multirun, so a sweep's runs sit together.

    Returns ``{}`` outside a multirun or when the user set them.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return {}
        sweep_dir = Path(str(hc.sweep.dir))
        out = {"group": f"{cfg.task.name}-{sweep_dir.parent.name}-{sweep_dir.name}"}
        name = hc.job.override_dirname
        if name:
            out["name"] = f"{hc.job.num}:{name}"
        return out
    except Exception:  # noqa: BLE001 - never fail over naming
        return {}
