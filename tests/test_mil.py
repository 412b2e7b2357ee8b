"""Slide-level MIL from feature bags: items and splits, bag sizes, models, metrics, train_mil / predict_mil tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histolight.errors import ConfigError
from histolight.mil.data import BagDataModule, BagDataset, build_items, collate_bags, item_splits, read_bag, read_table
from histolight.mil.models import MODELS, build_mil_model
from histolight.mil.module import mil_metrics
from histolight.mil.training import load_mil_model
from tests.conftest import ROOT, compose_config, tiny_demo_overrides


def write_bag(folder: Path, slide: str, n: int, d: int, shift: float = 0.0, size: tuple[int, int] = (1024, 768)) -> None:
    """A random bag of ``n`` tiles x ``d`` features (+ ``shift``) with tile centres inside a ``size`` slide."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(hash(slide) % 2**31)
    torch.save(torch.randn(n, d, generator=g) + shift, folder / f"{slide}.pt")
    rng = np.random.default_rng(n)
    locs = np.stack([rng.integers(32, size[0] - 32, n), rng.integers(32, size[1] - 32, n)], 1)
    np.savez(folder / f"{slide}.index.npz", locs)


def cohort(folder: Path, n_patients: int = 12, d: int = 8) -> pd.DataFrame:
    """Patients p00.. with 1-2 slides each, label a/b by patient (b bags shifted: learnable); bags in ``folder``."""
    rows = []
    for p in range(n_patients):
        lab = "ab"[p % 2]
        for j in range(1 + p % 3 // 2):
            s = f"s{p:02d}_{j}"
            write_bag(folder, s, 5 + 7 * p + j, d, shift=1.0 if lab == "b" else 0.0)
            rows.append({"slide": s, "patient": f"p{p:02d}", "label": lab})
    return pd.DataFrame(rows)


def test_kfold_splits_are_patient_level_and_leakage_free(tmp_path):
    table = cohort(tmp_path)
    found = build_items(table, tmp_path)
    seen: dict[str, int] = {}
    for fold in range(3):
        sp = item_splits(found.items, table, method="kfold", k=3, fold=fold, seed=3)
        by_patient = {}
        for it in found.items:
            by_patient.setdefault(it.patient, set()).add(sp[it.id])
        assert all(len(v) == 1 for v in by_patient.values()), "a patient in two splits"
        for p, v in by_patient.items():
            if v == {"val"}:
                assert p not in seen, f"patient {p} in folds {seen.get(p)} and {fold}"
                seen[p] = fold
        assert {it.label for it in found.items if sp[it.id] == "val"} == {"a", "b"}, "labels interleaved into every fold"
    assert sorted(seen) == sorted(table["patient"].unique())


def test_patient_level_items_pool_slides(tmp_path):
    table = cohort(tmp_path)
    found = build_items(table, tmp_path, level="patient")
    assert len(found.items) == 12 and sum(len(it.slides) for it in found.items) == len(table)
    ds = BagDataset(found.items, tmp_path, found.classes)
    two = next(i for i, it in enumerate(found.items) if len(it.slides) == 2)
    n = sum(read_bag(tmp_path, s)[0].shape[0] for s in found.items[two].slides)
    assert ds[two]["x"].shape == (n, 8)


def test_bags_of_one_and_50000_tiles(tmp_path):
    write_bag(tmp_path, "one", 1, 6)
    write_bag(tmp_path, "big", 50_000, 6, size=(200_000, 150_000))
    table = pd.DataFrame({"slide": ["one", "big"], "label": ["a", "b"]})
    found = build_items(read_table(table), tmp_path)
    train = BagDataset(found.items, tmp_path, found.classes, max_tiles=512)
    assert train[0]["x"].shape == (1, 6) and train[1]["x"].shape == (512, 6)
    full = BagDataset(found.items, tmp_path, found.classes)
    batch = collate_bags([full[0], full[1]])
    assert batch["x"].shape == (2, 50_000, 6) and batch["mask"].sum(1).tolist() == [1, 50_000]
    net = build_mil_model("attention_mil", 6, 2, hidden=16).eval()
    with torch.no_grad():
        out = net(batch["x"], batch["mask"])
    assert out["logits"].shape == (2, 2) and torch.allclose(out["scores"].sum(1), torch.ones(2))
    assert out["scores"][0, 1:].abs().sum() == 0, "padding gets no attention"


def test_missing_bags_and_labels_are_skipped_with_a_reason(tmp_path):
    table = cohort(tmp_path, n_patients=4)
    (tmp_path / "s00_0.pt").unlink()
    table.loc[1, "label"] = None
    extra = pd.DataFrame([{"slide": "s99_0", "patient": "p99", "label": "c"}])
    found = build_items(pd.concat([table, extra]), tmp_path, labels=["a", "b"])
    reasons = dict(zip(found.skipped["slide"], found.skipped["reason"]))
    assert "no bag" in reasons["s00_0"] and "s00_0.pt missing" in reasons["s00_0"]
    assert "no label" in reasons[table.loc[1, "slide"]]
    assert "not in data.labels" in reasons["s99_0"]
    assert len(found.items) == len(table) - 2 and found.classes == ["a", "b"]


def test_one_class_is_refused_naming_the_labels(tmp_path):
    table = cohort(tmp_path, n_patients=4).assign(label="tumor")
    with pytest.raises(ConfigError, match=r"at least two classes.*\['tumor'\]"):
        build_items(table, tmp_path)


def test_balanced_training_loader(tmp_path):
    table = cohort(tmp_path, n_patients=8)
    table.loc[table["label"] == "b", "label"] = ["b"] + ["a"] * (int((table["label"] == "b").sum()) - 1)
    found = build_items(table, tmp_path)
    dm = BagDataModule(found.items, {it.id: "train" for it in found.items}, tmp_path, found.classes, max_tiles=4)
    ys = torch.cat([b["y"] for _ in range(30) for b in dm.train_dataloader()])
    assert 0.3 < ys.float().mean() < 0.7, "the single 'b' bag is drawn about as often as all 'a' bags"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("width", [8, 20])
def test_models_forward_backward(name, width):
    kw = {"hidden": 32, **({"heads": 4, "landmarks": 16} if name == "transmil" else {})}
    net = build_mil_model(name, width, 3, **kw).train()
    x = torch.randn(2, 40, width)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    out = net(x, mask, torch.tensor([0, 2]))
    assert out["logits"].shape == (2, 3) and out["scores"].shape == (2, 40)
    loss = out["logits"].logsumexp(1).mean() + out["instance_loss"]
    loss.backward()
    # every parameter learns (CLAM's instance classifier of class 1 only from bags of class 1)
    assert all(p.grad is not None for n, p in net.named_parameters() if "instance_classifiers.1" not in n)
    if name.startswith("clam"):
        assert out["instance_loss"] > 0
    with torch.no_grad():  # one tile
        assert net.eval()(torch.randn(1, 1, width))["logits"].shape == (1, 3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tile_contributions_add_up_to_the_logits(name):
    """Where a network's logits are a sum over tiles, ``contributions`` are each tile's exact share (padding 0), and
    a tile's evidence for a class sums, over the bag plus the bias difference, to that class's log-odds."""
    from histolight.mil.attention import evidence

    kw = {"hidden": 16, **({"heads": 4, "landmarks": 16} if name == "transmil" else {})}
    net = build_mil_model(name, 6, 2, **kw).eval()
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 12:] = False
    with torch.no_grad():
        out = net(torch.randn(2, 30, 6) * 3, mask)
    if name in ("max_mlp", "transmil"):  # max pooling / self-attention: no additive reading
        assert out["contributions"] is None
        return
    c = out["contributions"]
    assert c.shape == (2, 30, 2) and c[1, 12:].abs().sum() == 0
    assert torch.allclose(c.sum(1) + net.head.bias, out["logits"], atol=1e-5)
    ev = evidence(c[1, :12].numpy(), 1)
    bias = float(net.head.bias[1] - net.head.bias[0])
    logodds = float(out["logits"][1, 1] - out["logits"][1, 0])
    assert ev.sum() + bias == pytest.approx(logodds, abs=1e-4) and np.allclose(
        evidence(c[1].numpy(), 0), -evidence(c[1].numpy(), 1)
    )


def test_clam_mb_ranks_each_class_by_its_own_branch():
    import torch.nn.functional as F

    net = build_mil_model("clam_mb", 6, 2, hidden=8, k_sample=1)
    h = torch.randn(4, 8)
    a = torch.tensor([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])  # branch 0 ranks tile 0 first, branch 1 tile 3
    clf = net.instance_classifiers[1]
    want = F.cross_entropy(clf(h[[3, 0]]), torch.tensor([1, 0]))
    assert torch.allclose(net._instance_loss(h, a, 1), want)
    out = net.eval()(torch.randn(1, 9, 6))
    assert torch.allclose(out["scores"].sum(), torch.tensor(1.0)), "the predicted class's attention"


def test_metrics():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = mil_metrics(probs, np.array([0, 1, 1, 1]), ["a", "b"])
    assert m["auroc"] == 1.0 and m["confusion"] == [[1, 0], [1, 2]]
    assert m["bal_acc"] == pytest.approx((1 + 2 / 3) / 2) and m["f1_a"] == pytest.approx(2 / 3)
    assert np.isnan(mil_metrics(probs[:2], np.array([0, 0]), ["a", "b"])["auroc"])


def test_demo_labels_from_masks(tiny_demo):
    from histolight.mil.demo import HIGH, LOW, demo_labels

    df = demo_labels(tiny_demo, threshold=0.3)
    manifest = json.loads((tiny_demo / "manifest.json").read_text())
    for s, row in zip(manifest["slides"], df.itertuples()):
        a = s["class_area_px"]
        assert row.necrosis_fraction == pytest.approx(a["necrosis"] / sum(a.values()), abs=0.02)
        assert row.necrosis_label == (HIGH if row.necrosis_fraction > 0.3 else LOW)


@pytest.mark.slow
def test_train_mil_kfold_then_predict_mil(tiny_demo, tmp_path):
    from histolight.tasks import execute

    bags = tmp_path / "bags"
    table = cohort(bags, n_patients=9, d=12)
    for s, shift in zip(("demo_000", "demo_001", "demo_002"), (0.0, 1.0, 1.0)):  # slides with files: heatmaps
        write_bag(bags, s, 30, 12, shift)
    demo = pd.DataFrame({"slide": ["demo_000", "demo_001", "demo_002"], "patient": ["d0", "d0", "d1"], "label": ["a", "b", "b"]})
    demo.loc[1, "label"] = "a"  # one patient, one label
    pd.concat([table, demo]).to_csv(tmp_path / "labels.csv", index=False)
    (bags / "bags_config.json").write_text(json.dumps({"num_features": 12, "tile_px": 64, "tile_um": 32}))
    out = tmp_path / "train"
    common = [
        *tiny_demo_overrides(tiny_demo),
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
    ]
    cfg = compose_config(
        [
            "task=train_mil",
            "data=bags",
            "model=mil_clam_sb",
            *common,
            f"paths.output_dir={out}",
            f"data.bags={bags}",
            f"data.annotations={tmp_path / 'labels.csv'}",
            "data.split.k=3",
            "data.max_tiles=16",
            "model.model_kwargs.hidden=16",
            "trainer.max_epochs=3",
            "optimized_metric=val/auroc_mean",
            "task.roi_label=necrosis",
            "task.evidence_class=b",
        ]
    )
    value = execute(cfg)
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 3 and {"val/auroc", "val/bal_acc", "val/f1_a", "val/confusion"} <= set(folds.columns)
    assert value == pytest.approx(folds["val/auroc"].mean())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val/auroc_sd"] == pytest.approx(folds["val/auroc"].std(), abs=1e-9) and metrics["n_items"] == len(table) + 3
    focus = pd.read_csv(out / "roi_focus.csv")  # the 3 items that are slides of the demo with a ROI file
    assert sorted(focus["slide"]) == ["demo_000", "demo_001", "demo_002"] and (focus["evidence_class"] == "b").all()
    assert metrics["oof/top_evidence_share"] == pytest.approx(focus["top_evidence_share"].mean())
    assert metrics["oof/top_roi_share"] == pytest.approx(focus["top_roi_share"].mean())
    assert 0 < metrics["oof/roi_share_all"] < 1, "the demo slides have necrosis ROIs among other tissue"
    from histolight.mil.report import roi_focus

    bad = tmp_path / "broken.geojson"
    bad.write_text("{not json")

    class Cohort:  # demo_002's ROI file cannot be read: noted, the other slides measured
        names = ["demo_000", "demo_001", "demo_002"]

        @staticmethod
        def roi_path(name):
            return bad if name == "demo_002" else tiny_demo / "rois" / f"{name}.csv"

    means = roi_focus(out, Cohort(), bags, "necrosis", "b")
    again = pd.read_csv(out / "roi_focus.csv").set_index("slide")
    assert again.loc["demo_002", "status"] == "failed" and "broken.geojson" in again.loc["demo_002", "reason"]
    assert means["oof/top_roi_share"] == pytest.approx(
        focus.set_index("slide").loc[["demo_000", "demo_001"], "top_roi_share"].mean()
    )
    pred = pd.read_parquet(out / "predictions.parquet")
    assert sorted(pred["id"]) == sorted(pd.read_csv(tmp_path / "labels.csv")["slide"]), "every slide validated once"
    conf = json.loads((out / "fold_1" / "model" / "mil_config.json").read_text())
    assert conf["kind"] == "mil" and conf["model"]["in_dim"] == 12 and conf["labels"] == ["a", "b"]
    assert conf["data"]["split"]["fold"] == 1 and conf["geometry"]["tile_um"] == 32

    pout = tmp_path / "predict"
    pcfg = compose_config(["task=predict_mil", *common, f"paths.output_dir={pout}", f"task.model={out / 'fold_1' / 'model'}"])
    pcfg.task.label_table, pcfg.task.label_column = str(tmp_path / "labels.csv"), "label"
    pcfg.task.roi_label, pcfg.task.montage_tiles, pcfg.optimized_metric = "necrosis", 4, "top_roi_share_mean"
    share = execute(pcfg)
    pred = pd.read_parquet(pout / "predictions.parquet")
    assert list(pred["slide"]) == ["demo_000", "demo_001", "demo_002"] and (pred["n_tiles"] == 30).all()
    assert pred["top_roi_share"].between(0, 1).all() and share == pytest.approx(pred["top_roi_share"].mean())
    assert ((0 < pred["roi_share_all"]) & (pred["roi_share_all"] < 1)).all(), "the chance level: necrosis among other tissue"
    assert sorted(p.name for p in (pout / "montages").glob("*.png")) == ["demo_000.png", "demo_001.png", "demo_002.png"]
    assert np.allclose(pred[["prob_a", "prob_b"]].sum(1), 1) and list(pred["label"]) == ["a", "a", "b"]
    assert pred["top_evidence_share"].between(0, 1).all() and (pred["evidence_class"] == pred["pred"]).all()
    att = pd.read_parquet(pout / "attention" / "demo_001.parquet")
    assert list(att.columns) == ["loc_x", "loc_y", "score", "evidence_a", "evidence_b"] and len(att) == 30
    assert att["score"].sum() == pytest.approx(1) and np.allclose(att["evidence_a"], -att["evidence_b"])
    row = pred.set_index("slide").loc["demo_001"]
    net = load_mil_model(out / "fold_1" / "model")[0].net
    bias = float(net.head.bias[1] - net.head.bias[0])
    assert att["evidence_b"].sum() + bias == pytest.approx(np.log(row["prob_b"] / row["prob_a"]), abs=1e-3)
    import cv2

    png = cv2.imread(str(pout / "heatmaps" / "demo_001.png"))
    thumb = _slide_thumbnail_shape(tiny_demo, "demo_001")
    assert png is not None and png.shape[2] == 3  # attention and evidence side by side, each in a thin frame
    assert 2 * thumb[1] < png.shape[1] <= 2 * (thumb[1] + 2) + 8 and thumb[0] < png.shape[0] < thumb[0] + 200

    from histolight.mil.predict import predict

    with pytest.raises(ConfigError, match=r"evidence_class='nope' is not a class of .* use one of \['a', 'b'\]"):
        predict(out / "fold_1" / "model", ["demo_001"], tmp_path / "p2", evidence_class="nope")
    assert not (tmp_path / "p2").exists(), "refused before any slide"


def _slide_thumbnail_shape(demo_dir: Path, name: str) -> tuple[int, int]:
    from histolight.mil.predict import THUMB_PX
    from histolight.wsi import Slide

    path = next(p for p in (demo_dir / "slides").iterdir() if p.stem == name)
    return Slide(path).thumbnail(max_size=THUMB_PX).shape[:2]


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "conf" / "model").glob("mil_*.yaml")))
def test_model_configs_compose_build_and_optimise(option, tmp_path):
    from histolight.config import from_config
    from histolight.mil.config import BagDataConfig, MILModelConfig
    from histolight.mil.module import MILModule

    cfg = compose_config([f"model={option}", "data=bags", f"data.bags={tmp_path}", f"paths.output_dir={tmp_path}"])
    data = from_config(BagDataConfig, cfg.data, "data")
    assert data.split.method == "kfold" and data.split.fold_list() == [0, 1, 2, 3, 4] and data.annotations
    m = from_config(MILModelConfig, cfg.model, "model")
    module = MILModule(m.name, 16, ["a", "b"], m.model_kwargs, optimizer=m.optimizer, scheduler=m.scheduler)
    with torch.no_grad():
        assert module.eval()(torch.zeros(1, 5, 16))["logits"].shape == (1, 2)
    from histolight.training.optim import configure_optimizers

    opt = configure_optimizers(module.parameters(), m.optimizer, m.scheduler, max_epochs=3)
    assert isinstance(opt["optimizer"], torch.optim.AdamW) and opt["lr_scheduler"]["scheduler"].T_max == 3


