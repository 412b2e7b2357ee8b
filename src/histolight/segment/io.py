"""Saving and loading trained segmentation models (no network access when loading).

A model folder (the training run's folder) holds, in the format of :mod:`histolight.training.artifacts`::

    segment_config.json    format keys + model (arch, encoder, loss, inference options, optimizer, ...),
                           data (mode, labels, mpp, size, sampling, augment, ...), labels (class names,
                           background first), geometry (mpp, tile_px, size), normalizer (with its fit),
                           input_norm (mean/std buffers), metrics, training (run config, checkpoint, slides)
    weights.safetensors    state dict of SegmentNet (smp model + input mean/std buffers)
    checkpoints/*.ckpt     Lightning checkpoints (when trained by histolight.segment.train)

:func:`load_model_and_config` rebuilds the model from the folder alone, from an older folder
(``model.pth`` + flat ``segment_config.json``), or from a Lightning ``.ckpt`` (whose hyperparameters hold
the config).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from histolight.errors import ConfigError, HistolightError
from histolight.segment.config import DATA_FIELDS, MODEL_FIELDS, SegmentConfig
from histolight.training.artifacts import read_model_folder, save_model_folder

log = logging.getLogger(__name__)

KIND = "segment"


def to_artifact(cfg: SegmentConfig, mean: list[float], std: list[float]) -> dict:
    """The sections of ``segment_config.json`` for config ``cfg`` and the network's input ``mean``/``std``."""
    d = cfg.to_dict()
    return {
        "model": {k: d[k] for k in MODEL_FIELDS},
        "data": {**{k: d[k] for k in DATA_FIELDS}, "epochs": cfg.epochs},
        "labels": cfg.class_names,
        "geometry": {"mpp": cfg.mpp, "tile_px": cfg.tile_px, "size": cfg.size},
        "normalizer": cfg.normalizer,
        "input_norm": {"mean": list(mean), "std": list(std)},
    }


def save_model(model, dest: str | os.PathLike, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the :class:`SegmentModel` ``model`` as a model folder ``dest`` (atomically).

    ``extra``: more sections (``metrics``, ``training``). Raises :class:`HistolightError` if a model is already
    there and ``overwrite`` is false.
    """
    meta = to_artifact(model.config, model.net.mean.flatten().tolist(), model.net.std.flatten().tolist())
    return save_model_folder(dest, KIND, model.net.state_dict(), {**meta, **(extra or {})}, overwrite=overwrite)


def _config_for_loading(d: dict, where: str) -> SegmentConfig:
    d = dict(d)
    d["encoder_weights"] = None  # the trained weights are in the folder; never look the original file up
    try:
        return SegmentConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid segmentation model config {where}: {e}") from None


def load_model_and_config(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a trained model: ``(SegmentModel in eval mode, SegmentConfig)``.

    ``path``: a model folder, its ``segment_config.json`` or weights file (``weights.safetensors``, or an older
    folder's ``model.pth``), or a Lightning ``.ckpt``. Makes no network call (the network is built with
    ``encoder_weights=None``); weights are read safely (safetensors or ``torch.load(weights_only=True)``): a
    pickle that needs code execution is refused, naming the file.
    """
    from histolight.io.weights import load_matching, read_checkpoint, read_state_dict
    from histolight.segment.model import SegmentModel

    p = Path(path).expanduser()
    if not p.exists():
        raise HistolightError(f"segmentation model '{p}' not found (give the training run's folder or its weights file)")
    if p.suffix == ".ckpt":
        hp = read_checkpoint(p).get("hyper_parameters") or {}
        if "config" not in hp:
            raise HistolightError(f"{p}: not a histolight segmentation checkpoint (no 'config' hyperparameter)")
        cfg = _config_for_loading(hp["config"], str(p))
        model = SegmentModel(cfg, load_pretrained=False)
        sd = read_state_dict(p)
        load_matching(model, sd, source=str(p), strict=True)
    else:
        mf = read_model_folder(p, KIND)
        meta = mf.meta
        flat = meta if mf.legacy else {**meta["data"], **meta["model"], "normalizer": meta["normalizer"]}
        if not mf.legacy:
            flat.update(input_mean=meta["input_norm"]["mean"], input_std=meta["input_norm"]["std"])
        cfg = _config_for_loading(flat, str(mf.folder))
        model = SegmentModel(cfg, load_pretrained=False)
        try:
            sd = mf.state_dict()
            load_matching(model.net, sd, source=str(mf.weights), strict=True)
        except HistolightError as e:
            raise HistolightError(f"{mf.weights} does not match its config ({cfg.arch}/{cfg.encoder_name}): {e}") from None
    model.to(device)
    model.eval()
    return model, cfg


__all__ = ["KIND", "to_artifact", "save_model", "load_model_and_config"]
