"""Feature bags: one ``(N, D)`` float32 tensor per slide, for MIL models (CLAM, attention MIL, ...).

An extractor is either a trained histolight tile classifier (its penultimate layer; tile size and stain
normalizer come from its model folder, :mod:`histolight.training.artifacts`) or a timm backbone (random init, or local weights from
``checkpoint_path``; nothing is downloaded).

Output layout (the same as Slideflow's feature bags)::

    <outdir>/<slide>.pt           torch float32 tensor (N, D), one row per tile, in TFRecord order
    <outdir>/<slide>.index.npz    arr_0 = int64 (N, 2) tile centres (loc_x, loc_y) in base px
    <outdir>/bags_config.json     the extractor (source, timm name, D, tile_px, normalizer, mean/std)
    <outdir>/summary.csv          per slide: slide, status (done/skipped/failed/empty), reason, seconds, tiles, dim

A slide counts as done when its ``.pt`` exists (written atomically, after the index); re-running
skips done slides (reason ``exists``) unless ``overwrite=True``. One failing slide (e.g. a corrupt TFRecord) is
recorded as ``failed`` with its reason and the rest go on (:mod:`histolight.cohort`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histolight.cohort import CohortResult, run_per_slide
from histolight.errors import ConfigError, HistolightError
from histolight.io.atomic import atomic_save_npz, atomic_write, atomic_write_json

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
        from histolight.training.normalize import normalize_batch

        return self.net(normalize_batch(batch_uint8, self.mean, self.std)).float()


def _is_model_path(model: str) -> bool:
    p = Path(model)
    if p.suffix in (".json", ".ckpt"):
        return True
    from histolight.training.artifacts import is_model_folder

    return p.is_dir() and is_model_folder(p, "classifier")


def build_extractor(
    model: str,
    checkpoint_path: str | None = None,
    tile_px: int | None = None,
    normalizer: Any = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` from a trained classifier path or a timm model name.

    Args:
        model: a histolight tile classifier (model folder, its config JSON, or a ``.ckpt``
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
            f"task.model={model!r} is neither a trained classifier path (a model folder from task=train_tiles, "
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


_EXTRACTORS: dict[str, FeatureExtractor] = {}


def load_extractor(spec: FeatureExtractor | dict, device: str = "cpu") -> FeatureExtractor:
    """``spec`` itself when it is a :class:`FeatureExtractor`, else ``build_extractor(**spec, device=device)`` built
    once per process (the last one is cached): slide workers build their extractor once, not once per slide."""
    if isinstance(spec, FeatureExtractor):
        return spec
    key = json.dumps({**spec, "device": str(device)}, sort_keys=True, default=str)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()
        _EXTRACTORS[key] = build_extractor(**spec, device=device)
    return _EXTRACTORS[key]


def bag_slide(
    name: str,
    extractor: FeatureExtractor | dict,
    files: dict[str, list[str]],
    outdir: str,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Per-slide function of :func:`extract_features`: the feature bag of slide ``name`` from its TFRecord(s)
    ``files[name]``. Returns its summary row (``tiles``, ``dim``); ``skipped`` (reason ``exists``) when the bag
    exists and not ``overwrite``, ``empty`` when the slide has no tile."""
    from torch.utils.data import DataLoader

    from histolight.classify.data import TileDataset
    from histolight.cohort import report_progress
    from histolight.io.tilestore import index_tfrecords

    out = Path(outdir) / f"{name}.pt"
    if out.exists() and not overwrite:
        return {"status": "skipped", "reason": "exists"}
    ext = load_extractor(extractor, device)
    group = index_tfrecords(files[name])
    if group.empty:
        return {"status": "empty", "tiles": 0, "dim": ext.dim}
    ext.net.to(device)
    ds = TileDataset(group, transform=ext.transform, tile_px=ext.tile_px)
    feats = []
    for b in DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False):
        feats.append(ext(b["image"].to(device)).cpu())
        report_progress(len(b["image"]), len(ds))
    bag = torch.cat(feats)
    if not torch.isfinite(bag).all():
        raise HistolightError(f"non-finite features for slide {name}")
    atomic_save_npz(Path(outdir) / f"{name}.index.npz", arr_0=group[["loc_x", "loc_y"]].to_numpy(np.int64))
    _save_tensor(out, bag)
    return {"tiles": len(group), "dim": int(bag.shape[1])}


