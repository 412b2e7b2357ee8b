"""Sweeps through run.py: an Optuna search (the [sweep] extra) optimises validation mIoU end to end."""

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, tiny_demo_overrides

TINY = [
    "model.encoder_name=tu-mobilenetv3_small_100",
    "data.mpp=4",
    "data.size=64",
    "data.batch_size=8",
    "model.infer_batch_size=4",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


@pytest.mark.slow
def test_optuna_sweep_optimises_val_miou(tmp_path, tiny_demo):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="install the [sweep] extra")
    env = {**os.environ, "HISTOLIGHT_ROOT": str(ROOT), "WANDB_MODE": "offline"}
    args = [
        sys.executable,
        str(ROOT / "run.py"),
        "-m",
        "experiment=seg_binary",
        "hparams_search=seg_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        *TINY,
        *tiny_demo_overrides(tiny_demo),
        f"paths.log_dir={tmp_path}/outputs",
        f"paths.work_dir={tmp_path}/work",
    ]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    results = list((tmp_path / "outputs" / "multirun").glob("*/*/optimization_results.yaml"))
    assert len(results) == 1
    res = yaml.safe_load(results[0].read_text())
    assert 0.0 <= float(res["best_value"]) <= 1.0
    assert "model.optimizer.lr" in res["best_params"]
    jobs = [p for p in results[0].parent.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == 2 and all((j / "segment_config.json").exists() and (j / "weights.safetensors").exists() for j in jobs)
