"""Validated options of tile classifiers: ``data`` (conf/data/tiles.yaml) and ``model`` (conf/model/timm_*.yaml);
the tasks' ``task`` sections have their schemas in their task modules.

Mistakes fail at startup with the key, the value and what is allowed, e.g.
``invalid config 'data': label_source='rio' is invalid: must be one of roi, slide, table``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from histolight.classify.data import check_on_corrupt
from histolight.classify.labels import LABEL_SOURCES
from histolight.classify.splits import BALANCE_METHODS
from histolight.config.schema import check, check_labels, is_pos_int
from histolight.errors import ConfigError
from histolight.training.augment import DEFAULTS as AUGMENT_DEFAULTS
from histolight.training.augment import validate_augment
from histolight.training.normalize import check_mean_std
from histolight.training.optim import check_optim
from histolight.training.splits import SPLIT_METHODS


def _bool(key: str, v: Any) -> None:
    check(isinstance(v, bool), key, v, "must be true or false")


def _nonneg_int(key: str, v: Any) -> None:
    check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, key, v, "must be an integer >= 0")


@dataclass
class SplitConfig:
    """``data.split``: how patients are divided into train/val/test."""

    method: str = "annotations"
    column: str = "split"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    k: int = 5
    fold: int = 0
    seed: int = 0

    def __post_init__(self):
        check(self.method in SPLIT_METHODS, "split.method", self.method, f"must be one of {', '.join(SPLIT_METHODS)}")
        for k in ("val_fraction", "test_fraction"):
            v = getattr(self, k)
            check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                f"split.{k}",
                v,
                "must be a fraction in [0, 1)",
            )
        check(
            self.val_fraction + self.test_fraction < 1,
            "split.val_fraction+test_fraction",
            self.val_fraction + self.test_fraction,
            "must leave patients for training (< 1)",
        )
        check(is_pos_int(self.k) and self.k >= 2, "split.k", self.k, "must be an integer >= 2 (number of folds)")
        check(
            isinstance(self.fold, int) and not isinstance(self.fold, bool) and 0 <= self.fold < self.k,
            "split.fold",
            self.fold,
            f"must be an integer in 0..{self.k - 1} (k={self.k})",
        )
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "split.seed", self.seed, "must be an integer")


@dataclass
class TileDataConfig:
    """``data`` for tile classifiers (conf/data/tiles.yaml)."""

    tile_px: int = 128
    tile_um: Any = 64
    tiles_root: str = "tiles"
    tfrecords: Any = None
    extract: bool = True
    extract_options: dict = field(default_factory=dict)
    label_source: str = "roi"
    label_column: str = "label"
    label_table: str | None = None
    labels: list[str] | None = None
    split: Any = None
    allow_patient_leakage: bool = False
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 2
    streaming: bool = False
    shuffle_buffer: int = 1024
    balance: str = "tile"
    samples_per_epoch: int | None = None
    augment: Any = field(default_factory=lambda: dict(AUGMENT_DEFAULTS))
    normalize: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int | None = None
    verify: bool = True
    on_corrupt: str = "fail"

    def __post_init__(self):
        from histolight.units import parse_tile_um

        check(
            is_pos_int(self.tile_px) and self.tile_px >= 8,
            "tile_px",
            self.tile_px,
            "must be an integer >= 8 (tile side in pixels, e.g. 128)",
        )
        parse_tile_um(self.tile_um)
        check(
            isinstance(self.tiles_root, str) and self.tiles_root.strip() != "",
            "tiles_root",
            self.tiles_root,
            "must be a folder (tiles go to <tiles_root>/<dataset.name>/<tile_px>px_<tile_um>um, as for task=extract)",
        )
        check(
            self.tfrecords is None or isinstance(self.tfrecords, (str, list)),
            "tfrecords",
            self.tfrecords,
            "must be null (use tiles_root) or a folder / glob / list of .tfrecords files",
        )
        _bool("extract", self.extract)
        check(
            isinstance(self.extract_options, dict),
            "extract_options",
            self.extract_options,
            "must be a mapping of histolight.extract options (roi_method, roi_filter_method, qc, ...)",
        )
        bad = {"tile_px", "tile_um", "outdir", "name"} & set(self.extract_options)
        check(
            not bad,
            "extract_options",
            self.extract_options,
            f"must not set {sorted(bad)} (use data.tile_px / data.tile_um / data.tiles_root)",
        )
        check(
            self.label_source in LABEL_SOURCES,
            "label_source",
            self.label_source,
            f"must be one of {', '.join(LABEL_SOURCES)} (roi: tile label = its ROI's label; slide: the slide's "
            "annotation in label_column; table: tile id -> label from label_table)",
        )
        check(
            isinstance(self.label_column, str) and self.label_column != "",
            "label_column",
            self.label_column,
            "must be a column name",
        )
        check(
            self.label_source != "table" or isinstance(self.label_table, str),
            "label_table",
            self.label_table,
            "must be a CSV/Parquet path when label_source=table",
        )
        self.labels = check_labels("labels", self.labels, min_len=2)
        self.split = SplitConfig(**(self.split or {})) if not isinstance(self.split, SplitConfig) else self.split
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "must be an integer >= 1")
        check(
            self.eval_batch_size is None or is_pos_int(self.eval_batch_size),
            "eval_batch_size",
            self.eval_batch_size,
            "must be null or an integer >= 1",
        )
        _nonneg_int("num_workers", self.num_workers)
        _bool("streaming", self.streaming)
        check(is_pos_int(self.shuffle_buffer), "shuffle_buffer", self.shuffle_buffer, "must be an integer >= 1")
        check(
            self.balance in BALANCE_METHODS,
            "balance",
            self.balance,
            f"must be one of {', '.join(BALANCE_METHODS)} (weighted sampling by class over tiles or over slides)",
        )
        check(
            self.samples_per_epoch is None or is_pos_int(self.samples_per_epoch),
            "samples_per_epoch",
            self.samples_per_epoch,
            "must be null (= number of training tiles) or an integer >= 1",
        )
        self.augment = validate_augment(self.augment, prefix="augment")
        for k in ("normalize", "allow_patient_leakage", "pin_memory", "persistent_workers", "verify"):
            _bool(k, getattr(self, k))
        check_on_corrupt(self.on_corrupt)
        check_mean_std(self.mean, self.std, prefix="data")
        check(
            self.prefetch_factor is None or is_pos_int(self.prefetch_factor),
            "prefetch_factor",
            self.prefetch_factor,
            "must be null or an integer >= 1",
        )


@dataclass
class TimmModelConfig:
    """``model`` for tile classifiers (conf/model/timm_*.yaml)."""

    name: str = "resnet18"
    pretrained: bool = False
    checkpoint_path: str | None = None
    drop_rate: float = 0.0
    freeze: Any = None
    label_smoothing: float = 0.0
    optimizer: dict | None = None
    scheduler: dict | None = None
    scheduler_interval: str = "epoch"
    warmup_epochs: int = 0
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        from histolight.classify.module import check_timm_name

        try:
            check_timm_name(self.name)
        except ConfigError as e:
            raise ValueError(str(e).replace("model.name", "name")) from None
        _bool("pretrained", self.pretrained)
        check(
            self.checkpoint_path is None or isinstance(self.checkpoint_path, str),
            "checkpoint_path",
            self.checkpoint_path,
            "must be null or a local weights file (.pth/.pt/.safetensors/.ckpt)",
        )
        for k, hi in (("drop_rate", 1.0), ("label_smoothing", 1.0)):
            v = getattr(self, k)
            check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < hi and math.isfinite(v),
                k,
                v,
                "must be a number in [0, 1)",
            )
        check(
            self.freeze in (None, "none", "backbone")
            or (isinstance(self.freeze, list) and all(isinstance(p, str) for p in self.freeze)),
            "freeze",
            self.freeze,
            "must be null, 'backbone' (train the head only) or a list of parameter-name prefixes",
        )
        self.optimizer, self.scheduler = check_optim(self.optimizer, self.scheduler, self.scheduler_interval, self.warmup_epochs)
        check(
            isinstance(self.model_kwargs, dict),
            "model_kwargs",
            self.model_kwargs,
            "must be a mapping of extra timm.create_model arguments",
        )


__all__ = ["SplitConfig", "TileDataConfig", "TimmModelConfig"]
