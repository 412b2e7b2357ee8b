"""Tile classifier under DDP: 2 CPU processes (gloo) through run.py; evaluation counts every tile once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT, tiny_demo_overrides


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_evaluate_each_tile_once(tiny_demo, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "experiment=tile_classifier",
        *tiny_demo_overrides(tiny_demo),
        f"paths.work_dir={tmp_path / 'work'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={run_dir}",
        "data.tile_px=32",
        "data.tile_um=32",
        "data.num_workers=0",
        "data.batch_size=16",
        "model=timm_resnet18",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HISTOLIGHT_ROOT": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    tiles = pd.read_parquet(run_dir / "tiles.parquet")
    n_val = int((tiles["split"] == "val").sum())
    n_train = int((tiles["split"] == "train").sum())
    # every validation tile evaluated exactly once across the two ranks (no DistributedSampler padding)
    assert m["val/n_tiles"] == n_val
    # each rank trains on half of the epoch's samples: ceil(n_train / 2) per rank, batches of 16 (ragged one dropped)
    assert m["train/steps"] == (-(-n_train // 2)) // 16
    assert (run_dir / "model" / "classifier_config.json").exists()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in p.stdout + p.stderr