def test_bad_options_fail_naming_the_key(tmp_path):
    from histolight.config import from_config
    from histolight.mil.config import BagDataConfig, MILModelConfig

    base = {"bags": str(tmp_path), "annotations": "x.csv"}
    with pytest.raises(ConfigError, match=r"level='slides' is invalid"):
        from_config(BagDataConfig, {**base, "level": "slides"}, "data")
    with pytest.raises(ConfigError, match=r"split.folds=\[5\] is invalid"):
        from_config(BagDataConfig, {**base, "split": {"k": 5, "folds": [5]}}, "data")
    with pytest.raises(ConfigError, match=r"name='abmil' is invalid: must be one of"):
        from_config(MILModelConfig, {"name": "abmil", "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}}, "model")


def test_evidence_class_must_be_a_label_before_training(tmp_path):
    from histolight.config import from_config
    from histolight.mil.config import BagDataConfig, TrainMILTask
    from histolight.mil.report import check_evidence_class

    cohort(tmp_path, n_patients=4).to_csv(tmp_path / "labels.csv", index=False)
    data = from_config(BagDataConfig, {"bags": str(tmp_path), "annotations": str(tmp_path / "labels.csv")}, "data")
    check_evidence_class("b", data)
    with pytest.raises(ConfigError, match=r"task.evidence_class='high' is not a label of 'label': use one of \['a', 'b'\]"):
        check_evidence_class("high", data)
    with pytest.raises(ConfigError, match=r"roi_label='' is invalid"):
        from_config(TrainMILTask, {"roi_label": ""}, "task")


def test_evidence_map_colours_by_sign_with_a_robust_scale():
    from histolight.mil.predict import EVIDENCE_KEY, evidence_map

    thumb = np.full((10, 400, 3), 255, np.uint8)
    locs = np.stack([np.arange(40) * 10 + 5, np.full(40, 5)], 1).astype(float)  # 40 tile centres, base px
    values = np.resize([-1.0, 0.0, 1.0], 40)
    values[39] = 1000.0  # one extreme tile does not wash out the others
    out = evidence_map(thumb, 1.0, locs, values, 10.0)
    white, red, blue = (np.asarray(EVIDENCE_KEY[k]) for k in ("none", "for", "against"))
    px = [out[5, x].astype(int) for x in (5, 15, 25, 395)]
    assert np.array_equal(px[1], white)
    assert px[2][0] > px[2][2] and px[0][2] > px[0][0], "red for, blue against"
    assert np.abs(px[2] - (white + red) // 2).max() <= 1, "1.0 is full colour (the 95th percentile of |value|)"
    assert np.abs(px[3] - (white + red) // 2).max() <= 1, "the extreme tile is clipped to full colour"
    assert np.abs(px[0] - (white + blue) // 2).max() <= 1
