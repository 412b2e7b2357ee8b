"""Guards before work: a run never lands on an earlier run's folder (its Hydra files stay), training refuses an
existing model or another run's checkpoints before any work, and generated ROIs never shadow a user's ROI file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from histolight.dataset import Dataset
from histolight.errors import HistolightError, ROIError
from histolight.utils.run_guard import guard
from tests.conftest import ROOT, compose_config, tiny_demo_overrides


def _compose(overrides: list[str], run_dir: Path):
    cfg = compose_config(overrides, hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.run.dir = str(run_dir)
    return cfg


def _old_run(folder: Path, task: str, *outputs: str) -> dict[str, bytes]:
    """An earlier run's folder: its .hydra files (returned) and ``outputs``."""
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"task": {"name": task}}), folder / ".hydra" / "config.yaml")
    (folder / ".hydra" / "overrides.yaml").write_text(f"- task={task}\n")
    for o in outputs:
        (folder / o).parent.mkdir(parents=True, exist_ok=True)
        (folder / o).write_text("x")
    return {p.name: p.read_bytes() for p in (folder / ".hydra").glob("*.yaml")}


def _hydra_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (folder / ".hydra").glob("*.yaml")}


def test_a_run_is_refused_in_an_earlier_runs_folder_unless_it_continues_it(tmp_path, capsys):
    run = tmp_path / "run"
    before = _old_run(run, "train_seg", "checkpoints/last.ckpt", "metrics.json")
    for overrides in (["experiment=seg_multiclass"], ["task=info"], ["experiment=tile_classifier"]):
        with pytest.raises(SystemExit) as e:
            guard(_compose(overrides, run), "hydra.run.dir")
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert f"hydra.run.dir='{run}' is invalid: it already holds a task=train_seg run (checkpoints, metrics.json)" in err
        assert _hydra_files(run) == before
        assert ("continue it with resume=auto" in err) == (overrides == ["experiment=seg_multiclass"])
    # continuing it (resume=auto, or a checkpoint of that run) or replacing it is admitted; its config is kept
    guard(_compose(["experiment=seg_multiclass", "resume=auto"], run), "hydra.run.dir")
    assert not (run / ".hydra" / "config.yaml").exists()
    assert [p.name for p in (run / ".hydra").glob("previous-*/*.yaml")] != []
    other = tmp_path / "other"
    _old_run(other, "train_tiles", "checkpoints/last.ckpt")
    guard(_compose(["experiment=tile_classifier", f"ckpt_path={other / 'checkpoints' / 'last.ckpt'}"], other), "hydra.run.dir")
    third = tmp_path / "third"
    _old_run(third, "info", "slides.csv")
    guard(_compose(["experiment=seg_multiclass", "task.overwrite=true"], third), "hydra.run.dir")


def test_per_slide_tasks_continue_their_own_folder_and_foreign_folders_are_refused(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _old_run(run, "info", "slides.csv")
    guard(_compose(["task=info"], run), "hydra.run.dir")  # the same per-slide task continues
    fresh = tmp_path / "fresh"
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / "run.log").write_text("a run that stopped at startup")
    guard(_compose(["task=info"], fresh), "hydra.run.dir")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "slides.csv").write_text("my own table")
    with pytest.raises(SystemExit):
        guard(_compose(["task=info"], foreign), "hydra.run.dir")
    assert "files that are not a histolight run (slides.csv)" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")  # the other ranks of a DDP run join rank 0's folder
    guard(_compose(["task=info"], foreign), "hydra.run.dir")


def test_run_py_refuses_before_writing_hydra_files(tmp_path):
    """A run.py subprocess (about a second: the guard stops it before any task import)."""
    run = tmp_path / "run"
    before = _old_run(run, "train_tiles", "model/classifier_config.json")
    env = {**os.environ, "HISTOLIGHT_ROOT": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run.py"), "task=info", f"hydra.run.dir={run}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "already holds a task=train_tiles run (model)" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and _hydra_files(run) == before and not (run / "info.log").exists()


def test_training_tasks_refuse_an_existing_model_before_any_work(tmp_path):
    from histolight.tasks import get_task
    from histolight.training.artifacts import save_model_folder

    out = tmp_path / "out"
    meta = {k: {} for k in ("model", "data", "geometry", "input_norm")} | {"labels": ["a"], "normalizer": None}
    import torch

    demo = tmp_path / "demo"  # would be generated by any work
    for exp, folder, kind in (("tile_classifier", out / "model", "classifier"), ("seg_multiclass", out, "segment")):
        save_model_folder(folder, kind, torch.nn.Linear(2, 2).state_dict(), meta)
        cfg = _compose([f"experiment={exp}", f"paths.demo_dir={demo}", "logger=none"], tmp_path / "unused")
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            del cfg["hydra"]
        with pytest.raises(HistolightError, match=f"already holds a {kind} model"):
            get_task(exp.replace("tile_classifier", "train_tiles").replace("seg_multiclass", "train_seg"))(cfg)
        assert not demo.exists()


def test_training_never_mixes_checkpoints_into_another_runs_folder(tmp_path, caplog):
    from histolight.training.trainer import check_checkpoint_folder, default_trainer, resume_checkpoint

    trainer = default_trainer(tmp_path, 1, "val/loss", "min")
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "epoch_004.ckpt").write_bytes(b"old")
    (ckpts / "last.ckpt").write_bytes(b"old")
    with pytest.raises(HistolightError, match=r"already holds another run's checkpoints \(epoch_004.ckpt, last.ckpt\)"):
        check_checkpoint_folder(trainer, None, overwrite=False)
    check_checkpoint_folder(trainer, resume_checkpoint(trainer, resume="auto"), overwrite=False)  # continuing it
    check_checkpoint_folder(trainer, None, overwrite=True)
    assert not list(ckpts.glob("*.ckpt")) and "deleting the earlier run's checkpoints" in caplog.text


