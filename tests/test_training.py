"""The training kit shared by segmentation and tile classification (histolight.training, histolight.io.weights):
one patient-split policy, one augmentation schema (old keys as aliases), ``_partial_`` optimizers with warmup,
one model-folder format that still reads the two older layouts (reloads without network), safe weights loading,
the overwrite guard, W&B sweep naming for both training tasks."""

from __future__ import annotations

import json
import logging
import socket
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from histolight.errors import ConfigError, HistolightError

ENC = "tu-mobilenetv3_small_100"
LABELS = ["tumor", "stroma", "necrosis"]


def _dataset(root, split_overrides: dict | None = None):
    from histolight.dataset import Dataset

    ann = pd.read_csv(root / "annotations.csv")
    for slide, value in (split_overrides or {}).items():
        ann.loc[ann["slide"] == slide, "split"] = value
    return Dataset(root / "slides", rois=root / "rois", annotations=ann, name="demo")


def _seg_config(mode="multiclass", **kw):
    from histolight.segment import SegmentConfig

    base = dict(mode=mode, labels=None if mode == "binary" else LABELS, mpp=4, size=64, encoder_name=ENC, infer_batch_size=4)
    return SegmentConfig(**{**base, **kw})


def _tiles_of(ds) -> pd.DataFrame:
    """A minimal labelled tile table: two tiles per slide of ``ds``."""
    rows = [
        {"id": f"{s}-{i}-0", "slide": s, "patient": ds.patient(s), "label": LABELS[i % 3]} for s in ds.names for i in range(2)
    ]
    return pd.DataFrame(rows).set_index("id")


# ---------------------------------------------------------------------------------------------- splits


def test_leakage_is_refused_with_the_same_message_in_both_stacks(tiny_demo, caplog):
    from histolight.classify import split_patients
    from histolight.segment import split_slides

    # demo_000 and demo_001 belong to patient p000; put them in different splits (and spell the values oddly)
    ds = _dataset(tiny_demo, {"demo_000": " Train", "demo_001": "VAL"})
    with pytest.raises(ConfigError) as seg:
        split_slides(ds, _seg_config())
    with pytest.raises(ConfigError) as cls:
        split_patients(_tiles_of(ds), "annotations", dataset=ds)
    assert str(seg.value) == str(cls.value)
    msg = str(seg.value)
    assert "patient 'p000' (train: ['demo_000'], val: ['demo_001'])" in msg
    assert "data.allow_patient_leakage=true" in msg and "annotations column 'split'" in msg
    # the override turns the refusal into a warning, in both stacks
    with caplog.at_level(logging.WARNING):
        train, val = split_slides(ds, _seg_config(allow_patient_leakage=True))
        s = split_patients(_tiles_of(ds), "annotations", dataset=ds, allow_leakage=True)
    assert train == ["demo_000"] and "demo_001" in val and set(s[s.index.str.startswith("demo_001")]) == {"val"}
    assert sum("patient leakage" in r.getMessage() for r in caplog.records) == 2


def test_split_values_are_case_insensitive_and_test_slides_left_out(tiny_demo):
    from histolight.segment import split_slides
    from histolight.training.splits import annotation_split, split_value

    assert [split_value(v) for v in (" Train ", "VAL", None, float("nan"), "")] == ["train", "val", None, None, None]
    ds = _dataset(tiny_demo, {"demo_000": "TRAIN ", "demo_001": " train", "demo_002": "Val"})
    assert split_slides(ds, _seg_config()) == (["demo_000", "demo_001"], ["demo_002"])
    # a patient in train and test is leakage too; other values leave the slide out
    sp = {"a": "p1", "b": "p1", "c": "p2", "d": "p3"}
    with pytest.raises(ConfigError, match=r"patient 'p1' \(train: \['a'\], test: \['b'\]\)"):
        annotation_split(sp, {"a": "train", "b": "Test", "c": "val"})
    assert annotation_split(sp, {"a": "train", "b": "train", "c": "val", "d": "holdout"}) == {
        "a": "train",
        "b": "train",
        "c": "val",
        "d": None,
    }


