"""``SegmentConfig``: every setting of a whole-slide segmentation model, validated at startup.

One flat dataclass (like Slideflow's ``sf.segment.SegmentConfig``) used by the Python API and
saved with each trained model (the ``data`` and ``model`` sections of ``segment_config.json``, see
:mod:`histolight.training.artifacts`). Under Hydra it is assembled from the ``data`` group (what to segment
and how to sample and augment it: :mod:`histolight.training.augment`) and the ``model`` group (network, loss,
``_partial_`` optimizer / scheduler: :mod:`histolight.training.optim`) by :func:`config_from_hydra`, which
reports mistakes with their config path (``data.mode``, ``model.loss``) before any work starts.

Modes and output channels:

- ``binary``: one tissue type vs background; one output channel (``H x W`` probabilities).
  ``labels`` may be null (any ROI is foreground) or the ROI labels counted as foreground.
- ``multiclass``: background plus ``N = len(labels)`` mutually exclusive classes; ``N + 1``
  channels, channel 0 = background.
- ``multilabel``: ``N`` possibly overlapping labels; ``N`` channels, each independent.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any

from histolight.config.schema import check, check_labels, is_pos_int, is_pos_num, to_dict
from histolight.errors import ConfigError
from histolight.training.augment import DEFAULTS as AUGMENT_DEFAULTS
from histolight.training.augment import deprecated, upgrade_augment, validate_augment
from histolight.training.normalize import IMAGENET_MEAN, IMAGENET_STD, check_training_normalizer
from histolight.training.optim import check_optim, legacy_optim

MODES = ("binary", "multiclass", "multilabel")
LOSSES = ("ce", "bce", "dice", "jaccard", "focal")
INPUT_NORMS = ("auto", "dataset", "imagenet", "none")
#: segmentation's augmentation defaults (conf/data/seg.yaml): the shared schema of histolight.training.augment
DEFAULT_AUGMENT = {
    **AUGMENT_DEFAULTS,
    "stain": 0.1,
    "color_jitter": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.05, "hue": 0.05, "p": 0.5},
}
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-4}
DEFAULT_SCHEDULER = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}
#: string-form optimizer keys of configs written before the move to ``_partial_`` nodes (see SegmentConfig.from_dict)
LEGACY_OPTIM_KEYS = ("lr", "weight_decay", "scheduler_kwargs")

#: keys of the Hydra ``data`` group that are not part of the saved model config
DATA_ONLY_KEYS = ("cache_dir",)


def parse_loss(loss: Any) -> dict[str, float]:
    """``'ce+dice'``, ``'0.5*ce+dice'``, ``['ce', 'dice']`` or ``{'ce': 1, 'dice': 0.5}`` -> ``{name: weight}``."""
    if isinstance(loss, str):
        items = [p.strip() for p in loss.replace(" ", "").split("+") if p.strip()]
        out: dict[str, float] = {}
        for it in items:
            w = 1.0
            if "*" in it:
                ws, it = it.split("*", 1)
                try:
                    w = float(ws)
                except ValueError:
                    raise ValueError(
                        f"loss={loss!r} is invalid: cannot read the weight {ws!r} (write e.g. '0.5*dice+ce')"
                    ) from None
            out[it.lower()] = out.get(it.lower(), 0.0) + w
        return out
    if isinstance(loss, (list, tuple)):
        return {str(x).lower(): 1.0 for x in loss}
    if isinstance(loss, Mapping):
        return {str(k).lower(): float(v) for k, v in loss.items()}
    raise ValueError(f"loss={loss!r} is invalid: give a string like 'ce+dice', a list or a {{name: weight}} mapping")


@dataclass
class SegmentConfig:
    """Settings of a segmentation model (data sampling, network, loss, optimiser, inference).

    Units: ``mpp`` in um/px (resolution of thumbnails or patches, masks and inference); ``size`` in px at
    ``mpp`` (training crop side, a multiple of 32); ``infer_tile_px`` sets the px per inference (and validation)
    forward pass, ``infer_batch_size * infer_tile_px**2`` (null = ``size``), in tiles of at most ``size`` px (larger
    values batch more of them: same prediction, better use of CPUs and GPUs); ``edge_sigma`` in px at ``mpp``.

    Patch mode (``patches=true``, :mod:`histolight.segment.patches`): crops are read from the slides at ``mpp``
    instead of thumbnails; ``val_windows`` fixed validation windows of ``tile_px`` px per validation slide,
    colour statistics over ``stats_crops`` crops, and ``cache_patches`` > 0 pre-samples that many training
    patches into an HDF5 cache (:mod:`histolight.segment.patch_cache`) reused every epoch (0 = read on the fly).
    """

    # ---- what to segment (data group)
    mode: str = "binary"
    labels: list[str] | None = None
    mpp: float = 20.0
    size: int = 512
    # ---- sampling (data group)
    crops_per_epoch: int = 128
    batch_size: int = 8
    num_workers: int = 0
    fg_crop_prob: float = 0.5
    augment: Any = field(default_factory=lambda: dict(DEFAULT_AUGMENT))
    train_split: Any = "train"
    val_split: Any = "val"
    val_fraction: float = 0.2
    allow_patient_leakage: bool = False
    # ---- patch mode (data=seg_patches, histolight.segment.patches): crops read from the slides at mpp
    patches: bool = False
    val_windows: int = 16
    stats_crops: int = 64
    cache_patches: int = 0
    # ---- network (model group)
    arch: str = "Unet"
    encoder_name: str = "resnet34"
    encoder_weights: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    input_norm: str = "auto"
    # ---- optimisation (model group): Hydra _partial_ nodes (histolight.training.optim)
    optimizer: dict = field(default_factory=lambda: dict(DEFAULT_OPTIMIZER))
    scheduler: dict | None = field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    scheduler_interval: str = "epoch"
    warmup_epochs: int = 0
    loss: Any = "ce+dice"
    focal_gamma: float = 2.0
    edge_weight: float = 0.0
    edge_sigma: float = 3.0
    class_weights: list[float] | None = None
    # ---- inference (model group)
    threshold: float = 0.5
    overlap: float = 0.25
    infer_batch_size: int = 8
    infer_tile_px: int | None = None
    # ---- set by training / other groups
    epochs: int = 20
    normalizer: dict | None = None
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    # ---- deprecated spelling of ``augment`` (Python API)
    augmentation: InitVar[Any] = None

    def __post_init__(self, augmentation: Any = None):
        if augmentation is not None:
            deprecated("SegmentConfig(augmentation=...)", "augment=...")
            self.augment = augmentation
        check(self.mode in MODES, "mode", self.mode, f"must be one of {list(MODES)}")
        if self.mode == "binary":
            self.labels = check_labels("labels", self.labels)
        else:
            check(
                self.labels is not None,
                "labels",
                self.labels,
                f"mode '{self.mode}' needs a list of ROI labels, e.g. [tumor, stroma]",
            )
            self.labels = check_labels("labels", self.labels)
        check(is_pos_num(self.mpp), "mpp", self.mpp, "must be a positive number of microns per pixel (e.g. 20 for real slides)")
        self.mpp = float(self.mpp)
        check(
            is_pos_int(self.size) and self.size % 32 == 0 and self.size >= 32,
            "size",
            self.size,
            "must be a positive multiple of 32 px (crop and tile side at mpp)",
        )
        check(is_pos_int(self.crops_per_epoch), "crops_per_epoch", self.crops_per_epoch, "must be a positive integer")
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "must be a positive integer")
        check(
            isinstance(self.num_workers, int) and self.num_workers >= 0,
            "num_workers",
            self.num_workers,
            "must be an integer >= 0",
        )
        check(
            isinstance(self.fg_crop_prob, (int, float)) and 0 <= self.fg_crop_prob <= 1,
            "fg_crop_prob",
            self.fg_crop_prob,
            "must be a probability in [0, 1]",
        )
        check(
            isinstance(self.val_fraction, (int, float)) and 0 <= self.val_fraction < 1,
            "val_fraction",
            self.val_fraction,
            "must be in [0, 1)",
        )
        check(
            isinstance(self.allow_patient_leakage, bool),
            "allow_patient_leakage",
            self.allow_patient_leakage,
            "must be true or false",
        )
        check(
            isinstance(self.patches, bool), "patches", self.patches, "must be true (crops from the slides) or false (thumbnails)"
        )
        for key in ("val_windows", "stats_crops", "cache_patches"):
            v = getattr(self, key)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, key, v, "must be an integer >= 0")
        check(not self.patches or self.stats_crops > 0, "stats_crops", self.stats_crops, "must be > 0 with patches=true")
        self.augment = validate_augment(self.augment, prefix="augment")
        self._check_network()
        self.optimizer, self.scheduler = check_optim(self.optimizer, self.scheduler, self.scheduler_interval, self.warmup_epochs)
        terms = parse_loss(self.loss)
        check(bool(terms), "loss", self.loss, f"name at least one of {list(LOSSES)}")
        for name, w in terms.items():
            if name not in LOSSES:
                close = difflib.get_close_matches(name, LOSSES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                check(False, "loss", self.loss, f"unknown loss '{name}'{hint}; allowed {list(LOSSES)} and sums like 'ce+dice'")
            check(w > 0, "loss", self.loss, "term weights must be positive")
        check(
            not ("bce" in terms and self.mode == "multiclass"),
            "loss",
            self.loss,
            "'bce' is for binary/multilabel modes; use 'ce' for multiclass",
        )
        check(
            isinstance(self.focal_gamma, (int, float)) and self.focal_gamma >= 0, "focal_gamma", self.focal_gamma, "must be >= 0"
        )
        check(
            isinstance(self.edge_weight, (int, float)) and self.edge_weight >= 0,
            "edge_weight",
            self.edge_weight,
            "must be >= 0 (extra weight of pixels at mask edges; 0 = off)",
        )
        check(is_pos_num(self.edge_sigma), "edge_sigma", self.edge_sigma, "must be a positive distance in px at mpp")
        if self.class_weights is not None:
            n = self.n_classes
            check(
                isinstance(self.class_weights, (list, tuple))
                and len(self.class_weights) == n
                and all(is_pos_num(w) for w in self.class_weights),
                "class_weights",
                self.class_weights,
                f"must be null or {n} positive numbers ({', '.join(self.class_names)})",
            )
            self.class_weights = [float(w) for w in self.class_weights]
        check(
            isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1, "threshold", self.threshold, "must be in (0, 1)"
        )
        check(
            isinstance(self.overlap, (int, float)) and 0 <= self.overlap < 0.5,
            "overlap",
            self.overlap,
            "must be a fraction of the tile in [0, 0.5)",
        )
        check(is_pos_int(self.infer_batch_size), "infer_batch_size", self.infer_batch_size, "must be a positive integer")
        check(
            self.infer_tile_px is None or (is_pos_int(self.infer_tile_px) and self.infer_tile_px % 32 == 0),
            "infer_tile_px",
            self.infer_tile_px,
            "must be null (= size) or a positive multiple of 32 px",
        )
        check(is_pos_int(self.epochs), "epochs", self.epochs, "must be a positive integer")
        for key in ("input_mean", "input_std"):
            v = getattr(self, key)
            check(
                v is None or (isinstance(v, (list, tuple)) and len(v) == 3 and all(is_pos_num(x) or x == 0 for x in v)),
                key,
                v,
                "must be null or 3 numbers (RGB, in [0, 1] units)",
            )
            if v is not None:
                setattr(self, key, [float(x) for x in v])
        if self.normalizer is not None:
            check(
                isinstance(self.normalizer, Mapping), "normalizer", self.normalizer, "must be null or a normalizer config mapping"
            )
            self.normalizer = dict(self.normalizer)
            if self.normalizer.get("method") in (None, "none"):
                self.normalizer = None

    # ------------------------------------------------------------------ validation helpers
    def _check_network(self):
        import segmentation_models_pytorch as smp

        archs = {a.__name__.lower(): a.__name__ for a in smp._MODEL_ARCHITECTURES}
        check(
            isinstance(self.arch, str) and self.arch.lower() in archs,
            "arch",
            self.arch,
            f"must be a segmentation_models_pytorch architecture: {sorted(archs.values())}",
        )
        self.arch = archs[self.arch.lower()]
        name = self.encoder_name
        ok = isinstance(name, str) and (name in smp.encoders.encoders or name.startswith("tu-"))
        if ok and name.startswith("tu-"):
            import timm

            ok = bool(timm.list_models(name[3:].split(".")[0]))
        if not ok:
            close = difflib.get_close_matches(str(name), list(smp.encoders.encoders), n=3)
            check(False, "encoder_name", name, f"unknown encoder (close: {close}); use an smp encoder name or 'tu-<timm model>'")
        w = self.encoder_weights
        check(
            w is None or isinstance(w, str),
            "encoder_weights",
            w,
            "must be null (random init), a local weights file (.pth/.pt/.safetensors), or an smp weights name (needs internet)",
        )
        if isinstance(w, str):
            looks_path = os.sep in w or w.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))
            if looks_path:
                check(Path(w).expanduser().is_file(), "encoder_weights", w, "file not found (give a local weights file, or null)")
            elif not name.startswith("tu-"):
                known = list(smp.encoders.encoders[name]["pretrained_settings"])
                check(w in known, "encoder_weights", w, f"not a local file nor a known weights name for {name}: {known}")
        check(
            isinstance(self.model_kwargs, Mapping),
            "model_kwargs",
            self.model_kwargs,
            "must be a mapping of extra smp model arguments (e.g. {decoder_channels: [128, 64, 32, 16, 16]})",
        )
        self.model_kwargs = dict(self.model_kwargs)
        for bad in ("encoder_name", "encoder_weights", "classes", "in_channels", "activation"):
            check(
                bad not in self.model_kwargs,
                f"model_kwargs.{bad}",
                self.model_kwargs.get(bad),
                "is set by histolight; use the dedicated key",
            )
        depth = self.model_kwargs.get("encoder_depth", 5)
        check(is_pos_int(depth), "model_kwargs.encoder_depth", depth, "must be a positive integer")
        check(self.size % (2**depth) == 0, "size", self.size, f"must be a multiple of 2**encoder_depth = {2**depth}")
        check(self.input_norm in INPUT_NORMS, "input_norm", self.input_norm, f"must be one of {list(INPUT_NORMS)}")

    # ------------------------------------------------------------------ derived
    @property
    def n_classes(self) -> int:
        """Number of classes scored by metrics / class weights: binary 2, multiclass N+1, multilabel N."""
        if self.mode == "binary":
            return 2
        if self.mode == "multiclass":
            return len(self.labels) + 1
        return len(self.labels)

    @property
    def n_out(self) -> int:
        """Output channels of the network: binary 1, multiclass N+1, multilabel N."""
        return 1 if self.mode == "binary" else self.n_classes

    @property
    def class_names(self) -> list[str]:
        """Names of the scored classes (``background`` first for binary/multiclass)."""
        if self.mode == "binary":
            return ["background", self.foreground_name]
        if self.mode == "multiclass":
            return ["background", *self.labels]
        return list(self.labels)

    @property
    def foreground_name(self) -> str:
        """ROI label written for binary predictions: the single label, else ``tissue``."""
        return self.labels[0] if self.labels and len(self.labels) == 1 else "tissue"

    @property
    def tile_px(self) -> int:
        """Inference / validation tile budget side in px (``infer_tile_px``, else ``size``): ``infer_batch_size`` times
        its square px per forward pass, in tiles of at most ``size`` px (:meth:`SegmentModel._tiled`)."""
        return int(self.infer_tile_px or self.size)

    @property
    def loss_terms(self) -> dict[str, float]:
        return parse_loss(self.loss)

    def resolved_input_stats(self) -> tuple[list[float], list[float]]:
        """(mean, std) in [0, 1] units applied to the network input."""
        norm = self.input_norm
        if norm == "auto":
            norm = "imagenet" if self.encoder_weights else "dataset"
        if norm == "none":
            return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        if norm == "imagenet" or self.input_mean is None or self.input_std is None:
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        return list(self.input_mean), list(self.input_std)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SegmentConfig:
        """Build from a dict (a saved config, checkpoint hyperparameters); keys that are not fields are ignored.

        Configs written by older versions load too: ``augmentation`` (old augmentation keys) becomes ``augment``,
        and string optimizer options (``optimizer: adamw``, ``lr``, ``weight_decay``, ``scheduler: cosine``,
        ``scheduler_kwargs``) become ``_partial_`` nodes.
        """
        d = dict(d)
        if "augmentation" in d:
            aug = d.pop("augmentation")
            d.setdefault("augment", aug)
        if isinstance(d.get("augment"), Mapping):
            d["augment"] = upgrade_augment(d["augment"], warn=False)
        if isinstance(d.get("optimizer"), str):
            old = {k: d.pop(k) for k in ("optimizer", "scheduler", *LEGACY_OPTIM_KEYS) if k in d}
            d["optimizer"], d["scheduler"], d["scheduler_interval"] = legacy_optim(**old)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        return (
            f"{self.mode} segmentation of {self.class_names} at {self.mpp:g} um/px, {self.arch}/{self.encoder_name}, "
            f"crops {self.size} px"
        )


_FIELDS = [f.name for f in dataclasses.fields(SegmentConfig)]
DATA_FIELDS = (
    "mode",
    "labels",
    "mpp",
    "size",
    "crops_per_epoch",
    "batch_size",
    "num_workers",
    "fg_crop_prob",
    "augment",
    "train_split",
    "val_split",
    "val_fraction",
    "allow_patient_leakage",
    "patches",
    "val_windows",
    "stats_crops",
    "cache_patches",
)
MODEL_FIELDS = (
    "arch",
    "encoder_name",
    "encoder_weights",
    "model_kwargs",
    "input_norm",
    "optimizer",
    "scheduler",
    "scheduler_interval",
    "warmup_epochs",
    "loss",
    "focal_gamma",
    "edge_weight",
    "edge_sigma",
    "class_weights",
    "threshold",
    "overlap",
    "infer_batch_size",
    "infer_tile_px",
)


#: keys that moved: old Hydra key -> where it lives now
MOVED_KEYS = {
    "model.lr": "model.optimizer.lr",
    "model.weight_decay": "model.optimizer.weight_decay",
    "model.scheduler_kwargs": "model.scheduler.<argument>",
}


def _unknown_keys(d: dict, allowed: tuple, prefix: str, ignore: tuple = ()) -> None:
    for k in d:
        if k in allowed or k in ignore or k == "_target_":
            continue
        close = difflib.get_close_matches(k, allowed, n=1)
        moved = MOVED_KEYS.get(f"{prefix}.{k}")
        hint = f" It moved: use '{moved}'." if moved else f" Did you mean '{prefix}.{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown key '{prefix}.{k}'.{hint} Allowed keys: {', '.join(allowed)} "
            "(segmentation tasks use data=seg and model=seg_*)"
        )


def config_from_hydra(cfg: Any, need_model: bool = True) -> SegmentConfig:
    """Validated :class:`SegmentConfig` from a Hydra config's ``data``, ``model``, ``normalizer`` and ``trainer``.

    ``need_model=False`` (task=export_masks) accepts a missing ``model`` group (defaults are used).
    Raises :class:`ConfigError` naming the full key (``data.mode``) on bad or unknown values.
    """
    if cfg.get("data") is None or (need_model and cfg.get("model") is None):
        raise ConfigError(
            "segmentation needs the config groups data and model (e.g. data=seg model=seg_unet, or experiment=seg_multiclass)"
        )
    data = to_dict(cfg.data)
    model = to_dict(cfg.get("model")) if cfg.get("model") is not None else {}
    if "augmentation" in data:  # the old name of data.augment
        if "augment" in data:
            raise ConfigError("data.augmentation is the old name of data.augment: give only data.augment")
        deprecated("data.augmentation", "data.augment")
        data["augment"] = data.pop("augmentation")
    _unknown_keys(data, DATA_FIELDS, "data", DATA_ONLY_KEYS)
    _unknown_keys(model, MODEL_FIELDS, "model")
    kw = {k: v for k, v in data.items() if k in DATA_FIELDS}
    kw.update({k: v for k, v in model.items() if k in MODEL_FIELDS})
    norm = check_training_normalizer(to_dict(cfg.get("normalizer")) or None, per_tile=False)
    if norm:
        kw["normalizer"] = norm
    epochs = None
    if cfg.get("trainer") is not None:
        epochs = cfg.trainer.get("max_epochs")
    if isinstance(epochs, int) and epochs > 0:
        kw["epochs"] = epochs
    try:
        return SegmentConfig(**kw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        key = msg.split("=", 1)[0].split(".")[0]
        prefix = "model" if key in MODEL_FIELDS else "data" if key in DATA_FIELDS else "segment"
        raise ConfigError(f"invalid config '{prefix}': {prefix}.{msg}") from None