def default_tiles(
    extractor: FeatureExtractor, tiles_root: str | os.PathLike, cohort: str, tile_px: int | None = None, tile_um: Any = None
) -> Path:
    """The tile folder ``task=extract`` writes for this extractor: ``<tiles_root>/<cohort>/<px>px_<um>um`` with a
    trained classifier's own geometry, or ``tile_px``/``tile_um`` for a timm backbone (ConfigError if unset)."""
    from histolight.io.tilestore import tile_folder

    px, um = (extractor.tile_px, extractor.tile_um) if extractor.tile_um is not None else (tile_px, tile_um)
    if px is None or um is None:
        raise ConfigError(
            f"task.tfrecords=None is invalid for the timm backbone {extractor.config.get('timm_name')!r} without "
            "task.tile_px and task.tile_um: set both (the tile folder <tiles_root>/<dataset>/<px>px_<um>um) or task.tfrecords"
        )
    return tile_folder(tiles_root, cohort, px, um)


def extract_features(
    extractor: FeatureExtractor | dict,
    tfrecords: Any,
    outdir: str | os.PathLike,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = "auto",
    overwrite: bool = False,
    slides: Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> CohortResult:
    """Write one feature bag per slide of ``tfrecords`` (folder / glob / files) into ``outdir``, on the cohort runner
    (:func:`histolight.cohort.run_per_slide`).

    Args:
        extractor: a :class:`FeatureExtractor`, or the keyword arguments of :func:`build_extractor` (without
            ``device``), built once per slide worker.
        device: ``auto`` (cuda when available), ``cpu``, ``cuda[:n]``.
        num_workers: DataLoader workers per slide (0 inside slide worker processes).
        workers: slide worker processes.

    Returns: the run's :class:`~histolight.cohort.CohortResult`; its table (``slide, status, reason, seconds, tiles,
    dim``) is also ``<outdir>/summary.csv``.
    """
    from histolight.io.tilestore import find_tfrecords, tfrecord_slide_name
    from histolight.utils.device import resolve_device

    device = resolve_device(device)
    paths = find_tfrecords(tfrecords)
    if not paths:
        raise HistolightError(f"no TFRecords found in {tfrecords!r}; run task=extract first or set task.tfrecords")
    ext = load_extractor(extractor, device)
    if ext.tile_um is not None:
        from histolight.classify.predict import check_tile_geometry

        check_tile_geometry(paths, ext.tile_px, ext.tile_um)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cfg_path = outdir / "bags_config.json"
    keys = ("timm_name", "dim", "model")
    if cfg_path.exists() and not overwrite:
        old = json.loads(cfg_path.read_text())
        if {k: old.get(k) for k in keys} != {k: ext.config.get(k) for k in keys}:
            raise HistolightError(
                f"'{outdir}' holds feature bags of another extractor ({old.get('timm_name')}, "
                f"dim {old.get('dim')}); choose another outdir or pass overwrite=true"
            )
    atomic_write_json(cfg_path, ext.config)
    files: dict[str, list[str]] = {}
    for p in paths:
        files.setdefault(tfrecord_slide_name(p), []).append(p)
    names = sorted(files) if slides is None else [s for s in sorted(files) if s in set(slides)]
    fn = functools.partial(
        bag_slide,
        extractor=extractor,
        files=files,
        outdir=str(outdir),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        overwrite=overwrite,
    )
    return run_per_slide(
        names, fn, out_dir=outdir, workers=workers, summary_name="summary.csv", desc="feature bags", progress=progress
    )


def load_bag(outdir: str | os.PathLike, slide: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(features (N, D), locations (N, 2))`` of one slide's bag."""
    outdir = Path(outdir)
    feats = torch.load(outdir / f"{slide}.pt", map_location="cpu", weights_only=True)
    locs = np.load(outdir / f"{slide}.index.npz")["arr_0"]
    return feats, locs


__all__ = ["FeatureExtractor", "build_extractor", "load_extractor", "bag_slide", "default_tiles", "extract_features", "load_bag"]