def test_random_and_kfold_splits_keep_patients_together():
    from histolight.training.splits import kfold_split, random_split

    sp = {f"s{i}": f"p{i // 2}" for i in range(40)}  # 20 patients, 2 slides each
    for split in (
        random_split(sp, val_fraction=0.2, test_fraction=0.1, seed=1),
        kfold_split(sp, k=4, fold=2, test_fraction=0.1, seed=1),
    ):
        per_patient: dict[str, set] = {}
        for s, v in split.items():
            per_patient.setdefault(sp[s], set()).add(v)
        assert all(len(v) == 1 for v in per_patient.values()) and set(split.values()) == {"train", "val", "test"}
    assert random_split(sp, seed=1) == random_split(sp, seed=1) != random_split(sp, seed=2)
    assert set(random_split({"s": "p"}, val_fraction=0.5).values()) == {"train"}  # one patient: all training
    with pytest.raises(ConfigError, match=r"data.split.fold=4 is invalid"):
        kfold_split(sp, k=4, fold=4)


def test_segmentation_split_by_patient(tiny_demo):
    from histolight.dataset import Dataset
    from histolight.segment import split_slides

    ds = _dataset(tiny_demo)
    train, val = split_slides(ds, _seg_config("binary"))
    assert train == ["demo_000", "demo_001"] and val == ["demo_002"]  # demo_000/001 share patient p000
    # without a split column: a seeded patient-level split, patients never straddle train and val
    ann = ds.annotations.drop(columns=["split"]).reset_index(drop=True)
    ds2 = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=ann)
    train, val = split_slides(ds2, _seg_config("binary", val_fraction=0.5))
    assert train and val and not ({ds2.patient(n) for n in train} & {ds2.patient(n) for n in val})
    assert sorted(train + val) == ds2.names


# ---------------------------------------------------------------------------------------------- augmentation


def test_old_augmentation_keys_are_deprecated_aliases():
    from histolight.classify.config import TileDataConfig
    from histolight.training.augment import validate_augment

    with pytest.warns(DeprecationWarning, match=r"data.augment.rotate90 is deprecated: use data.augment.rot90"):
        a = validate_augment({"rotate90": False, "flip": True})
    assert a["rot90"] is False and "rotate90" not in a
    with pytest.warns(DeprecationWarning, match="stain_augment"):
        a = validate_augment({"stain_augment": {"p": 0.3}})
    assert a["stain"] == {"p": 0.3}
    with pytest.warns(DeprecationWarning, match="brightness_contrast/hue_saturation"):
        a = validate_augment({"brightness_contrast": 0.2, "hue_saturation": 0.05})
    assert a["color_jitter"] == {"brightness": 0.2, "contrast": 0.2, "saturation": 0.05, "hue": 0.05, "p": 0.5}
    # the same aliases in both stacks' configs
    with pytest.warns(DeprecationWarning):
        assert _seg_config(augment={"rotate90": False}).augment["rot90"] is False
    with pytest.warns(DeprecationWarning):
        assert TileDataConfig(augment={"rotate90": False, "stain_augment": None}).augment["rot90"] is False
    with pytest.warns(DeprecationWarning, match="augmentation"):
        assert _seg_config(augmentation={"flip": False}).augment["flip"] is False  # the old field name
    with pytest.raises(ValueError, match=r"augment.rotate90=True is invalid: is an old name of augment.rot90"):
        validate_augment({"rotate90": True, "rot90": True}, prefix="augment")
    with pytest.raises(ValueError, match=r"data.augment.flp=True is invalid: unknown augmentation \(did you mean 'flip'\?\)"):
        validate_augment({"flp": True})
    with pytest.raises(ValueError, match=r"data.augment.blur=2 is invalid: must be a number in \[0, 1\]"):
        validate_augment({"blur": 2})
    assert validate_augment(None) == validate_augment(False) == validate_augment({"flip": False, "rot90": False})


