"""``task=features``: per-slide feature bags from TFRecords with a trained classifier or a timm backbone.

    python run.py task=features task.model=outputs/<run>/model            # the tiles task=extract wrote
    python run.py task=features task.model=resnet18 task.tile_px=256 task.tile_um=128 [task.workers=2]

Tiles: ``task.tfrecords``, or by default the tile folder ``<tiles_root>/<dataset.name>/<px>px_<um>um`` of the model's
geometry (a trained classifier's own; ``task.tile_px``/``task.tile_um`` for a timm backbone). Bags and the per-slide
``summary.csv`` go to ``task.outdir`` (layout: :mod:`histolight.features.extractor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from histolight.cohort import PerSlideOptions
from histolight.config.schema import check, from_config, is_pos_int
from histolight.tasks.common import dataset_config
from histolight.units import parse_tile_um


@dataclass
class FeaturesTaskConfig(PerSlideOptions):
    """``conf/task/features.yaml``."""

    outdir: str | None = None
    tfrecords: Any = None
    tiles_root: str | None = None
    model: str = "resnet18"
    checkpoint_path: str | None = None
    tile_px: int | None = None
    tile_um: Any = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    overwrite: bool = False
    name: str = "features"

    def __post_init__(self):
        super().__post_init__()
        hint = (
            "a trained classifier (model folder of task=train_tiles, its config JSON or a .ckpt) or a timm name (e.g. resnet18)"
        )
        check(isinstance(self.model, str) and self.model != "", "model", self.model, f"must be {hint}")
        check(isinstance(self.outdir, str) and self.outdir != "", "outdir", self.outdir, "must be the folder of the bags")
        check(self.tfrecords not in ("", []), "tfrecords", self.tfrecords, "null, a folder, a glob or a list of files")
        check(self.tfrecords is not None or bool(self.tiles_root), "tiles_root", self.tiles_root, "a folder when tfrecords=null")
        check(self.tile_px is None or is_pos_int(self.tile_px), "tile_px", self.tile_px, "null or a positive integer (px)")
        if self.tile_um is not None:
            parse_tile_um(self.tile_um)
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "a positive integer")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")


def run(cfg: DictConfig) -> dict:
    from histolight.features.extractor import default_tiles, extract_features, load_extractor
    from histolight.utils.device import resolve_device

    t = from_config(FeaturesTaskConfig, cfg.task, "task")
    norm = OmegaConf.to_container(cfg.normalizer, resolve=True) if cfg.get("normalizer") is not None else None
    spec = {"model": t.model, "checkpoint_path": t.checkpoint_path, "tile_px": t.tile_px, "normalizer": norm}
    device = resolve_device(t.device)
    ext = load_extractor(spec, device)  # validates the model before any work (and is reused in this process)
    src = t.tfrecords or default_tiles(ext, t.tiles_root, dataset_config(cfg).name, t.tile_px, t.tile_um)
    kw = {"batch_size": t.batch_size, "num_workers": t.num_workers, "overwrite": t.overwrite, "workers": t.workers}
    res = extract_features(spec, src, t.outdir, device=device, **kw)
    print(f"features (dim {ext.dim}) from {src}: {res.summary_line()} -> {t.outdir}")
    tiles = int(res.table["tiles"].fillna(0).sum()) if "tiles" in res.table else 0
    return {**res.metrics(), "n_tiles": tiles, "dim": ext.dim}
