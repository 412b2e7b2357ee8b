"""``task=train_tiles``: extract (or reuse) tiles, label them, split by patient, train a timm classifier,
evaluate it and save it as a self-contained model folder.

    python run.py experiment=tile_classifier                       # demo cohort, ROI labels, mobilenetv3
    python run.py experiment=tile_classifier data.label_source=slide   # weak supervision
    python run.py experiment=tile_classifier trainer=gpu            # one GPU, AMP
    python run.py experiment=tile_classifier trainer=ddp            # several GPUs

Outputs in the run folder: ``model/`` (``weights.pt`` + ``model_config.json``, see
:mod:`histolight.classify.artifacts`), ``checkpoints/``, ``tiles.parquet`` (every used tile with its
label and split), ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from histolight.errors import ConfigError

log = logging.getLogger(__name__)


def build_normalizer_from(cfg: DictConfig, enabled: bool):
    """The run's stain normalizer (``cfg.normalizer``), or None; context normalizers are refused."""
    if not enabled or cfg.get("normalizer") is None:
        return None
    from histolight.norm import build_normalizer

    n = build_normalizer(cfg.normalizer)
    if n is not None and n.method == "augment":
        raise ConfigError(
            "normalizer=augment is a random stain augmentation, not a normalization; for training use "
            "data.augment.stain_augment={p: 0.5, ...} (normalizer=none)"
        )
    if n is not None and getattr(n, "use_context", False):
        raise ConfigError(
            "normalizer.context=true needs a per-slide thumbnail and cannot run on the fly in the tile "
            "loader; normalize at extraction instead (data.extract_options.normalizer) or set context=false"
        )
    return n


def write_parquet(df, path) -> None:
    """Write ``df`` as Parquet atomically."""
    from histolight.io.atomic import atomic_write

    with atomic_write(path, "wb") as fh:
        df.to_parquet(fh, index=False)


