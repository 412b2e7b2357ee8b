"""Image preprocessing of a feature extractor: what a ``(B, 3, H, W)`` uint8 batch goes through before the network.

The options are Slideflow's (``build_feature_extractor(name, resize=..., ...)``):

- ``resize``: an int (resize to this many px, shorter side), ``True`` (to the extractor's input size) or ``False``.
- ``center_crop``: an int, ``True`` (the input size) or ``False``; cropping happens after resizing.
- ``interpolation``: ``bilinear`` (default for most models), ``bicubic`` (GigaPath, Virchow, PLIP), ``nearest``.
- ``antialias``: antialias when resizing (default ``False``, the behaviour of torchvision < 0.17).
- ``norm_mean``, ``norm_std``: per-channel normalization on the 0-1 scale (default ImageNet's).

The pipeline runs on the batch, on the extractor's device, in this order: uint8 -> float 0-1, resize, center crop,
normalize. ``extractor.transform`` is the :class:`torchvision.transforms.Compose` that does it, so its ``repr`` shows
every step in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from histolight.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _size(key: str, v: Any) -> int | bool:
    if isinstance(v, bool):
        return v
    if v is None:
        return False
    if isinstance(v, (int, float)) and float(v).is_integer() and v > 0:
        return int(v)
    raise ConfigError(f"{key}={v!r} is invalid: use an integer number of px, true (the extractor's input size) or false")


def _triple(key: str, v: Any) -> tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError:
        t = ()
    if len(t) != 3:
        raise ConfigError(f"{key}={v!r} is invalid: give three per-channel values (R, G, B) on the 0-1 scale")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing options of an extractor (see the module docstring); ``input_px`` resolves ``True`` sizes."""

    input_px: int | None = None
    resize: int | bool = False
    center_crop: int | bool = False
    interpolation: str = "bilinear"
    antialias: bool = False
    norm_mean: tuple[float, float, float] = IMAGENET_MEAN
    norm_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "resize", _size("resize", self.resize))
        object.__setattr__(self, "center_crop", _size("center_crop", self.center_crop))
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r} is invalid: use one of {', '.join(INTERPOLATIONS)}")
        if not isinstance(self.antialias, bool):
            raise ConfigError(f"antialias={self.antialias!r} is invalid: use true or false")
        object.__setattr__(self, "norm_mean", _triple("norm_mean", self.norm_mean))
        object.__setattr__(self, "norm_std", _triple("norm_std", self.norm_std))
        if any(s <= 0 for s in self.norm_std):
            raise ConfigError(f"norm_std={list(self.norm_std)} is invalid: every value must be > 0")
        for key in ("resize", "center_crop"):
            if getattr(self, key) is True and not self.input_px:
                raise ConfigError(f"{key}=true needs the extractor's input size; give {key} as a number of px")

    def _px(self, v: int | bool) -> int | None:
        if v is False:
            return None
        return int(self.input_px) if v is True else int(v)

    @property
    def resize_px(self) -> int | None:
        return self._px(self.resize)

    @property
    def crop_px(self) -> int | None:
        return self._px(self.center_crop)

    def output_px(self, tile_px: int | None) -> int | None:
        """Side of the network's input for tiles of ``tile_px`` (None: unknown)."""
        return self.crop_px or self.resize_px or tile_px

    def kwargs(self) -> dict:
        """The options as plain JSON values (what ``bags_config.json`` records)."""
        d = asdict(self)
        d.pop("input_px")
        d["norm_mean"], d["norm_std"] = list(self.norm_mean), list(self.norm_std)
        return d

    def with_options(self, **options: Any) -> Preprocessing:
        """A copy with the given options replaced (None = keep the default)."""
        d = {**asdict(self), **{k: v for k, v in options.items() if v is not None}}
        return Preprocessing(**d)

    def compose(self):
        """The :class:`torchvision.transforms.Compose` doing this preprocessing on a uint8 batch."""
        from torchvision import transforms as T

        mode = {
            "bilinear": T.InterpolationMode.BILINEAR,
            "bicubic": T.InterpolationMode.BICUBIC,
            "nearest": T.InterpolationMode.NEAREST,
        }
        steps: list = [T.ConvertImageDtype(torch.float32)]
        if self.resize_px:
            steps.append(T.Resize(self.resize_px, interpolation=mode[self.interpolation], antialias=self.antialias))
        if self.crop_px:
            steps.append(T.CenterCrop(self.crop_px))
        steps.append(T.Normalize(mean=self.norm_mean, std=self.norm_std))
        return T.Compose(steps)


PREPROCESS_KEYS = ("resize", "center_crop", "interpolation", "antialias", "norm_mean", "norm_std")


def split_preprocess_options(options: dict) -> tuple[dict, dict]:
    """``(preprocessing options, the rest)`` of ``build_feature_extractor``'s keyword arguments."""
    pre = {k: options.pop(k) for k in list(options) if k in PREPROCESS_KEYS}
    return pre, options


def as_tuple(v: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


__all__ = [
    "Preprocessing",
    "PREPROCESS_KEYS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "split_preprocess_options",
]
