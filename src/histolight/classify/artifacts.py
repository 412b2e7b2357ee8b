"""A trained tile classifier on disk, in the model-folder format of :mod:`histolight.training.artifacts`:
``classifier_config.json`` + ``weights.safetensors`` (older ``model_config.json`` + ``weights.pt`` folders load too).

In memory a classifier's description is one flat dict (:func:`make_model_config`, ``LoadedModel.config``)::

    {"timm_name": "resnet18", "model_kwargs": {}, "drop_rate": 0.0, "num_classes": 3,
     "label_map": {"classes": ["necrosis", "stroma", "tumor"], ...}, "tile_px": 128, "tile_um": 64,
     "normalizer": null | StainNormalizer.to_config() (method + fit), "mean": [...], "std": [...],
     "label_source": "roi", ... (data options), "checkpoint": ..., "metrics": {...}}

:func:`save_model` files it into the sections of ``classifier_config.json`` (``model``, ``data``, ``labels``,
``geometry``, ``normalizer``, ``input_norm``, ``metrics``, ``training``); :func:`read_model_config` flattens
either layout back. :func:`load_model` accepts the folder, its config JSON, or a Lightning ``.ckpt`` written by
``task=train_tiles`` (which embeds the flat config under ``checkpoint['histolight']``). Weights are read safely
(:mod:`histolight.io.weights`).
"""

from __future__ import annotations

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
from histolight.training.artifacts import read_model_folder, save_model_folder

log = logging.getLogger(__name__)

KIND = "classifier"
MODEL_KEYS = ("timm_name", "model_kwargs", "drop_rate", "num_classes")
PROVENANCE_KEYS = ("checkpoint", "extraction", "tile_dir", "seed", "dataset")
_SECTION_KEYS = {*MODEL_KEYS, "label_map", "tile_px", "tile_um", "normalizer", "mean", "std", "metrics", *PROVENANCE_KEYS}


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
    """The flat, JSON-able description of a classifier (``normalizer``: a StainNormalizer, its ``to_config()``
    dict, or None; ``mean``/``std`` in [0, 1] units; ``extra``: data options and provenance)."""
    if normalizer is not None and hasattr(normalizer, "to_config"):
        normalizer = normalizer.to_config()
    cfg = {
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


def _geometry(tile_px: int, tile_um: Any) -> dict:
    """``{tile_px, tile_um, mpp}``: the tile side in px and um (or magnification) and its um/px."""
    from histolight.units import mag_to_mpp, parse_tile_um

    um, mag = parse_tile_um(tile_um)
    mpp = um / int(tile_px) if um is not None else mag_to_mpp(mag)
    return {"tile_px": int(tile_px), "tile_um": tile_um, "mpp": mpp}


def to_artifact(config: dict) -> dict:
    """The sections of ``classifier_config.json`` from a flat config."""
    return {
        "model": {k: config[k] for k in MODEL_KEYS if k in config},
        "data": {k: v for k, v in config.items() if k not in _SECTION_KEYS},
        "labels": list(config["label_map"]["classes"]),
        "geometry": _geometry(config["tile_px"], config["tile_um"]),
        "normalizer": config.get("normalizer"),
        "input_norm": {"mean": list(config["mean"]), "std": list(config["std"])},
        "metrics": config.get("metrics") or {},
        "training": {k: config[k] for k in PROVENANCE_KEYS if k in config},
    }


def from_artifact(meta: dict) -> dict:
    """The flat config of a ``classifier_config.json``."""
    labels = LabelMap(meta["labels"])
    geo = meta["geometry"]
    return {
        **meta["model"],
        "num_classes": len(labels),
        "label_map": labels.to_dict(),
        "tile_px": geo["tile_px"],
        "tile_um": geo["tile_um"],
        "normalizer": meta.get("normalizer"),
        "mean": meta["input_norm"]["mean"],
        "std": meta["input_norm"]["std"],
        **meta.get("data", {}),
        "metrics": meta.get("metrics", {}),
        **meta.get("training", {}),
    }


def save_model(outdir: str | os.PathLike, net: nn.Module, config: dict, overwrite: bool = False) -> Path:
    """Write the timm model ``net`` and its flat ``config`` as a model folder ``outdir`` (atomically).

    An existing model there is only replaced with ``overwrite=True``.
    """
    _check_config(config, "the model config")
    return save_model_folder(outdir, KIND, net.state_dict(), to_artifact(_jsonable(config)), overwrite=overwrite)


@dataclass
class LoadedModel:
    """A rebuilt classifier: ``net`` (eval mode), its flat ``config``, ``label_map``, ``normalizer`` and
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
        from histolight.training.normalize import normalize_batch

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
    for k in ("timm_name", "label_map", "tile_px", "tile_um", "mean", "std"):
        if k not in cfg:
            raise HistolightError(f"{where} lacks '{k}'")
    return cfg


def read_model_config(path: str | os.PathLike) -> dict:
    """The flat config of a model folder (either layout), its config JSON, or a ``task=train_tiles`` ``.ckpt``."""
    p = Path(path)
    if p.suffix == ".ckpt":
        from histolight.io.weights import read_checkpoint

        ck = read_checkpoint(p)
        if "histolight" not in ck:
            raise HistolightError(f"checkpoint '{p}' has no histolight model config (not written by task=train_tiles)")
        return _check_config(ck["histolight"], str(p))
    mf = read_model_folder(p, KIND)
    return _check_config(dict(mf.meta) if mf.legacy else from_artifact(mf.meta), str(mf.folder))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a classifier from a model folder / its config JSON / a ``.ckpt`` (no training config needed).

    Weights are read safely: a pickle that needs code execution is refused (naming the file)."""
    from histolight.classify.module import create_timm_model
    from histolight.io.weights import load_matching, read_state_dict

    p = Path(path)
    cfg = read_model_config(p)
    label_map = LabelMap.from_dict(cfg["label_map"])
    net = create_timm_model(
        cfg["timm_name"], len(label_map), pretrained=False, drop_rate=cfg.get("drop_rate", 0.0), **cfg.get("model_kwargs", {})
    )
    if p.suffix == ".ckpt":
        sd = read_state_dict(p)
    else:
        sd = read_model_folder(p, KIND).state_dict()
    try:
        load_matching(net, sd, source=f"'{path}'", strict=True)
    except HistolightError as e:
        raise HistolightError(f"weights of '{path}' do not fit {cfg['timm_name']} with {len(label_map)} classes: {e}") from None
    net.eval().to(device)
    normalizer = None
    if cfg.get("normalizer"):
        from histolight.norm import build_normalizer

        normalizer = build_normalizer(cfg["normalizer"])
    return LoadedModel(net, cfg, label_map, normalizer, str(p))


__all__ = [
    "KIND",
    "LoadedModel",
    "make_model_config",
    "save_model",
    "load_model",
    "read_model_config",
    "to_artifact",
    "from_artifact",
]
