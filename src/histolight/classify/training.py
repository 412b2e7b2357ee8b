"""``histolight.classify.train``: a cohort -> labelled tiles -> a trained timm tile classifier in a model folder.

>>> from histolight.classify.config import TileDataConfig, TimmModelConfig
>>> data = TileDataConfig(tiles_root="outputs/work/tiles", split={"method": "annotations"})
>>> model = TimmModelConfig(name="resnet18", optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3})
>>> metrics = train(data, model, dataset, "outputs/tiles_run", epochs=5)      # outputs/tiles_run/model

Steps: extract (or reuse) tiles, label them, split by patient (:mod:`histolight.training.splits`), train, evaluate
the chosen checkpoint on the val/test splits, save the model folder (:mod:`histolight.training.artifacts`),
``tiles.parquet`` (every used tile with its label and split) and ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from histolight.classify.config import TileDataConfig, TimmModelConfig
from histolight.errors import ConfigError

log = logging.getLogger(__name__)

#: ``checkpoint`` choices: the monitored best or the last epoch
CKPT_CHOICES = ("best", "last")


def train(
    data: TileDataConfig,
    model: TimmModelConfig,
    dataset,
    dest: str | os.PathLike,
    *,
    trainer=None,
    epochs: int = 5,
    normalizer: Any = None,
    seed: int = 0,
    ckpt: str = "best",
    eval_splits: Sequence[str] = ("val", "test"),
    model_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    slide_metrics: Any = "auto",
    monitor: str = "val/bal_acc",
    monitor_mode: str = "max",
    run_config: dict | None = None,
    ckpt_path: str | os.PathLike | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """Train a tile classifier and save it as a model folder.

    Args:
        data, model: validated ``data`` / ``model`` options.
        dataset: the cohort (:class:`histolight.dataset.Dataset`), with ROIs / annotations for the label source.
        dest: output folder (the run folder under Hydra): ``tiles.parquet``, ``metrics.json``, checkpoints.
        trainer: a Lightning ``Trainer``; default: one device, ``epochs`` epochs, checkpoints of the best
            ``monitor`` (``monitor_mode``) in ``dest/checkpoints``.
        normalizer: the stain normalizer applied to every tile on the fly (a StainNormalizer or its config; only
            when ``data.normalize``), saved with the model; None = off.
        seed: global seed (sampling, augmentation, initialisation).
        ckpt: ``best`` or ``last``: the checkpoint evaluated on ``eval_splits`` and exported.
        model_dir: the model folder (default ``dest/model``); an existing model there is replaced only with
            ``overwrite`` (checked before any work).
        slide_metrics: ``auto`` (on for ``label_source=slide``), True or False: slide-level AUROC / accuracy.
        run_config: the resolved run config, logged to the loggers.
        ckpt_path, resume: continue training from this Lightning checkpoint, or (``resume='auto'``) from the
            ``last.ckpt`` of the trainer's checkpoint folder when there is one (:mod:`histolight.training.trainer`).
            Without either, a checkpoint folder holding another run's checkpoints is refused (deleted with
            ``overwrite``) before any work.

    Returns: ``val/...`` and ``test/...`` metrics (``acc``, ``bal_acc``, ``auroc``, ``loss``, ``n_tiles``, ...),
    ``train/n_tiles``, ``train/steps``, ``epochs``, ``seconds`` and ``model_dir``.
    """
    import lightning as L

    from histolight.classify.artifacts import make_model_config, save_model
    from histolight.classify.datamodule import TileDataModule
    from histolight.classify.labels import LabelMap, check_classes
    from histolight.classify.module import TileClassifier, timm_preprocessing
    from histolight.classify.pipeline import prepare_tiles
    from histolight.classify.splits import split_patients
    from histolight.io.atomic import atomic_write_json
    from histolight.io.tables import nan_to_none, write_parquet
    from histolight.training.artifacts import check_overwrite
    from histolight.training.trainer import (
        check_checkpoint_folder,
        chosen_checkpoint,
        default_trainer,
        fit,
        log_hyperparams,
        restore_weights,
        resume_checkpoint,
    )

    if ckpt not in CKPT_CHOICES:
        raise ConfigError(f"ckpt={ckpt!r} is invalid: must be one of {list(CKPT_CHOICES)}")
    t0 = time.time()
    out = Path(dest)
    model_dir = Path(model_dir) if model_dir else out / "model"
    check_overwrite(model_dir, "classifier", overwrite)
    if trainer is None:
        trainer = default_trainer(out, epochs, monitor, monitor_mode)
    resume_from = resume_checkpoint(trainer, ckpt_path, resume)
    check_checkpoint_folder(trainer, resume_from, overwrite)
    if normalizer is not None and not hasattr(normalizer, "transform"):
        from histolight.norm import build_normalizer

        normalizer = build_normalizer(normalizer)
    normalizer = normalizer if data.normalize else None
    L.seed_everything(int(seed), workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    # ---- tiles: extract or reuse, label, split by patient
    roi_filter = data.extract_options.get("roi_filter_method", "center")
    tiles, info = prepare_tiles(
        dataset,
        tile_px=data.tile_px,
        tile_um=data.tile_um,
        tiles_root=data.tiles_root,
        tfrecords=data.tfrecords,
        extract=data.extract,
        extract_options=data.extract_options,
        label_source=data.label_source,
        label_column=data.label_column,
        label_table=data.label_table,
        roi_filter_method=roi_filter,
        classes=data.labels,
    )
    check_classes(tiles["label"])
    sp = data.split
    tiles["split"] = split_patients(
        tiles,
        sp.method,
        dataset=dataset,
        column=sp.column,
        val_fraction=sp.val_fraction,
        test_fraction=sp.test_fraction,
        k=sp.k,
        fold=sp.fold,
        seed=sp.seed,
        allow_leakage=data.allow_patient_leakage,
    )
    label_map = LabelMap.from_labels(tiles["label"], classes=data.labels)
    mean, std = (data.mean, data.std) if data.mean and data.std else timm_preprocessing(model.name)
    dm = TileDataModule(
        tiles,
        label_map,
        tile_px=data.tile_px,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        streaming=data.streaming,
        shuffle_buffer=data.shuffle_buffer,
        balance=data.balance,
        samples_per_epoch=data.samples_per_epoch,
        augment=data.augment,
        normalizer=normalizer,
        seed=seed,
        pin_memory=data.pin_memory,
        persistent_workers=data.persistent_workers,
        prefetch_factor=data.prefetch_factor,
        verify=data.verify,
        on_corrupt=data.on_corrupt,
    )
    log.info("tiles per split and class:\n%s", dm.summary().to_string())

    # ---- model, trainer
    with_slides = (data.label_source == "slide") if slide_metrics == "auto" else bool(slide_metrics)
    model_config = make_model_config(
        model.name,
        label_map,
        data.tile_px,
        data.tile_um,
        normalizer=normalizer,
        mean=mean,
        std=std,
        drop_rate=model.drop_rate,
        model_kwargs=model.model_kwargs,
        label_source=data.label_source,
        label_column=data.label_column if data.label_source == "slide" else None,
        roi_filter_method=roi_filter,
        dataset=getattr(dataset, "name", None),
        split=asdict(sp),
        seed=seed,
    )
    module = TileClassifier(
        model.name,
        label_map.names,
        pretrained=model.pretrained,
        checkpoint_path=model.checkpoint_path,
        drop_rate=model.drop_rate,
        freeze=model.freeze,
        label_smoothing=model.label_smoothing,
        optimizer=model.optimizer,
        scheduler=model.scheduler,
        scheduler_interval=model.scheduler_interval,
        warmup_epochs=model.warmup_epochs,
        slide_metrics=with_slides,
        model_config=model_config,
        model_kwargs=model.model_kwargs,
        mean=mean,
        std=std,
    )
    hp = {"data": asdict(data), "model": asdict(model), "seed": seed, "classes": label_map.names, "tiles": dm.summary().to_dict()}
    log_hyperparams(trainer, {**hp, **({"run": run_config} if run_config else {})})
    fit(trainer, module, dm, resume_from)

    # ---- evaluate the chosen checkpoint's weights on val / test
    chosen = chosen_checkpoint(trainer, ckpt)
    restore_weights(module, chosen)
    metrics: dict = {}
    for split in eval_splits:
        if not dm.has_split(split):
            log.info("no '%s' split: not evaluated", split)
            continue
        run_eval = trainer.validate if split == "val" else trainer.test
        run_eval(module, dataloaders=dm.eval_dataloader(split), verbose=False)
        metrics.update({f"{split}/{k}": float(v) for k, v in module.last_metrics.get(split, {}).items()})
    metrics["train/n_tiles"] = float((dm.tiles["split"] == "train").sum())
    metrics["train/steps"] = float(trainer.global_step)
    metrics["epochs"] = float(trainer.current_epoch)
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics = {k: nan_to_none(v) for k, v in metrics.items()}

    # ---- artifacts (rank zero)
    if trainer.is_global_zero:
        extra = {"checkpoint": chosen, "metrics": metrics, "extraction": info.extraction, "tile_dir": str(info.tile_dir or "")}
        save_model(model_dir, module.net, {**model_config, **extra}, overwrite=overwrite)
        write_parquet(dm.tiles.drop(columns=["y"]).reset_index(), out / "tiles.parquet")
        atomic_write_json(out / "metrics.json", metrics)
        log.info("model saved to %s", model_dir)
    metrics["model_dir"] = str(model_dir)
    return metrics


__all__ = ["train"]
