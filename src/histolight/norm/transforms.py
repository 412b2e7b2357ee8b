"""Albumentations transforms: stain normalization and stain/HSV augmentation (picklable).

Images are HxWx3 RGB, uint8 (returned uint8) or float32 in [0, 1] (returned float32 in [0, 1],
quantized to 1/255 steps).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import albumentations as A
import numpy as np

from histolight.norm.augment import sample_augment_params
from histolight.norm.normalizer import StainNormalizer, build_normalizer


def _on_u8(img: np.ndarray, fn) -> np.ndarray:
    if img.dtype == np.uint8:
        return fn(img)
    if np.issubdtype(img.dtype, np.floating):
        u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        return (fn(u8).astype(np.float32) / 255.0).astype(img.dtype, copy=False)
    raise ValueError(f"expected a uint8 or float [0, 1] RGB image, got {img.dtype}")


class StainNormalize(A.ImageOnlyTransform):
    """Apply a stain normalizer (per-tile statistics, or its context if one is set).

    Args:
        normalizer: a StainNormalizer or a config accepted by `build_normalizer`
            (dict / DictConfig / method name); 'none' is rejected.
        p: probability (default 1).
    """

    def __init__(self, normalizer: StainNormalizer | Mapping | str, p: float = 1.0):
        super().__init__(p=p)
        norm = build_normalizer(normalizer)
        if norm is None:
            raise ValueError("StainNormalize needs a normalizer; got method 'none' / None")
        self.normalizer = norm

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return _on_u8(img, self.normalizer.transform)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("normalizer",)


class StainAugment(A.ImageOnlyTransform):
    """Random stain (H&E optical-density scale/shift) and HSV augmentation.

    Args:
        stain_alpha: H and E concentrations scaled by U(1 - a, 1 + a).
        stain_beta: H and E concentrations shifted by U(-b, b) (OD units).
        hue: hue shift U(-h, h), fraction of the colour circle.
        saturation, value: scaled by U(1 - s, 1 + s), U(1 - v, 1 + v).
        preset / fit: stain basis used for the decomposition (default preset 'v1').
        p: probability (default 0.5).
    Randomness comes from albumentations' generator (so `A.Compose(..., seed=...)` applies).
    """

    def __init__(
        self,
        stain_alpha: float = 0.1,
        stain_beta: float = 0.05,
        hue: float = 0.02,
        saturation: float = 0.1,
        value: float = 0.1,
        preset: str | None = None,
        fit: Mapping | None = None,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.stain_alpha, self.stain_beta = stain_alpha, stain_beta
        self.hue, self.saturation, self.value = hue, saturation, value
        self.preset, self.fit = preset, fit
        self.normalizer = StainNormalizer(
            "augment",
            preset=preset,
            fit=fit,
            stain_alpha=stain_alpha,
            stain_beta=stain_beta,
            hue=hue,
            saturation=saturation,
            value=value,
        )

    def get_params(self) -> dict[str, Any]:
        return {"aug": sample_augment_params(1, self.random_generator, self.normalizer.options)[0]}

    def apply(self, img: np.ndarray, aug=None, **params: Any) -> np.ndarray:
        if aug is None:
            aug = self.get_params()["aug"]
        return _on_u8(img, lambda u8: self.normalizer.augment(u8, aug))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("stain_alpha", "stain_beta", "hue", "saturation", "value", "preset", "fit")