def test_one_pipeline_moves_masks_with_the_image_and_runs_on_tiles():
    from histolight.training.augment import build_augmentation

    aug = {"flip": True, "rot90": True, "scale": 0.2, "stain": 0.1, "color_jitter": {"p": 1.0}, "blur": 0.5, "jpeg": {"p": 1.0}}
    t = build_augmentation(aug)
    t.set_random_seed(0)
    img = np.full((64, 64, 3), 255, np.uint8)
    img[8:40, 16:48] = (180, 60, 120)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:48] = 1
    for _ in range(5):
        r = t(image=img, masks=[mask])
        m = r["masks"][0]
        assert r["image"].shape == (64, 64, 3) and m.shape == (64, 64) and set(np.unique(m)) <= {0, 1}
        tissue = r["image"].astype(int).sum(-1) < 600  # the coloured square, wherever it went
        assert (tissue == (m > 0)).mean() > 0.95
    assert t(image=img)["image"].shape == (64, 64, 3)  # tiles: image only
    assert build_augmentation(None) is None


# ---------------------------------------------------------------------------------------------- optimizers


def test_segmentation_optimizer_and_warmup_come_from_partial_nodes():
    from histolight.segment.model import SegmentModel

    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9}
    cfg = _seg_config(optimizer=sgd, scheduler=None, warmup_epochs=2)
    conf = SegmentModel(cfg).configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.005, 0.0275, 0.05, 0.05])  # linear warmup from 0.1 x lr over 2 epochs
    # cosine after warmup: T_max filled in as the epochs left after the warmup
    conf = SegmentModel(_seg_config(warmup_epochs=2, epochs=10)).configure_optimizers()
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.SequentialLR)
    assert conf["lr_scheduler"]["scheduler"]._schedulers[1].T_max == 8
    with pytest.raises(ValueError, match=r"optimizer=.* is invalid: must be a Hydra node with _target_ and _partial_"):
        _seg_config(optimizer="adamw")
    plateau = {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "_partial_": True}
    with pytest.raises(ValueError, match="warmup_epochs=1 is invalid: must be 0 with ReduceLROnPlateau"):
        _seg_config(scheduler=plateau, warmup_epochs=1)
    conf = SegmentModel(_seg_config(scheduler=plateau)).configure_optimizers()
    assert conf["lr_scheduler"]["monitor"] == "val/loss"


def test_segmentation_lr_and_scheduler_are_used_in_training(tiny_demo, tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from histolight.segment import train

    cfg = _seg_config(
        "binary",
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.0123},
        scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.5},
        crops_per_epoch=2,
        batch_size=2,
    )
    logger = CSVLogger(tmp_path, name="csv")
    seen, opts = [], []

    class Spy(LearningRateMonitor):
        def on_train_epoch_start(self, trainer, pl_module):
            opts.append(trainer.optimizers[0])
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])
            super().on_train_epoch_start(trainer, pl_module)

    train(
        cfg,
        _dataset(tiny_demo),
        tmp_path / "m",
        epochs=3,
        loggers=[logger],
        callbacks=[Spy()],
        enable_progress_bar=False,
        enable_model_summary=False,
        n_overlays=0,
    )
    assert seen == pytest.approx([0.0123, 0.0123 * 0.5, 0.0123 * 0.25])
    assert isinstance(opts[0], torch.optim.SGD)  # the _partial_ node's optimizer
    df = pd.read_csv(next((tmp_path / "csv").rglob("metrics.csv")))
    lr_col = [c for c in df.columns if c.startswith("lr-")][0]
    assert df[lr_col].dropna().iloc[0] == pytest.approx(0.0123)
    assert {"val/miou", "val/mdice", "val/iou_background", "val/dice_tissue"} <= set(df.columns)


def test_classifier_takes_the_same_nodes_and_callables():
    from histolight.classify import TileClassifier

    node = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}
    sched = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}
    for opt in (node, partial(torch.optim.AdamW, lr=0.01)):
        m = TileClassifier("resnet10t", ["a", "b"], optimizer=opt, scheduler=sched, warmup_epochs=1)
        conf = m.configure_optimizers()
        assert isinstance(conf["optimizer"], torch.optim.AdamW) and conf["optimizer"].param_groups[0]["lr"] == pytest.approx(
            0.001
        )