def trainer_config(cfg: DictConfig) -> DictConfig:
    """``cfg.trainer`` with GPU-only options dropped on CPU (so ``trainer=ddp trainer.accelerator=cpu`` works):
    SyncBatchNorm needs CUDA, and 16-bit AMP is a GPU feature (CPU runs use 32-true)."""
    tcfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    acc = str(tcfg.get("accelerator", "auto"))
    on_cpu = acc == "cpu" or (acc == "auto" and not _cuda())
    if on_cpu:
        if tcfg.get("sync_batchnorm"):
            log.warning("trainer.sync_batchnorm=true needs GPUs; disabled on CPU")
            tcfg.sync_batchnorm = False
        if str(tcfg.get("precision", "32-true")) in ("16-mixed", "16", "16-true"):
            log.warning("trainer.precision=%s (AMP) needs a GPU; using 32-true on CPU", tcfg.precision)
            tcfg.precision = "32-true"
    return tcfg


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _clean(metrics: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def run(cfg: DictConfig) -> dict:
    from histolight.classify.config import load_configs

    task, data, model_cfg = load_configs(cfg)  # every option validated before any work
    if cfg.get("trainer") is None:
        raise ConfigError("task=train_tiles needs a trainer config (trainer=cpu|gpu|ddp)")
    normalizer = build_normalizer_from(cfg, data.normalize)

    import lightning as L

    from histolight.classify import (
        LabelMap,
        TileClassifier,
        TileDataModule,
        make_model_config,
        prepare_tiles,
        save_model,
        split_patients,
    )
    from histolight.classify.module import timm_preprocessing
    from histolight.tasks.common import load_dataset, output_dir
    from histolight.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers

    t0 = time.time()
    seed = int(cfg.get("seed") or 0)
    L.seed_everything(seed, workers=True, verbose=False)
    out = output_dir(cfg)
    ds = load_dataset(cfg)

    # ---- tiles: extract or reuse, label, split by patient
    tiles, info = prepare_tiles(
        ds,
        tile_px=data.tile_px,
        tile_um=data.tile_um,
        tiles_dir=data.tiles_dir,
        tfrecords=data.tfrecords,
        extract=data.extract,
        extract_options=data.extract_options,
        label_source=data.label_source,
        label_column=data.label_column,
        label_table=data.label_table,
        roi_filter_method=data.extract_options.get("roi_filter_method", "center"),
        classes=data.labels,
    )
    sp = data.split
    tiles["split"] = split_patients(
        tiles,
        sp.method,
        dataset=ds,
        column=sp.column,
        val_fraction=sp.val_fraction,
        test_fraction=sp.test_fraction,
        k=sp.k,
        fold=sp.fold,
        seed=sp.seed,
    )
    label_map = LabelMap.from_labels(tiles["label"], classes=data.labels)
    mean, std = (data.mean, data.std) if data.mean and data.std else timm_preprocessing(model_cfg.name)
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
        verify=data.verify_crc,
    )
    log.info("tiles per split and class:\n%s", dm.summary().to_string())

    # ---- model, trainer
    slide_metrics = (data.label_source == "slide") if task.slide_metrics == "auto" else bool(task.slide_metrics)
    model_config = make_model_config(
        model_cfg.name,
        label_map,
        data.tile_px,
        data.tile_um,
        normalizer=normalizer,
        mean=mean,
        std=std,
        drop_rate=model_cfg.drop_rate,
        model_kwargs=model_cfg.model_kwargs,
        label_source=data.label_source,
        label_column=data.label_column if data.label_source == "slide" else None,
        roi_filter_method=data.extract_options.get("roi_filter_method", "center"),
        dataset=OmegaConf.select(cfg, "dataset.name"),
        split=dict(sp.__dict__),
        seed=seed,
    )
    module = TileClassifier(
        model_cfg.name,
        label_map.names,
        pretrained=model_cfg.pretrained,
        checkpoint_path=model_cfg.checkpoint_path,
        drop_rate=model_cfg.drop_rate,
        freeze=model_cfg.freeze,
        label_smoothing=model_cfg.label_smoothing,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.get("scheduler")),
        scheduler_interval=model_cfg.scheduler_interval,
        slide_metrics=slide_metrics,
        model_config=model_config,
        model_kwargs=model_cfg.model_kwargs,
        mean=mean,
        std=std,
    )
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(trainer_config(cfg), callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        try:
            lg.log_hyperparams(
                {
                    "data": OmegaConf.to_container(cfg.data, resolve=True),
                    "model": OmegaConf.to_container(cfg.model, resolve=True),
                    "seed": seed,
                    "classes": label_map.names,
                    "tiles": dm.summary().to_dict(),
                }
            )
        except Exception as e:  # noqa: BLE001 - logging must not stop training
            log.warning("could not log hyperparameters to %s: %s", type(lg).__name__, e)

    trainer.fit(module, datamodule=dm)

    # ---- evaluate the chosen checkpoint on val / test
    ckpt = None
    cb = trainer.checkpoint_callback
    if cb is not None:
        ckpt = (cb.best_model_path if task.ckpt == "best" else cb.last_model_path) or cb.last_model_path or None
    if task.ckpt == "best" and ckpt is None:
        log.warning("no best checkpoint (no ModelCheckpoint callback with a monitor); evaluating the final weights")
    metrics: dict = {}
    for split in task.eval_splits:
        if not dm.has_split(split):
            log.info("no '%s' split: not evaluated", split)
            continue
        if split == "val":
            trainer.validate(module, dataloaders=dm.eval_dataloader("val"), ckpt_path=ckpt, verbose=False)
            got = module.last_metrics.get("val", {})
        else:
            trainer.test(module, dataloaders=dm.eval_dataloader("test"), ckpt_path=ckpt, verbose=False)
            got = module.last_metrics.get("test", {})
        metrics.update({f"{split}/{k}": float(v) for k, v in got.items()})
    metrics["train/n_tiles"] = float((dm.tiles["split"] == "train").sum())
    metrics["train/steps"] = float(trainer.global_step)
    metrics["epochs"] = float(trainer.current_epoch)
    metrics["seconds"] = round(time.time() - t0, 1)

    # ---- artifacts (rank zero): the evaluated checkpoint's weights
    if ckpt and not any(s in task.eval_splits and dm.has_split(s) for s in ("val", "test")):
        import torch

        module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    if trainer.is_global_zero:
        from histolight.io.atomic import atomic_write_json

        model_dir = Path(task.model_dir) if task.model_dir else out / "model"
        save_model(
            model_dir,
            module.net,
            {
                **model_config,
                "checkpoint": ckpt,
                "metrics": _clean(metrics),
                "extraction": info.extraction,
                "tile_dir": str(info.tile_dir or ""),
            },
            overwrite=task.overwrite,
        )
        write_parquet(dm.tiles.drop(columns=["y"]).reset_index(), out / "tiles.parquet")
        atomic_write_json(out / "metrics.json", _clean(metrics))
        log.info("model saved to %s", model_dir)
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("bal_acc", "auroc", "/acc")))
        print(f"train_tiles: {summary}; model in {model_dir}")
        metrics["model_dir"] = str(model_dir)
    return metrics
