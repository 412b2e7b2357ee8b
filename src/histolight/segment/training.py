"""``histolight.segment.train`` (module ``training``): thumbnails + masks -> a trained model folder (Slideflow's
``sf.segment.train``), with the shared training kit (:mod:`histolight.training`: splits, augmentation, optimizers,
model folder).

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

from histolight.errors import ConfigError, HistolightError
from histolight.segment.config import SegmentConfig
from histolight.segment.data import ThumbMask, check_labels_present, export_key, export_thumbs_and_masks, load_thumb_mask
from histolight.training.splits import annotation_split, names_in, random_split

log = logging.getLogger(__name__)


def split_slides(dataset, cfg: SegmentConfig, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) slide names, decided per patient (:mod:`histolight.training.splits`).

    With a ``split`` column in the annotations: slides whose value is in ``cfg.train_split`` / ``cfg.val_split``
    (compared case-insensitively; other values, e.g. ``test``, are left out); a patient with slides in two
    splits is a :class:`ConfigError` unless ``cfg.allow_patient_leakage``. When no slide is in the val split,
    ``val_fraction`` of the training patients are drawn for validation; without a split column (or training
    slides), ``val_fraction`` of all patients.
    """
    names = dataset.names
    slide_patient = {n: dataset.patient(n) for n in names}
    ann = dataset.annotations
    if ann is not None and "split" in ann.columns:
        values = {n: dataset.column(n, "split") for n in names}
        roles = {"train": cfg.train_split, "val": cfg.val_split, "test": "test"}
        split = annotation_split(slide_patient, values, roles=roles, allow_leakage=cfg.allow_patient_leakage)
        train, val = names_in(split, "train", names), names_in(split, "val", names)
        if train and val:
            return train, val
        if train:
            log.warning(
                "no slide has split=%r; drawing %.0f%% of the training patients for validation",
                cfg.val_split,
                100 * cfg.val_fraction,
            )
            slide_patient = {n: slide_patient[n] for n in train}
        else:
            log.warning("no slide has split=%r; splitting every slide by patient instead", cfg.train_split)
    split = random_split(slide_patient, val_fraction=cfg.val_fraction, seed=seed)
    return names_in(split, "train", names), names_in(split, "val", names)


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
        for it in items:
            if getattr(norm, "use_context", False):
                norm.set_context(it.image)  # the whole thumbnail is the slide's context
            it.image = norm.transform(it.image)
    return items


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
    ckpt_path: str | os.PathLike | None = None,
    resume: str | None = None,
    **trainer_kwargs,
) -> dict[str, Any]:
    """Train a segmentation model and save it as the model folder ``dest`` (``segment_config.json`` +
    ``weights.safetensors``, see :mod:`histolight.segment.io`), with ``checkpoints/``, ``overlays/`` and
    ``metrics.json``.

    Args:
        config: the :class:`SegmentConfig`.
        dataset: a :class:`histolight.dataset.Dataset` with ROIs (and a ``split`` column, else a
            patient-level split of ``config.val_fraction`` is drawn: :func:`split_slides`).
        dest: output folder (the run dir under Hydra).
        cache_dir: where thumbnails/masks are exported and reused (default ``dest/thumbs``).
        trainer: a Lightning ``Trainer``; default: one built from ``epochs`` (``config.epochs``)
            with a checkpoint on the best ``val/miou``, ``loggers``, ``callbacks`` and ``trainer_kwargs``.
        seed: global seed (``None`` = leave as is).
        overwrite: replace a model already in ``dest`` (checked before any work).
        run_config: the full resolved run config, logged to the loggers and saved as ``training.run``.
        train_slides, val_slides: explicit slide lists (override the split).
        n_overlays, overlay_every: validation overlay images (``dest/overlays`` and image loggers).
        ckpt_path, resume: continue training from this Lightning checkpoint, or (``resume='auto'``) from the
            ``last.ckpt`` of the trainer's checkpoint folder when there is one (:mod:`histolight.training.trainer`).
            Without either, a checkpoint folder holding another run's checkpoints is refused (deleted with
            ``overwrite``) before any work.

    Returns: metrics of the best checkpoint on the validation slides (``val/miou``, ``val/mdice``,
    ``val/iou_<class>``, ...), plus ``epochs``, ``train_time_s`` and ``model_dir``.
    """
    import lightning.pytorch as L

    from histolight.io.atomic import atomic_write_json
    from histolight.io.tables import nan_to_none
    from histolight.segment.datamodule import SegmentDataModule
    from histolight.segment.io import KIND, save_model
    from histolight.segment.model import SegmentModel
    from histolight.training.artifacts import check_overwrite
    from histolight.training.normalize import pixel_stats
    from histolight.training.trainer import (
        check_checkpoint_folder,
        chosen_checkpoint,
        default_trainer,
        fit,
        log_hyperparams,
        restore_weights,
        resume_checkpoint,
        update_summary,
    )

    t0 = time.time()
    dest = Path(dest)
    check_overwrite(dest, KIND, overwrite)
    if epochs is not None:
        config = replace(config, epochs=int(epochs))
    if trainer is None:
        trainer = default_trainer(dest, config.epochs, "val/miou", "max", loggers, callbacks, **trainer_kwargs)
    elif (trainer.max_epochs or -1) > 0:
        config = replace(config, epochs=int(trainer.max_epochs))
    resume_from = resume_checkpoint(trainer, ckpt_path, resume)
    check_checkpoint_folder(trainer, resume_from, overwrite)
    dest.mkdir(parents=True, exist_ok=True)
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
        raise ConfigError(f"data.train_split={config.train_split!r} is invalid: no slide has it in the annotations' split column")
    train_items = prepare_items(dataset, config, cache_dir, train_names)
    val_items = prepare_items(dataset, config, cache_dir, val_names) if val_names else []
    if not train_items:
        raise HistolightError("no training slide could be exported (see the errors above)")
    if not val_items:
        log.warning("no validation slides: validating on the training slides (metrics are not held-out)")
        val_items = train_items
    check_labels_present(train_items + val_items, config.labels, config.mode)
    if config.input_mean is None or config.input_std is None:
        mean, std = pixel_stats(it.image for it in train_items)
        config = replace(config, input_mean=mean, input_std=std)
    slides = {"train_slides": [i.name for i in train_items], "val_slides": [i.name for i in val_items]}
    log.info(
        "segmentation: %s; %d train slides (%s), %d val slides (%s); %d crops/epoch",
        config.describe(),
        len(train_items),
        ",".join(slides["train_slides"]),
        len(val_items),
        ",".join(slides["val_slides"]),
        config.crops_per_epoch,
    )

    # ---- model, trainer
    datamodule = SegmentDataModule(config, train_items, val_items)
    model = SegmentModel(
        config, load_pretrained=True, trust_checkpoint=config.trust_checkpoint, n_overlays=n_overlays, overlay_every=overlay_every
    )
    model.overlay_dir = dest / "overlays"
    hp = {"segment": config.to_dict(), "artifacts_dir": str(dest.resolve()), **slides}
    log_hyperparams(trainer, {**hp, "run": run_config} if run_config is not None else hp)
    fit(trainer, model, datamodule, resume_from)
    fit_time = time.time() - t0

    # ---- best weights, final metrics, artifacts
    best = chosen_checkpoint(trainer, "best")
    restore_weights(model, best)
    res = trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k: nan_to_none(float(v)) for k, v in (res[0] if res else {}).items()}
    metrics.update({"epochs": int(trainer.current_epoch), "train_time_s": round(fit_time, 1), "model_dir": str(dest)})
    training = {"run": run_config, "checkpoint": best, **slides}
    save_model(model, dest, extra={"metrics": metrics, "training": training}, overwrite=True)
    atomic_write_json(dest / "metrics.json", metrics)
    summary = {f"best/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    update_summary(trainer, {"artifacts_dir": str(dest.resolve()), **summary})
    log.info("segmentation model saved to %s (val/miou %s)", dest, metrics.get("val/miou"))
    return metrics


__all__ = ["split_slides", "prepare_items", "train"]