# ---------------------------------------------------------------------------------------------- ROIs


@pytest.fixture
def cohort(tiny_demo, tmp_path) -> Path:
    """A copy of the tiny demo's slides and ROIs, demo_002's ROIs as the user's QuPath JSON export."""
    root = tmp_path / "cohort"
    shutil.copytree(tiny_demo / "slides", root / "slides")
    shutil.copytree(tiny_demo / "rois", root / "rois")
    (root / "rois" / "demo_002.csv").unlink()
    shutil.copy(tiny_demo / "rois_qupath" / "demo_002.geojson", root / "rois" / "demo_002.json")
    return root


def _fake_segmentation(monkeypatch, tiny_demo):
    """generate_rois returns the slide's true ROIs (no model run)."""
    from histolight.roi import read_rois
    from histolight.segment import rois as seg_rois

    monkeypatch.setattr(seg_rois, "generate_rois", lambda slide, m, **kw: read_rois(tiny_demo / "rois" / f"{slide.name}.csv"))


def test_generated_rois_never_shadow_the_users_file(cohort, tiny_demo, monkeypatch, caplog):
    from histolight.segment.rois import generate_dataset_rois

    _fake_segmentation(monkeypatch, tiny_demo)
    rois = cohort / "rois"
    ds = Dataset(cohort / "slides", rois=rois)
    for dest in (None, rois):  # the dataset's ROI folder, by default or by name
        res = generate_dataset_rois(ds, object(), dest=dest, formats=["geojson"], progress=False)
        assert set(res.table["status"]) == {"skipped"}
    assert not (rois / "demo_002.geojson").exists() and ds.roi_path("demo_002") == rois / "demo_002.json"
    # a separate folder holding the user's file: skipped too
    other = cohort / "pred"
    other.mkdir()
    shutil.copy(rois / "demo_002.json", other / "demo_002.json")
    res = generate_dataset_rois(ds, object(), dest=other, progress=False)
    assert dict(zip(res.table["slide"], res.table["status"])) == {"demo_000": "done", "demo_001": "done", "demo_002": "skipped"}
    assert Dataset(cohort / "slides", rois=other).roi_path("demo_000") == other / "demo_000.geojson"  # a recorded set
    # overwrite: the user's file is replaced by the generated set, never left beside it
    with caplog.at_level("WARNING"):
        generate_dataset_rois(ds, object(), dest=rois, overwrite=True, progress=False)
    assert not (rois / "demo_002.json").exists() and "replacing" in caplog.text
    assert ds.roi_path("demo_002") == rois / "demo_002.geojson"


def test_two_roi_formats_of_one_slide_are_an_error_naming_both(cohort, tiny_demo, monkeypatch):
    from histolight.segment.rois import generate_dataset_rois

    rois = cohort / "rois"
    shutil.copy(tiny_demo / "rois_qupath" / "demo_002.geojson", rois / "demo_002.geojson")
    ds = Dataset(cohort / "slides", rois=rois)
    with pytest.raises(ROIError, match=r"slide 'demo_002' has 2 ROI files in .*: demo_002.geojson and demo_002.json"):
        ds.roi_path("demo_002")
    # a set histolight wrote side by side is accepted, until one of its files is edited
    _fake_segmentation(monkeypatch, tiny_demo)
    pred = cohort / "pred"
    generate_dataset_rois(ds, object(), dest=pred, slides=["demo_000"], progress=False)
    gen = Dataset(cohort / "slides", rois=pred)
    assert gen.roi_path("demo_000") == pred / "demo_000.geojson"
    with open(pred / "demo_000.csv", "a") as fh:
        fh.write("edited,1,1,tumor\n")
    with pytest.raises(ROIError, match="demo_000.geojson and demo_000.csv"):
        gen.roi_path("demo_000")


def test_generate_rois_task_writes_beside_no_users_file(cohort, tiny_demo, tmp_path, monkeypatch):
    """task=generate_rois with task.dest at a folder holding the user's demo_002.json: that slide is skipped."""
    from histolight.tasks import get_task

    _fake_segmentation(monkeypatch, tiny_demo)
    monkeypatch.setattr("histolight.segment.rois.load_segment_model", lambda model, device=None: object())
    model = tmp_path / "model"
    model.mkdir()
    cfg = _compose(
        [
            "task=generate_rois",
            f"task.model={model}",
            f"task.dest={cohort / 'rois'}",
            f"dataset.slides={cohort / 'slides'}",
            f"dataset.rois={cohort / 'rois'}",
            "dataset.annotations=null",
            "dataset.demo=null",
            *[o for o in tiny_demo_overrides(tiny_demo) if o.startswith("paths.")],
        ],
        tmp_path / "unused",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        del cfg["hydra"]
    r = get_task("generate_rois")(cfg)
    assert r["n_skipped"] == 3 and not (cohort / "rois" / "demo_002.geojson").exists()
