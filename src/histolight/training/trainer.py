"""Lightning trainer plumbing shared by the training stacks: the trainer of a Hydra run (loggers with W&B sweep
naming, callbacks, CPU fallbacks for GPU-only options), a default trainer for the Python API, hyperparameter
logging, the checkpoint whose weights a run exports, and resuming.

Resuming (``ckpt_path=<file>`` or ``resume=auto``): :func:`resume_checkpoint` picks and checks the checkpoint at
startup (it exists; ``auto``: the run folder's ``last.ckpt``, if any), :func:`check_checkpoint_folder` keeps a run
from mixing its checkpoints into another run's, and :func:`fit` checks that the checkpoint fits the model before
``Trainer.fit`` restores weights, optimizer, scheduler, epoch and callback states from it, read with
``weights_only=True`` (plain data only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histolight.errors import ConfigError, HistolightError

log = logging.getLogger(__name__)

#: file name (without .ckpt) of the latest-epoch checkpoint
LAST = "last"
#: ``resume`` values: null (train from the start, or from ``ckpt_path``) or auto (the run folder's last.ckpt)
RESUME_CHOICES = (None, "auto")
#: what a checkpoint needs to continue training (a weights-only file has only ``state_dict``)
TRAINING_STATE = ("state_dict", "optimizer_states", "loops", "epoch")


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
    from histolight.utils.logs import quiet_lightning
    from histolight.utils.wandb import with_sweep_settings

    quiet_lightning()
    loggers = instantiate_loggers(with_sweep_settings(cfg.get("logger"), cfg))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    if os.environ.get("SLURM_JOB_ID"):  # launcher=slurm: save last.ckpt when warned of preemption / the time limit
        from histolight.training.preemption import PreemptionCheckpoint

        callbacks.append(PreemptionCheckpoint(LAST))
    return instantiate(trainer_config(cfg.trainer), callbacks=callbacks, logger=loggers or False)


def last_checkpoint_callback(dirpath: str | os.PathLike):
    """A ``ModelCheckpoint`` that writes the latest epoch as ``<dirpath>/last.ckpt`` every epoch (what resuming
    continues from; ``save_last=True`` alone rewrites it only when the monitored metric improves)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=str(dirpath), filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False)


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
    and of the last epoch (``last.ckpt``) in ``dest/checkpoints``; ``kw`` overrides any Trainer option."""
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from histolight.utils.logs import quiet_lightning

    quiet_lightning()
    callbacks = list(callbacks or [])
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        folder = Path(dest) / "checkpoints"
        best = ModelCheckpoint(
            dirpath=str(folder), filename="epoch_{epoch:03d}", monitor=monitor, mode=mode, auto_insert_metric_name=False
        )
        callbacks += [best, last_checkpoint_callback(folder)]
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


def _checkpoint_callbacks(trainer: Any) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [cb for cb in getattr(trainer, "callbacks", []) or [] if isinstance(cb, ModelCheckpoint)]


def _last_path(cb: Any) -> str:
    """The latest-epoch checkpoint a ``ModelCheckpoint`` saved: its ``save_last`` file, or what an unmonitored
    one (:func:`last_checkpoint_callback`) keeps."""
    return cb.last_model_path or ("" if cb.monitor else cb.best_model_path) or ""


def chosen_checkpoint(trainer: Any, which: str = "best") -> str | None:
    """Path of the ``best`` (monitored) or ``last`` checkpoint saved by the trainer's checkpoint callbacks.

    ``best`` falls back to the last checkpoint, then to None (= keep the final weights), with a warning;
    ``last`` is None when no last checkpoint was saved (the final weights are the last epoch's).
    """
    if getattr(trainer, "fast_dev_run", False):
        return None
    cbs = _checkpoint_callbacks(trainer)
    for cb in cbs:
        if which == "best" and cb.monitor and cb.best_model_path and Path(cb.best_model_path).is_file():
            return cb.best_model_path
    for last in map(_last_path, cbs):
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


def check_resume_options(ckpt_path: Any, resume: Any) -> None:
    """Validate ``ckpt_path`` (an existing file) and ``resume`` (null | auto) at startup."""
    if resume not in RESUME_CHOICES:
        raise ConfigError(
            f"resume={resume!r} is invalid: must be null or auto (auto = continue from the run folder's "
            "checkpoints/last.ckpt; point hydra.run.dir at that run)"
        )
    if ckpt_path is None:
        return
    if resume is not None:
        raise ConfigError(f"ckpt_path={ckpt_path!r} and resume={resume!r} exclude each other: give one")
    ok = isinstance(ckpt_path, (str, os.PathLike)) and str(ckpt_path).strip() != ""
    if not ok or not Path(ckpt_path).is_file():
        why = "file not found" if ok else "must be a file path"
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is invalid: {why} (a Lightning checkpoint of this model, e.g. "
            "outputs/<run>/checkpoints/last.ckpt)"
        )


def resume_checkpoint(trainer: Any, ckpt_path: Any = None, resume: Any = None) -> Path | None:
    """The checkpoint this run continues from: ``ckpt_path``, or with ``resume='auto'`` the ``last.ckpt`` of the
    trainer's checkpoint folder when it exists (None: train from the start). Checked before any work. In a SLURM job
    the scheduler requeued (:func:`histolight.training.preemption.requeued`), ``resume=None`` acts as ``auto``."""
    check_resume_options(ckpt_path, resume)
    if ckpt_path is not None:
        return Path(ckpt_path)
    from histolight.training.preemption import requeued

    folders = [Path(cb.dirpath) for cb in _checkpoint_callbacks(trainer) if cb.dirpath and (cb.save_last or cb.filename == LAST)]
    if resume is None and folders and requeued():  # a SLURM job requeued after preemption continues where it stopped
        log.info("requeued SLURM job (SLURM_RESTART_COUNT=%s): resume=auto", os.environ["SLURM_RESTART_COUNT"])
        resume = "auto"
    if resume != "auto":
        return None
    if not folders:
        raise ConfigError(
            "resume=auto needs a checkpoint callback that saves last.ckpt into a set folder "
            "(callbacks=default or callbacks=last_checkpoint: <run>/checkpoints/last.ckpt)"
        )
    last = folders[0] / f"{LAST}.ckpt"
    if not last.is_file():
        log.info("resume=auto: no %s yet; training from the start", last)
        return None
    log.info("resume=auto: continuing from %s", last)
    return last


def check_checkpoint_folder(trainer: Any, resume_from: Path | None, overwrite: bool) -> None:
    """Never mix checkpoints of two runs: a checkpoint folder that already holds ``*.ckpt`` files is refused
    (:class:`HistolightError`) unless this run continues from one of them; with ``overwrite`` they are deleted."""
    if not getattr(trainer, "is_global_zero", True):
        return
    for cb in _checkpoint_callbacks(trainer):
        folder = Path(cb.dirpath) if cb.dirpath else None
        old = sorted(folder.glob("*.ckpt")) if folder and folder.is_dir() else []
        if not old or (resume_from is not None and resume_from.resolve().parent == folder.resolve()):
            continue
        names = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
        if not overwrite:
            raise HistolightError(
                f"checkpoint folder '{folder}' already holds another run's checkpoints ({names}); continue that run "
                "with resume=auto (hydra.run.dir=<that run>), replace them with task.overwrite=true, or train in a "
                "new run folder"
            )
        log.warning("overwrite: deleting the earlier run's checkpoints in %s (%s)", folder, names)
        for p in old:
            p.unlink(missing_ok=True)


def check_resumable(ckpt: str | os.PathLike, module: Any) -> None:
    """``ckpt`` is a training checkpoint (optimizer, loops, epoch) whose weights fit ``module`` key by key and
    shape by shape; read with ``weights_only=True``. Raises :class:`HistolightError` naming what differs."""
    from histolight.io.weights import read_checkpoint

    ck = read_checkpoint(ckpt)
    lacking = [k for k in TRAINING_STATE if k not in ck]
    if lacking:
        raise HistolightError(
            f"ckpt_path='{ckpt}' cannot resume training: it lacks {lacking} (a weights-only file; resume from a "
            "Lightning checkpoint such as <run>/checkpoints/last.ckpt)"
        )
    own, theirs = module.state_dict(), ck["state_dict"]
    missing = [k for k in own if k not in theirs]
    extra = [k for k in theirs if k not in own]
    shapes = [
        f"{k} {list(theirs[k].shape)} vs {list(own[k].shape)}" for k in own if k in theirs and theirs[k].shape != own[k].shape
    ]
    if missing or extra or shapes:
        raise HistolightError(
            f"ckpt_path='{ckpt}' does not match the model ({type(module).__name__}): {len(missing)} tensors missing "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}), {len(shapes)} of another shape "
            f"(checkpoint vs model, e.g. {shapes[:3]}); resume with the model, labels and data options of that run"
        )


def fit(trainer: Any, module: Any, datamodule: Any, resume_from: Path | None = None) -> None:
    """``trainer.fit``, continuing from ``resume_from`` (checked by :func:`check_resumable` first; Lightning reads it
    with ``weights_only=True``)."""
    if resume_from is not None:
        check_resumable(resume_from, module)
        log.info("resuming training from %s", resume_from)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)


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
    "last_checkpoint_callback",
    "default_trainer",
    "log_hyperparams",
    "chosen_checkpoint",
    "restore_weights",
    "check_resume_options",
    "resume_checkpoint",
    "check_checkpoint_folder",
    "check_resumable",
    "fit",
    "update_summary",
]
