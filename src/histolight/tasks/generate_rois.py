"""``task=generate_rois``: write ROIs predicted by a segmentation model (``Dataset.generate_rois``).

    python run.py task=generate_rois task.model=outputs/<run> task.dest=data/rois_pred

For each slide: ``<dest>/<slide>.csv`` (Slideflow) and ``<dest>/<slide>.geojson`` (QuPath), in base
px, labelled by class. ``dest`` defaults to the dataset's ROI folder; slides that already have ROIs
are skipped unless ``task.overwrite=true``. Failing slides are logged and skipped; the run folder
gets ``rois_report.csv``.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from histolight.config import from_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    from histolight.segment.tasks import GenerateRoisTask

    task = from_config(GenerateRoisTask, cfg.task, "task")
    import pandas as pd

    from histolight.io.atomic import atomic_write_text
    from histolight.segment.io import load_model_and_config
    from histolight.segment.tasks import select_slides
    from histolight.tasks.common import load_dataset, output_dir
    from histolight.tasks.segment import _auto_device

    ds = load_dataset(cfg)
    names = select_slides(ds, task.slides, task.split)
    model, _ = load_model_and_config(task.model, device=task.device or _auto_device())
    report = ds.generate_rois(
        model,
        dest=task.dest,
        overwrite=task.overwrite,
        formats=task.formats,
        slides=names,
        min_area_mm2=task.min_area_mm2,
        min_hole_mm2=task.min_hole_mm2,
        simplify_tolerance=task.simplify_tolerance,
    )
    df = pd.DataFrame(report, columns=["slide", "status", "n_rois", "labels", "files", "error"])
    atomic_write_text(output_dir(cfg) / "rois_report.csv", df.to_csv(index=False))
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    print(
        f"ROIs: {counts.get('written', 0)} written, {counts.get('skipped', 0)} skipped (already had ROIs), "
        f"{counts.get('failed', 0)} failed -> {task.dest or (ds.roi_dirs[0] if ds.roi_dirs else '-')}"
    )
    return {
        "n_slides": len(names),
        "n_written": int(counts.get("written", 0)),
        "n_skipped": int(counts.get("skipped", 0)),
        "n_failed": int(counts.get("failed", 0)),
    }
