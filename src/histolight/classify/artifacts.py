"""A trained tile classifier on disk: ``weights.pt`` + ``model_config.json``, enough to rebuild it alone.

``model_config.json``::

    {"format": "histolight.tile_classifier", "version": 1,
     "timm_name": "resnet18", "model_kwargs": {}, "drop_rate": 0.0,
     "label_map": {"classes": ["necrosis", "stroma", "tumor"], "index": {...}},
     "tile_px": 128, "tile_um": 64, "normalizer": null | StainNormalizer.to_config() (method + fit),
     "mean": [...], "std": [...], "label_source": "roi", "weights": "weights.pt",
     "checkpoint": "<the Lightning checkpoint it came from>", "metrics": {...}, "histolight_version": "..."}

:func:`load_model` accepts that folder, the JSON file, or a Lightning ``.ckpt`` written by
``task=train_tiles`` (which embeds the same config under ``checkpoint['histolight']``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histolight.classify.labels import LabelMap
from histolight.errors import HistolightError

log = logging.getLogger(__name__)

FORMAT = "histolight.tile_classifier"
VERSION = 1
CONFIG_NAME = "model_config.json"
WEIGHTS_NAME = "weights.pt"


def make_model_config(
    timm_name: str,
    label_map: LabelMap,
    tile_px: int,
    tile_um: Any,
    *,
    normalizer: Any = None,
    mean: Sequence[float],
    std: Sequence[float],
    drop_rate: float = 0.0,
    model_kwargs: dict | None = None,
    label_source: str | None = None,
    **extra,
) -> dict:
    """The JSON-able description of a model (``normalizer``: a StainNormalizer, its ``to_config()`` dict, or None)."""
    import histolight

    if normalizer is not None and hasattr(normalizer, "to_config"):
        normalizer = normalizer.to_config()
    cfg = {
        "format": FORMAT,
        "version": VERSION,
        "timm_name": timm_name,
        "model_kwargs": dict(model_kwargs or {}),
        "drop_rate": float(drop_rate),
        "label_map": label_map.to_dict(),
        "num_classes": len(label_map),
        "tile_px": int(tile_px),
        "tile_um": tile_um,
        "normalizer": _jsonable(normalizer),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "label_source": label_source,
        "histolight_version": histolight.__version__,
    }
    cfg.update(_jsonable(extra))
    return cfg


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return o


def save_model(outdir: str | os.PathLike, net: nn.Module, config: dict, overwrite: bool = False) -> Path:
    """Write ``weights.pt`` (state dict of the timm model) and ``model_config.json`` into ``outdir`` atomically.

    An existing model there is only replaced with ``overwrite=True``.
    """
    from histolight.io.atomic import atomic_write, atomic_write_json

    outdir = Path(outdir)
    if (outdir / CONFIG_NAME).exists() and not overwrite:
        raise HistolightError(f"a model already exists in '{outdir}'; pass overwrite=true to replace it")
    outdir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with atomic_write(outdir / WEIGHTS_NAME, "wb") as fh:
        torch.save(sd, fh)
    atomic_write_json(outdir / CONFIG_NAME, {**_jsonable(config), "weights": WEIGHTS_NAME})
    return outdir


@dataclass
class LoadedModel:
    """A rebuilt classifier: ``net`` (eval mode), its ``config``, ``label_map``, ``normalizer`` and
    :meth:`transform` (evaluation preprocessing)."""

    net: nn.Module
    config: dict
    label_map: LabelMap
    normalizer: Any = None
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return self.label_map.names

    @property
    def tile_px(self) -> int:
        return int(self.config["tile_px"])

    @property
    def tile_um(self) -> Any:
        return self.config["tile_um"]

    def transform(self):
        """Evaluation transform: H x W x 3 uint8 -> 3 x H x W uint8 tensor (stain normalization if any)."""
        from histolight.classify.augment import build_transform

        return build_transform(False, normalizer=self.normalizer)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 batch -> normalized float (model config mean/std), on ``x``'s device."""
        from histolight.classify.augment import normalize_batch

        return normalize_batch(x, self.config["mean"], self.config["std"])

    @torch.no_grad()
    def predict_images(self, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (n, C) for ``H x W x 3`` uint8 RGB tiles (resized to ``tile_px`` if needed)."""
        import cv2

        tf = self.transform()
        dev = next(self.net.parameters()).device
        self.net.eval()
        out = []
        for i in range(0, len(images), batch_size):
            xs = []
            for img in images[i : i + batch_size]:
                if img.shape[0] != self.tile_px or img.shape[1] != self.tile_px:
                    img = cv2.resize(img, (self.tile_px, self.tile_px), interpolation=cv2.INTER_AREA)
                xs.append(tf(img))
            x = self.preprocess(torch.stack(xs).to(dev))
            out.append(self.net(x).float().softmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_map)), np.float32)


def _check_config(cfg: dict, where: str) -> dict:
    if cfg.get("format") != FORMAT:
        raise HistolightError(f"{where} is not a histolight tile classifier config (format={cfg.get('format')!r})")
    if int(cfg.get("version", 0)) > VERSION:
        raise HistolightError(f"{where} has version {cfg.get('version')}, newer than this histolight ({VERSION}); upgrade")
    for k in ("timm_name", "label_map", "tile_px", "mean", "std"):
        if k not in cfg:
            raise HistolightError(f"{where} lacks '{k}'")
    return cfg


def read_model_config(path: str | os.PathLike) -> dict:
    """The model config of a model folder, ``model_config.json`` or a histolight Lightning ``.ckpt``."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.exists():
        raise HistolightError(
            f"model '{path}' not found (expected a folder with {CONFIG_NAME}, the JSON file, or a .ckpt from task=train_tiles)"
        )
    if p.suffix == ".ckpt":
        ck = torch.load(p, map_location="cpu", weights_only=False)
        if "histolight" not in ck:
            raise HistolightError(f"checkpoint '{p}' has no histolight model config (not written by task=train_tiles)")
        return _check_config(ck["histolight"], str(p))
    return _check_config(json.loads(p.read_text()), str(p))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a classifier from a model folder / ``model_config.json`` / ``.ckpt`` (no training config needed)."""
    from histolight.classify.module import create_timm_model

    p = Path(path)
    cfg = read_model_config(p)
    label_map = LabelMap.from_dict(cfg["label_map"])
    net = create_timm_model(
        cfg["timm_name"], len(label_map), pretrained=False, drop_rate=cfg.get("drop_rate", 0.0), **cfg.get("model_kwargs", {})
    )
    if p.suffix == ".ckpt":
        ck = torch.load(p, map_location="cpu", weights_only=False)
        sd = {k[4:]: v for k, v in ck["state_dict"].items() if k.startswith("net.")}
    else:
        wdir = p if p.is_dir() else p.parent
        wpath = wdir / cfg.get("weights", WEIGHTS_NAME)
        if not wpath.exists():
            raise HistolightError(f"model weights '{wpath}' not found")
        sd = torch.load(wpath, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise HistolightError(f"weights of '{path}' do not fit {cfg['timm_name']} with {len(label_map)} classes: {e}") from None
    net.eval().to(device)
    normalizer = None
    if cfg.get("normalizer"):
        from histolight.norm import build_normalizer

        normalizer = build_normalizer(cfg["normalizer"])
    return LoadedModel(net, cfg, label_map, normalizer, str(p))


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LoadedModel", "make_model_config", "save_model", "load_model", "read_model_config"]
