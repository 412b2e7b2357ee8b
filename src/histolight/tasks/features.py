"""``task=features``: per-slide feature bags from TFRecords with a trained classifier or a timm backbone."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histolight.config.schema import check, from_config, is_pos_int
from histolight.errors import HistolightError

log = logging.getLogger(__name__)


@dataclass
class FeaturesTaskConfig:
    """``conf/task/features.yaml``."""

    tfrecords: Any
    outdir: str
    model: str = "resnet18"
    checkpoint_path: str | None = None
    tile_px: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    overwrite: bool = False
    name: str = "features"

    def __post_init__(self):
        check(
            self.tfrecords not in (None, ""),
            "tfrecords",
            self.tfrecords,
            "a folder of <slide>.tfrecords, a glob or a list of files",
        )
        check(
            isinstance(self.model, str) and self.model != "",
            "model",
            self.model,
            "a timm model name (e.g. resnet18) or a trained classifier (folder, model_config.json or .ckpt)",
        )
        check(self.tile_px is None or is_pos_int(self.tile_px), "tile_px", self.tile_px, "null or a positive integer (px)")
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "a positive integer")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check(
            self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"),
            "device",
            self.device,
            "auto, cpu, cuda or cuda:<n>",
        )


def run(cfg: DictConfig) -> dict:
    import torch

    from histolight.features import build_extractor, extract_features

    t = from_config(FeaturesTaskConfig, cfg.task, "task")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if t.device == "auto" else t.device
    ext = build_extractor(
        t.model, checkpoint_path=t.checkpoint_path, tile_px=t.tile_px, normalizer=cfg.get("normalizer"), device=device
    )
    summary = extract_features(
        ext, t.tfrecords, t.outdir, batch_size=t.batch_size, num_workers=t.num_workers, device=device, overwrite=t.overwrite
    )
    print(summary.to_string(index=False))
    n_failed = int((summary["status"] == "failed").sum())
    if len(summary) and n_failed == len(summary):
        raise HistolightError(f"every slide failed; see {t.outdir}/summary.csv")
    log.info("feature bags (dim %d) in %s", ext.dim, t.outdir)
    return {"slides": len(summary), "failed": n_failed, "tiles": int(summary["tiles"].sum()), "dim": ext.dim}
