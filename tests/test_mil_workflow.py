"""The MIL workflow around training: one command from slides to a cross-validated model (bags built when
missing), attention quality (top tiles, ROI share, montage), W&B grouping of a multirun, ranking runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box

from histolight.errors import ConfigError
from tests.conftest import compose_config, tiny_demo_overrides


def test_top_tiles_and_roi_share():
    from histolight.mil.attention import roi_share, top_tiles
    from histolight.roi import ROI

    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.05, 0.3, 0.0, 0.4, 0.6, 0.8])
    assert top_tiles(scores, 0.1).tolist() == [3] and top_tiles(scores, 0.25).tolist() == [3, 9, 8]
    assert top_tiles(scores[:1], 0.1).tolist() == [0], "at least one tile"
    locs = np.array([[50 + 100 * i, 50] for i in range(10)])  # tile centres along x
    rois = [
        ROI("a", box(0, 0, 400, 100), "necrosis"),
        ROI("b", box(800, 0, 1000, 100), "necrosis"),
        ROI("c", box(0, 0, 1000, 100), "tumor"),
    ]
    # top 30% = tiles 3, 9, 8: tile 3 (x=350) and 9 (x=950) and 8 (x=850) lie in necrosis
    assert roi_share(locs, scores, rois, "necrosis", 0.3) == pytest.approx(1.0)
    assert roi_share(locs, 1 - scores, rois, "necrosis", 0.3) == pytest.approx(1 / 3)  # tiles 6, 4, 0: only 0 in a
    assert roi_share(locs, scores, rois, "fat") == 0.0 and np.isnan(roi_share(locs[:0], scores[:0], rois, "tumor"))


def test_top_tiles_montage_reads_the_slide():
    from histolight.mil.attention import montage
    from histolight.wsi import VirtualSlide

    img = np.full((400, 600, 3), 255, np.uint8)
    img[100:200, 300:400] = (200, 0, 0)  # a red square around (350, 150)
    slide = VirtualSlide(img, mpp=0.5)
    locs = np.array([[350, 150], [50, 50], [550, 350]])
    out = montage(slide, locs, np.array([0.7, 0.2, 0.1]), tile_base=100, n=2, tile_px=32)
    assert out.dtype == np.uint8 and out.shape[0] > 32 and out.shape[1] >= 2 * 32 + 4  # two titled tiles in a row
    first = out[-32:, :32].reshape(-1, 3).mean(0)
    assert first[0] > 150 and first[1] < 50, "the top tile (the red square) comes first"


def test_demo_experiment_builds_the_same_bags_as_mil_demo_bags(tmp_path):
    one = compose_config(["experiment=mil_demo", f"paths.output_dir={tmp_path}"])
    bags = compose_config(["experiment=mil_demo_bags", f"paths.output_dir={tmp_path}"])
    for k in ("model", "source", "tile_px", "tile_um", "outdir", "qc"):
        assert one.task.build_bags[k] == bags.task[k], k
    assert one.data.bags == bags.task.outdir


def test_mil_runs_of_a_multirun_share_a_wandb_group(monkeypatch, tmp_path):
    from omegaconf import open_dict

    import histolight.utils.wandb as hw
    from histolight.training.trainer import build_trainer

    monkeypatch.setattr(hw, "wandb_sweep_settings", lambda cfg: {"group": f"{cfg.task.name}-sweep", "name": "1:model=mil_mean"})
    cfg = compose_config(["experiment=mil_demo", "logger=wandb", f"paths.output_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "fold_0")
    init = build_trainer(cfg).loggers[0]._wandb_init
    assert init["group"] == "train_mil-sweep" and init["name"] == "1:model=mil_mean"


def _fake_run(folder: Path, value: float | None, model: str, metric: str = "val/auroc_mean") -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"task: {{name: train_mil}}\nmodel: {{name: {model}}}\noptimized_metric: {metric}\n"
    )
    (folder / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n")
    m = {"val/auroc_sd": 0.1, "seconds": 3.0} | ({metric: value} if value is not None else {})
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_compare_ranks_the_runs_of_a_sweep(tmp_path):
    from histolight.tasks import execute
    from histolight.training.compare import compare_runs, find_runs

    sweep = tmp_path / "sweep"
    for i, (v, m) in enumerate([(0.8, "mean_mlp"), (0.95, "attention_mil"), (None, "transmil"), (0.7, "max_mlp")]):
        _fake_run(sweep / str(i), v, m)
    runs = find_runs([sweep])
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    table = compare_runs(runs)
    assert list(table["model"]) == ["attention_mil", "mean_mlp", "max_mlp", "transmil"]
    assert table["rank"].tolist()[:3] == [1, 2, 3] and pd.isna(table["rank"].iloc[3])
    assert list(table.columns[:3]) == ["rank", "val/auroc_mean", "val/auroc_sd"]
    assert list(compare_runs(runs, "seconds", "min")["run"])[0] == str(runs[0])
    with pytest.raises(ConfigError, match=r"task.metric='val/f1' is in no run's metrics.json"):
        compare_runs(runs, "val/f1")
    with pytest.raises(ConfigError, match=r"holds no run folder"):
        find_runs([tmp_path / "nothing"])

    out = tmp_path / "cmp"
    cfg = compose_config(["task=compare", f"task.runs={sweep}", f"paths.output_dir={out}", "optimized_metric=best_value"])
    assert execute(cfg) == pytest.approx(0.95)
    md = (out / "comparison.md").read_text()
    assert md.splitlines()[2].startswith("| 1 | attention_mil | model=attention_mil | 0.950 | 0.100 |")
    assert len(pd.read_csv(out / "comparison.csv")) == 4


@pytest.mark.slow  # the demo pipeline in one command on the tiny cohort: bags from the slides, 2-fold CV (~15 s)
def test_one_command_from_slides_to_cross_validated_mil(tiny_demo, tmp_path):
    from histolight.mil.demo import demo_labels
    from histolight.tasks import execute

    frac = demo_labels(tiny_demo)["necrosis_fraction"].sort_values().to_numpy()
    threshold = float((frac[0] + frac[1]) / 2)  # one low slide, two high
    bags, out = tmp_path / "bags", tmp_path / "run"
    overrides = [
        "experiment=mil_demo",
        *tiny_demo_overrides(tiny_demo),
        f"paths.output_dir={out}",
        f"paths.work_dir={tmp_path / 'work'}",
        f"data.bags={bags}",
        f"task.demo_labels={threshold}",
        "task.build_bags.tile_px=32",
        "task.attention_examples=2",
        "data.split.k=2",
        "data.balance=false",
        "model.model_kwargs.hidden=16",
        "trainer.max_epochs=2",
        "+trainer.enable_model_summary=false",
        "optimized_metric=oof/auroc",  # 1-2 validation slides per fold: per-fold AUROC is undefined
    ]
    assert 0 <= execute(compose_config(overrides)) <= 1
    names = [f"demo_{i:03d}" for i in range(3)]
    assert all((bags / f"{n}.pt").is_file() and (bags / f"{n}.index.npz").is_file() for n in names)
    conf = json.loads((bags / "bags_config.json").read_text())
    assert conf["tile_px"] == 32 and conf["tile_um"] == 32 and conf["num_features"] == 512
    assert len(pd.read_csv(out / "folds.csv")) == 2 and sorted(pd.read_parquet(out / "predictions.parquet")["id"]) == names
    assert list((out / "attention_examples" / "heatmaps").glob("demo_*.png"))
    assert pd.read_csv(out / "roc.csv")["tpr"].iloc[-1] == 1.0