def test_old_string_optimizer_options_are_converted_when_loading():
    from histolight.segment import SegmentConfig

    old = {**_seg_config().to_dict(), "optimizer": "sgd", "lr": 0.02, "weight_decay": 0.0, "scheduler": "step"}
    old["scheduler_kwargs"] = {"step_size": 3, "gamma": 0.5}
    cfg = SegmentConfig.from_dict(old)
    assert cfg.optimizer == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.02,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "nesterov": True,
    }
    assert cfg.scheduler == {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 3, "gamma": 0.5}


# ---------------------------------------------------------------------------------------------- weights


class Custom:
    """A class whose pickle needs code execution to load."""


def test_unsafe_pickles_are_refused_everywhere(tmp_path):
    from histolight.classify.module import create_timm_model
    from histolight.io.weights import read_state_dict

    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Custom()}, bad)
    with pytest.raises(HistolightError, match=r"cannot be loaded safely \(it holds a .*Custom object\).*code execution"):
        read_state_dict(bad)
    with pytest.raises(ConfigError, match=r"model.checkpoint_path=.* is invalid: .*code execution"):
        create_timm_model("resnet10t", 2, checkpoint_path=str(bad))
    with pytest.raises(ValueError, match=r"encoder_weights=.*code execution"):
        from histolight.segment.model import SegmentModel

        SegmentModel(_seg_config(encoder_weights=str(bad)), load_pretrained=True)
    (tmp_path / "text.pt").write_text("not a pickle")
    with pytest.raises(HistolightError, match="not a readable torch weights file"):
        read_state_dict(tmp_path / "text.pt")


def test_load_matching_strips_prefixes_and_reports(tmp_path, caplog):
    from histolight.classify.module import create_timm_model
    from histolight.io.weights import load_matching, read_state_dict

    src = create_timm_model("resnet10t", 5)
    ck = {"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}  # a Lightning checkpoint
    torch.save(ck, tmp_path / "ck.ckpt")
    sd = read_state_dict(tmp_path / "ck.ckpt")
    dst = create_timm_model("resnet10t", 2)  # another head
    rep = load_matching(dst, sd)
    assert rep.strip == "net." and rep.shape_mismatch == ["fc.bias", "fc.weight"] and rep.missing == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.conv1[0].weight, src.conv1[0].weight)
    ddp = {f"module.{k}": v for k, v in src.state_dict().items()}
    assert load_matching(create_timm_model("resnet10t", 5), ddp, strict=True).loaded == len(ddp)
    with pytest.raises(HistolightError, match=r"no tensor of x matches the ResNet"):
        load_matching(dst, {"foo.bar": torch.zeros(3)}, source="x")
    with pytest.raises(HistolightError, match="does not fit"):
        load_matching(dst, sd, strict=True)


# ---------------------------------------------------------------------------------------------- model folders


def _old_segment_folder(model, folder):
    """A model folder as written before the shared format: model.pth + a flat segment_config.json."""
    folder.mkdir()
    torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, folder / "model.pth")
    cfg = model.config.to_dict()
    old_aug = {"flip": True, "rotate90": True, "brightness_contrast": 0.1, "hue_saturation": 0.05, "stain": 0.1}
    del cfg["augment"], cfg["optimizer"], cfg["scheduler"], cfg["scheduler_interval"], cfg["allow_patient_leakage"]
    mean, std = model.net.mean.flatten().tolist(), model.net.std.flatten().tolist()
    meta = {
        **cfg,
        "augmentation": old_aug,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "optimizer": "adamw",
        "scheduler": "cosine",
        "scheduler_kwargs": {},
        "input_mean": mean,
        "input_std": std,
        "format": "histolight.segment.model/1",
        "n_out": model.config.n_out,
        "class_names": model.config.class_names,
        "normalization": None,
        "input_stats": {"mean": mean, "std": std},
        "metrics": {"val/miou": 0.5},
    }
    (folder / "segment_config.json").write_text(json.dumps(meta))


