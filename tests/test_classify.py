"""Tile classifiers: labels from ROIs/slides/tables, patient splits, TFRecord datasets, training, artifacts,
prediction, config validation. Runs on a tiny demo cohort (3 slides, 1024x768) with 32 px tiles."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from histolight.classify import (
    EvalDistributedSampler,
    LabelMap,
    LoadedModel,
    StreamingTileDataset,
    TileClassifier,
    TileDataModule,
    TileDataset,
    UnknownLabelError,
    WeightedDistributedSampler,
    balance_weights,
    evaluate_predictions,
    index_tfrecords,
    label_tiles,
    load_model,
    make_model_config,
    predict_tfrecords,
    prepare_tiles,
    save_model,
    split_patients,
)
from histolight.dataset import Dataset
from histolight.errors import ConfigError, HistolightError
from tests.conftest import compose_config, tiny_demo_overrides

PX, UM = 32, 32  # tiny tiles: 64 base px at 0.5 um/px
CLASSES = ["tumor", "stroma", "necrosis"]


# ------------------------------------------------------------------------------------------ fixtures


def _dataset(root: Path) -> Dataset:
    return Dataset(root / "slides", rois=root / "rois", annotations=root / "annotations.csv", name="demo")


@pytest.fixture(scope="session")
def work(tiny_demo, tmp_path_factory) -> Path:
    """paths.work_dir holding the tiny demo's tiles (extracted once, as data=tiles would)."""
    from histolight.extract import extract_tiles

    w = tmp_path_factory.mktemp("classify_work")
    extract_tiles(
        _dataset(tiny_demo),
        PX,
        UM,
        str(w / "tiles"),
        roi_method="auto",
        roi_filter_method="center",
        qc=["otsu"],
        report=False,
        progress=False,
        workers=1,
    )
    return w


@pytest.fixture(scope="session")
def tiles(tiny_demo, work) -> pd.DataFrame:
    ds = _dataset(tiny_demo)
    t, info = prepare_tiles(ds, tile_px=PX, tile_um=UM, tiles_root=work / "tiles", extract=False)
    t["split"] = split_patients(t, "annotations", dataset=ds)
    assert info.n_labelled == len(t) > 0
    return t


def _train_overrides(demo: Path, work: Path, out: Path, *extra: str) -> list[str]:
    return [
        "experiment=tile_classifier",
        *tiny_demo_overrides(demo),
        f"paths.work_dir={work}",
        f"paths.output_dir={out}",
        f"data.tile_px={PX}",
        f"data.tile_um={UM}",
        "data.num_workers=0",
        "data.batch_size=32",
        "model=timm_resnet18",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "+trainer.num_sanity_val_steps=0",
        *extra,
    ]


# ------------------------------------------------------------------------------------------ labels


def _mask(demo: Path, slide: str) -> np.ndarray:
    return cv2.imread(str(demo / "masks" / f"{slide}.png"), cv2.IMREAD_GRAYSCALE)


def test_roi_labels_center_match_ground_truth(tiny_demo):
    """center: a tile is labelled with the class under its centre pixel; tiles off labelled ROIs are dropped."""
    from histolight.extract import get_tile_dataframe

    ds = _dataset(tiny_demo)
    grid = get_tile_dataframe(ds, PX, UM, roi_method="ignore", roi_filter_method="center")  # every tile
    lab = label_tiles(get_tile_dataframe(ds, PX, UM, roi_filter_method="center"), "roi", dataset=ds)
    assert set(lab["label"]) == set(CLASSES)
    assert lab.index.isin(grid.index).all()
    agree, n = 0, 0
    for slide, df in grid.groupby("slide"):
        m = _mask(tiny_demo, slide)
        truth = m[df["loc_y"].to_numpy(), df["loc_x"].to_numpy()]
        got = lab["label"].reindex(df.index)
        for t, g in zip(truth, got):
            n += 1
            agree += (t == 0 and pd.isna(g)) or (t > 0 and g == CLASSES[t - 1])
    assert agree / n > 0.98, f"{agree}/{n} tiles agree with the ground-truth mask"
    assert (lab["patient"] == lab["slide"].map(ds.patient)).all()


