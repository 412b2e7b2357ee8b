"""Resuming training (``ckpt_path=`` / ``resume=auto``): a run killed mid-epoch with SIGKILL continues from its
``last.ckpt`` to the planned epoch count with its step counter and metrics continuing; bad checkpoints are refused
before training; a run never lands on (or mixes checkpoints into) an earlier run's folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback

from histolight.errors import ConfigError, HistolightError
from tests.conftest import ROOT, tiny_demo_overrides

SEG = [
    "experiment=seg_multiclass",
    "model.encoder_name=tu-mobilenetv3_small_100",
    "data.mpp=4",
    "data.size=64",
    "data.crops_per_epoch=4",
    "data.batch_size=2",  # 2 steps per epoch
    "model.infer_batch_size=4",
    "task.n_overlays=0",
]
TILES = [
    "experiment=tile_classifier",
    "data.tile_px=32",
    "data.tile_um=32",
    "data.num_workers=0",
    "data.batch_size=16",
    "data.samples_per_epoch=48",  # 3 steps per epoch
    "data.eval_batch_size=64",
    "model=timm_mobilenetv3",
]
COMMON = ["logger=csv", "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
KILL = ["+callbacks.kill._target_=tests.test_resume.KillAt", "+callbacks.kill.epoch=1", "+callbacks.kill.batch=1"]


class KillAt(Callback):
    """SIGKILL this process at the start of training batch ``batch`` of epoch ``epoch`` (mid-epoch, after the
    previous epoch's checkpoint)."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    # one thread: tiny models train several times faster than with threads fighting over busy cores
    env = {**os.environ, "WANDB_MODE": "offline", "HISTOLIGHT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), *args, f"paths.work_dir={tmp / 'work'}", f"paths.log_dir={tmp / 'logs'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _ckpt(path: Path) -> dict:
    from histolight.io.weights import read_checkpoint

    return read_checkpoint(path)


def _training_rows(csv: Path) -> pd.DataFrame:
    """Rows of a CSVLogger file that log a ``train/`` metric (not the final evaluation)."""
    df = pd.read_csv(csv)
    return df[df.filter(like="train/").notna().any(axis=1)]


def _kill_and_resume(base: list[str], tmp: Path, steps_per_epoch: int) -> Path:
    run = tmp / "run"
    args = [*base, *COMMON, f"hydra.run.dir={run}"]
    p = _run(args + KILL, tmp)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert _ckpt(last)["epoch"] == 0 and not (run / "metrics.json").exists()
    hydra_files = {f.name: f.read_bytes() for f in (run / ".hydra").glob("*.yaml")}

    # the same command without resume=auto is refused before Hydra rewrites the run's .hydra/ files
    p = _run(args, tmp)
    assert p.returncode == 1 and "resume=auto" in p.stderr and str(run) in p.stderr, p.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in (run / ".hydra").glob("*.yaml")} == hydra_files

    p = _run([*args, "resume=auto"], tmp)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "resuming training from" in p.stdout + p.stderr
    ck = _ckpt(last)
    assert ck["epoch"] == 2 and ck["global_step"] == 3 * steps_per_epoch  # epochs 1 and 2 trained once more, not 3
    first, second = (_training_rows(run / "csv" / v / "metrics.csv") for v in ("version_0", "version_1"))
    assert set(first["epoch"]) <= {0, 1}
    assert set(second["epoch"]) == {1, 2}  # the resumed run logs epochs 1-2, its steps continue
    assert second["step"].min() >= steps_per_epoch
    prev = list((run / ".hydra").glob("previous-*/overrides.yaml"))
    assert len(prev) == 1 and "resume=auto" not in prev[0].read_text()  # the killed run's config is kept
    return run


@pytest.mark.slow  # three run.py subprocesses (~30 s)
def test_segmentation_killed_mid_epoch_resumes(tiny_demo, tmp_path):
    run = _kill_and_resume([*SEG, *tiny_demo_overrides(tiny_demo)], tmp_path, steps_per_epoch=2)
    import json

    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    assert (run / "segment_config.json").is_file()


@pytest.mark.slow  # three run.py subprocesses (~40 s)
def test_tile_classifier_killed_mid_epoch_resumes(tiny_demo, tmp_path):
    run = _kill_and_resume([*TILES, *tiny_demo_overrides(tiny_demo)], tmp_path, steps_per_epoch=3)
    import json

    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 3 and m["train/steps"] == 9
    assert (run / "model" / "classifier_config.json").is_file()


# ---------------------------------------------------------------------------------------------- checked before training


class Tiny(LightningModule):
    def __init__(self, n: int = 2):
        super().__init__()
        self.net = torch.nn.Linear(4, n)


class Custom:
    pass


def _lightning_ckpt(path: Path, module, **extra) -> Path:
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [], "loops": {}, "epoch": 0, **extra}, path)
    return path


def test_resume_options_are_checked_at_startup(tmp_path):
    from histolight.training.trainer import check_resume_options

    for ckpt, resume, message in (
        (None, "yes", r"resume='yes' is invalid: must be null or auto"),
        (str(tmp_path / "nope.ckpt"), None, r"ckpt_path='.*nope.ckpt' is invalid: file not found \(a Lightning checkpoint"),
        (str(tmp_path), None, "file not found"),
        (str(tmp_path / "x.ckpt"), "auto", "exclude each other"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_resume_options(ckpt, resume)


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_before_training(tmp_path):
    from histolight.training.trainer import fit

    class NoFit:
        def fit(self, *a, **kw):
            raise AssertionError("training started")

    other = _lightning_ckpt(tmp_path / "other.ckpt", Tiny(3))
    with pytest.raises(
        HistolightError, match=r"does not match the model \(Tiny\): .*2 of another shape .*net.weight \[3, 4\] vs \[2, 4\]"
    ):
        fit(NoFit(), Tiny(2), None, other)
    torch.save(Tiny(2).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(HistolightError, match=r"cannot resume training: it lacks .*optimizer_states.* \(a weights-only file"):
        fit(NoFit(), Tiny(2), None, tmp_path / "weights.pt")
    unsafe = _lightning_ckpt(tmp_path / "unsafe.ckpt", Tiny(2), callbacks={"x": Custom()})
    with pytest.raises(HistolightError, match="cannot be loaded safely"):  # never unpickled
        fit(NoFit(), Tiny(2), None, unsafe)


def test_training_tasks_check_the_checkpoint_before_any_work(tmp_path):
    from histolight.tasks import get_task
    from tests.conftest import compose_config

    demo = tmp_path / "demo"  # would be generated by any work
    for exp, task in (("seg_multiclass", "train_seg"), ("tile_classifier", "train_tiles")):
        for extra, message in (
            ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], "file not found"),
            (["resume=auto", "callbacks=none"], "resume=auto needs a checkpoint callback that saves last.ckpt"),
        ):
            cfg = compose_config([f"experiment={exp}", f"paths.demo_dir={demo}", "logger=none", *extra], tmp_path / "out")
            with pytest.raises(ConfigError, match=message):
                get_task(task)(cfg)
            assert not demo.exists()
