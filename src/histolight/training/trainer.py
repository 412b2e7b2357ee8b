"""Lightning trainer plumbing shared by the training stacks: the trainer of a Hydra run (loggers with W&B sweep
naming, callbacks, CPU fallbacks for GPU-only options), a default trainer for the Python API, hyperparameter
logging, and the checkpoint whose weights a run exports."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def trainer_config(trainer_cfg: Any) -> Any:
    """``trainer_cfg`` (a DictConfig) with GPU-only options dropped on CPU (so ``trainer=ddp
    trainer.accelerator=cpu`` works): SyncBatchNorm needs CUDA, and 16-bit AMP is a GPU feature (CPU: 32-true)."""
    import torch
    from omegaconf import OmegaConf

    tcfg = OmegaConf.create(OmegaConf.to_container(trainer_cfg, resolve=True))
    acc = str(tcfg.get("accelerator", "auto"))
    if acc == "cpu" or (acc == "auto" and not torch.cuda.is_available()):
        if tcfg.get("sync_batchnorm"):
            log.warning("trainer.sync_batchnorm=true needs GPUs; disabled on CPU")
            tcfg.sync_batchnorm = False
        if str(tcfg.get("precision", "32-true")) in ("16-mixed", "16", "16-true"):
            log.warning("trainer.precision=%s (AMP) needs a GPU; using 32-true on CPU", tcfg.precision)
            tcfg.precision = "32-true"
    return tcfg


def build_trainer(cfg: Any):
    """The Lightning ``Trainer`` of a Hydra run: ``cfg.trainer`` (see :func:`trainer_config`), the ``callbacks``
    group and the ``logger`` group (a W&B logger gets the sweep's group/name in a multirun)."""
    from histolight.utils.instantiate import instantiate, instantiate_callbacks, instantiate_loggers
    from histolight.utils.wandb import with_sweep_settings

    loggers = instantiate_loggers(with_sweep_settings(cfg.get("logger"), cfg))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    return instantiate(trainer_config(cfg.trainer), callbacks=callbacks, logger=loggers or False)


def default_trainer(
    dest: str | os.PathLike,
    epochs: int,
    monitor: str,
    mode: str = "max",
    loggers: Sequence | None = None,
    callbacks: Sequence | None = None,
    **kw,
):
    """A one-device ``Trainer`` for the Python API: ``epochs`` epochs, checkpoints of the best ``monitor``
    (and the last epoch) in ``dest/checkpoints``; ``kw`` overrides any Trainer option."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(callbacks or [])
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(Path(dest) / "checkpoints"),
                filename="epoch_{epoch:03d}",
                monitor=monitor,
                mode=mode,
                save_last=True,
                auto_insert_metric_name=False,
            )
        )
    opts = dict(
        max_epochs=epochs,
        logger=list(loggers) if loggers else False,
        callbacks=callbacks,
        default_root_dir=str(dest),
        accelerator="auto",
        devices=1,
        log_every_n_steps=5,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def log_hyperparams(trainer: Any, hp: dict) -> None:
    """``hp`` to every logger of ``trainer`` (a logger that fails is reported, never fatal)."""
    for lg in trainer.loggers:
        try:
            lg.log_hyperparams(hp)
        except Exception as e:  # noqa: BLE001 - logging must not stop training
            log.warning("could not log hyperparameters to %s: %s", type(lg).__name__, e)


def chosen_checkpoint(trainer: Any, which: str = "best") -> str | None:
    """Path of the ``best`` (monitored) or ``last`` checkpoint saved by the trainer's checkpoint callbacks.

    ``best`` falls back to the last checkpoint, then to None (= keep the final weights), with a warning;
    ``last`` is None when no last checkpoint was saved (the final weights are the last epoch's).
    """
    if getattr(trainer, "fast_dev_run", False):
        return None
    saved = [(cb.best_model_path or "", cb.last_model_path or "") for cb in getattr(trainer, "checkpoint_callbacks", []) or []]
    for best, _ in saved:
        if which == "best" and best and Path(best).is_file():
            return best
    for _, last in saved:
        if last and Path(last).is_file():
            if which == "best":
                log.warning("no best checkpoint (no monitored metric); using the last one: %s", last)
            return last
    if which == "best":
        log.warning("no checkpoint was saved (no ModelCheckpoint callback?); keeping the final weights")
    return None


def restore_weights(module: Any, ckpt: str | None) -> None:
    """Load the weights of Lightning checkpoint ``ckpt`` into ``module`` (safe loading; no-op for None)."""
    if not ckpt:
        return
    from histolight.io.weights import read_state_dict

    module.load_state_dict(read_state_dict(ckpt))
    log.info("weights of %s restored", ckpt)


def update_summary(trainer: Any, values: dict) -> None:
    """Add ``values`` to the run summary of loggers that have one (W&B); never fatal."""
    for lg in trainer.loggers:
        summ = getattr(getattr(lg, "experiment", None), "summary", None)
        if summ is not None and hasattr(summ, "update"):
            try:
                summ.update(values)
            except Exception as e:  # noqa: BLE001 - a summary is a convenience
                log.warning("could not update the %s summary: %s", type(lg).__name__, e)


__all__ = [
    "trainer_config",
    "build_trainer",
    "default_trainer",
    "log_hyperparams",
    "chosen_checkpoint",
    "restore_weights",
    "update_summary",
]
