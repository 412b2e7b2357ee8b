"""The training kit shared by segmentation (:mod:`histolight.segment`) and tile classification
(:mod:`histolight.classify`): one patient-split policy, one augmentation schema, one input normalization, one
optimizer config style, one model-folder format, one trainer plumbing.

- :mod:`~.splits`: patient-level splits (annotations / random / k-fold); patient leakage refused unless
  ``data.allow_patient_leakage=true``; split values compared case-insensitively.
- :mod:`~.augment`: ``data.augment`` keys ``flip, rot90, scale, stain, color_jitter, blur, jpeg`` (old keys as
  deprecated aliases) -> a mask-aware albumentations pipeline.
- :mod:`~.normalize`: ImageNet constants, ``normalize_batch`` (mean/std on the device), ``pixel_stats``, the
  stain-normalizer rules of training runs.
- :mod:`~.optim`: optimizer / scheduler from Hydra ``_partial_`` nodes, with warmup.
- :mod:`~.artifacts`: ``<kind>_config.json`` + ``weights.safetensors`` model folders (older layouts still read).
- :mod:`~.trainer`: the run's Lightning trainer (W&B sweep naming, CPU fallbacks), checkpoints (``last.ckpt`` every
  epoch; another run's checkpoints are never mixed in), resuming (``ckpt_path`` / ``resume=auto``, read with
  ``weights_only=True``), logging.
"""

from histolight.training.artifacts import (
    FORMAT,
    FORMAT_VERSION,
    ModelFolder,
    check_overwrite,
    is_model_folder,
    read_model_folder,
    save_model_folder,
)
from histolight.training.augment import build_augmentation, validate_augment
from histolight.training.normalize import IMAGENET_MEAN, IMAGENET_STD, check_training_normalizer, normalize_batch, pixel_stats
from histolight.training.optim import check_optim, configure_optimizers
from histolight.training.splits import annotation_split, check_patient_leakage, kfold_split, random_split, split_slides
from histolight.training.trainer import build_trainer, chosen_checkpoint, default_trainer, restore_weights, resume_checkpoint

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFolder",
    "check_overwrite",
    "is_model_folder",
    "read_model_folder",
    "save_model_folder",
    "build_augmentation",
    "validate_augment",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "check_training_normalizer",
    "normalize_batch",
    "pixel_stats",
    "check_optim",
    "configure_optimizers",
    "annotation_split",
    "check_patient_leakage",
    "kfold_split",
    "random_split",
    "split_slides",
    "build_trainer",
    "chosen_checkpoint",
    "default_trainer",
    "restore_weights",
    "resume_checkpoint",
]
