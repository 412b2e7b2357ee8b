"""Stain normalization and stain augmentation for H&E images (NumPy/OpenCV and batched PyTorch).

from histolight.norm import StainNormalizer, build_normalizer, available_methods
n = StainNormalizer("macenko", preset="v1")   # or .fit(img | [imgs])
n.set_context(thumbnail)                       # optional per-slide source statistics
out = n.transform(tile)                        # HxWx3 uint8 RGB -> HxWx3 uint8 RGB
out_b = n.transform_batch(x)                   # (B,3,H,W) uint8/float torch, same device/dtype
n2 = build_normalizer(n.to_config())           # exact rebuild; build_normalizer(None) is None
"""

from histolight.norm.augment import sample_augment_params
from histolight.norm.normalizer import NormalizerWarning, StainNormalizer, available_methods, build_normalizer
from histolight.norm.options import option_spec
from histolight.norm.presets import available_presets, load_preset

__all__ = [
    "StainNormalizer",
    "build_normalizer",
    "available_methods",
    "available_presets",
    "load_preset",
    "option_spec",
    "NormalizerWarning",
    "sample_augment_params",
]
