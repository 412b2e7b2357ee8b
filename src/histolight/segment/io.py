"""Saving and loading trained segmentation models (no network access when loading).

A model folder holds::

    model.pth              state dict of SegmentNet (smp model + input mean/std buffers)
    segment_config.json    SegmentConfig fields (arch, encoder, mode, labels, mpp, size, normalizer,
                           input_mean/std, ...) plus format, class_names, n_out, metrics, the
                           training config and the Lightning checkpoint's path
    checkpoints/*.ckpt     Lightning checkpoints (when trained by histolight.segment.train)

:func:`load_model_and_config` rebuilds the model from ``model.pth`` + ``segment_config.json``
alone (or from a Lightning ``.ckpt``, whose hyperparameters hold the config).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import torch

from histolight.errors import ConfigError, HistolightError
from histolight.io.atomic import atomic_write
from histolight.segment.config import SegmentConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.pth"
CONFIG_FILE = "segment_config.json"
FORMAT = "histolight.segment.model/1"


def save_model(model, dest: str | os.PathLike, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model.pth`` and ``segment_config.json`` into folder ``dest`` (atomically).

    Raises :class:`HistolightError` if a model is already there and ``overwrite`` is false.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / MODEL_FILE).exists() and not overwrite:
        raise HistolightError(f"{dest / MODEL_FILE} exists; pass overwrite=True (task.overwrite=true) to replace it")
    cfg: SegmentConfig = model.config
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, buf)
    with atomic_write(dest / MODEL_FILE, "wb") as fh:
        fh.write(buf.getvalue())
    mean = model.net.mean.flatten().tolist()
    std = model.net.std.flatten().tolist()
    meta = {
        **cfg.to_dict(),
        "input_mean": mean,
        "input_std": std,
        "format": FORMAT,
        "n_out": cfg.n_out,
        "class_names": cfg.class_names,
        "normalization": cfg.normalizer,
        "input_stats": {"mean": mean, "std": std},
        **(extra or {}),
    }
    from histolight.io.atomic import atomic_write_json

    atomic_write_json(dest / CONFIG_FILE, meta, default=_json_default)
    return dest


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _config_for_loading(d: dict) -> SegmentConfig:
    d = dict(d)
    d["encoder_weights"] = None  # the trained weights are in model.pth; never look the original file up
    try:
        return SegmentConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid segment_config.json: {e}") from None


def load_model_and_config(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a trained model: ``(SegmentModel in eval mode, SegmentConfig)``.

    ``path``: a model folder, its ``model.pth`` or ``segment_config.json``, or a Lightning ``.ckpt``.
    Makes no network call (the network is built with ``encoder_weights=None``).
    """
    from histolight.segment.model import SegmentModel

    p = Path(path).expanduser()
    if not p.exists():
        raise HistolightError(f"segmentation model '{p}' not found (give the training run's folder or its model.pth)")
    if p.suffix == ".ckpt":
        ck = torch.load(str(p), map_location="cpu", weights_only=False)
        hp = ck.get("hyper_parameters") or {}
        if "config" not in hp:
            raise HistolightError(f"{p}: not a histolight segmentation checkpoint (no 'config' hyperparameter)")
        cfg = _config_for_loading(hp["config"])
        model = SegmentModel(cfg, load_pretrained=False)
        model.load_state_dict(ck["state_dict"], strict=True)
    else:
        folder = p if p.is_dir() else p.parent
        cfg_path, model_path = folder / CONFIG_FILE, folder / MODEL_FILE
        for q in (cfg_path, model_path):
            if not q.exists():
                raise HistolightError(f"{q} is missing: a segmentation model folder holds {MODEL_FILE} and {CONFIG_FILE}")
        try:
            meta = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise HistolightError(f"{cfg_path}: not valid JSON ({e})") from None
        cfg = _config_for_loading(meta)
        model = SegmentModel(cfg, load_pretrained=False)
        sd = torch.load(str(model_path), map_location="cpu", weights_only=True)
        missing, unexpected = model.net.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise HistolightError(
                f"{model_path} does not match its config ({cfg.arch}/{cfg.encoder_name}): "
                f"{len(missing)} missing, {len(unexpected)} unexpected tensors"
            )
    model.to(device)
    model.eval()
    return model, cfg


def read_model_meta(path: str | os.PathLike) -> dict:
    """The full ``segment_config.json`` of a model folder (metrics, training config, ...)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return json.loads((folder / CONFIG_FILE).read_text())
