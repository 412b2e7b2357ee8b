"""Feature bags: one ``(N, D)`` float32 tensor per slide, for MIL models (CLAM, attention MIL, ...).

An extractor is either a trained histolight tile classifier (its penultimate layer; tile size and stain
normalizer come from its ``model_config.json``) or a timm backbone (random init, or local weights from
``checkpoint_path``; nothing is downloaded).

Output layout (the same as Slideflow's feature bags)::

    <outdir>/<slide>.pt           torch float32 tensor (N, D), one row per tile, in TFRecord order
    <outdir>/<slide>.index.npz    arr_0 = int64 (N, 2) tile centres (loc_x, loc_y) in base px
    <outdir>/bags_config.json     the extractor (source, timm name, D, tile_px, normalizer, mean/std)
    <outdir>/summary.csv          per slide: tiles, status, error

A slide counts as done when its ``.pt`` exists (written atomically, after the index); re-running
skips done slides unless ``overwrite=True``. One failing slide is logged and the rest go on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from histolight.errors import ConfigError, HistolightError
from histolight.io.atomic import atomic_save_npz, atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


class _PreLogits(nn.Module):
    """A timm model's pooled features before the classifier: ``(B, 3, H, W) -> (B, D)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


@dataclass
class FeatureExtractor:
    """Tiles in, feature vectors out.

    Attributes:
        net: ``(B, 3, H, W)`` normalized float -> ``(B, D)``.
        transform: per tile, in DataLoader workers: ``H x W x 3`` uint8 -> ``3 x H x W`` uint8 tensor.
        mean, std: per-channel normalization (0-1 scale) applied to the uint8 batch on the device.
        tile_px: tiles are resized to this (None: as stored).
        tile_um: the tile size the model was trained on (checked against the TFRecords' folder name).
        config: JSON-able description written to ``bags_config.json``.
    """

    net: nn.Module
    transform: Callable
    mean: Sequence[float]
    std: Sequence[float]
    tile_px: int | None = None
    tile_um: Any = None
    config: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @torch.no_grad()
    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 on the model's device -> ``(B, D)`` float32."""
        from histolight.classify.augment import normalize_batch

        return self.net(normalize_batch(batch_uint8, self.mean, self.std)).float()


def _is_model_path(model: str) -> bool:
    p = Path(model)
    return p.suffix in (".json", ".ckpt") or (p.is_dir() and (p / "model_config.json").exists())


