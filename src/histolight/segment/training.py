"""``histolight.segment.train`` (module ``training``): thumbnails + masks -> a trained model folder (Slideflow's ``sf.segment.train``).

>>> from histolight.dataset import Dataset
>>> from histolight import segment
>>> ds = Dataset("data/demo/slides", rois="data/demo/rois", annotations="data/demo/annotations.csv")
>>> cfg = segment.SegmentConfig(mode="multiclass", labels=["tumor", "stroma", "necrosis"], mpp=4, size=256, epochs=10)
>>> metrics = segment.train(cfg, ds, dest="outputs/seg_model")
>>> model, cfg = segment.load_model_and_config("outputs/seg_model")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from histolight.errors import ConfigError, HistolightError
from histolight.segment.config import SegmentConfig
from histolight.segment.data import ThumbMask, check_labels_present, export_key, export_thumbs_and_masks, load_thumb_mask

log = logging.getLogger(__name__)


def split_slides(dataset, cfg: SegmentConfig, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) slide names: by the annotations' ``split`` column when present (slides of other splits,
    e.g. ``test``, are left out), else a random patient-level split of ``val_fraction`` (also used to carve
    validation patients out of the training split when no slide has ``val_split``). Slides of one patient
    never straddle the two sets."""
    ann = dataset.annotations
    names = dataset.names
    if ann is not None and "split" in ann.columns:

        def pick(spec) -> list[str]:
            vals = {str(v) for v in (spec if isinstance(spec, (list, tuple)) else [spec])}
            return [n for n in names if n in ann.index and str(ann.at[n, "split"]) in vals]

        train, val = pick(cfg.train_split), pick(cfg.val_split)
        overlap = {dataset.patient(n) for n in train} & {dataset.patient(n) for n in val}
        if overlap:
            log.warning("patients %s have slides in both the train and val splits", sorted(overlap)[:5])
        if train and val:
            return train, val
        if train:
            log.warning(
                "no slide has split=%r; drawing %.0f%% of the training patients for validation",
                cfg.val_split,
                100 * cfg.val_fraction,
            )
            names = train
        else:
            log.warning("no slide has split=%r; splitting every slide by patient instead", cfg.train_split)
    patients = sorted({dataset.patient(n) for n in names})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    n_val = int(round(cfg.val_fraction * len(patients))) if len(patients) > 1 else 0
    if cfg.val_fraction > 0 and len(patients) > 1:
        n_val = max(1, n_val)
    val_p = set(patients[:n_val])
    return [n for n in names if dataset.patient(n) not in val_p], [n for n in names if dataset.patient(n) in val_p]


def prepare_items(
    dataset, cfg: SegmentConfig, cache_dir: str | os.PathLike, slides: Sequence[str], overwrite: bool = False
) -> list[ThumbMask]:
    """Export (or reuse cached) thumbnails + masks of ``slides`` and load them, stain-normalised if configured."""
    folder = Path(cache_dir) / export_key(cfg.mpp, cfg.mode, cfg.labels)
    paths = export_thumbs_and_masks(
        dataset, cfg.mpp, folder, labels=cfg.labels, mode=cfg.mode, overwrite=overwrite, slides=slides
    )
    items = [load_thumb_mask(paths[n]) for n in slides if n in paths]
    if cfg.normalizer:
        from histolight.norm import build_normalizer

        norm = build_normalizer(cfg.normalizer)
        if norm is not None:
            for it in items:
                if getattr(norm, "use_context", False):
                    norm.set_context(it.image)
                it.image = norm.transform(it.image)
    return items


