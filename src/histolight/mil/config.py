"""Validated options of slide-level (MIL) models: ``data`` (conf/data/bags.yaml) and ``model``
(conf/model/mil_*.yaml). Mistakes fail at startup naming the key, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from histolight.config.schema import check, check_labels, from_config, is_pos_int
from histolight.errors import ConfigError
from histolight.mil.models import MODELS
from histolight.training.optim import check_optim
from histolight.training.options import CheckpointOptions
from histolight.training.splits import SPLIT_METHODS

LEVELS = ("slide", "patient")


@dataclass
class BagSplitConfig:
    """``data.split``: patient-level splits (:mod:`histolight.training.splits`).

    ``kfold`` trains one model per fold in ``folds`` (null = every fold ``0..k-1``); the other methods train one.
    """

    method: str = "kfold"
    column: str = "split"
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    k: int = 5
    folds: list[int] | None = None
    seed: int = 0

    def __post_init__(self):
        check(self.method in SPLIT_METHODS, "split.method", self.method, f"must be one of {', '.join(SPLIT_METHODS)}")
        for k in ("val_fraction", "test_fraction"):
            v = getattr(self, k)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
            check(ok, f"split.{k}", v, "must be a fraction in [0, 1)")
        check(is_pos_int(self.k) and self.k >= 2, "split.k", self.k, "must be an integer >= 2 (number of folds)")
        if self.folds is not None:
            self.folds = list(self.folds)
            ok = all(isinstance(f, int) and not isinstance(f, bool) and 0 <= f < self.k for f in self.folds)
            check(
                ok and len(set(self.folds)) == len(self.folds) > 0,
                "split.folds",
                self.folds,
                f"null or distinct folds in 0..{self.k - 1}",
            )
        check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "split.seed", self.seed, "must be an integer")

    def fold_list(self) -> list[int | None]:
        """The folds to train (``[None]``: one split, not k-fold)."""
        if self.method != "kfold":
            return [None]
        return list(self.folds) if self.folds is not None else list(range(self.k))


@dataclass
class BagDataConfig:
    """``data`` of MIL training (conf/data/bags.yaml); see that file for each key."""

    bags: str = "???"
    annotations: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None
    level: str = "slide"
    max_tiles: int | None = 512
    batch_size: int = 1
    eval_batch_size: int = 1
    num_workers: int = 0
    balance: bool = True
    allow_patient_leakage: bool = False
    split: BagSplitConfig = field(default_factory=BagSplitConfig)

    def __post_init__(self):
        check(
            isinstance(self.bags, str) and self.bags not in ("", "???"),
            "bags",
            self.bags,
            "must be the folder of the feature bags",
        )
        check(
            isinstance(self.annotations, str) and self.annotations != "",
            "annotations",
            self.annotations,
            "must be a CSV/Parquet table with slide, patient and the label column (e.g. ${dataset.annotations})",
        )
        check(isinstance(self.label_column, str) and self.label_column != "", "label_column", self.label_column, "a column name")
        self.labels = check_labels("labels", self.labels, min_len=2)
        check(self.level in LEVELS, "level", self.level, f"must be one of {list(LEVELS)}")
        check(self.max_tiles is None or is_pos_int(self.max_tiles), "max_tiles", self.max_tiles, "null (all) or an integer > 0")
        for k in ("batch_size", "eval_batch_size"):
            check(is_pos_int(getattr(self, k)), k, getattr(self, k), "must be an integer > 0 (bags per batch)")
        ok = isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool) and self.num_workers >= 0
        check(ok, "num_workers", self.num_workers, "must be an integer >= 0")
        for k in ("balance", "allow_patient_leakage"):
            check(isinstance(getattr(self, k), bool), k, getattr(self, k), "must be true or false")
        if isinstance(self.split, dict):
            try:
                self.split = BagSplitConfig(**self.split)
            except TypeError as e:
                raise ConfigError(f"invalid config 'data.split': {e}") from None


@dataclass
class MILModelConfig:
    """``model`` of MIL training (conf/model/mil_*.yaml)."""

    name: str = "attention_mil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    label_smoothing: float = 0.0
    optimizer: Any = None
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    warmup_epochs: int = 0

    def __post_init__(self):
        check(self.name in MODELS, "name", self.name, f"must be one of {sorted(MODELS)}")
        check(isinstance(self.model_kwargs, dict), "model_kwargs", self.model_kwargs, "must be a mapping of model options")
        ok = isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1
        check(ok, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        self.optimizer, self.scheduler = check_optim(self.optimizer, self.scheduler, self.scheduler_interval, self.warmup_epochs)


@dataclass
class TrainMILTask(CheckpointOptions):
    """``task`` of ``task=train_mil`` (conf/task/train_mil.yaml)."""

    name: str = "train_mil"
    demo_labels: float | None = None
    build_bags: Any = None
    attention_examples: int = 4
    roi_label: str | None = None
    evidence_class: str | None = None

    def __post_init__(self):
        super().__post_init__()
        ok = self.demo_labels is None or (isinstance(self.demo_labels, float) and 0 < self.demo_labels < 1)
        check(
            ok, "demo_labels", self.demo_labels, "null or the necrosis fraction (0-1) above which a demo slide is high_necrosis"
        )
        ok = isinstance(self.attention_examples, int) and not isinstance(self.attention_examples, bool)
        check(ok and self.attention_examples >= 0, "attention_examples", self.attention_examples, "an integer >= 0")
        for key in ("roi_label", "evidence_class"):
            value = getattr(self, key)
            check(value is None or (isinstance(value, str) and value != ""), key, value, "null or a label name")
        if self.build_bags is not None:
            from histolight.features.config import FeaturesTaskConfig

            check(isinstance(self.build_bags, dict), "build_bags", self.build_bags, "null or task=features options")
            from_config(FeaturesTaskConfig, self.build_bags, "task.build_bags")


__all__ = ["LEVELS", "BagSplitConfig", "BagDataConfig", "MILModelConfig", "TrainMILTask"]
