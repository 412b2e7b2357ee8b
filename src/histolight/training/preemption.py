"""Preemption and time limits on SLURM: a training job saves ``last.ckpt`` when the scheduler warns it, is requeued,
and its requeued run continues from that checkpoint.

Under ``launcher=slurm`` (submitit) the scheduler sends submitit's signal (``SIGUSR2`` unless
``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) ``hydra.launcher.signal_delay_s`` seconds before the time limit, or
when the job is preempted (``scancel --signal=USR2 <job>`` simulates both). submitit's handler requeues the job
(``scontrol requeue``) and exits. :class:`PreemptionCheckpoint` runs first: at the next step boundary every rank
saves the run's latest state to ``<checkpoints>/last.ckpt`` (written beside it, then renamed over it: a kill while
saving keeps the earlier one). The requeued job runs the same Hydra job again; :func:`requeued` tells the training tasks to continue from
``last.ckpt`` as ``resume=auto`` would (:func:`histolight.training.trainer.resume_checkpoint`).

Without submitit (a plain ``sbatch``/``srun`` job), Lightning's own SLURM auto-requeue handles ``SIGUSR1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def requeued() -> bool:
    """True in a SLURM job that the scheduler restarted (``SLURM_RESTART_COUNT`` >= 1: requeued after a signal,
    preemption or a node failure)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def resume_when_requeued(resume: str | None, ckpt_path: str | None) -> str | None:
    """``resume`` for a run that may be a requeued SLURM job: ``'auto'`` when none was asked for
    (``resume=None``, no ``ckpt_path``) and the scheduler restarted this job, else ``resume`` unchanged."""
    if resume is None and ckpt_path is None and requeued():
        log.info("requeued SLURM job (SLURM_RESTART_COUNT=%s): resume=auto", os.environ["SLURM_RESTART_COUNT"])
        return "auto"
    return resume


def under_submitit() -> bool:
    """True in a job started by submitit on SLURM (``launcher=slurm``)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def preempt_signal() -> signal.Signals:
    """The signal submitit's jobs are warned with (``SUBMITIT_PREEMPT_SIGNAL``, default ``USR2``)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    return signal.Signals[name]


class PreemptionCheckpoint(Callback):
    """Save ``last.ckpt`` on submitit's preemption / pre-timeout signal, then let submitit requeue the job.

    Installed at the start of training in front of the handler submitit set (chained, not replaced); inert
    outside submitit jobs. The signal handler only notes the signal: the state is saved at the next boundary where
    it is whole (the end of a training step, or of training), because a checkpoint taken mid-validation resumes
    into a validation that never logs its metrics; not at the end of an epoch, where the save would come before
    the epoch's own checkpoint and early-stopping callbacks (a best epoch would go unsaved). Under DDP the ranks
    agree at each boundary (any rank signalled) so that they save together. The checkpoint folder is that of the
    trainer's ``ModelCheckpoint`` writing ``last.ckpt`` (``callbacks=default`` / ``last_checkpoint``); without one,
    nothing is saved and the requeued job starts over.
    """

    def __init__(self, last: str = "last") -> None:
        self.last = last  # file name of the latest-epoch checkpoint, without .ckpt
        self._previous: Any = None
        self._signal: signal.Signals | None = None
        self._target: Path | None = None
        self._received = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not under_submitit():
            return
        sig = preempt_signal()
        previous = signal.getsignal(sig)
        if not callable(previous):  # submitit always installs one; anything else is not ours to chain
            return
        self._target = _last_checkpoint(trainer, self.last)
        if self._target is None:
            log.warning("no checkpoint callback writes last.ckpt: a preempted job will start over when requeued")
            return
        self._previous, self._signal, self._received = previous, sig, False

        def handler(signum: int, frame: Any) -> None:
            log.warning("signal %s: saving %s at the next step boundary", signal.Signals(signum).name, self._target)
            self._received = True

        signal.signal(sig, handler)

    def _save_and_requeue(self, trainer: Any) -> None:
        """At a boundary: when any rank was signalled, every rank saves (a barrier; rank 0 writes ``last.ckpt``
        beside it, then renames it over it) and submitit's handler requeues the job and exits."""
        if self._signal is None or not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        target = self._target
        log.warning("saving %s before the job is requeued", target)
        tmp = target.with_name(f".{target.name}.preempt-{os.getpid()}")
        try:
            trainer.save_checkpoint(str(tmp))
            if trainer.is_global_zero:
                os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        sig, previous = self._signal, self._previous
        signal.signal(sig, previous)
        self._previous, self._signal = None, None
        previous(sig, None)  # submitit: requeue (rank 0) and exit

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._save_and_requeue(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._save_and_requeue(trainer)  # signalled during the last validation: the requeued job finishes the run
        if self._signal is not None:
            signal.signal(self._signal, self._previous)
            self._previous, self._signal = None, None


def _last_checkpoint(trainer: Any, last: str) -> Path | None:
    """``<dirpath>/<last>.ckpt`` of the trainer's unmonitored ``ModelCheckpoint`` named ``last`` (None: none)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.filename == last and not cb.monitor:
            return Path(cb.dirpath) / f"{last}.ckpt"
    return None


__all__ = ["PreemptionCheckpoint", "preempt_signal", "requeued", "under_submitit"]
