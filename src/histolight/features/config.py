"""Validated options of ``task=features`` (conf/task/features.yaml); also the ``task.build_bags`` options of
``task=train_mil``. Mistakes fail at startup naming the key, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from histolight.classify.data import check_on_corrupt
from histolight.cohort import PerSlideOptions
from histolight.config.schema import check, is_pos_int
from histolight.units import parse_tile_um


@dataclass
class FeaturesTaskConfig(PerSlideOptions):
    """``conf/task/features.yaml``."""

    outdir: str | None = None
    source: str = "tfrecords"
    tfrecords: Any = None
    tiles_root: str | None = None
    model: str | None = None
    tile_px: int | None = None
    tile_um: Any = None
    qc: Any = field(default_factory=lambda: ["otsu"])
    extract: Any = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    overwrite: bool = False
    prefetch: bool = True
    verify: bool = True
    on_corrupt: str = "skip"
    shard_index: int = 0
    num_shards: int = 1
    name: str = "features"

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.outdir, str) and self.outdir != "", "outdir", self.outdir, "must be the folder of the bags")
        check(self.source in ("tfrecords", "slides"), "source", self.source, "tfrecords or slides")
        check(self.tfrecords not in ("", []), "tfrecords", self.tfrecords, "null, a folder, a glob or a list of files")
        check(
            self.source == "slides" or self.tfrecords is not None or bool(self.tiles_root),
            "tiles_root",
            self.tiles_root,
            "a folder when tfrecords=null",
        )
        check(self.tile_px is None or is_pos_int(self.tile_px), "tile_px", self.tile_px, "null or a positive integer (px)")
        if self.tile_um is not None:
            parse_tile_um(self.tile_um)
        check(self.extract is None or isinstance(self.extract, dict), "extract", self.extract, "null or task=extract options")
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "a positive integer")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check(is_pos_int(self.num_shards), "num_shards", self.num_shards, "an integer >= 1")
        check(isinstance(self.verify, bool), "verify", self.verify, "true (check TFRecord CRCs) or false")
        check_on_corrupt(self.on_corrupt, "on_corrupt")


__all__ = ["FeaturesTaskConfig"]