@pytest.mark.parametrize("frac", [0.5, 0.9])
def test_roi_labels_fractional_match_ground_truth(tiny_demo, frac):
    """fraction f: kept tiles are > f inside ROIs and carry the ROI covering most of them."""
    from histolight.extract import get_tile_dataframe

    ds = _dataset(tiny_demo)
    all_tiles = get_tile_dataframe(ds, PX, UM, roi_method="ignore", roi_filter_method="center", columns="all")
    lab = label_tiles(get_tile_dataframe(ds, PX, UM, roi_filter_method=frac), "roi", dataset=ds)
    size = int(all_tiles["size_base"].iloc[0])
    ok_keep, ok_label, n = 0, 0, 0
    for slide, df in all_tiles.groupby("slide"):
        m = _mask(tiny_demo, slide)
        for tid, r in df.iterrows():
            crop = m[r["y"] : r["y"] + size, r["x"] : r["x"] + size]
            inside = (crop > 0).mean()
            counts = np.bincount(crop.ravel(), minlength=4)[1:]
            n += 1
            kept = tid in lab.index
            ok_keep += kept == (inside > frac) or abs(inside - frac) < 0.03
            if kept:
                ok_label += lab.at[tid, "label"] == CLASSES[int(counts.argmax())] or counts.max() < 0.55 * counts.sum()
    n_kept = len(lab)
    assert n_kept > 20
    assert ok_keep / n > 0.99
    assert ok_label / n_kept > 0.98
    if frac == 0.9:  # stricter filter, fewer tiles than center
        assert n_kept < len(get_tile_dataframe(ds, PX, UM, roi_filter_method="center"))


def test_slide_and_table_label_sources(tiny_demo, work, tmp_path):
    ds = _dataset(tiny_demo)
    index = index_tfrecords(sorted((work / "tiles" / "demo" / f"{PX}px_{UM}um").glob("*.tfrecords")))
    weak = label_tiles(index, "slide", dataset=ds, column="label")
    assert len(weak) == len(index)
    assert (weak["label"] == weak["slide"].map(ds.annotations["label"])).all()
    with pytest.raises(ConfigError, match="label_column='nope'"):
        label_tiles(index, "slide", dataset=ds, column="nope")
    # table: CSV with tile ids, some tiles absent (dropped), extra ids ignored
    sub = index.iloc[::3]
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"tile_id": list(sub.index) + ["nope-1-1"], "label": ["a"] * len(sub) + ["b"]}).to_csv(csv, index=False)
    tab = label_tiles(index, "table", table=str(csv), dataset=ds)
    assert list(tab.index) == list(sub.index) and set(tab["label"]) == {"a"}
    # DataFrame indexed by tile id (Slideflow's labels=df)
    tab2 = label_tiles(index, "table", table=pd.DataFrame({"label": ["x"] * 2}, index=index.index[:2]))
    assert list(tab2.index) == list(index.index[:2])
    # class filter
    only = label_tiles(index, "slide", dataset=ds, classes=["stroma"])
    assert set(only["label"]) == {"stroma"}
    with pytest.raises(ConfigError, match="label_source='rio'"):
        label_tiles(index, "rio")


