"""The feature extractor object: tiles in, ``(N, D)`` float32 feature vectors out.

Built by :func:`histolight.features.build_feature_extractor`. One object, four calls (as in Slideflow):

>>> ext(batch)                      # (B, 3, H, W) uint8 tiles -> (B, D) float32
>>> bags, coords = ext("s1.tfrecords")   # (N, D) features and (N, 2) tile centres (base px) of one TFRecord
>>> grid = ext(slide, tile_um=128)  # (W, H, D): the slide's tiles read straight from the WSI (QC applied); NaN where
...                                 # no tile was kept
>>> ext.transform                   # the preprocessing pipeline, in order

A uint8 batch goes through :attr:`transform` (to float, resize, crop, normalize) on the extractor's device; a
float batch is taken as already preprocessed. Mixed precision: autocast on a GPU (bf16 where supported, else fp16)
unless ``mixed_precision=False``; the CPU stays fp32 unless ``mixed_precision=True`` (bf16). Features come back as
float32 on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histolight.errors import ConfigError, HistolightError
from histolight.features.preprocess import Preprocessing

log = logging.getLogger(__name__)

TFRECORD_SUFFIXES = (".tfrecords", ".tfrecord")


@dataclass(frozen=True)
class ExtractorInfo:
    """What the registry records of an extractor (see :func:`histolight.features.list_extractors`)."""

    name: str
    arch: str
    num_features: int | None
    input_px: int | None
    license: str
    citation: str
    source: str = ""
    weights_layout: str = ""
    large: bool = False  # too big to materialize in CI (tests build it on the meta device)
    options: tuple[str, ...] = ()


@dataclass
class FeatureExtractor:
    """A built extractor (see the module docstring).

    Attributes:
        net: ``(B, 3, H, W)`` preprocessed float -> ``(B, D)``, in eval mode.
        info: the registry entry (license, citation, architecture).
        preprocessing: the options of :attr:`transform`.
        num_features: ``D``.
        tile_px, tile_um: the tile geometry the extractor is meant for (a trained classifier's own; else as given).
        normalizer: a stain normalizer applied to each tile before everything else (a classifier's own), or None.
        random_init: no weights were loaded.
        build_kwargs: the keyword arguments of ``build_feature_extractor`` that rebuild it (``bags_config.json``).
    """

    net: nn.Module
    info: ExtractorInfo
    preprocessing: Preprocessing
    num_features: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mixed_precision: bool | None = None
    tile_px: int | None = None
    tile_um: Any = None
    normalizer: Any = None
    random_init: bool = False
    build_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.net.eval()
        self.transform = self.preprocessing.compose()

    # ------------------------------------------------------------------ descriptors
    @property
    def name(self) -> str:
        return self.info.name

    tag = name

    @property
    def dim(self) -> int:
        return self.num_features

    @property
    def license(self) -> str:
        return self.info.license

    @property
    def citation(self) -> str:
        return self.info.citation

    def __repr__(self) -> str:
        init = ", random init" if self.random_init else ""
        return f"FeatureExtractor({self.name!r}, {self.info.arch}, D={self.num_features}, device={self.device}{init})"

    def to(self, device: str | torch.device) -> FeatureExtractor:
        self.device = torch.device(device)
        if self.device.type != "meta":
            self.net.to(self.device)
        return self

    # ------------------------------------------------------------------ batches
    def autocast(self):
        """The autocast context of this extractor's mixed-precision setting (a no-op when it is off)."""
        kind = self.device.type
        on = (kind == "cuda") if self.mixed_precision is None else bool(self.mixed_precision)
        if not on or kind not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        if kind == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16
        return torch.autocast(kind, dtype=dtype)

    @torch.no_grad()
    def forward_batch(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 tiles (or ``(B, H, W, 3)`` / ``(H, W, 3)`` numpy) -> ``(B, D)`` float32 on the CPU.

        A floating-point tensor is taken as already preprocessed."""
        if isinstance(x, np.ndarray):
            a = x[None] if x.ndim == 3 else x
            if a.ndim != 4 or a.shape[-1] != 3:
                raise HistolightError(f"expected H x W x 3 or B x H x W x 3 uint8 images, got an array of shape {x.shape}")
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise HistolightError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        if self.device.type == "meta":  # shapes only: what the transform would output
            px = self.preprocessing.output_px(int(x.shape[-1])) or int(x.shape[-1])
            x = torch.empty(x.shape[0], 3, px, px, device="meta")
        x = x.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            x = self.transform(x)
        with self.autocast():
            out = self.net(x)
        return out.float().cpu() if self.device.type != "meta" else out.float()

    # ------------------------------------------------------------------ calls
    def __call__(self, obj: Any, **kwargs: Any):
        """A batch -> ``(B, D)``; a TFRecord path -> ``(bags, coords)``; a slide (or slide path) -> ``(W, H, D)``."""
        if isinstance(obj, (torch.Tensor, np.ndarray)):
            if kwargs:
                raise TypeError(f"unexpected options for a batch: {sorted(kwargs)}")
            return self.forward_batch(obj)
        if isinstance(obj, (str, os.PathLike)):
            p = Path(obj)
            if p.name.lower().endswith(TFRECORD_SUFFIXES):
                return self.features_from_tfrecord(p, **kwargs)
            return self.features_from_slide(p, **kwargs)
        if hasattr(obj, "read_region") and hasattr(obj, "dimensions"):
            return self.features_from_slide(obj, **kwargs)
        raise TypeError(f"cannot extract features from a {type(obj).__name__}: give a tile batch, a TFRecord path or a slide")

    def features_from_tfrecord(
        self, path: str | os.PathLike, batch_size: int = 64, num_workers: int = 0, **dataset_options: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bags (N, D) float32, coords (N, 2) int64 tile centres in base px)`` of one TFRecord, in record order."""
        from histolight.features.sources import tfrecord_batches

        if not Path(path).is_file():
            raise HistolightError(f"TFRecord '{path}' does not exist")
        feats, locs = [], []
        for b in tfrecord_batches([str(path)], batch_size, num_workers, self.normalizer, **dataset_options):
            feats.append(self.forward_batch(b.images))
            locs.append(b.locs)
        if not feats:
            return torch.zeros(0, self.num_features), torch.zeros(0, 2, dtype=torch.int64)
        return torch.cat(feats), torch.from_numpy(np.concatenate(locs))

    def features_from_slide(
        self,
        slide: Any,
        tile_px: int | None = None,
        tile_um: Any = None,
        rois: Any = None,
        batch_size: int = 64,
        **extract_options: Any,
    ) -> torch.Tensor:
        """``(W, H, D)`` float32: the features of a slide's tile grid (``W`` columns x ``H`` rows), read straight
        from the slide with ``task=extract``'s grid, QC (default ``qc=['otsu']``) and tile filters; NaN where no
        tile was kept.

        Args:
            slide: a :class:`~histolight.wsi.Slide` / ``VirtualSlide`` or a slide file path.
            tile_px, tile_um: tile geometry (default: the extractor's own, e.g. a trained classifier's).
            rois: the slide's ROIs in base px (see ``extract_options['roi_method']``), or None.
            extract_options: any option of :class:`~histolight.extract.config.ExtractConfig` (``qc``,
                ``stride_div``, ``grayspace_fraction``, ...).
        """
        from histolight.features.sources import slide_batches

        cfg = slide_extract_config(self, tile_px, tile_um, extract_options)
        own = not hasattr(slide, "read_region")
        if own:
            from histolight.wsi import Slide

            slide = Slide(str(slide))
        try:
            shape: list[int] = []
            feats, grid = [], []
            for b in slide_batches(
                slide, cfg, rois, normalizer=self.normalizer, batch_size=batch_size, on_plan=lambda p: shape.extend(p.grid.shape)
            ):
                feats.append(self.forward_batch(b.images))
                grid.append(b.grid)
        finally:
            if own:
                slide.close()
        rows, cols = shape
        out = torch.full((cols, rows, self.num_features), float("nan"))
        if feats:
            g = torch.from_numpy(np.concatenate(grid))
            out[g[:, 0], g[:, 1]] = torch.cat(feats)
        return out


def slide_extract_config(ext: FeatureExtractor, tile_px: int | None, tile_um: Any, options: dict):
    """The :class:`~histolight.extract.config.ExtractConfig` for reading an extractor's tiles from slides."""
    from histolight.config.schema import from_config
    from histolight.extract.config import ExtractConfig

    px = tile_px or ext.tile_px or ext.preprocessing.output_px(None) or ext.info.input_px
    um = tile_um if tile_um is not None else ext.tile_um
    if um is None:
        raise ConfigError(
            f"reading tiles from slides needs their size: give tile_um (microns, or a magnification such as '20x') for {ext.name}"
        )
    if px is None:
        raise ConfigError(f"{ext.name} has no fixed input size: give tile_px (the tile side in px, e.g. tile_px=224)")
    if ext.tile_um is not None and (tile_px or tile_um is not None) and (px, str(um)) != (ext.tile_px, str(ext.tile_um)):
        raise ConfigError(f"{ext.name} was trained on {ext.tile_px}px / {ext.tile_um} tiles, not {px}px / {um}")
    opts = {k: v for k, v in options.items() if v is not None}
    return from_config(ExtractConfig, {"tile_px": int(px), "tile_um": um, "report": False, **opts}, "extract")


__all__ = ["FeatureExtractor", "ExtractorInfo", "slide_extract_config"]
