"""``task=export_masks``: thumbnails + ROI masks for segmentation (``histolight.segment.data.export_cohort``).

    python run.py task=export_masks data=seg data.mode=multiclass data.mpp=4

Writes ``<slide>.npz`` + ``<slide>.json`` per slide (format: :mod:`histolight.segment.data`) into ``task.dest`` or, by
default, ``<data.cache_dir>/mpp<mpp>_<mode>_<hash of labels>``: the folder ``task=train_seg`` reads, so training
reuses the export. Up-to-date exports are skipped (reason ``exists``) unless ``task.overwrite=true``. One row per
slide in ``<run>/export_report.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from histolight.cohort import PerSlideOptions
from histolight.config import from_config
from histolight.errors import ConfigError
from histolight.tasks.common import load_dataset, opt_list, output_dir, select_slides


@dataclass
class ExportMasksTask(PerSlideOptions):
    """``conf/task/export_masks.yaml``."""

    name: str = "export_masks"
    dest: str | None = None
    overwrite: bool = False
    slides: Any = None

    def __post_init__(self):
        super().__post_init__()
        self.slides = opt_list("slides", self.slides)


def run(cfg: DictConfig) -> dict:
    from histolight.segment.config import config_from_hydra
    from histolight.segment.data import export_cohort, export_key

    t = from_config(ExportMasksTask, cfg.task, "task")
    scfg = config_from_hydra(cfg, need_model=False)
    if t.dest:
        dest = Path(t.dest)
    elif cfg.data.get("cache_dir"):
        dest = Path(cfg.data.cache_dir) / export_key(scfg.mpp, scfg.mode, scfg.labels)
    else:
        raise ConfigError("task.dest=None is invalid while data.cache_dir is unset: give one of them")
    ds = load_dataset(cfg)
    res = export_cohort(
        ds,
        scfg.mpp,
        dest,
        labels=scfg.labels,
        mode=scfg.mode,
        overwrite=t.overwrite,
        slides=select_slides(ds, t.slides),
        workers=t.workers,
        report_dir=output_dir(cfg),
    )
    print(f"export_masks ({scfg.mode}, labels {scfg.labels}, {scfg.mpp:g} um/px): {res.summary_line()} -> {dest}")
    return {**res.metrics(), "dest": str(dest)}