def _default_trainer(dest: Path, epochs: int, loggers, callbacks, **kw):
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(callbacks or [])
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(dest / "checkpoints"),
                filename="epoch_{epoch:03d}",
                monitor="val/miou",
                mode="max",
                save_last=True,
                auto_insert_metric_name=False,
            )
        )
    opts = dict(
        max_epochs=epochs,
        logger=loggers if loggers else False,
        callbacks=callbacks,
        default_root_dir=str(dest),
        accelerator="auto",
        devices=1,
        log_every_n_steps=5,
        enable_progress_bar=True,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def _best_checkpoint(trainer) -> str | None:
    for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
        p = getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")
        if p and Path(p).exists():
            return p
    return None


def train(
    config: SegmentConfig,
    dataset,
    dest: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    trainer=None,
    loggers: Sequence | None = None,
    callbacks: Sequence | None = None,
    epochs: int | None = None,
    seed: int | None = 42,
    overwrite: bool = False,
    run_config: dict | None = None,
    train_slides: Sequence[str] | None = None,
    val_slides: Sequence[str] | None = None,
    n_overlays: int = 3,
    overlay_every: int = 5,
    **trainer_kwargs,
) -> dict[str, Any]:
    """Train a segmentation model and save it into ``dest`` (``model.pth``, ``segment_config.json``, checkpoints).

    Args:
        config: the :class:`SegmentConfig`.
        dataset: a :class:`histolight.dataset.Dataset` with ROIs (and a ``split`` column, else a
            patient-level split of ``config.val_fraction`` is drawn).
        dest: output folder (the run dir under Hydra).
        cache_dir: where thumbnails/masks are exported and reused (default ``dest/thumbs``).
        trainer: a Lightning ``Trainer``; default: one built from ``epochs`` (``config.epochs``)
            with a checkpoint on the best ``val/miou``, ``loggers`` and ``callbacks``.
        seed: global seed (``None`` = leave as is).
        overwrite: replace a model already in ``dest``.
        run_config: the full resolved run config, logged to the loggers and saved as ``training``.
        train_slides, val_slides: explicit slide lists (override the split).
        n_overlays, overlay_every: validation overlay images (``dest/overlays`` and image loggers).

    Returns: metrics of the best checkpoint on the validation slides (``val/miou``, ``val/mdice``,
    ``val/iou_<class>``, ...), plus ``epochs``, ``train_time_s`` and ``model_dir``.
    """
    import lightning.pytorch as L
    import torch

    from histolight.segment.datamodule import SegmentDataModule, input_stats
    from histolight.segment.io import MODEL_FILE, save_model
    from histolight.segment.model import SegmentModel

    t0 = time.time()
    dest = Path(dest)
    if (dest / MODEL_FILE).exists() and not overwrite:
        raise HistolightError(f"{dest / MODEL_FILE} exists; pass overwrite=True to replace it")
    dest.mkdir(parents=True, exist_ok=True)
    if epochs is not None:
        config = replace(config, epochs=int(epochs))
    if seed is not None:
        L.seed_everything(int(seed), workers=True, verbose=False)
    cache_dir = Path(cache_dir) if cache_dir else dest / "thumbs"

    # ---- slides and data
    if train_slides is None:
        train_names, val_names = split_slides(dataset, config, seed=seed or 0)
    else:
        train_names, val_names = list(train_slides), list(val_slides or [])
    if val_slides is not None:
        val_names = list(val_slides)
    if not train_names:
        raise ConfigError("no training slides: check data.train_split and the annotations' split column")
    train_items = prepare_items(dataset, config, cache_dir, train_names)
    val_items = prepare_items(dataset, config, cache_dir, val_names) if val_names else []
    if not train_items:
        raise HistolightError("no training slide could be exported (see the errors above)")
    if not val_items:
        log.warning("no validation slides: validating on the training slides (metrics are not held-out)")
        val_items = train_items
    check_labels_present(train_items + val_items, config.labels, config.mode)
    if config.input_mean is None or config.input_std is None:
        mean, std = input_stats(train_items)
        config = replace(config, input_mean=mean, input_std=std)
    log.info(
        "segmentation: %s; %d train slides (%s), %d val slides (%s); %d crops/epoch",
        config.describe(),
        len(train_items),
        ",".join(i.name for i in train_items),
        len(val_items),
        ",".join(i.name for i in val_items),
        config.crops_per_epoch,
    )

    # ---- model, trainer
    datamodule = SegmentDataModule(config, train_items, val_items)
    model = SegmentModel(config, load_pretrained=True, n_overlays=n_overlays, overlay_every=overlay_every)
    model.overlay_dir = dest / "overlays"
    if trainer is None:
        trainer = _default_trainer(dest, config.epochs, loggers, callbacks, **trainer_kwargs)
    else:
        config = replace(config, epochs=int(trainer.max_epochs)) if (trainer.max_epochs or -1) > 0 else config
        model.config = config
    hp = {
        "segment": config.to_dict(),
        "artifacts_dir": str(dest.resolve()),
        "train_slides": [i.name for i in train_items],
        "val_slides": [i.name for i in val_items],
    }
    if run_config is not None:
        hp["run"] = run_config
    for lg in trainer.loggers:
        try:
            lg.log_hyperparams(hp)
        except Exception as e:  # noqa: BLE001
            log.warning("could not log the config to %s: %s", type(lg).__name__, e)

    trainer.fit(model, datamodule=datamodule)
    fit_time = time.time() - t0

    # ---- best weights, final metrics, artifacts
    best = _best_checkpoint(trainer)
    if best and not getattr(trainer, "fast_dev_run", False):
        ck = torch.load(best, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["state_dict"])
        log.info("best checkpoint: %s", best)
    res = trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (res[0] if res else {}).items()}
    metrics.update({"epochs": int(trainer.current_epoch), "train_time_s": round(fit_time, 1), "model_dir": str(dest)})
    extra = {
        "training": run_config,
        "metrics": metrics,
        "checkpoint": best,
        "train_slides": [i.name for i in train_items],
        "val_slides": [i.name for i in val_items],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_model(model, dest, extra=extra, overwrite=True)
    from histolight.io.atomic import atomic_write_json

    atomic_write_json(dest / "metrics.json", metrics)
    for lg in trainer.loggers:
        exp = getattr(lg, "experiment", None)
        summ = getattr(exp, "summary", None)
        if summ is not None and hasattr(summ, "update"):
            try:
                summ.update(
                    {
                        "artifacts_dir": str(dest.resolve()),
                        "model_path": str((dest / MODEL_FILE).resolve()),
                        **{f"best/{k}": v for k, v in metrics.items() if isinstance(v, float)},
                    }
                )
            except Exception:  # noqa: BLE001
                pass
    log.info("segmentation model saved to %s (val/miou %.4f)", dest, metrics.get("val/miou", float("nan")))
    return metrics
