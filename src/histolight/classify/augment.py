"""Tile preprocessing and augmentation (albumentations), built from ``data.augment``.

Order: optional stain normalization (the run's normalizer, on the fly), then (training only)
flips, 90-degree rotations, stain augmentation, colour jitter, JPEG compression; the result is a
``3 x H x W`` uint8 tensor. ``(x / 255 - mean) / std`` runs on whole batches on the device
(:func:`normalize_batch`, called by the LightningModule and by prediction). The same function builds the
evaluation/prediction transform (``train=False``: normalization only), so a saved model's
``model_config.json`` is enough to rebuild it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from histolight.config.schema import check, is_pos_num

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: augment keys and their defaults (``conf/data/tiles.yaml``)
AUGMENT_DEFAULTS: dict[str, Any] = {
    "flip": True,
    "rot90": True,
    "color_jitter": None,  # {brightness, contrast, saturation, hue, p}
    "stain_augment": None,  # options of histolight.norm.transforms.StainAugment, plus p
    "jpeg": None,  # {quality: [lo, hi], p}
}
_JITTER_KEYS = {"brightness", "contrast", "saturation", "hue", "p"}
_JPEG_KEYS = {"quality", "p"}


def _prob(key: str, v: Any) -> float:
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1, key, v, "must be a probability in [0, 1]")
    return float(v)


def validate_augment(aug: Mapping | None, prefix: str = "augment") -> dict:
    """Defaults filled in; ``ValueError`` naming ``<prefix>.<key>``, the value and what is allowed."""
    aug = dict(aug or {})
    unknown = [k for k in aug if k not in AUGMENT_DEFAULTS]
    check(
        not unknown,
        f"{prefix}.{unknown[0] if unknown else ''}",
        aug.get(unknown[0]) if unknown else None,
        f"unknown augmentation; allowed keys: {sorted(AUGMENT_DEFAULTS)}",
    )
    out = {**AUGMENT_DEFAULTS, **aug}
    for k in ("flip", "rot90"):
        check(isinstance(out[k], bool), f"{prefix}.{k}", out[k], "must be true or false")
    cj = out["color_jitter"]
    if cj is not None:
        check(
            isinstance(cj, Mapping) and set(cj) <= _JITTER_KEYS,
            f"{prefix}.color_jitter",
            cj,
            f"must be null or a mapping with keys {sorted(_JITTER_KEYS)}",
        )
        cj = dict(cj)
        for k in ("brightness", "contrast", "saturation"):
            v = cj.get(k, 0.1)
            check(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                f"{prefix}.color_jitter.{k}",
                v,
                "must be a number in [0, 1) (relative change)",
            )
        h = cj.get("hue", 0.02)
        check(
            isinstance(h, (int, float)) and not isinstance(h, bool) and 0 <= h <= 0.5,
            f"{prefix}.color_jitter.hue",
            h,
            "must be a number in [0, 0.5]",
        )
        _prob(f"{prefix}.color_jitter.p", cj.get("p", 0.5))
        out["color_jitter"] = cj
    jp = out["jpeg"]
    if jp is not None:
        check(
            isinstance(jp, Mapping) and set(jp) <= _JPEG_KEYS,
            f"{prefix}.jpeg",
            jp,
            f"must be null or a mapping with keys {sorted(_JPEG_KEYS)}",
        )
        q = list(jp.get("quality", [50, 95]))
        check(
            len(q) == 2 and all(isinstance(v, int) and 1 <= v <= 100 for v in q) and q[0] <= q[1],
            f"{prefix}.jpeg.quality",
            q,
            "must be [low, high] integers with 1 <= low <= high <= 100",
        )
        _prob(f"{prefix}.jpeg.p", jp.get("p", 0.3))
        out["jpeg"] = {"quality": q, "p": jp.get("p", 0.3)}
    sa = out["stain_augment"]
    if sa is not None:
        check(
            isinstance(sa, Mapping),
            f"{prefix}.stain_augment",
            sa,
            "must be null or a mapping of histolight.norm StainAugment options (e.g. {p: 0.5})",
        )
        if "p" in sa:
            _prob(f"{prefix}.stain_augment.p", sa["p"])
        out["stain_augment"] = dict(sa)
    return out


def check_mean_std(mean: Any, std: Any, prefix: str = "data") -> None:
    for k, v in (("mean", mean), ("std", std)):
        if v is None:
            continue
        check(
            isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v),
            f"{prefix}.{k}",
            v,
            "must be null or three numbers (per RGB channel, images scaled to [0, 1])",
        )
    if std is not None:
        check(all(is_pos_num(x) for x in std), f"{prefix}.std", std, "must be positive")


def to_chw_uint8(img: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W uint8 tensor (a quarter of the bytes of float32 between processes)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) uint8 (0-255) -> float32 ``(x / 255 - mean) / std``, on ``x``'s device."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x.float() - m) / s


class TileTransform:
    """Picklable ``H x W x 3 uint8 -> 3 x H x W uint8 tensor``: the albumentations pipeline, run in the
    DataLoader workers. Mean/std normalization happens on the batch, on the device (:func:`normalize_batch`)."""

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
        augment: ``data.augment`` (see :data:`AUGMENT_DEFAULTS`); ignored when ``train=False``.
        normalizer: a fitted :class:`histolight.norm.StainNormalizer` applied to every tile, or None.
    """
    import albumentations as A

    ops: list = []
    if normalizer is not None:
        from histolight.norm.transforms import StainNormalize

        ops.append(StainNormalize(normalizer))
    if train:
        aug = validate_augment(augment)
        if aug["flip"]:
            ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
        if aug["rot90"]:
            ops.append(A.RandomRotate90(p=1.0))
        if aug["stain_augment"] is not None:
            from histolight.norm.transforms import StainAugment

            ops.append(StainAugment(**aug["stain_augment"]))
        cj = aug["color_jitter"]
        if cj is not None:
            ops.append(
                A.ColorJitter(
                    brightness=cj.get("brightness", 0.1),
                    contrast=cj.get("contrast", 0.1),
                    saturation=cj.get("saturation", 0.1),
                    hue=cj.get("hue", 0.02),
                    p=cj.get("p", 0.5),
                )
            )
        jp = aug["jpeg"]
        if jp is not None:
            ops.append(A.ImageCompression(quality_range=tuple(jp["quality"]), p=jp["p"]))
    pipeline = A.Compose(ops) if ops else None
    return TileTransform(pipeline)


__all__ = [
    "AUGMENT_DEFAULTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TileTransform",
    "build_transform",
    "normalize_batch",
    "to_chw_uint8",
    "validate_augment",
    "check_mean_std",
]
