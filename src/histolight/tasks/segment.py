"""``task=segment``: run a trained segmentation model over the cohort's slides.

    python run.py task=segment task.model=outputs/<run> [task.split=test] [task.output=proba] [task.workers=2]

Per slide, in ``<run>/segment/``: the prediction aligned to the slide, its ``.pred.json`` sidecar, an overlay PNG
and ROIs (format: :mod:`histolight.segment.outputs`). One row per slide in ``<run>/segment_report.csv``.
``task.out_mpp=<um/px>|base`` also writes the prediction at that resolution as a pyramidal TIFF (streamed);
``task.images=<files, wildcards or a CSV/TSV list>`` segments image files instead (``task.images_mpp``, else
assumed at the model's mpp; masks at the image size, :mod:`histolight.segment.images`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from histolight.config import from_config
from histolight.config.schema import check, is_pos_int, is_pos_num
from histolight.tasks.common import RoiOptions, check_model_path, load_dataset, opt_list, output_dir, resolve_model, select_slides


@dataclass
class SegmentTask(RoiOptions):
    """``conf/task/segment.yaml``."""

    name: str = "segment"
    model: str | None = None
    slides: Any = None
    split: Any = None
    output: str = "labels"
    overlay: bool = True
    rois: bool = True
    roi_formats: list = field(default_factory=lambda: ["csv", "geojson"])
    device: str = "auto"
    strip_px: int | None = None
    out_mpp: Any = None
    images: Any = None
    images_mpp: float | None = None

    def __post_init__(self):
        super().__post_init__()
        check_model_path(self.model, "a trained model folder (task.model=outputs/<run>), e.g. from experiment=seg_multiclass")
        self.slides, self.split = opt_list("slides", self.slides), opt_list("split", self.split)
        check(self.output in ("labels", "proba"), "output", self.output, "must be labels or proba")
        self.roi_formats = opt_list("roi_formats", self.roi_formats) or []
        check(all(f in ("csv", "geojson") for f in self.roi_formats), "roi_formats", self.roi_formats, "entries: csv, geojson")
        check(self.strip_px is None or is_pos_int(self.strip_px), "strip_px", self.strip_px, "must be null or an integer >= 1")
        ok = self.out_mpp is None or self.out_mpp == "base" or is_pos_num(self.out_mpp)
        check(ok, "out_mpp", self.out_mpp, "must be null, 'base' or a positive number of um/px")
        self.images = opt_list("images", self.images)
        check(self.images_mpp is None or is_pos_num(self.images_mpp), "images_mpp", self.images_mpp, "must be null or um/px > 0")


def run(cfg: DictConfig) -> dict:
    from histolight.segment.images import segment_images
    from histolight.segment.outputs import segment_slides

    t = from_config(SegmentTask, cfg.task, "task")
    t.model = resolve_model(t.model, "segment", "segment")
    out = output_dir(cfg)
    if t.images:  # image files instead of the dataset's slides; full-resolution masks at the image size by default
        run_on = functools.partial(segment_images, t.images, mpp=t.images_mpp, out_mpp=t.out_mpp or "base")
    else:
        ds = load_dataset(cfg)
        run_on = functools.partial(segment_slides, ds, slides=select_slides(ds, t.slides, t.split), out_mpp=t.out_mpp)
    res = run_on(
        model=t.model,
        out=out / "segment",
        output=t.output,
        overlay=t.overlay,
        rois=t.rois,
        roi_formats=t.roi_formats,
        strip_px=t.strip_px,
        roi_kwargs=t.roi_kwargs(),
        device=t.device,
        workers=t.workers,
        report_dir=out,
    )
    print(f"segment: {res.summary_line()} -> {out / 'segment'}")
    return res.metrics()
