"""``task=train_seg``: train a whole-slide segmentation model (``histolight.segment.train``).

    python run.py experiment=seg_multiclass                 # demo cohort, W&B (offline without a key)
    python run.py -m experiment=seg_multiclass model.arch=Unet,FPN model.lr=1e-4,3e-4
    python run.py experiment=seg_multiclass hparams_search=seg_optuna

Outputs in the run folder: ``model.pth`` + ``segment_config.json`` (load with
``histolight.segment.load_model_and_config(<run dir>)``), ``checkpoints/`` (Lightning),
``overlays/`` (validation image | truth | prediction), ``metrics.json``. Returns the best
checkpoint's validation metrics (``val/miou``, ...), so sweeps can optimise them.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from histolight.config import from_config
from histolight.errors import ConfigError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    from histolight.segment.config import config_from_hydra
    from histolight.segment.tasks import TrainSegTask, wandb_sweep_settings

    task = from_config(TrainSegTask, cfg.task, "task")
    scfg = config_from_hydra(cfg)  # every option validated before any work
    ds_labels = OmegaConf.select(cfg, "dataset.labels")
    if scfg.labels and ds_labels:
        unknown = [lab for lab in scfg.labels if lab not in ds_labels]
        if unknown:
            raise ConfigError(
                f"data.labels={scfg.labels} is invalid: {unknown} not among the cohort's labels {list(ds_labels)} "
                "(dataset.labels)"
            )
    if cfg.get("trainer") is None:
        raise ConfigError("task=train_seg needs a trainer config (trainer=cpu|gpu)")

    from histolight.segment import train
    from histolight.tasks.common import load_dataset, output_dir
    from histolight.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers

    out = output_dir(cfg)
    ds = load_dataset(cfg)
    logger_cfg = cfg.get("logger")
    if logger_cfg is not None and logger_cfg.get("wandb") is not None:
        sweep = wandb_sweep_settings(cfg)
        logger_cfg = OmegaConf.create(OmegaConf.to_container(logger_cfg, resolve=True))
        for k, v in sweep.items():
            if logger_cfg.wandb.get(k) is None:
                logger_cfg.wandb[k] = v
    loggers = instantiate_loggers(logger_cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    metrics = train(
        scfg,
        ds,
        out,
        cache_dir=cfg.data.get("cache_dir"),
        trainer=trainer,
        seed=cfg.get("seed"),
        overwrite=task.overwrite,
        run_config=run_config,
        n_overlays=task.n_overlays,
        overlay_every=task.overlay_every,
    )
    print(
        f"Segmentation model: {out}  (val/miou {metrics.get('val/miou', float('nan')):.4f}, "
        f"val/mdice {metrics.get('val/mdice', float('nan')):.4f}, {metrics.get('train_time_s')} s)"
    )
    return metrics