def test_label_map_roundtrip_and_unknown_label():
    lm = LabelMap.from_labels(["stroma", "tumor", "stroma"])
    assert lm.names == ["stroma", "tumor"] and LabelMap.from_dict(lm.to_dict()) == lm
    assert list(lm.encode(pd.Series(["tumor", "stroma"], index=["s-1-1", "s-2-2"]))) == [1, 0]
    with pytest.raises(UnknownLabelError, match=r"tile 's-2-2' has label 'fat'.*\['stroma', 'tumor'\]"):
        lm.encode(pd.Series(["tumor", "fat"], index=["s-1-1", "s-2-2"]))
    pred = pd.DataFrame(
        {"slide": ["s", "s"], "loc_x": [1, 2], "loc_y": [1, 2], "prob_stroma": [0.9, 0.2], "prob_tumor": [0.1, 0.8]},
        index=["s-1-1", "s-2-2"],
    )
    m = evaluate_predictions(pred, pd.Series(["stroma", "tumor"], index=pred.index), lm)
    assert m["acc"] == 1.0 and m["bal_acc"] == 1.0 and m["auroc"] == 1.0
    with pytest.raises(UnknownLabelError, match="s-2-2.*'necrosis'"):
        evaluate_predictions(pred, pd.Series(["stroma", "necrosis"], index=pred.index), lm)


# ------------------------------------------------------------------------------------------ splits


def _fake_tiles(n_patients=20, slides_per_patient=2, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(slides_per_patient):
            slide = f"p{p}_s{s}"
            for i in range(int(rng.integers(1, 50))):
                rows.append({"patient": f"p{p}", "slide": slide, "label": CLASSES[(p + i) % 3], "id": f"{slide}-{i}-0"})
    return pd.DataFrame(rows).set_index("id")


@pytest.mark.parametrize(
    "method,kw", [("random", dict(val_fraction=0.2, test_fraction=0.2)), ("kfold", dict(k=4, fold=1, test_fraction=0.1))]
)
def test_no_patient_leakage(method, kw):
    t = _fake_tiles()
    s = split_patients(t, method, seed=3, **kw)
    per_patient = t.assign(split=s).groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(s) == {"train", "val", "test"}
    assert s.equals(split_patients(t, method, seed=3, **kw))  # seeded
    assert not s.equals(split_patients(t, method, seed=4, **kw))


def test_kfold_partitions_patients():
    t = _fake_tiles()
    vals = [set(t.loc[split_patients(t, "kfold", k=4, fold=f, seed=0) == "val", "patient"]) for f in range(4)]
    assert set().union(*vals) == set(t["patient"])
    assert sum(len(v) for v in vals) == t["patient"].nunique()
    with pytest.raises(ConfigError, match="fold=4"):
        split_patients(t, "kfold", k=4, fold=4)


def test_annotation_splits_by_patient(tiny_demo, tiles):
    ds = _dataset(tiny_demo)
    assert (tiles.groupby("patient")["split"].nunique() == 1).all()
    ann = ds.annotations.copy()
    ann["split"] = ann["split"].map({"train": " Train", "val": "VAL ", "test": "test"})  # compared case-insensitively
    odd = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=ann.reset_index(drop=True))
    assert split_patients(tiles, "annotations", dataset=odd).equals(tiles["split"])
    ann.loc["demo_001", "split"] = "val"  # demo_000 and demo_001 share patient p000
    bad = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=ann.reset_index(drop=True))
    with pytest.raises(ConfigError, match=r"patient 'p000' \(train: \['demo_000'\], val: \['demo_001'\]\)"):
        split_patients(tiles, "annotations", dataset=bad)  # the override: tests/test_training.py


def test_empty_split_and_missing_class_are_clear_errors(tiles):
    lm = LabelMap(CLASSES)
    with pytest.raises(HistolightError, match="the 'val' split is empty"):
        TileDataModule(tiles.assign(split="train"), lm, tile_px=PX)
    no_necrosis = tiles[~((tiles["split"] == "train") & (tiles["label"] == "necrosis"))]
    with pytest.raises(HistolightError, match=r"class\(es\) \['necrosis'\] have no training tiles"):
        TileDataModule(no_necrosis, lm, tile_px=PX)
    with pytest.raises(UnknownLabelError, match="has label 'tumor'"):
        TileDataModule(tiles, LabelMap(["stroma", "necrosis", "fat"]), tile_px=PX)


