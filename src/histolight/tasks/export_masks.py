"""``task=export_masks``: thumbnails + ROI masks for segmentation (``histolight.segment.data.export_cohort``).

    python run.py task=export_masks                                        # data=seg defaults: binary, 20 um/px
    python run.py task=export_masks data=seg data.mode=multiclass data.mpp=4  # labels: dataset.labels

Writes ``<slide>.npz`` + ``<slide>.json`` per slide (format: :mod:`histolight.segment.data`) into ``task.dest`` or, by
default, ``<data.cache_dir>/mpp<mpp>_<mode>_<hash of labels>``: the folder ``task=train_seg`` reads, so training
reuses the export. ``task.mask_layout=channels`` writes multiclass masks as one 0/1 channel per label ``(N, H, W)``
(Slideflow's documented layout) instead of the compact class-index map (``index``, the default). Up-to-date exports are skipped (reason ``exists``) unless ``task.overwrite=true``. One row per
slide in ``<run>/export_report.csv``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from histolight.cohort import PerSlideOptions
from histolight.config import from_config
from histolight.config.schema import check
from histolight.errors import ConfigError
from histolight.tasks.common import load_dataset, opt_list, output_dir, select_slides

log = logging.getLogger(__name__)


@dataclass
class ExportMasksTask(PerSlideOptions):
    """``conf/task/export_masks.yaml``."""

    name: str = "export_masks"
    dest: str | None = None
    overwrite: bool = False
    slides: Any = None
    mask_layout: str = "index"

    def __post_init__(self):
        super().__post_init__()
        self.slides = opt_list("slides", self.slides)
        check(self.mask_layout in ("index", "channels"), "mask_layout", self.mask_layout, "must be index or channels")


def with_data_defaults(cfg: DictConfig) -> None:
    """Fill in what ``task=export_masks`` needs and the command line left out: the ``data`` group (``data=seg``: its
    mode, mpp and cache folder) and, for multiclass / multilabel masks, ``data.labels`` from ``dataset.labels``."""
    from histolight.config.files import group_option

    with open_dict(cfg):
        if cfg.get("data") is None:
            cfg.data = group_option("data", "seg")
            log.info("no data group given: using data=seg (%s masks at %s um/px)", cfg.data.mode, cfg.data.mpp)
        labels = OmegaConf.select(cfg, "dataset.labels")
        if cfg.data.get("mode") != "binary" and cfg.data.get("labels") is None and labels:
            cfg.data.labels = list(labels)
            log.info("data.labels=null: using the cohort's labels %s (dataset.labels)", list(labels))


def run(cfg: DictConfig) -> dict:
    from histolight.segment.config import config_from_hydra
    from histolight.segment.data import export_cohort, export_key

    t = from_config(ExportMasksTask, cfg.task, "task")
    with_data_defaults(cfg)
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
        mask_layout=t.mask_layout,
    )
    layout = (
        "one channel per label (N, H, W)" if t.mask_layout == "channels" or scfg.mode == "multilabel" else "class index (H, W)"
    )
    print(
        f"export_masks ({scfg.mode}, labels {scfg.labels}, {scfg.mpp:g} um/px, masks: {layout}): {res.summary_line()} -> {dest}"
    )
    return {**res.metrics(), "dest": str(dest), "mask_layout": t.mask_layout}
