"""``task=generate_rois``: write ROIs predicted by a segmentation model (``Dataset.generate_rois``).

    python run.py task=generate_rois task.model=outputs/<run> task.dest=data/rois_pred

For each slide: ``<dest>/<slide>.csv`` (Slideflow) and ``<dest>/<slide>.geojson`` (QuPath), in base px, labelled by
class. ``dest`` defaults to the dataset's ROI folder; slides that already have ROIs (in the dataset when writing
there, or any ROI file of the slide in ``dest``: a generated file never sits beside the user's) are skipped (reason
``exists``) unless ``task.overwrite=true`` (which replaces the slide's ROI files in ``dest``). One row per slide in
``<run>/rois_report.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from histolight.config import from_config
from histolight.config.schema import check
from histolight.tasks.common import RoiOptions, check_model_path, load_dataset, opt_list, output_dir, select_slides


@dataclass
class GenerateRoisTask(RoiOptions):
    """``conf/task/generate_rois.yaml``."""

    name: str = "generate_rois"
    model: str | None = None
    dest: str | None = None
    overwrite: bool = False
    formats: list = field(default_factory=lambda: ["csv", "geojson"])
    slides: Any = None
    split: Any = None
    device: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_model_path(self.model, "a trained model folder (task.model=outputs/<run>)")
        self.formats = opt_list("formats", self.formats) or []
        ok = bool(self.formats) and all(f in ("csv", "geojson") for f in self.formats)
        check(ok, "formats", self.formats, "must list csv and/or geojson")
        self.slides, self.split = opt_list("slides", self.slides), opt_list("split", self.split)


def run(cfg: DictConfig) -> dict:
    from histolight.segment.rois import generate_dataset_rois

    t = from_config(GenerateRoisTask, cfg.task, "task")
    ds = load_dataset(cfg)
    res = generate_dataset_rois(
        ds,
        t.model,
        dest=t.dest,
        overwrite=t.overwrite,
        formats=t.formats,
        slides=select_slides(ds, t.slides, t.split),
        device=t.device,
        workers=t.workers,
        report_dir=output_dir(cfg),
        **t.roi_kwargs(),
    )
    print(f"generate_rois: {res.summary_line()} -> {t.dest or ds.roi_dirs[0]}")
    return res.metrics()
