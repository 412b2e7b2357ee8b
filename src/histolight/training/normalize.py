"""Network input normalization (per-channel mean/std) and the stain-normalizer rules of training runs.

Input statistics are in [0, 1] units (pixel / 255), RGB order. Both stacks normalize on the device:
``(x - mean) / std`` with ``x`` in [0, 1] (:func:`normalize_batch` takes uint8 0-255 or float 0-1 batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from histolight.config.schema import check, is_pos_num
from histolight.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_batch(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 (0-255) or float (0-1) -> float32 ``(x / 255 - mean) / std`` (uint8) or
    ``(x - mean) / std`` (float), on ``x``'s device; ``mean``/``std``: 3 numbers in [0, 1] units."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    if x.dtype == torch.uint8:
        return (x.float() - m * 255.0) / (s * 255.0)
    return (x - m) / s


def pixel_stats(images: Iterable[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units) over every pixel of ``H x W x 3`` uint8 images."""
    s = np.zeros(3)
    ss = np.zeros(3)
    n = 0
    for img in images:
        x = img.reshape(-1, 3).astype(np.float64) / 255.0
        s += x.sum(0)
        ss += (x**2).sum(0)
        n += len(x)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 1e-8))
    return [float(v) for v in mean], [float(max(v, 1e-3)) for v in std]


def check_mean_std(mean: Any, std: Any, prefix: str = "data") -> None:
    """``ValueError`` unless ``mean``/``std`` are null or 3 numbers (std positive), naming ``<prefix>.mean|std``."""
    for k, v in (("mean", mean), ("std", std)):
        check(
            v is None or (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)),
            f"{prefix}.{k}",
            v,
            "must be null or three numbers (per RGB channel, images scaled to [0, 1])",
        )
    if std is not None:
        check(all(is_pos_num(x) for x in std), f"{prefix}.std", std, "must be positive")


def check_training_normalizer(node: Mapping | None, *, per_tile: bool) -> dict | None:
    """The stain normalizer config of a training run (``normalizer`` group) as a dict, or None when off.

    One rule set for every stack: ``normalizer=augment`` is refused (a random augmentation cannot be re-applied
    at inference: use ``data.augment.stain``); with ``per_tile`` (tiles normalized on the fly in the loader)
    ``normalizer.context=true`` is refused too, since no slide thumbnail is at hand there.
    """
    if node is None:
        return None
    d = dict(node)
    method = d.get("method")
    if method in (None, "none"):
        return None
    if method == "augment":
        raise ConfigError(
            "normalizer=augment is a random stain augmentation, not a normalization a trained model can re-apply; "
            "for training use data.augment.stain (e.g. data.augment.stain={p: 0.5}) with normalizer=none"
        )
    if per_tile and d.get("context"):
        raise ConfigError(
            "normalizer.context=true needs a per-slide thumbnail, which the tile loader does not have; normalize at "
            "extraction instead (data.extract_options.normalizer) or set normalizer.context=false"
        )
    return d


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize_batch", "pixel_stats", "check_mean_std", "check_training_normalizer"]
