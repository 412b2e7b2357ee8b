"""Whole-slide segmentation: config schema, export format, data, losses, training (three modes), tiled and
whole-slide inference, ROI generation, qc.Segment, Hydra tasks (splits, optimizers and model folders, shared with
tile classifiers: tests/test_training.py).

Everything runs on the tiny demo cohort (3 slides, 1024 x 768 px at 0.5 um/px -> 128 x 96 px at 4 um/px)
with a small timm encoder, on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from histolight.errors import ConfigError, SlideError
from tests.conftest import compose_config, tiny_demo_overrides

LABELS = ["tumor", "stroma", "necrosis"]
ENC = "tu-mobilenetv3_small_100"
TINY = [
    f"model.encoder_name={ENC}",
    "data.mpp=4",
    "data.size=64",
    "data.crops_per_epoch=4",
    "data.batch_size=8",
    "model.infer_batch_size=4",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def compose_cfg(overrides: list[str], tmp_path):
    cfg = compose_config(overrides, tmp_path / "out")
    with open_dict(cfg):
        cfg.paths.work_dir = str(tmp_path / "work")
    return cfg


def small_config(mode="multiclass", **kw):
    from histolight.segment import SegmentConfig

    labels = None if mode == "binary" else LABELS
    base = dict(
        mode=mode, labels=labels, mpp=4, size=64, encoder_name=ENC, crops_per_epoch=4, batch_size=4, infer_batch_size=4, epochs=1
    )
    base.update(kw)
    return SegmentConfig(**base)


def tiny_dataset(root):
    from histolight.dataset import Dataset

    return Dataset(root / "slides", rois=root / "rois", annotations=root / "annotations.csv")


def gt_labels(root, name, shape_hw):
    """Ground-truth class map (0 bg, 1 tumor, 2 stroma, 3 necrosis) resized (nearest) to ``shape_hw``."""
    import cv2

    m = cv2.imread(str(root / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    return cv2.resize(m, (shape_hw[1], shape_hw[0]), interpolation=cv2.INTER_NEAREST)


@pytest.fixture(scope="module")
def trained(tiny_demo, tmp_path_factory):
    """One model per mode trained through the Hydra task for a fast_dev_run step (multiclass logs to offline W&B)."""
    from histolight.tasks import get_task

    out = {}
    for mode in ("multiclass", "binary", "multilabel"):
        tmp = tmp_path_factory.mktemp(f"seg_{mode}")
        # multiclass: one real epoch logged to offline W&B (fast_dev_run would disable loggers and checkpoints)
        run = ["logger=wandb", "trainer.max_epochs=1"] if mode == "multiclass" else ["logger=csv", "+trainer.fast_dev_run=true"]
        cfg = compose_cfg([f"experiment=seg_{mode}", *run, *TINY, *tiny_demo_overrides(tiny_demo)], tmp)
        metrics = get_task("train_seg")(cfg)
        out[mode] = (tmp / "out", metrics)
    from histolight.utils.instantiate import finish_wandb

    finish_wandb()
    return out


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.slow
def test_bad_mode_labels_and_keys_are_rejected_at_startup(tiny_demo, tmp_path):
    from histolight.tasks import get_task

    run = get_task("train_seg")
    base = ["experiment=seg_multiclass", *TINY, *tiny_demo_overrides(tiny_demo), "logger=csv"]
    cases = [
        (["data.mode=multiclas"], r"data\.mode='multiclas' is invalid: must be one of \['binary', 'multiclass', 'multilabel'\]"),
        (["data.labels=[tumor,tumor]"], r"data\.labels=.*must be unique \(repeated: \['tumor'\]\)"),
        (["data.labels=[background,tumor]"], r"'background' is implicit"),
        (["data.labels=null"], r"mode 'multiclass' needs a list of ROI labels"),
        (["data.labels=tumor"], r"must be a list of class names"),
        (["data.labels=[tumour,stroma]"], r"\['tumour'\] not among the cohort's labels"),
        (["data.size=100"], r"data\.size=100 is invalid: must be a positive multiple of 32"),
        (["+data.crop_size=64"], r"unknown key 'data.crop_size'"),
        (["model.loss=ce+dcie"], r"unknown loss 'dcie' \(did you mean 'dice'\?\)"),
        (["model.arch=UNet3"], r"model\.arch='UNet3' is invalid"),
        (["model.class_weights=[1,2]"], r"class_weights=\[1, 2\] is invalid: must be null or 4 positive numbers"),
        (["model.encoder_weights=/nonexistent/w.pth"], r"encoder_weights=.*file not found"),
        (["+model.lr=0.1"], r"unknown key 'model.lr'. It moved: use 'model.optimizer.lr'"),
        (["model.optimizer.lr=-1"], r"model\.optimizer\.lr=-1 is invalid: must be a positive learning rate"),
        (["model.optimizer._target_=torch.optim.Adamm"], r"model\.optimizer\._target_='torch.optim.Adamm' is invalid"),
        (["+data.augment.rotate=true"], r"data\.augment\.rotate=True is invalid: unknown augmentation"),
    ]
    for extra, pattern in cases:
        cfg = compose_cfg(base + extra, tmp_path)
        with pytest.raises(ConfigError, match=pattern):
            run(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # rejected before any work
    from histolight.segment import SegmentConfig

    with pytest.raises(ValueError, match="loss='bce' is invalid"):
        SegmentConfig(mode="multiclass", labels=LABELS, loss="bce")
    # a label that exists in no ROI is caught after the export (typo against the ROI files)
    from histolight.segment.data import check_labels_present, export_thumbs_and_masks, load_thumb_mask

    paths = export_thumbs_and_masks(tiny_dataset(tiny_demo), 4, tmp_path / "x", labels=["tumor", "fat"], mode="multilabel")
    with pytest.raises(ConfigError, match=r"no ROI of label\(s\) \['fat'\]"):
        check_labels_present([load_thumb_mask(p) for p in paths.values()], ["tumor", "fat"], "multilabel")


# ---------------------------------------------------------------------------------------------- export + data


def test_export_format_holes_and_cache(tiny_demo, tmp_path):
    from histolight.segment import export_thumbs_and_masks, load_thumb_mask

    ds = tiny_dataset(tiny_demo)
    dest = tmp_path / "mc"
    paths = export_thumbs_and_masks(ds, 4, dest, labels=LABELS, mode="multiclass")
    assert sorted(paths) == ds.names
    for name, p in paths.items():
        it = load_thumb_mask(p)
        assert it.image.shape == (96, 128, 3) and it.image.dtype == np.uint8
        assert it.mask.shape == (96, 128) and it.mask.dtype == np.uint8
        meta = json.loads(p.with_suffix(".json").read_text())
        for k in ("mpp", "mode", "labels", "slide_dims", "thumb_size", "mask_encoding", "base_mpp"):
            assert k in meta
        assert meta["slide_dims"] == [1024, 768] and meta["thumb_size"] == [128, 96] and meta["labels"] == LABELS
        gt = gt_labels(tiny_demo, name, (96, 128))
        assert (it.mask == gt).mean() > 0.97  # rasterized ROIs (holes respected) agree with the exact mask
    # necrosis inside the hole of a tumor ROI: the hole shows necrosis, not tumor
    from histolight.roi import read_rois

    name = ds.names[0]
    rois = read_rois(ds.roi_path(name))
    holed = [r for r in rois if r.label == "tumor" and r.n_holes]
    if holed:
        hole = holed[0].polygons[0].interiors[0]
        c = np.asarray(hole.coords).mean(0) / 8
        assert load_thumb_mask(paths[name]).mask[int(c[1]), int(c[0])] == 3
    # cached: a second export does not rewrite; overwrite does
    m0 = paths[name].stat().st_mtime_ns
    export_thumbs_and_masks(ds, 4, dest, labels=LABELS, mode="multiclass")
    assert paths[name].stat().st_mtime_ns == m0
    export_thumbs_and_masks(ds, 4, dest, labels=LABELS, mode="multiclass", overwrite=True)
    assert paths[name].stat().st_mtime_ns != m0
    # multilabel: (N, H, W); binary: (H, W) union of all ROIs
    ml = load_thumb_mask(export_thumbs_and_masks(ds, 4, tmp_path / "ml", labels=LABELS, mode="multilabel")[name])
    assert ml.mask.shape == (3, 96, 128)
    b = load_thumb_mask(export_thumbs_and_masks(ds, 4, tmp_path / "b", mode="binary")[name])
    assert b.mask.shape == (96, 128) and set(np.unique(b.mask)) <= {0, 1}
    assert ((b.mask > 0) == (ml.mask.any(0))).mean() > 0.99


def test_crops_pad_augment_identically_and_more_crops_than_slides():
    from torch.utils.data import DataLoader

    from histolight.segment.data import ThumbMask
    from histolight.segment.datamodule import SegmentDataModule

    # image colour encodes the class, so after any geometric augmentation mask and image must still agree
    np.random.default_rng(0)
    mask = np.zeros((40, 50), np.uint8)
    mask[5:30, 10:45] = 1
    mask[10:20, 20:30] = 2
    colours = np.array([[255, 255, 255], [200, 0, 0], [0, 0, 200]], np.uint8)
    item = ThumbMask("s", colours[mask], mask, {})
    aug = {"flip": True, "rot90": True, "scale": 0.0, "stain": None, "color_jitter": None, "blur": 0.0}
    cfg = small_config("multiclass", labels=["a", "b"], size=64, crops_per_epoch=10, batch_size=8, augment=aug)
    dm = SegmentDataModule(cfg, [item], [item])
    batches = list(dm.train_dataloader())
    assert [b["image"].shape[0] for b in batches] == [8, 2]  # 10 crops per epoch from 1 slide, batch 8
    for b in batches:
        img = (b["image"] * 255).round().byte().permute(0, 2, 3, 1).numpy()
        m = b["mask"].numpy()
        w = b["weight"].numpy()
        assert img.shape[1:3] == (64, 64) and m.shape[1:] == (64, 64)
        assert (w > 0).sum(axis=(1, 2)).tolist() == [40 * 50] * len(m)  # the 40x50 thumbnail, padded to 64
        valid = w > 0
        for k in range(3):
            sel = (m == k) & valid
            assert (np.abs(img[sel].astype(int) - colours[k]).max(initial=0)) == 0
        assert (img[~valid] == 255).all()
    v = next(iter(dm.val_dataloader()))
    assert v["image"].shape == (1, 3, 64, 64) and v["weight"].sum() == 40 * 50
    # multilabel masks (N, H, W) follow the geometry too
    ml = np.stack([mask == 1, mask == 2]).astype(np.uint8)
    cfg2 = small_config("multilabel", labels=["a", "b"], size=64, crops_per_epoch=4, augment=aug)
    b = next(
        iter(
            DataLoader(
                SegmentDataModule(cfg2, [ThumbMask("s", colours[mask], ml, {})]).train_dataloader().dataset,
                batch_size=4,
                collate_fn=lambda x: x,
            )
        )
    )
    for s in b:
        img = (s["image"] * 255).round().byte().permute(1, 2, 0).numpy()
        assert s["mask"].shape == (2, 64, 64)
        red = (img == [200, 0, 0]).all(-1)
        assert np.array_equal(red, s["mask"][0].numpy().astype(bool))


def test_losses_edges_and_class_weights():
    from histolight.segment.losses import SegmentLoss, edge_weight_map

    t = torch.zeros(1, 32, 32, dtype=torch.long)
    t[:, 8:24, 8:24] = 1
    w = edge_weight_map(t[0].numpy(), edge_weight=5.0, sigma=2.0)
    assert w[16, 16] < 1.05 and w[8, 16] > 5.0 and w[0, 0] < 1.05 and w.min() >= 1.0
    perfect = torch.where(t.bool(), 10.0, -10.0)[:, None]  # binary logits
    for loss in ("ce", "focal", "dice", "jaccard", "ce+dice", "0.5*focal+jaccard"):
        f = SegmentLoss("binary", __import__("histolight.segment.config", fromlist=["x"]).parse_loss(loss), 2)
        good, bad = f(perfect, t), f(-perfect, t)
        assert torch.isfinite(good) and good < 0.05 and bad > 0.5, loss
    # weight 0 pixels are ignored entirely
    f = SegmentLoss("multiclass", {"ce": 1.0, "dice": 1.0}, 3)
    logits = torch.randn(1, 3, 32, 32)
    weight = torch.zeros(1, 32, 32)
    weight[:, :16] = 1
    l1 = f(logits, t, weight)
    logits2 = logits.clone()
    logits2[..., 16:, :] = torch.randn(1, 3, 16, 32) * 100
    assert torch.allclose(l1, f(logits2, t, weight))
    # class weights change the loss
    fw = SegmentLoss("multiclass", {"ce": 1.0}, 3, class_weights=[1.0, 10.0, 1.0])
    assert not torch.allclose(fw(logits, t), SegmentLoss("multiclass", {"ce": 1.0}, 3)(logits, t))


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["multiclass", "binary", "multilabel"])
def test_modes_train_save_and_infer_with_correct_shapes(trained, tiny_demo, mode):
    from histolight.segment import load_model_and_config

    out, metrics = trained[mode]
    assert "val/miou" in metrics and 0.0 <= metrics["val/miou"] <= 1.0
    assert (out / "weights.safetensors").exists() and (out / "segment_config.json").exists() and (out / "metrics.json").exists()
    assert not (out / "model.pth").exists()
    meta = json.loads((out / "segment_config.json").read_text())
    assert meta["format"] == "histolight-model" and meta["format_version"] == 1 and meta["kind"] == "segment"
    for k in ("arch", "encoder_name", "optimizer", "loss"):
        assert k in meta["model"], k
    for k in ("mode", "labels", "mpp", "size", "augment"):
        assert k in meta["data"], k
    assert meta["geometry"]["mpp"] == 4 and meta["normalizer"] is None and len(meta["input_norm"]["mean"]) == 3
    assert meta["labels"][0] == "background" or mode == "multilabel"
    assert meta["training"]["run"]["data"]["mode"] == mode and meta["training"]["train_slides"]
    model, cfg = load_model_and_config(out)
    n = {"binary": None, "multiclass": 4, "multilabel": 3}[mode]
    img = np.random.default_rng(0).integers(0, 255, (70, 150, 3), dtype=np.uint8)  # non-square, not a multiple of 32
    p = model.run_tiled_inference(img)
    assert p.shape == ((70, 150) if n is None else (n, 70, 150)) and p.dtype == np.float32
    assert 0 <= p.min() and p.max() <= 1
    if mode == "multiclass":
        assert np.allclose(p.sum(0), 1, atol=1e-4)
    lab = model.run_tiled_inference(img, output="labels")
    assert lab.shape == ((3, 70, 150) if mode == "multilabel" else (70, 150)) and lab.dtype == np.uint8
    ds = tiny_dataset(tiny_demo)
    with ds.open(ds.names[0]) as slide:
        whole = model.run_slide_inference(slide, strip_px=40)  # 3 strips for 96 rows
        w, h = slide.size_at_mpp(cfg.mpp)
        assert (h, w) == (96, 128) and whole.shape == ((h, w) if n is None else (n, h, w))


def test_wandb_offline_run_and_lightning_artifacts(trained):
    out, _ = trained["multiclass"]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs, list(out.iterdir())
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert list((out / "checkpoints").glob("*.ckpt"))
    assert list((out / "overlays").glob("*.png"))  # validation image | truth | prediction


# ---------------------------------------------------------------------------------------------- inference


def test_tiled_inference_matches_single_pass_in_the_interior():
    import cv2

    from histolight.segment.model import SegmentModel

    torch.manual_seed(0)
    cfg = small_config(
        "multiclass",
        encoder_name="efficientnet-b0",
        size=96,
        overlap=0.25,
        input_mean=[0.8, 0.6, 0.8],
        input_std=[0.15, 0.2, 0.15],
    )
    model = SegmentModel(cfg).eval()
    img = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 255, (200, 331, 3), dtype=np.uint8), (0, 0), 3)
    tiled = model.run_tiled_inference(img)  # 3 x 4 tiles of 96 px, blended
    single = model.run_forward(img)  # one pass over the padded image
    assert tiled.shape == single.shape == (4, 200, 331)
    inner = np.abs(tiled - single)[:, 24:-24, 24:-24]
    assert inner.max() < 0.05 and inner.mean() < 0.005, (inner.max(), inner.mean())
    # tiles never exceed the training crop (size=96): a larger tile_px only puts more of them in a forward pass
    assert np.allclose(model.run_tiled_inference(img, tile_px=352), tiled, atol=1e-5)
    # one tile covering the whole image (a model trained on crops that large) is the single pass (up to float error)
    import dataclasses

    big = SegmentModel(dataclasses.replace(cfg, size=352)).eval()
    big.load_state_dict(model.state_dict())
    assert np.allclose(big.run_tiled_inference(img, tile_px=352), single, atol=1e-5)
    # tiny and odd sizes keep their exact shape
    for h, w in ((17, 5), (33, 200), (200, 33)):
        assert model.run_tiled_inference(img[:h, :w]).shape == (4, h, w)


def test_slide_inference_in_strips_matches_thumbnail_inference(tmp_path):
    from histolight.segment.model import SegmentModel
    from histolight.wsi import VirtualSlide

    torch.manual_seed(0)
    model = SegmentModel(small_config("binary", size=64)).eval()
    rng = np.random.default_rng(3)
    import cv2

    base = cv2.resize(cv2.GaussianBlur(rng.integers(0, 255, (150, 110, 3), dtype=np.uint8), (0, 0), 2), (880, 1200))
    slide = VirtualSlide(base, mpp=0.5, downsamples=(1, 4, 8))  # 8 base px per output px at 4 um/px
    reads = []
    orig = slide.read

    def spy(location, size, mpp, out_size=None):
        out = orig(location, size, mpp, out_size)
        reads.append(out.shape)
        return out

    slide.read = spy
    strips = model.run_slide_inference(slide, strip_px=32)
    assert strips.shape == (150, 110)
    # memory is bounded by one strip plus its context rows (tile // 2 above and below), never the whole slide
    assert len(reads) == 5 and max(r[0] for r in reads) <= 32 + 64 and all(r[1] == 110 for r in reads)
    ref = model.run_tiled_inference(slide.thumbnail(mpp=4))
    assert np.abs(strips - ref)[8:-8, 8:-8].mean() < 0.02


# ---------------------------------------------------------------------------------------------- ROIs + QC


def test_rois_from_masks_match_ground_truth_and_round_trip(tiny_demo, tmp_path):
    import shapely

    from histolight.roi import rasterize_rois, read_rois
    from histolight.segment.rois import masks_to_rois, write_slide_rois

    ds = tiny_dataset(tiny_demo)
    name = ds.names[0]
    gt = gt_labels(tiny_demo, name, (384, 512))  # 1 um/px: 2 base px per mask px
    rois = masks_to_rois({lab: gt == i + 1 for i, lab in enumerate(LABELS)}, downsample=2.0, base_mpp=0.5, min_area_mm2=0.0005)
    truth = ds.rois(name)
    for lab in LABELS:
        a = shapely.unary_union([r.geometry for r in rois if r.label == lab])
        b = shapely.unary_union([r.geometry for r in truth if r.label == lab])
        assert a.intersection(b).area / a.union(b).area > 0.95, lab
    assert sum(r.n_holes for r in rois if r.label == "tumor") >= sum(r.n_holes for r in truth if r.label == "tumor")
    files = write_slide_rois(rois, tmp_path, name)
    for f in files:
        back = read_rois(f)
        assert sorted(r.label for r in back) == sorted(r.label for r in rois)
        assert sum(r.area for r in back) == pytest.approx(sum(r.area for r in rois), rel=1e-3)
    gj = json.loads((tmp_path / f"{name}.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    for feat in gj["features"]:
        g = shapely.geometry.shape(feat["geometry"])
        assert g.is_valid and feat["properties"]["objectType"] == "annotation"
        assert feat["properties"]["classification"]["name"] in LABELS
    back = read_rois(tmp_path / f"{name}.csv")
    mask = rasterize_rois(back, (384, 512), 0.5, labels=LABELS, mode="multiclass")
    assert (mask == gt).mean() > 0.98
    # area threshold and simplification
    few = masks_to_rois({"tumor": gt == 1}, 2.0, 0.5, min_area_mm2=1.0)
    assert few == []
    coarse = masks_to_rois({"tumor": gt == 1}, 2.0, 0.5, min_area_mm2=0.0005, simplify_tolerance=20)
    fine = masks_to_rois({"tumor": gt == 1}, 2.0, 0.5, min_area_mm2=0.0005, simplify_tolerance=0)
    n = lambda rs: sum(len(p.exterior.coords) for r in rs for p in r.polygons)  # noqa: E731
    assert n(coarse) < n(fine)


class _Oracle:
    """Stands in for a trained model: 'predicts' the ground-truth class map of the demo slide."""

    def __init__(self, root, cfg):
        self.root, self.config = root, cfg

    def run_slide_inference(self, slide, output="labels", **kw):
        w, h = slide.size_at_mpp(self.config.mpp)
        if slide.name == "broken":
            raise SlideError(slide.path, "simulated failure")
        lab = gt_labels(self.root, slide.name, (h, w))
        if self.config.mode == "multiclass":
            return lab
        if self.config.mode == "binary":
            return (lab > 0).astype(np.uint8)
        return np.stack([lab == i + 1 for i in range(3)]).astype(np.uint8)


@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
def test_qc_segment_masks(tiny_demo, tmp_path, mode):
    from histolight.qc import QCMask, Segment, build_qc
    from histolight.segment import save_model
    from histolight.segment.model import SegmentModel

    cfg = small_config(mode)
    save_model(SegmentModel(cfg), tmp_path / "m")
    ds = tiny_dataset(tiny_demo)
    with ds.open(ds.names[0]) as slide:
        gt = gt_labels(tiny_demo, slide.name, (96, 128))
        variants = {(None, "less"): gt == 0, (None, "greater"): gt > 0}
        if mode != "binary":
            k = 2 if mode == "multiclass" else 1  # stroma: class 2 / channel 1
            variants[(k, "less")] = gt != 2
            variants[(k, "greater")] = gt == 2
        for (k, direction), expect in variants.items():
            qc = Segment(tmp_path / "m", class_idx=k, threshold_direction=direction)
            qc._model = _Oracle(tiny_demo, cfg)
            m = qc(slide)
            assert isinstance(m, QCMask) and m.mpp == 4 and m.name == "segment"
            assert m.mask.shape == (96, 128)
            assert np.array_equal(m.mask, expect), (k, direction)
        # registered for extraction configs
        built = build_qc([{"name": "segment", "model_path": str(tmp_path / "m")}])
        assert isinstance(built[0], Segment)
    with pytest.raises(ValueError, match="threshold_direction"):
        Segment(tmp_path / "m", threshold_direction="lower")
    if mode != "binary":
        with pytest.raises(ValueError, match="class_idx=7 is invalid"):
            Segment(tmp_path / "m", class_idx=7)


def test_qc_segment_in_extraction_keeps_only_predicted_tissue(tiny_demo, tmp_path):
    extract = pytest.importorskip("histolight.extract")
    from histolight.qc import Segment
    from histolight.segment import save_model
    from histolight.segment.model import SegmentModel

    cfg = small_config("binary")
    save_model(SegmentModel(cfg), tmp_path / "m")
    qc = Segment(tmp_path / "m")
    qc._model = _Oracle(tiny_demo, cfg)
    ds = tiny_dataset(tiny_demo)
    res = extract.extract_tiles(
        ds,
        tile_px=32,
        tile_um=32,
        outdir=tmp_path / "tiles",
        qc=[qc],
        roi_method="ignore",
        workers=1,
        report=False,
        progress=False,
        grayspace_fraction=1.0,
        whitespace_fraction=1.0,
    )
    everything = extract.extract_tiles(
        ds,
        tile_px=32,
        tile_um=32,
        outdir=tmp_path / "all",
        qc=[],
        roi_method="ignore",
        workers=1,
        report=False,
        progress=False,
        grayspace_fraction=1.0,
        whitespace_fraction=1.0,
    ).tiles
    tiles = res.tiles
    assert 0 < len(tiles) < len(everything)
    for name, df in tiles.groupby("slide"):
        gt = gt_labels(tiny_demo, name, (768, 1024))

        def in_tissue(t, gt=gt):
            return gt[t["loc_y"].astype(int).clip(0, 767), t["loc_x"].astype(int).clip(0, 1023)] > 0

        kept, every = in_tissue(df), in_tissue(everything[everything["slide"] == name])
        assert kept.mean() > 0.9, name  # tiles whose centre is on tissue (edge tiles may be half tissue)
        assert kept.sum() >= 0.95 * every.sum(), name  # and nearly every tissue tile is kept


def test_dataset_generate_rois_writes_skips_and_survives_failures(tiny_demo, tmp_path):
    from histolight.roi import read_rois
    from histolight.segment.model import SegmentModel

    ds = tiny_dataset(tiny_demo)
    model = SegmentModel(small_config("multiclass"))
    oracle = _Oracle(tiny_demo, model.config)
    model.run_slide_inference = oracle.run_slide_inference
    rep = ds.generate_rois(model).table  # every slide already has ROIs: skipped
    assert set(rep["status"]) == {"skipped"} and set(rep["reason"]) == {"exists"}
    rep = ds.generate_rois(model, dest=tmp_path / "pred", min_area_mm2=0.001).table
    assert set(rep["status"]) == {"done"}
    for name in ds.names:
        rois = read_rois(tmp_path / "pred" / f"{name}.csv")
        assert {r.label for r in rois} <= set(LABELS) and rois
        assert (tmp_path / "pred" / f"{name}.geojson").exists()
    m0 = (tmp_path / "pred" / f"{ds.names[0]}.csv").stat().st_mtime_ns
    rep = ds.generate_rois(model, dest=tmp_path / "pred").table
    assert set(rep["status"]) == {"skipped"}
    assert (tmp_path / "pred" / f"{ds.names[0]}.csv").stat().st_mtime_ns == m0
    # a failing slide is logged and skipped; the others are written
    ds2 = ds.filter()
    ds2._paths = {**ds._paths, "broken": ds._paths[ds.names[0]]}
    orig_open = ds2.open

    def open_(name):
        s = orig_open(name if name != "broken" else ds.names[0])
        if name == "broken":
            s.name = "broken"
        return s

    ds2.open = open_
    res = ds2.generate_rois(model, dest=tmp_path / "pred2", overwrite=True, min_area_mm2=0.001)
    status = dict(zip(res.table["slide"], res.table["status"]))
    assert status["broken"] == "failed" and "simulated" in res.failed["broken"]
    assert all(status[n] == "done" for n in ds.names)


# ---------------------------------------------------------------------------------------------- Hydra tasks


@pytest.mark.slow
def test_tasks_export_segment_and_generate_rois(trained, tiny_demo, tmp_path):
    from histolight.roi import read_rois
    from histolight.tasks import get_task

    model_dir, _ = trained["multiclass"]
    ov = tiny_demo_overrides(tiny_demo)
    cfg = compose_cfg(
        ["task=export_masks", "data=seg", "data.mode=multiclass", f"data.labels=[{','.join(LABELS)}]", "data.mpp=4", *ov],
        tmp_path,
    )
    r = get_task("export_masks")(cfg)
    assert r["n_done"] == 3 and len(list((tmp_path / "work").rglob("*.npz"))) == 3
    cfg = compose_cfg(["task=segment", f"task.model={model_dir}", "task.min_area_mm2=0.0001", *ov], tmp_path)
    r = get_task("segment")(cfg)
    assert r["n_done"] == 3
    seg = tmp_path / "out" / "segment"
    name = tiny_dataset(tiny_demo).names[0]
    import cv2

    pred = cv2.imread(str(seg / f"{name}.pred.png"), cv2.IMREAD_UNCHANGED)
    assert pred.shape == (96, 128) and pred.max() <= 3
    meta = json.loads((seg / f"{name}.pred.json").read_text())
    assert meta["downsample"] == 8 and meta["slide_dims"] == [1024, 768]
    assert (seg / f"{name}.overlay.png").exists()
    read_rois(seg / "rois" / f"{name}.csv")  # loads (may be empty for an untrained model)
    cfg = compose_cfg(["task=generate_rois", f"task.model={model_dir}", f"task.dest={tmp_path / 'gen'}", *ov], tmp_path)
    r = get_task("generate_rois")(cfg)
    assert r["n_done"] + r["n_empty"] == 3 and r["n_failed"] == 0
    cfg = compose_cfg(["task=generate_rois", f"task.model={model_dir}", *ov], tmp_path)
    assert get_task("generate_rois")(cfg)["n_skipped"] == 3  # the dataset's own ROIs are never overwritten
    cfg = compose_cfg(["task=segment", "task.model=/nonexistent", *ov], tmp_path)
    with pytest.raises(ConfigError, match="task.*model='/nonexistent'.*does not exist"):
        get_task("segment")(cfg)