def test_balance_weights():
    y = np.array([0] * 90 + [1] * 10)
    s = np.array(["a"] * 80 + ["b"] * 10 + ["b"] * 10)
    w = balance_weights(y, s, "tile")
    assert np.isclose(w[y == 0].sum(), 0.5) and np.isclose(w[y == 1].sum(), 0.5)
    w = balance_weights(y, s, "slide")  # class 0: slides a (80 tiles) and b (10 tiles) weigh the same
    assert np.isclose(w[:80].sum(), 0.25) and np.isclose(w[80:90].sum(), 0.25) and np.isclose(w[90:].sum(), 0.5)
    assert balance_weights(y, s, "none") is None


# ------------------------------------------------------------------------------------------ datasets


def test_map_dataset_reads_extracted_tiles(tiles):
    ds = TileDataset(tiles, labels=np.zeros(len(tiles), np.int64), tile_px=PX)
    item = ds[5]
    assert item["image"].shape == (3, PX, PX) and item["image"].dtype == torch.uint8
    assert 0 <= item["slide"] < len(ds.slides) and item["index"] == 5
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)  # each worker opens its own files
    n = sum(b["image"].shape[0] for b in loader)
    assert n == len(ds)


def test_streaming_shards_are_disjoint_and_sized(tiles):
    t = tiles.sort_values(["slide", "record"])
    ds = StreamingTileDataset(t, labels=np.zeros(len(t), np.int64), tile_px=PX, shuffle_buffer=64, seed=1)
    for n_shards in (1, 2, 4, 8):  # file-level (>= 2 files per shard) and record-level sharding
        parts = [set(ds._shard(k, n_shards)) for k in range(n_shards)]
        assert sum(len(p) for p in parts) == len(t) and set().union(*parts) == set(range(len(t)))
    # 2 DDP ranks x 2 workers: every rank gets the same count; items stay in the rank's shards
    counts, seen = [], []
    for rank in (0, 1):
        ds_r = StreamingTileDataset(
            t,
            labels=np.zeros(len(t), np.int64),
            tile_px=PX,
            shuffle_buffer=64,
            seed=1,
            rank=rank,
            world_size=2,
            samples_per_epoch=200,
        )
        loader = torch.utils.data.DataLoader(ds_r, batch_size=10, num_workers=2)
        idx = torch.cat([b["index"] for b in loader]).tolist()
        counts.append(len(idx))
        seen.append(set(idx))
        owned = set(ds_r._shard(rank * 2, 4)) | set(ds_r._shard(rank * 2 + 1, 4))
        assert set(idx) <= owned
    assert counts == [100, 100] and not (seen[0] & seen[1])
    # epochs differ (shared epoch counter), same epoch is reproducible
    a = [b["index"] for b in torch.utils.data.DataLoader(ds, batch_size=len(t))][0]
    ds.set_epoch(1)
    b = [b["index"] for b in torch.utils.data.DataLoader(ds, batch_size=len(t))][0]
    ds.set_epoch(0)
    c = [b["index"] for b in torch.utils.data.DataLoader(ds, batch_size=len(t))][0]
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_streaming_balancing(tiles):
    t = tiles.sort_values(["slide", "record"])
    y = LabelMap(CLASSES).encode(t["label"])
    w = balance_weights(y, t["slide"].to_numpy(), "tile")
    ds = StreamingTileDataset(
        t,
        labels=y,
        tile_px=PX,
        weights=w,
        samples_per_epoch=1500,
        shuffle_buffer=32,
        seed=0,
        transform=lambda img: torch.zeros(1),
    )
    got = np.bincount(torch.cat([b["label"] for b in torch.utils.data.DataLoader(ds, batch_size=500)]).numpy(), minlength=3)
    assert np.all(np.abs(got / got.sum() - 1 / 3) < 0.07), got


