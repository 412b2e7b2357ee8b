"""Validated options of the tile-classifier tasks: ``data`` (conf/data/tiles.yaml), ``model``
(conf/model/timm_*.yaml), ``task`` (conf/task/train_tiles.yaml, conf/task/predict.yaml).

Mistakes fail at startup with the key, the value and what is allowed, e.g.
``invalid config 'data': label_source='rio' is invalid: must be one of roi, slide, table``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from histolight.classify.augment import check_mean_std, validate_augment
from histolight.classify.labels import LABEL_SOURCES
from histolight.classify.splits import BALANCE_METHODS, SPLIT_METHODS
from histolight.config.schema import check, check_labels, from_config, is_pos_int, to_dict
from histolight.errors import ConfigError


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
    tiles_dir: str = "tiles"
    tfrecords: Any = None
    extract: bool = True
    extract_options: dict = field(default_factory=dict)
    label_source: str = "roi"
    label_column: str = "label"
    label_table: str | None = None
    labels: list[str] | None = None
    split: Any = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 2
    streaming: bool = False
    shuffle_buffer: int = 1024
    balance: str = "tile"
    samples_per_epoch: int | None = None
    augment: dict | None = None
    normalize: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int | None = None
    verify_crc: bool = False

    def __post_init__(self):
        from histolight.extract.config import parse_tile_um

        check(
            is_pos_int(self.tile_px) and self.tile_px >= 8,
            "tile_px",
            self.tile_px,
            "must be an integer >= 8 (tile side in pixels, e.g. 128)",
        )
        parse_tile_um(self.tile_um)
        check(
            isinstance(self.tiles_dir, str) and self.tiles_dir.strip() != "",
            "tiles_dir",
            self.tiles_dir,
            "must be a folder (tiles go to <tiles_dir>/<tile_px>px_<tile_um>um)",
        )
        check(
            self.tfrecords is None or isinstance(self.tfrecords, (str, list)),
            "tfrecords",
            self.tfrecords,
            "must be null (use tiles_dir) or a folder / glob / list of .tfrecords files",
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
            f"must not set {sorted(bad)} (use data.tile_px / data.tile_um / data.tiles_dir)",
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
        self.augment = validate_augment(self.augment)
        for k in ("normalize", "pin_memory", "persistent_workers", "verify_crc"):
            _bool(k, getattr(self, k))
        check_mean_std(self.mean, self.std, prefix="data")
        check(
            self.prefetch_factor is None or is_pos_int(self.prefetch_factor),
            "prefetch_factor",
            self.prefetch_factor,
            "must be null or an integer >= 1",
        )

    @property
    def tile_dir_name(self) -> str:
        from histolight.extract.config import tile_dir_name

        return tile_dir_name(self.tile_px, self.tile_um)


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
        for k in ("optimizer", "scheduler"):
            v = getattr(self, k)
            if v is None and k == "scheduler":
                continue
            check(
                isinstance(v, dict) and "_target_" in v and v.get("_partial_") is True,
                k,
                v,
                "must be a Hydra node with _target_ and _partial_: true (e.g. torch.optim.AdamW)",
            )
        check(
            self.scheduler_interval in ("epoch", "step"),
            "scheduler_interval",
            self.scheduler_interval,
            "must be 'epoch' or 'step'",
        )
        check(
            isinstance(self.model_kwargs, dict),
            "model_kwargs",
            self.model_kwargs,
            "must be a mapping of extra timm.create_model arguments",
        )


@dataclass
class TrainTilesTaskConfig:
    """``task`` of ``task=train_tiles`` (conf/task/train_tiles.yaml)."""

    name: str = "train_tiles"
    monitor: str = "val/bal_acc"
    monitor_mode: str = "max"
    ckpt: str = "best"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    model_dir: str | None = None
    overwrite: bool = False
    slide_metrics: Any = "auto"

    def __post_init__(self):
        check(
            isinstance(self.monitor, str) and "/" in self.monitor,
            "monitor",
            self.monitor,
            "must be a logged metric such as val/bal_acc, val/loss, val/auroc",
        )
        check(self.monitor_mode in ("min", "max"), "monitor_mode", self.monitor_mode, "must be 'min' or 'max'")
        check(
            self.ckpt in ("best", "last"), "ckpt", self.ckpt, "must be 'best' or 'last' (the checkpoint evaluated and exported)"
        )
        check(
            isinstance(self.eval_splits, list) and set(self.eval_splits) <= {"val", "test"},
            "eval_splits",
            self.eval_splits,
            "must be a list drawn from [val, test]",
        )
        _bool("overwrite", self.overwrite)
        check(
            self.slide_metrics in ("auto", True, False),
            "slide_metrics",
            self.slide_metrics,
            "must be auto (on for label_source=slide), true or false",
        )


@dataclass
class PredictTaskConfig:
    """``task`` of ``task=predict`` (conf/task/predict.yaml)."""

    name: str = "predict"
    model: str | None = None
    tfrecords: Any = None
    tiles_dir: str | None = None
    slides: list[str] | None = None
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    heatmaps: bool = True
    heatmap_scale: int = 4
    label_source: str | None = None
    label_column: str = "label"
    label_table: str | None = None
    roi_filter_method: Any = "center"

    def __post_init__(self):
        check(
            isinstance(self.model, str) and self.model.strip() != "",
            "model",
            self.model,
            "must be a trained model: a folder with model_config.json (train_tiles writes <run>/model), "
            "the JSON file, or a .ckpt",
        )
        check(
            self.tfrecords is None or isinstance(self.tfrecords, (str, list)),
            "tfrecords",
            self.tfrecords,
            "must be null (the model's tile folder under tiles_dir) or a folder / glob / list of .tfrecords",
        )
        check(
            self.tfrecords is not None or isinstance(self.tiles_dir, str),
            "tiles_dir",
            self.tiles_dir,
            "must be a folder when tfrecords is null",
        )
        check(
            self.slides is None or isinstance(self.slides, list), "slides", self.slides, "must be null or a list of slide names"
        )
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "must be an integer >= 1")
        _nonneg_int("num_workers", self.num_workers)
        check(
            isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
            "device",
            self.device,
            "must be auto, cpu, cuda or cuda:<n>",
        )
        _bool("heatmaps", self.heatmaps)
        check(is_pos_int(self.heatmap_scale), "heatmap_scale", self.heatmap_scale, "must be an integer >= 1 (px per tile)")
        check(
            self.label_source is None or self.label_source in LABEL_SOURCES,
            "label_source",
            self.label_source,
            f"must be null (no evaluation) or one of {', '.join(LABEL_SOURCES)}",
        )
        from histolight.extract.config import parse_roi_filter_method

        self.roi_filter_method = parse_roi_filter_method(self.roi_filter_method)


def load_configs(cfg: Any) -> tuple[TrainTilesTaskConfig, TileDataConfig, TimmModelConfig]:
    """Validated ``task``, ``data`` and ``model`` sections of a train_tiles config (before any work)."""
    if cfg.get("data") is None:
        raise ConfigError("task=train_tiles needs a data config: add data=tiles (or experiment=tile_classifier)")
    if cfg.get("model") is None:
        raise ConfigError("task=train_tiles needs a model config: add model=timm_resnet18 (or experiment=tile_classifier)")
    task = from_config(TrainTilesTaskConfig, cfg.task, "task")
    data = from_config(TileDataConfig, cfg.data, "data")
    model = from_config(TimmModelConfig, cfg.model, "model")
    return task, data, model


__all__ = [
    "SplitConfig",
    "TileDataConfig",
    "TimmModelConfig",
    "TrainTilesTaskConfig",
    "PredictTaskConfig",
    "load_configs",
    "to_dict",
]
