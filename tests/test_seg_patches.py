"""Patch segmentation (issue 14): crops from the slide with per-crop masks, sampling, validation windows, the patch
cache, evaluation, debug inputs, the demo's fine-scale variant, and training from an export folder (issue 11)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import shapely

from histolight.errors import ConfigError

BASE_MPP = 0.5
W, H = 1024, 768


def _cohort(tmp_path, rois_by_slide: dict, size=(W, H)):
    """A cohort of pale-pink synthetic SVS slides with the given ROIs (base px), one patient per slide."""
    from histolight.dataset import Dataset
    from histolight.demo import write_aperio_svs
    from histolight.roi import ROI, write_rois

    (tmp_path / "slides").mkdir()
    (tmp_path / "rois").mkdir()
    lines = ["patient,slide,split"]
    for k, (name, rois) in enumerate(rois_by_slide.items()):
        img = np.full((size[1], size[0], 3), 245, np.uint8)
        for label, geom in rois:
            x0, y0, x1, y1 = (int(v) for v in geom.bounds)
            img[max(0, y0) : y1, max(0, x0) : x1] = (200, 120, 190) if label != "gland" else (90, 40, 140)
        write_aperio_svs(tmp_path / "slides" / f"{name}.svs", img, BASE_MPP)
        write_rois([ROI(f"r{i}", g, lab) for i, (lab, g) in enumerate(rois)], tmp_path / "rois" / f"{name}.csv")
        lines.append(f"p{k},{name},{'train' if k == 0 else 'val'}")
    (tmp_path / "ann.csv").write_text("\n".join(lines) + "\n")
    return Dataset(tmp_path / "slides", rois=tmp_path / "rois", annotations=tmp_path / "ann.csv")


def _cfg(**kw):
    from histolight.segment import SegmentConfig

    base = dict(
        mode="binary",
        labels=["gland"],
        mpp=1.0,
        size=64,
        patches=True,
        crops_per_epoch=8,
        batch_size=4,
        val_windows=4,
        stats_crops=4,
        encoder_name="tu-mobilenetv3_small_100",
        model_kwargs={"decoder_channels": [32, 16, 16, 16, 16]},
        infer_tile_px=128,
        epochs=1,
    )
    return SegmentConfig(**{**base, **kw})


def test_rois_only_in_one_corner_are_found(tmp_path):
    """Labelled crops come from the ROIs even when they cover 0.3% of the slide in one corner; the background share
    comes from the tissue map."""
    from histolight.segment.patches import PatchDataset, describe_slide

    corner = [("gland", shapely.box(20, 20, 120, 120)), ("gland", shapely.box(140, 30, 200, 90))]
    tissue = [("tumor", shapely.box(300, 250, 1000, 740))]  # unlabelled for this model: background crops go there
    ds = _cohort(tmp_path, {"s0": corner + tissue})
    cfg = _cfg(fg_crop_prob=0.5)
    sp = describe_slide(ds, "s0", cfg, seed=1, val_windows=6)
    pds = PatchDataset([sp], cfg, 1, augment=False, seed=0)
    rng = np.random.default_rng(0)
    with_fg = [int(pds.sample(rng)[2].any()) for _ in range(60)]
    assert 0.3 < np.mean(with_fg) < 0.7  # about fg_crop_prob of them: the tissue far from the corner has none
    assert (sp.windows[:3] < 400).all()  # the labelled half of the validation windows sits at the corner


def test_crop_straddling_the_slide_edge(tmp_path):
    """A window half outside the slide: white image, valid 0 and no mask outside; the ROI up to the edge inside."""
    from histolight.segment.patches import SlideHandles, describe_slide, read_crop

    ds = _cohort(tmp_path, {"s0": [("gland", shapely.box(W - 100, 500, W, 700))]})
    cfg = _cfg()
    sp = describe_slide(ds, "s0", cfg)
    side = sp.crop_base(cfg.size, cfg.mpp)  # 128 base px
    image, mask, valid = read_crop(SlideHandles(), sp, W - side / 2, 540, cfg)
    half = cfg.size // 2
    assert image.shape == (64, 64, 3) and mask.shape == valid.shape == (64, 64)
    assert (valid[:, :half] == 1).all() and (valid[:, half:] == 0).all()
    assert (image[:, half + 1 :] >= 250).all()  # outside: white
    assert mask[:, :half].mean() > 0.95 and mask[:, half:].sum() == 0


@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
def test_crop_masks_match_the_whole_slide_raster(tmp_path, mode):
    """Per-crop rasterization equals the matching window of the whole-slide mask, holes included, in every mode."""
    from histolight.roi import ROI, rasterize_rois
    from histolight.segment.patches import describe_slide, rasterize_crop

    ring = shapely.box(200, 200, 700, 600).difference(shapely.box(350, 350, 500, 500))
    rois = [("tumor", ring), ("gland", shapely.box(400, 400, 450, 450)), ("gland", shapely.box(750, 100, 950, 300))]
    ds = _cohort(tmp_path, {"s0": rois})
    labels = ["tumor", "gland"]
    cfg = _cfg(mode=mode, labels=labels if mode != "binary" else ["tumor"])
    sp = describe_slide(ds, "s0", cfg)
    scale = BASE_MPP / cfg.mpp
    whole = rasterize_rois(
        [ROI(str(i), g, lab) for i, (lab, g) in enumerate(rois)], (H // 2, W // 2), scale, labels=cfg.labels, mode=mode
    )
    for x0, y0 in [(0, 0), (256, 320), (800, 64)]:
        crop = rasterize_crop(sp, x0, y0, 128, 64, mode, cfg.labels)
        want = whole[..., y0 // 2 : y0 // 2 + 64, x0 // 2 : x0 // 2 + 64]
        np.testing.assert_array_equal(crop, want)
    hole = rasterize_crop(sp, 360, 360, 128, 64, mode, cfg.labels)
    if mode == "binary":
        assert hole.sum() == 0  # inside the tumor's hole
    elif mode == "multiclass":
        assert set(np.unique(hole)) <= {0, 2}


def test_validation_windows_are_fixed_per_slide_and_seed(tmp_path):
    from histolight.segment.patches import describe_slide

    ds = _cohort(tmp_path, {"s0": [("gland", shapely.box(300, 300, 500, 500))]})
    cfg = _cfg()
    a = describe_slide(ds, "s0", cfg, seed=3, val_windows=5).windows
    b = describe_slide(ds, "s0", cfg, seed=3, val_windows=5).windows
    c = describe_slide(ds, "s0", cfg, seed=4, val_windows=5).windows
    assert a.shape == (5, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_datasets_hold_no_slide_pixels_and_reopen_per_process(tmp_path):
    """Pickled (as DataLoader workers receive it) a dataset carries polygons and small maps, no open slide."""
    from histolight.segment.patches import PatchDataset, describe_slide

    ds = _cohort(tmp_path, {"s0": [("gland", shapely.box(300, 300, 500, 500))]})
    cfg = _cfg()
    sp = describe_slide(ds, "s0", cfg)
    pds = PatchDataset([sp], cfg, 4, seed=0)
    pds[0]
    assert pds.handles._open  # opened lazily in this process
    blob = pickle.dumps(pds)
    clone = pickle.loads(blob)
    assert clone.handles._open == {} and len(blob) < 200_000
    big = [v for v in vars(sp).values() if isinstance(v, np.ndarray) and v.nbytes > 64 * 64 * 3]
    assert sum(a.nbytes for a in big) < 20000 * 8 + 1
    out = clone[1]
    assert out["image"].shape == (3, 64, 64) and out["mask"].shape == (64, 64) and out["weight"].shape == (64, 64)


def test_crop_colour_statistics_come_from_crops(tmp_path):
    from histolight.segment.patches import crop_stats, describe_slide

    ds = _cohort(tmp_path, {"s0": [("gland", shapely.box(0, 0, W, H))]})
    cfg = _cfg()
    mean, std = crop_stats([describe_slide(ds, "s0", cfg)], cfg, 4)
    np.testing.assert_allclose(mean, np.array([90, 40, 140]) / 255, atol=0.02)  # the slide is one colour
    assert max(std) < 0.05


def test_patch_cache_written_once_with_its_split(tmp_path):
    from histolight.segment.patch_cache import CachedPatches, build_patch_cache, read_split
    from histolight.segment.patches import WindowDataset, describe_slide

    ds = _cohort(tmp_path, {"s0": [("gland", shapely.box(300, 300, 500, 500))], "s1": [("gland", shapely.box(0, 0, 90, 90))]})
    cfg = _cfg()
    tr = [describe_slide(ds, "s0", cfg)]
    va = [describe_slide(ds, "s1", cfg, val_windows=3)]
    path = build_patch_cache(tmp_path / "cache", tr, va, cfg, 6, seed=0, progress=False)
    mtime = path.stat().st_mtime_ns
    assert build_patch_cache(tmp_path / "cache", tr, va, cfg, 6, seed=0, progress=False) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert read_split(path) == {"train": ["s0"], "val": ["s1"]}
    assert build_patch_cache(tmp_path / "cache", tr, va, cfg, 7, seed=0, progress=False) != path  # other settings
    train = CachedPatches(path, "train", cfg, n=10, seed=0)
    assert len(train) == 10 and train[3]["image"].shape == (3, 64, 64) and train[3]["name"] == "s0"
    val = CachedPatches(path, "val", cfg)
    live = WindowDataset(va, cfg)
    assert len(val) == len(live) == 3
    for i in range(3):
        for k in ("image", "mask", "weight"):
            assert np.array_equal(val[i][k].numpy(), live[i][k].numpy())


def test_confusion_counts_and_scores():
    from histolight.segment.evaluate import class_rows, confusion

    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    cm = confusion(pred, truth, np.ones_like(truth), "multiclass", 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    rows = {r["class"]: r for r in class_rows(cm, ["bg", "a", "b"], "multiclass")}
    assert (rows["a"]["tp"], rows["a"]["fp"], rows["a"]["fn"], rows["a"]["tn"]) == (2, 1, 0, 5)
    assert rows["a"]["dice"] == pytest.approx(0.8) and rows["a"]["iou"] == pytest.approx(2 / 3)
    ml = confusion(np.stack([pred == 1, pred == 2]), np.stack([truth == 1, truth == 2]), np.ones_like(truth), "multilabel", 2)
    r = class_rows(ml, ["a", "b"], "multilabel")[1]
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 0, 1, 5)


@pytest.mark.slow
def test_train_patches_end_to_end_with_cache_evaluation_and_inputs(tmp_path):
    from histolight import segment

    glands = [("gland", shapely.box(x, y, x + 80, y + 80)) for x in range(100, 900, 200) for y in range(100, 650, 200)]
    ds = _cohort(tmp_path, {"s0": glands, "s1": glands[::2]})
    cfg = _cfg(cache_patches=8, mpp=2.0, val_windows=2)
    dest = tmp_path / "model"
    m = segment.train(
        cfg, ds, dest, cache_dir=tmp_path / "cache", logger=False, enable_progress_bar=False, save_inputs=1, overwrite=True
    )
    assert "val/miou" in m and "eval/val/dice_gland" in m
    assert list((tmp_path / "cache").glob("patches_*.h5"))
    ev = dest / "evaluation"
    assert {"per_slide.csv", "per_class.csv", "confusion.csv", "confusion.png"} <= {p.name for p in ev.iterdir()}
    assert len(list((ev / "panels").glob("s1_*.png"))) >= 2 and (dest / "inputs" / "batch0.png").exists()
    saved = json.loads((dest / "segment_config.json").read_text())
    assert json.dumps(saved).count('"patches": true') == 1


@pytest.mark.slow
def test_train_reuses_an_export_folder(tmp_path, tiny_demo):
    """issue 11: ``segment.train(config, dataset, data_source=<export folder>, dest=...)`` trains on the export."""
    from histolight import segment
    from histolight.dataset import Dataset

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=tiny_demo / "annotations.csv")
    cfg = segment.SegmentConfig(
        mode="binary", mpp=8, size=64, crops_per_epoch=4, batch_size=4, epochs=1, encoder_name="tu-mobilenetv3_small_100"
    )
    masks = tmp_path / "masks"
    segment.export_thumbs_and_masks(ds, mpp=8, dest=masks, mode="binary")
    m = segment.train(cfg, ds, data_source=masks, dest=tmp_path / "m", logger=False, enable_progress_bar=False)
    assert "val/miou" in m and not (tmp_path / "m" / "thumbs").exists()  # nothing exported again
    with pytest.raises(ConfigError, match="exported with"):
        segment.train(
            segment.SegmentConfig(**{**cfg.to_dict(), "mpp": 4.0}), ds, data_source=masks, dest=tmp_path / "m2", logger=False
        )


def test_demo_fine_variant_adds_glands_and_keeps_the_default_key(tmp_path):
    from histolight.demo import DemoConfig, generate_demo
    from histolight.roi import read_rois

    assert "glands" not in DemoConfig().key()  # the three-class cohort's manifest key is unchanged
    root = generate_demo(tmp_path / "fine", n_slides=1, width=1024, height=768, glands=6, workers=1)
    rois = read_rois(root / "rois" / "demo_000.csv")
    assert 1 <= sum(r.label == "gland" for r in rois) <= 6
    assert json.loads((root / "masks" / "labels.json").read_text())["4"] == "gland"
    import cv2

    mask = cv2.imread(str(root / "masks" / "demo_000.png"), cv2.IMREAD_UNCHANGED)
    assert (mask == 4).any()
    with pytest.raises(ValueError, match="glands"):
        DemoConfig(glands=-1)


def test_seg_patches_configs_validate():
    from histolight.segment import SegmentConfig

    with pytest.raises(ValueError, match="val_windows"):
        SegmentConfig(patches=True, val_windows=-1)
    with pytest.raises(ValueError, match="patches"):
        SegmentConfig(patches="yes")


def test_tensorboard_logger_config_instantiates(tmp_path):
    from omegaconf import OmegaConf

    from histolight.utils.instantiate import instantiate_loggers

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "logger" / "tensorboard.yaml")
    cfg.tensorboard.save_dir = str(tmp_path)
    (lg,) = instantiate_loggers(cfg)
    lg.experiment.add_image("x", np.zeros((4, 4, 3), np.uint8), 0, dataformats="HWC")
    lg.finalize("success")
    assert list(tmp_path.rglob("events.out.tfevents.*"))
