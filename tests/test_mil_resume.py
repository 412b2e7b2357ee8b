"""Resuming MIL training (``resume=auto``): a k-fold run killed with SIGKILL in the middle of fold 1 keeps fold 0,
continues fold 1 from its ``last.ckpt`` and finishes with every fold's results; ``ckpt_path`` is for one model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback

from histolight.errors import ConfigError
from tests.conftest import ROOT
from tests.test_mil import cohort


class KillAtFold(Callback):
    """SIGKILL this process at training batch ``batch`` of epoch ``epoch`` of fold ``fold`` (the fold's trainer
    writes into ``<run>/fold_<fold>``)."""

    def __init__(self, fold: int, epoch: int, batch: int):
        self.fold, self.epoch, self.batch = fold, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        here = Path(str(trainer.default_root_dir)).name == f"fold_{self.fold}"
        if here and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HISTOLIGHT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), *args, f"paths.work_dir={tmp / 'work'}", f"paths.log_dir={tmp / 'logs'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _epoch(ckpt: Path) -> int:
    from histolight.io.weights import read_checkpoint

    return int(read_checkpoint(ckpt)["epoch"])


@pytest.mark.slow  # three run.py subprocesses (~25 s)
def test_killed_kfold_mil_training_resumes(tmp_path):
    bags = tmp_path / "bags"
    cohort(bags, n_patients=8, d=8).to_csv(tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    args = [
        "task=train_mil",
        "data=bags",
        "model=mil_attention",
        f"data.bags={bags}",
        f"data.annotations={tmp_path / 'labels.csv'}",
        "data.split.k=2",
        "data.max_tiles=16",
        "model.model_kwargs.hidden=16",
        "logger=csv",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"hydra.run.dir={run}",
    ]
    kill = ["+callbacks.kill._target_=tests.test_mil_resume.KillAtFold", "+callbacks.kill.fold=1"]
    p = _run([*args, *kill, "+callbacks.kill.epoch=1", "+callbacks.kill.batch=1"], tmp_path)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-3000:]
    fold0 = (run / "fold_0" / "model" / "weights.safetensors").read_bytes()
    assert _epoch(run / "fold_1" / "checkpoints" / "last.ckpt") == 0 and not (run / "fold_1" / "model").exists()
    assert not (run / "metrics.json").exists()

    p = _run(args, tmp_path)  # the same command without resume=auto is refused
    assert p.returncode == 1 and "resume=auto" in p.stderr, p.stderr[-3000:]

    p = _run([*args, "resume=auto"], tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "fold 0: finished by the interrupted run; kept" in log and "resuming training from" in log
    assert (run / "fold_0" / "model" / "weights.safetensors").read_bytes() == fold0, "the finished fold is not retrained"
    assert _epoch(run / "fold_1" / "checkpoints" / "last.ckpt") == 2
    meta = json.loads((run / "fold_1" / "model" / "mil_config.json").read_text())
    assert meta["training"]["resumed_from"].endswith("fold_1/checkpoints/last.ckpt")
    folds = pd.read_csv(run / "folds.csv")
    assert list(folds["fold"]) == [0, 1] and folds["val/auroc"].notna().all()
    pred = pd.read_parquet(run / "predictions.parquet")
    assert sorted(pred["id"]) == sorted(pd.read_csv(tmp_path / "labels.csv")["slide"]), "every slide validated once"
    assert json.loads((run / "metrics.json").read_text())["n_folds"] == 2


def test_ckpt_path_continues_one_model_only(tmp_path):
    from histolight.mil.config import BagDataConfig, MILModelConfig
    from histolight.mil.training import train

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    data = BagDataConfig(bags=str(tmp_path), annotations=str(tmp_path / "labels.csv"))
    model = MILModelConfig(optimizer={"_target_": "torch.optim.AdamW", "_partial_": True})
    with pytest.raises(ConfigError, match=r"continues one model, but 5 folds are trained: continue the run with resume=auto"):
        train(data, model, tmp_path / "out", ckpt_path=ckpt)
    with pytest.raises(ConfigError, match=r"ckpt_path=.* and resume='auto' exclude each other"):
        train(data, model, tmp_path / "out", ckpt_path=ckpt, resume="auto")
