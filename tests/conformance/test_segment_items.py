"""Issue 11, segmentation items: each test failed on the code before its fix.

Items: 8 (tiled inference with tiles larger than the training crop: same weights, a different prediction), 9 (the
default ROI area threshold dropped every nucleus at 0.5 um/px without a word; binary ROIs take the model's label),
and the documented calls ``SegmentModel.run_slide_inference('/path/to/slide')`` and multiclass masks exported in
Slideflow's ``(N, ...)`` channel layout.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from histolight.segment import SegmentConfig
from histolight.wsi import VirtualSlide

LABELS = ["tumor", "stroma", "necrosis"]


def blobs(seed: int, n: int, radius=(3, 8), every: int = 900) -> tuple[np.ndarray, np.ndarray]:
    """A pink ``n x n`` image with dark purple blobs (nuclei-like, ``radius`` px) and their 0/1 mask."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n, 3), np.float32)
    img[:] = (235, 190, 215)
    img += cv2.GaussianBlur(rng.normal(0, 25, (n, n, 3)).astype(np.float32), (0, 0), 2)
    mask = np.zeros((n, n), np.uint8)
    for _ in range(n * n // every):
        x, y = (int(v) for v in rng.integers(0, n, 2))
        r = int(rng.integers(*radius))
        cv2.ellipse(mask, (x, y), (r, max(1, int(r * rng.uniform(0.6, 1)))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    img[mask > 0] = img[mask > 0] * 0.35 + np.array((90, 40, 130)) * 0.65
    return np.clip(img, 0, 255).astype(np.uint8), mask


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 0
    return float(2 * (p & t).sum() / max(1, p.sum() + t.sum()))


# ---------------------------------------------------------------------------------------------- item 8


@pytest.mark.slow
def test_item8_inference_at_4x_the_training_crop_matches_inference_at_the_crop_size():
    """A binary U-Net trained on 64 px crops predicts the same with ``infer_tile_px`` 64 and 256: tiles never exceed
    the training crop (larger ``infer_tile_px`` only batches more of them). Before the fix the 256 px setting sent
    the whole 256 px image as one tile and the prediction differed away from the tile borders."""
    from histolight.segment.inference import plan_tiles
    from histolight.segment.model import SegmentModel

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SegmentConfig(
            mode="binary",
            labels=["nucleus"],
            mpp=1,
            size=64,
            encoder_name="tu-mobilenetv3_small_100",
            model_kwargs={"decoder_channels": [64, 32, 16, 16, 16]},
            input_norm="none",
            infer_batch_size=8,
        )
        model = SegmentModel(cfg)
        img, mask = blobs(0, 384)
        opt = torch.optim.AdamW(model.parameters(), 3e-3)
        rng = np.random.default_rng(1)
        model.train()
        for _ in range(60):
            ys, xs = rng.integers(0, 384 - 64, (2, 8))
            x = torch.stack([torch.from_numpy(img[y : y + 64, x : x + 64].transpose(2, 0, 1).copy()) for y, x in zip(ys, xs)])
            t = torch.stack([torch.from_numpy(mask[y : y + 64, x : x + 64].copy()) for y, x in zip(ys, xs)])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x.float() / 255)[:, 0], t.float())
            opt.zero_grad()
            loss.backward()
            opt.step()
        test_img, truth = blobs(5, 256)
        at_crop = model.run_tiled_inference(test_img, tile_px=64)
        at_4x = model.run_tiled_inference(test_img, tile_px=256)
    finally:
        torch.set_num_threads(threads)
    assert dice(at_crop > 0.5, truth) > 0.5  # a trained model, not noise
    assert np.abs(at_crop - at_4x).max() < 1e-4
    lay = plan_tiles(256, 256, 256, cfg.overlap, cfg.infer_batch_size, max_side=cfg.size)
    assert (lay.th, lay.tw) == (64, 64) and lay.per_pass >= lay.n_tiles  # one pass of training-size tiles


# ---------------------------------------------------------------------------------------------- item 9


def _nuclei_slide(n_nuclei: int = 30):
    """A 512 x 512 px VirtualSlide at 0.5 um/px and a 'prediction' of ``n_nuclei`` disks of radius 5 px (~20 um^2)."""
    mask = np.zeros((512, 512), np.uint8)
    for k in range(n_nuclei):
        cv2.circle(mask, (40 + 80 * (k % 6), 40 + 80 * (k // 6)), 5, 1, -1)
    slide = VirtualSlide(np.full((512, 512, 3), 230, np.uint8), mpp=0.5, downsamples=(1,), name="nuclei")
    model = SimpleNamespace(config=SegmentConfig(mode="binary", labels=["nucleus"], mpp=0.5, size=64, encoder_name="resnet18"))
    return slide, model, mask


def test_item9_default_area_threshold_scales_with_the_model_mpp_and_binary_rois_take_the_label():
    from histolight.segment.rois import generate_rois

    slide, model, mask = _nuclei_slide()
    rois = generate_rois(slide, model, labels_pred=mask)  # defaults, as task=segment / task=generate_rois use them
    assert len(rois) == 30
    assert {r.label for r in rois} == {"nucleus"}


def test_item9_objects_dropped_by_the_area_threshold_are_reported(caplog, tmp_path):
    from histolight.segment.rois import generate_dataset_rois, generate_rois

    slide, model, mask = _nuclei_slide()
    rep: dict = {}
    with caplog.at_level(logging.WARNING):
        rois = generate_rois(slide, model, min_area_mm2=0.01, labels_pred=mask, report=rep)
    assert rois == [] and rep["n_dropped"] == 30 and rep["n_objects"] == 30
    assert "30 of 30 predicted objects are smaller than min_area_mm2=0.01" in caplog.text
    assert "no ROI is left; lower min_area_mm2" in caplog.text

    class OneSlide:  # a dataset of this one slide, and a model that 'predicts' the nuclei
        names = ["nuclei"]
        roi_dirs: list = []

        def open(self, name):
            return slide

        def has_rois(self, name):
            return False

    model.run_slide_inference = lambda s, output="labels", **kw: mask
    res = generate_dataset_rois(OneSlide(), model, dest=tmp_path, min_area_mm2=0.001, report_dir=tmp_path, progress=False)
    row = res.table.iloc[0]
    assert row["status"] == "empty" and row["n_dropped"] == 30 and row["min_area_mm2"] == 0.001


# ---------------------------------------------------------------------------------------------- documented calls


def test_run_slide_inference_accepts_a_path_string(tiny_demo):
    from histolight.segment.model import SegmentModel
    from histolight.wsi import open_slide

    torch.manual_seed(0)
    cfg = SegmentConfig(mode="multiclass", labels=LABELS, mpp=8, size=64, encoder_name="tu-mobilenetv3_small_100")
    model = SegmentModel(cfg).eval()
    path = sorted((tiny_demo / "slides").iterdir())[0]
    pred = model.run_slide_inference(str(path))
    assert pred.shape == (4, 48, 64)  # (N + 1, H, W): 1024 x 768 px at 0.5 um/px read at 8 um/px
    with open_slide(path) as s:
        assert np.allclose(pred, model.run_slide_inference(s), atol=1e-6)


def test_multiclass_masks_export_as_channels_on_request(tiny_demo, tmp_path):
    from histolight.dataset import Dataset
    from histolight.segment.data import export_thumbs_and_masks, load_thumb_mask

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=tiny_demo / "annotations.csv")
    name = ds.names[0]
    idx = export_thumbs_and_masks(ds, mpp=8, dest=tmp_path / "index", labels=LABELS, mode="multiclass", slides=[name])
    ch = export_thumbs_and_masks(
        ds, mpp=8, dest=tmp_path / "ch", labels=LABELS, mode="multiclass", slides=[name], mask_layout="channels"
    )
    with np.load(idx[name]) as z:
        index_map = z["mask"]
    with np.load(ch[name]) as z:
        channels = z["mask"]
    assert index_map.shape == (48, 64)  # the compact default: class index
    assert channels.shape == (3, 48, 64) and channels.dtype == np.uint8  # (N, H, W): one 0/1 channel per label
    for i in range(3):
        assert np.array_equal(channels[i], (index_map == i + 1).astype(np.uint8))
    assert channels.sum(0).max() <= 1 and channels.any()
    assert np.array_equal(load_thumb_mask(ch[name]).mask, index_map)  # training reads both layouts alike