def test_segment_model_folders_old_and_new(tmp_path, recwarn):
    from histolight.segment import load_model_and_config, save_model
    from histolight.segment.model import SegmentModel
    from histolight.training.artifacts import read_model_folder

    torch.manual_seed(0)
    model = SegmentModel(_seg_config("multilabel", input_mean=[0.7, 0.5, 0.7], input_std=[0.2, 0.2, 0.2])).eval()
    img = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    ref = model.run_tiled_inference(img)
    # the older layout still loads (no deprecation noise for a saved config), with its optimizer converted
    _old_segment_folder(model, tmp_path / "old")
    m_old, cfg_old = load_model_and_config(tmp_path / "old")
    assert np.array_equal(m_old.run_tiled_inference(img), ref)
    assert cfg_old.augment["rot90"] is True and cfg_old.optimizer["lr"] == 3e-3
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "augment" in str(w.message)]
    assert read_model_folder(tmp_path / "old" / "model.pth").legacy
    # the new format round-trips
    save_model(model, tmp_path / "new", extra={"metrics": {"val/miou": 0.7}})
    meta = json.loads((tmp_path / "new" / "segment_config.json").read_text())
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["segment_config.json", "weights.safetensors"]
    assert {k: meta[k] for k in ("format", "format_version", "kind", "weights")} == {
        "format": "histolight-model",
        "format_version": 1,
        "kind": "segment",
        "weights": "weights.safetensors",
    }
    assert meta["labels"] == LABELS and meta["geometry"] == {"mpp": 4.0, "tile_px": 64, "size": 64}
    assert meta["input_norm"]["mean"] == pytest.approx([0.7, 0.5, 0.7]) and meta["data"]["mode"] == "multilabel"
    m_new, cfg_new = load_model_and_config(tmp_path / "new")
    assert np.array_equal(m_new.run_tiled_inference(img), ref) and cfg_new.labels == LABELS
    # a Lightning checkpoint (hyperparameters hold the config) loads safely too
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "m.ckpt")
    assert np.array_equal(load_model_and_config(tmp_path / "m.ckpt")[0].run_tiled_inference(img), ref)
    # overwrite guard, then overwrite replaces an old folder's files by the new ones
    with pytest.raises(
        HistolightError, match=r"already holds a segment model \(model.pth, segment_config.json\).*overwrite=True"
    ):
        save_model(model, tmp_path / "old")
    save_model(model, tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["segment_config.json", "weights.safetensors"]
    # a newer format version is refused with a clear error
    meta["format_version"] = 2
    (tmp_path / "new" / "segment_config.json").write_text(json.dumps(meta))
    with pytest.raises(HistolightError, match="format_version=2; this histolight reads up to 1"):
        load_model_and_config(tmp_path / "new")


def test_saved_model_reloads_identically_without_network(tmp_path, monkeypatch):
    from histolight.segment import load_model_and_config, save_model
    from histolight.segment.model import SegmentModel

    torch.manual_seed(0)
    model = SegmentModel(_seg_config("multilabel")).eval()
    save_model(model, tmp_path / "m")
    with pytest.raises(HistolightError, match="overwrite"):
        save_model(model, tmp_path / "m")

    def no_network(*a, **k):
        raise AssertionError("network access while loading a model")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    img = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    for path in (tmp_path / "m", tmp_path / "m" / "weights.safetensors", tmp_path / "m" / "segment_config.json"):
        m2, cfg2 = load_model_and_config(path)
        assert cfg2.mode == "multilabel" and cfg2.labels == LABELS
        assert np.array_equal(model.run_tiled_inference(img), m2.run_tiled_inference(img))
    # a local encoder weights file is accepted (nothing can be downloaded)
    torch.save(model.net.model.encoder.state_dict(), tmp_path / "enc.pth")
    m3 = SegmentModel(_seg_config("multilabel", encoder_weights=str(tmp_path / "enc.pth")), load_pretrained=True)
    for k, v in model.net.model.encoder.state_dict().items():
        assert torch.equal(v, m3.net.model.encoder.state_dict()[k])


def test_classifier_model_folders_old_and_new(tmp_path):
    from histolight.classify import LabelMap, load_model, make_model_config, save_model
    from histolight.classify.module import create_timm_model
    from histolight.training.artifacts import read_model_folder

    torch.manual_seed(0)
    net = create_timm_model("resnet10t", 3).eval()
    lm = LabelMap(LABELS)
    tiles = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    # the older layout: weights.pt + model_config.json
    old = tmp_path / "old"
    old.mkdir()
    torch.save(net.state_dict(), old / "weights.pt")
    legacy = {
        "format": "histolight.tile_classifier",
        "version": 1,
        "timm_name": "resnet10t",
        "model_kwargs": {},
        "drop_rate": 0.0,
        "label_map": lm.to_dict(),
        "num_classes": 3,
        "tile_px": 32,
        "tile_um": 32,
        "normalizer": None,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "label_source": "roi",
        "weights": "weights.pt",
    }
    (old / "model_config.json").write_text(json.dumps(legacy))
    m_old = load_model(old)
    ref = m_old.predict_images(tiles)
    assert m_old.classes == LABELS and m_old.tile_px == 32 and read_model_folder(old).legacy
    # the new format round-trips, with the same flat config in memory
    cfg = make_model_config("resnet10t", lm, 32, 32, mean=[0.5] * 3, std=[0.25] * 3, label_source="roi", seed=3)
    save_model(tmp_path / "new", net, {**cfg, "metrics": {"val/acc": 0.5}})
    meta = json.loads((tmp_path / "new" / "classifier_config.json").read_text())
    assert meta["format"] == "histolight-model" and meta["kind"] == "classifier" and meta["labels"] == LABELS
    assert meta["geometry"] == {"tile_px": 32, "tile_um": 32, "mpp": 1.0} and meta["input_norm"]["std"] == [0.25] * 3
    assert meta["model"]["timm_name"] == "resnet10t" and meta["data"]["label_source"] == "roi"
    assert meta["training"]["seed"] == 3 and meta["metrics"] == {"val/acc": 0.5}
    m_new = load_model(tmp_path / "new")
    np.testing.assert_array_equal(m_new.predict_images(tiles), ref)
    assert {k: m_new.config[k] for k in ("timm_name", "tile_um", "mean", "label_source")} == {
        "timm_name": "resnet10t",
        "tile_um": 32,
        "mean": [0.5] * 3,
        "label_source": "roi",
    }
    # one kind is not the other; a missing weights file is named
    with pytest.raises(HistolightError, match="no segment model in"):
        read_model_folder(tmp_path / "new", "segment")
    (tmp_path / "new" / "weights.safetensors").unlink()
    with pytest.raises(HistolightError, match="weights.safetensors is missing"):
        load_model(tmp_path / "new")
    # an unsafe pickle as an old folder's weights is refused
    torch.save({"x": Custom()}, old / "weights.pt")
    with pytest.raises(HistolightError, match="code execution"):
        load_model(old)


def test_training_refuses_to_replace_a_model_before_any_work(tiny_demo, tmp_path):
    from histolight import classify, segment
    from histolight.classify.config import TileDataConfig, TimmModelConfig
    from histolight.segment.model import SegmentModel

    dest = tmp_path / "seg"
    segment.save_model(SegmentModel(_seg_config()), dest)
    with pytest.raises(HistolightError, match="already holds a segment model"):
        segment.train(_seg_config(), _dataset(tiny_demo), dest)
    assert not (dest / "thumbs").exists()  # nothing exported
    model_dir = tmp_path / "run" / "model"
    net = torch.nn.Linear(2, 2)
    from histolight.training.artifacts import save_model_folder

    meta = {k: {} for k in ("model", "data", "geometry", "input_norm")} | {"labels": ["a"], "normalizer": None}
    save_model_folder(model_dir, "classifier", net.state_dict(), meta)
    data = TileDataConfig(tiles_root=str(tmp_path / "tiles"))
    model = TimmModelConfig(name="resnet10t", optimizer={"_target_": "torch.optim.AdamW", "_partial_": True})
    with pytest.raises(HistolightError, match="already holds a classifier model"):
        classify.train(data, model, _dataset(tiny_demo), tmp_path / "run")
    assert not (tmp_path / "tiles").exists()  # nothing extracted


# ---------------------------------------------------------------------------------------------- tasks


def test_normalizer_rules_are_one_rule_with_one_message():
    from histolight.training.normalize import check_training_normalizer

    msgs = []
    for per_tile in (True, False):
        with pytest.raises(ConfigError) as e:
            check_training_normalizer({"method": "augment"}, per_tile=per_tile)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "data.augment.stain" in msgs[0]
    with pytest.raises(ConfigError, match="normalizer.context=true needs a per-slide thumbnail"):
        check_training_normalizer({"method": "reinhard", "context": True}, per_tile=True)
    assert check_training_normalizer({"method": "reinhard", "context": True}, per_tile=False)["context"] is True
    assert check_training_normalizer({"method": "none"}, per_tile=True) is None


def test_both_training_tasks_name_wandb_runs_of_a_sweep(monkeypatch, tmp_path):
    import histolight.utils.wandb as hw
    from histolight.training.trainer import build_trainer
    from tests.conftest import compose_config

    assert hw.wandb_sweep_settings(None) == {}  # not a multirun
    monkeypatch.setattr(hw, "wandb_sweep_settings", lambda cfg: {"group": f"{cfg.task.name}-sweep", "name": "0:x=1"})
    for exp in ("tile_classifier", "seg_binary"):
        cfg = compose_config([f"experiment={exp}", "logger=wandb", "trainer.max_epochs=1"], tmp_path / exp)
        trainer = build_trainer(cfg)
        init = trainer.loggers[0]._wandb_init
        assert init["group"] == f"{cfg.task.name}-sweep" and init["name"] == "0:x=1"


def test_trainer_config_drops_gpu_options_on_cpu():
    from omegaconf import OmegaConf

    from histolight.training.trainer import trainer_config

    t = trainer_config(OmegaConf.create({"accelerator": "cpu", "precision": "16-mixed", "sync_batchnorm": True}))
    assert t.precision == "32-true" and t.sync_batchnorm is False


def test_validating_an_optimizer_config_imports_only_known_packages(tmp_path, monkeypatch):
    """A config read from someone's model folder must not make histolight import a module it names."""
    import sys

    from histolight.training.optim import check_partial

    (tmp_path / "evil_optim_mod.py").write_text(
        "import pathlib; pathlib.Path(__file__).with_name('ran').write_text('x')\nclass O: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check_partial("optimizer", {"_target_": "evil_optim_mod.O", "_partial_": True}) is not None
    assert "evil_optim_mod" not in sys.modules and not (tmp_path / "ran").exists()
    with pytest.raises(ValueError, match="cannot be imported"):
        check_partial("optimizer", {"_target_": "torch.optim.AdamWW", "_partial_": True})
    with pytest.raises(ValueError, match="dotted class path"):
        check_partial("optimizer", {"_target_": "os.system('x')", "_partial_": True})


@pytest.mark.parametrize("k", [2, 4, 5])
def test_stratified_kfold_puts_every_stratum_in_every_fold(k):
    from histolight.training.splits import kfold_split

    patients = {f"p{i}": f"p{i}" for i in range(20)}
    strata = {p: ("a" if i % 2 else "b") for i, p in enumerate(patients)}
    for fold in range(k):
        split = kfold_split(patients, k=k, fold=fold, strata=strata)
        val = [p for p, s in split.items() if s == "val"]
        assert {strata[p] for p in val} == {"a", "b"}, (k, fold, val)
