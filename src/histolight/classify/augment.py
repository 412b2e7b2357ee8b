"""The tile transform run in the DataLoader workers: optional stain normalization (the run's normalizer, on the
fly), then (training only) the ``data.augment`` pipeline of :mod:`histolight.training.augment`; the result is a
``3 x H x W`` uint8 tensor. ``(x / 255 - mean) / std`` runs on whole batches on the device
(:func:`histolight.training.normalize.normalize_batch`, called by the LightningModule and by prediction). The same
function builds the evaluation/prediction transform (``train=False``: stain normalization only), so a saved model's
config is enough to rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from histolight.training.augment import build_augmentation


def to_chw_uint8(img: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W uint8 tensor (a quarter of the bytes of float32 between processes)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class TileTransform:
    """Picklable ``H x W x 3 uint8 -> 3 x H x W uint8 tensor``: the albumentations pipeline, run in the
    DataLoader workers. Mean/std normalization happens on the batch, on the device (``normalize_batch``)."""

    def __init__(self, pipeline: Any | None):
        self.pipeline = pipeline
        self._seed: int | None = None

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        if self.pipeline is not None:
            # albumentations keeps its own RNG; seed it from torch's per-process seed (base seed + worker id
            # in DataLoader workers, drawn from the seeded main process), so augmentation is reproducible
            # and differs between workers.
            s = torch.initial_seed() % 2**32
            if s != self._seed:
                self.pipeline.set_random_seed(s)
                self._seed = s
            img = self.pipeline(image=img)["image"]
        return to_chw_uint8(img)

    def __repr__(self) -> str:
        return f"TileTransform({self.pipeline!r})"


def build_transform(train: bool, augment: Mapping | None = None, normalizer: Any = None) -> TileTransform:
    """The tile transform for training (``train=True``: with augmentation) or evaluation/prediction.

    Args:
        augment: ``data.augment`` (keys of :mod:`histolight.training.augment`); ignored when ``train=False``.
        normalizer: a fitted :class:`histolight.norm.StainNormalizer` applied to every tile first, or None.
    """
    import albumentations as A

    ops: list = []
    if normalizer is not None:
        from histolight.norm.transforms import StainNormalize

        ops.append(StainNormalize(normalizer))
    if train:
        aug = build_augmentation(augment)
        if aug is not None:
            ops += list(aug.transforms)
    return TileTransform(A.Compose(ops) if ops else None)


__all__ = ["TileTransform", "build_transform", "to_chw_uint8"]