def build_extractor(
    model: str,
    checkpoint_path: str | None = None,
    tile_px: int | None = None,
    normalizer: Any = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a trained classifier path or a timm model name.

    Args:
        model: a histolight tile classifier (folder with ``model_config.json``, the JSON, or a ``.ckpt``
            from ``task=train_tiles``), or a timm model name such as ``resnet18``.
        checkpoint_path: local weights for a timm backbone (ignored for trained classifiers).
        tile_px: resize tiles to this many px (timm backbones; classifiers use their own ``tile_px``).
        normalizer: stain normalizer config for timm backbones (classifiers use their saved one).
    """
    from histolight.classify.augment import build_transform

    if _is_model_path(str(model)):
        from histolight.classify.artifacts import load_model

        if checkpoint_path:
            log.warning("checkpoint_path is ignored for a trained classifier (%s): its own weights are used", model)
        m = load_model(model, device=device)
        net = _PreLogits(m.net).eval().to(device)
        cfg = {
            "source": "classifier",
            "model": str(Path(model).resolve()),
            "timm_name": m.config["timm_name"],
            "dim": int(m.net.num_features),
            "tile_px": m.tile_px,
            "tile_um": m.tile_um,
            "normalizer": m.config.get("normalizer"),
            "mean": m.config["mean"],
            "std": m.config["std"],
        }
        return FeatureExtractor(net, m.transform(), m.config["mean"], m.config["std"], m.tile_px, m.tile_um, cfg)

    import timm

    from histolight.classify.module import create_timm_model, timm_preprocessing

    if not timm.is_model(str(model)):
        close = timm.list_models(f"*{str(model)[:6]}*")[:5]
        raise ConfigError(
            f"task.model={model!r} is neither a trained classifier path (folder with model_config.json, "
            f"the JSON or a .ckpt) nor a timm model name" + (f"; similar timm names: {close}" if close else "")
        )
    try:
        backbone = create_timm_model(str(model), num_classes=0, pretrained=False, checkpoint_path=checkpoint_path)
    except HistolightError:
        raise
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError for unknown names
        raise ConfigError(f"task.model={model!r} is neither a trained classifier path nor a timm model ({e})") from None
    norm = None
    if normalizer is not None:
        from histolight.norm import build_normalizer

        norm = build_normalizer(normalizer)
    mean, std = timm_preprocessing(str(model))
    net = _PreLogits(backbone).eval().to(device)
    cfg = {
        "source": "timm",
        "timm_name": str(model),
        "checkpoint_path": checkpoint_path,
        "random_init": not checkpoint_path,
        "dim": int(backbone.num_features),
        "tile_px": tile_px,
        "tile_um": None,
        "normalizer": norm.to_config() if norm is not None else None,
        "mean": list(mean),
        "std": list(std),
    }
    if not checkpoint_path:
        log.warning("timm backbone %s has random weights (no checkpoint_path): features are only useful for testing", model)
    return FeatureExtractor(net, build_transform(False, normalizer=norm), mean, std, tile_px, None, cfg)


def _save_tensor(path: Path, t: torch.Tensor) -> None:
    with atomic_write(path, "wb") as fh:
        torch.save(t.contiguous(), fh)


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    tfrecords: Any,
    outdir: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    slides: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Write one feature bag per slide of ``tfrecords`` (folder / glob / files) into ``outdir``.

    Returns the per-slide summary (``slide, tiles, dim, status, error``), also written as ``summary.csv``.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from histolight.classify.data import TileDataset, find_tfrecords, index_tfrecords

    paths = find_tfrecords(tfrecords)
    if not paths:
        raise HistolightError(f"no TFRecords found in {tfrecords!r}; run task=extract first or set task.tfrecords")
    if extractor.tile_um is not None:
        from histolight.classify.predict import check_tile_geometry

        check_tile_geometry(paths, extractor.tile_px, extractor.tile_um)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cfg_path = outdir / "bags_config.json"
    if cfg_path.exists() and not overwrite:
        old = json.loads(cfg_path.read_text())
        if {k: old.get(k) for k in ("timm_name", "dim", "model")} != {
            k: extractor.config.get(k) for k in ("timm_name", "dim", "model")
        }:
            raise HistolightError(
                f"'{outdir}' holds feature bags of another extractor ({old.get('timm_name')}, "
                f"dim {old.get('dim')}); choose another outdir or pass overwrite=true"
            )
    atomic_write_json(cfg_path, extractor.config)
    table = index_tfrecords(paths, slides=slides)
    names = sorted(table["slide"].unique()) if len(table) else []
    empty = sorted({Path(p).name.rsplit(".tfrecords", 1)[0] for p in paths} - set(names))
    rows = [{"slide": s, "tiles": 0, "dim": extractor.dim, "status": "empty", "error": None} for s in empty]
    extractor.net.to(device)
    bar = tqdm(names, desc="feature bags", unit="slide", disable=not progress)
    for slide in bar:
        out = outdir / f"{slide}.pt"
        group = table[table["slide"] == slide]
        if out.exists() and not overwrite:
            rows.append({"slide": slide, "tiles": len(group), "dim": extractor.dim, "status": "skipped (exists)", "error": None})
            continue
        try:
            ds = TileDataset(group, transform=extractor.transform, tile_px=extractor.tile_px)
            dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False)
            feats = [extractor(b["image"].to(device)).cpu() for b in dl]
            bag = torch.cat(feats) if feats else torch.zeros((0, extractor.dim))
            if not torch.isfinite(bag).all():
                raise HistolightError(f"non-finite features for slide {slide}")
            atomic_save_npz(outdir / f"{slide}.index.npz", arr_0=group[["loc_x", "loc_y"]].to_numpy(np.int64))
            _save_tensor(out, bag)
            rows.append({"slide": slide, "tiles": len(group), "dim": int(bag.shape[1]), "status": "ok", "error": None})
        except HistolightError as e:
            log.error("feature bag for %s failed: %s", slide, e)
            rows.append({"slide": slide, "tiles": len(group), "dim": extractor.dim, "status": "failed", "error": str(e)})
        bar.set_postfix(tiles=len(group))
    summary = pd.DataFrame(rows, columns=["slide", "tiles", "dim", "status", "error"]).sort_values("slide")
    atomic_write_text(outdir / "summary.csv", summary.to_csv(index=False))
    return summary


def load_bag(outdir: str | os.PathLike, slide: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(features (N, D), locations (N, 2))`` of one slide's bag."""
    outdir = Path(outdir)
    feats = torch.load(outdir / f"{slide}.pt", map_location="cpu", weights_only=True)
    locs = np.load(outdir / f"{slide}.index.npz")["arr_0"]
    return feats, locs


__all__ = ["FeatureExtractor", "build_extractor", "extract_features", "load_bag"]