def test_augmentation_is_seeded_from_torch():
    from histolight.classify import build_transform

    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    aug = {"color_jitter": {"p": 1.0}, "jpeg": {"quality": [40, 60], "p": 1.0}}
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        tf = build_transform(True, aug)
        outs.append(torch.stack([tf(img) for _ in range(4)]))
    assert torch.equal(outs[0], outs[1])  # same torch seed, same augmentations
    assert not torch.equal(outs[0][0], outs[0][1])  # but each call draws new parameters
    torch.manual_seed(124)
    assert not torch.equal(build_transform(True, aug)(img), outs[0][0])


def test_distributed_samplers():
    parts = [list(EvalDistributedSampler(11, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    w = np.ones(50)
    s0, s1 = (WeightedDistributedSampler(w, 50, num_replicas=2, rank=r, seed=0) for r in (0, 1))
    assert len(s0) == len(list(s0)) == 25 and list(s0) != list(s1)
    s0.set_epoch(1)
    assert list(s0) != list(WeightedDistributedSampler(w, 50, num_replicas=2, rank=0, seed=0))


def test_slideflow_text_index(tmp_path):
    """Slideflow TFRecords with a plain-text <stem>.index (offset length) are readable."""
    from histolight.io import TFRecordWriter, build_index

    p = tmp_path / "sf_slide.tfrecords"
    img = np.full((PX, PX, 3), 128, np.uint8)
    ok, jpg = cv2.imencode(".jpg", img)
    with TFRecordWriter(p, "sf_slide", write_index=False) as w:
        for i in range(4):
            w.write_tile(jpg.tobytes(), 100 * i, 50)
    idx, _ = build_index(p, write=False)
    np.savetxt(tmp_path / "sf_slide.index", idx, fmt="%d")
    t = index_tfrecords([p])
    assert list(t.index) == [f"sf_slide-{100 * i}-50" for i in range(4)]
    assert TileDataset(t, tile_px=16)[3]["image"].shape == (3, 16, 16)  # resized to tile_px


# ------------------------------------------------------------------------------------------ training


def _module(lm: LabelMap, model_config=None) -> TileClassifier:
    from functools import partial

    return TileClassifier("resnet18", lm.names, optimizer=partial(torch.optim.SGD, lr=0.1), model_config=model_config)


@pytest.mark.slow
def test_extracted_tfrecords_train_one_step_and_reload_predicts_identically(tiles, work, tmp_path):
    import lightning as L

    lm = LabelMap(CLASSES)
    dm = TileDataModule(tiles, lm, tile_px=PX, batch_size=16, balance="slide")
    cfg = make_model_config("resnet18", lm, PX, UM, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    module = _module(lm, cfg)
    before = module.net.fc.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and not torch.equal(before, module.net.fc.weight)
    # save -> load -> identical predictions
    module.net.eval()
    model_dir = save_model(tmp_path / "model", module.net, cfg)
    with pytest.raises(HistolightError, match="already holds a classifier model"):
        save_model(model_dir, module.net, cfg)
    conf = json.loads((model_dir / "classifier_config.json").read_text())  # the format: tests/test_training.py
    assert conf["labels"] == CLASSES and conf["geometry"]["tile_px"] == PX and conf["model"]["timm_name"] == "resnet18"
    src = work / "tiles" / "demo" / f"{PX}px_{UM}um"
    live = predict_tfrecords(LoadedModel(module.net, cfg, lm), src, batch_size=64, progress=False)
    again = predict_tfrecords(load_model(model_dir), src, batch_size=64, progress=False)
    pd.testing.assert_frame_equal(live, again)
    assert list(live.columns) == ["slide", "loc_x", "loc_y", "prob_tumor", "prob_stroma", "prob_necrosis", "pred"]
    np.testing.assert_allclose(live.filter(like="prob_").sum(1), 1.0, rtol=1e-5)
    from histolight.classify.predict import check_tile_geometry

    with pytest.raises(ConfigError, match="do not match the model's tiles"):
        check_tile_geometry(["/t/64px_32um/a.tfrecords"], PX, UM)


def test_local_weights_freeze_and_label_smoothing(tmp_path):
    from histolight.classify.module import apply_freeze, create_timm_model

    src = create_timm_model("resnet18", 10)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = create_timm_model("resnet18", 3, checkpoint_path=str(tmp_path / "w.pth"))  # head (10 -> 3) re-initialised
    assert torch.equal(m.conv1.weight, src.conv1.weight) and m.fc.weight.shape == (3, 512)
    n = apply_freeze(m, "backbone")
    assert n > 0 and {k for k, p in m.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    m2 = create_timm_model("resnet18", 3)
    apply_freeze(m2, ["conv1", "layer1"])
    assert not m2.conv1.weight.requires_grad and m2.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ConfigError, match="matches no parameter"):
        apply_freeze(create_timm_model("resnet18", 3), ["encoder."])
    with pytest.raises(ConfigError, match="does not exist"):
        create_timm_model("resnet18", 3, checkpoint_path=str(tmp_path / "missing.pth"))
    mod = TileClassifier("resnet18", CLASSES, label_smoothing=0.1, freeze="backbone")
    opt = mod.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 512 * 3 + 3


# ------------------------------------------------------------------------------------------ tasks (Hydra)


@pytest.mark.slow
def test_train_tiles_task_end_to_end_then_predict(tiny_demo, work, tmp_path):
    from histolight.tasks import get_task

    out = tmp_path / "train"
    cfg = compose_config(_train_overrides(tiny_demo, work, out))
    metrics = get_task("train_tiles")(cfg)
    for k in ("val/acc", "val/bal_acc", "val/auroc", "val/loss", "val/n_tiles"):
        assert k in metrics, k
    assert 0 <= metrics["val/bal_acc"] <= 1
    used = pd.read_parquet(out / "tiles.parquet")
    assert metrics["val/n_tiles"] == (used["split"] == "val").sum()
    assert (used.groupby("patient")["split"].nunique() == 1).all()
    assert (out / "model" / "weights.safetensors").exists() and list((out / "checkpoints").glob("*.ckpt"))
    conf = json.loads((out / "model" / "classifier_config.json").read_text())
    assert conf["labels"] == CLASSES and conf["geometry"]["tile_um"] == UM and conf["normalizer"] is None
    assert conf["metrics"]["val/bal_acc"] == metrics["val/bal_acc"] and conf["training"]["checkpoint"]
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "W&B offline run files"
    from histolight.utils.instantiate import finish_wandb

    finish_wandb()

    pout = tmp_path / "predict"
    pcfg = compose_config(
        [
            "task=predict",
            *tiny_demo_overrides(tiny_demo),
            f"paths.work_dir={work}",
            f"paths.output_dir={pout}",
            f"task.model={out / 'model'}",
            "task.label_source=roi",
        ]
    )
    pm = get_task("predict")(pcfg)
    pred = pd.read_parquet(pout / "predictions.parquet")
    assert {"tile_id", "slide", "loc_x", "loc_y", "prob_tumor", "prob_stroma", "prob_necrosis"} <= set(pred.columns)
    assert pm["n_tiles"] == len(pred) and pm["n_slides"] == 3 and "eval/bal_acc" in pm
    slides = pd.read_parquet(pout / "slides.parquet")
    assert len(slides) == 3 and (slides["n_tiles"].sum() == len(pred))
    pngs = sorted(p for p in (pout / "heatmaps").glob("*.png") if p.stem != "legend")
    assert len(pngs) == 3 and cv2.imread(str(pngs[0])).shape[2] == 3


@pytest.mark.slow
def test_weak_supervision_streaming_slide_metrics(tiny_demo, work, tmp_path):
    """label_source=slide (a named annotations column), streaming loader, slide-level metrics,
    on-the-fly stain normalization and stain augmentation."""
    from histolight.tasks import get_task

    ann = pd.read_csv(tiny_demo / "annotations.csv")
    ann["grade"] = ["low", "high", "low"]  # train: demo_000/001 (patient p000), val: demo_002
    ann.to_csv(tmp_path / "ann.csv", index=False)
    out = tmp_path / "weak"
    cfg = compose_config(
        _train_overrides(
            tiny_demo,
            work,
            out,
            "data.label_source=slide",
            "data.label_column=grade",
            "data.labels=null",
            f"dataset.annotations={tmp_path / 'ann.csv'}",
            "logger=csv",
            "data.streaming=true",
            "data.shuffle_buffer=64",
            "normalizer=reinhard_fast",
            "data.augment.stain={p:0.5}",
        )
    )
    m = get_task("train_tiles")(cfg)
    assert m["val/n_slides"] == 1 and "val/slide_acc" in m
    conf = json.loads((out / "model" / "classifier_config.json").read_text())
    assert conf["labels"] == ["high", "low"] and conf["data"]["label_source"] == "slide"
    assert conf["data"]["label_column"] == "grade"
    # the on-the-fly normalizer and its fit are saved with the model and rebuilt on load
    assert conf["normalizer"]["method"] == "reinhard_fast" and conf["normalizer"]["fit"]
    loaded = load_model(out / "model")
    assert loaded.normalizer is not None and loaded.normalizer.to_config() == conf["normalizer"]


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("data.label_source=rio", r"label_source='rio' is invalid: must be one of roi, slide, table"),
        ("data.tile_px=0", r"tile_px=0 is invalid"),
        ("data.labels=[tumor]", r"labels=\['tumor'\] is invalid: needs at least 2"),
        ("data.labels=[tumor,tumor,stroma]", r"labels must be unique"),
        ("data.balance=class", r"balance='class' is invalid: must be one of none, tile, slide"),
        ("data.split.method=kfolds", r"split.method='kfolds' is invalid: must be one of annotations, random, kfold"),
        ("model.name=resnet19", r"'resnet19' is not a timm model"),
        ("+data.batchsize=3", r"unknown key 'data.batchsize'. Did you mean 'data.batch_size'"),
        ("data.augment.jpeg.quality=[90,10]", r"augment.jpeg.quality=\[90, 10\] is invalid"),
        ("task.monitor_mode=maximum", r"monitor_mode='maximum' is invalid"),
        ("model.optimizer.lr=-1", r"optimizer.lr=-1 is invalid: must be a positive learning rate"),
        ("data.augment.rot90=2", r"augment.rot90=2 is invalid: must be true or false"),
        ("normalizer=augment", r"normalizer=augment is a random stain augmentation"),
    ],
)
def test_config_mistakes_fail_before_work(tmp_path, override, pattern):
    from histolight.tasks import get_task

    demo = tmp_path / "never_generated"
    cfg = compose_config(_train_overrides(demo, tmp_path / "work", tmp_path / "out", override))
    with pytest.raises(ConfigError, match=pattern):
        get_task("train_tiles")(cfg)
    assert not demo.exists() and not (tmp_path / "work").exists()


def test_predict_config_needs_a_model(tmp_path):
    from histolight.tasks import get_task

    cfg = compose_config(["task=predict", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="model=None is invalid"):
        get_task("predict")(cfg)


def test_label_typo_is_a_missing_class_error(tiny_demo, work, tmp_path):
    from histolight.tasks import get_task

    cfg = compose_config(_train_overrides(tiny_demo, work, tmp_path / "o", "data.labels=[tumour,stroma,necrosis]", "logger=none"))
    with pytest.raises(HistolightError, match=r"\['tumour'\] have no training tiles"):
        get_task("train_tiles")(cfg)


def test_slurm_launcher_composes_with_ddp():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="install the [sweep] extra")
    overrides = ["experiment=tile_classifier", "launcher=slurm", "trainer=ddp", "trainer.devices=4"]
    overrides += ["hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4"]
    cfg = compose_config(overrides, hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.task.name == "train_tiles" and cfg.trainer.strategy == "ddp"
