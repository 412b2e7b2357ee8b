"""Tile classifier on a GPU with AMP (16-mixed); skipped without CUDA."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_amp_step_and_gpu_predictions_match_cpu(tiny_demo, tmp_path):
    import lightning as L

    from histolight.classify import (
        LabelMap,
        LoadedModel,
        TileClassifier,
        TileDataModule,
        make_model_config,
        predict_tfrecords,
        prepare_tiles,
        split_patients,
    )
    from histolight.dataset import Dataset

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=tiny_demo / "annotations.csv")
    tiles, info = prepare_tiles(
        ds,
        tile_px=32,
        tile_um=32,
        tiles_root=tmp_path / "tiles",
        progress=False,
        extract_options={"qc": ["otsu"], "report": False, "workers": 1},
    )
    tiles["split"] = split_patients(tiles, "annotations", dataset=ds)
    lm = LabelMap(["tumor", "stroma", "necrosis"])
    dm = TileDataModule(tiles, lm, tile_px=32, batch_size=16, pin_memory=True)
    module = TileClassifier("resnet18", lm.names, optimizer=partial(torch.optim.AdamW, lr=1e-3))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    cfg = make_model_config("resnet18", lm, 32, 32, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    m = LoadedModel(module.net.eval(), cfg, lm)
    gpu = predict_tfrecords(m, info.tile_dir, device="cuda", amp=False, progress=False)
    cpu = predict_tfrecords(m, info.tile_dir, device="cpu", progress=False)
    np.testing.assert_allclose(gpu.filter(like="prob_").to_numpy(), cpu.filter(like="prob_").to_numpy(), atol=1e-3)
