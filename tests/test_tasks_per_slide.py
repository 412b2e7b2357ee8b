"""Every per-slide task runs on the cohort runner: one broken slide fails only itself, is listed with its reason in
the task's summary CSV, and makes ``python run.py`` exit with status 2 unless ``task.allow_failures=true``.

Each task runs through :func:`histolight.tasks.execute` (what ``run.py`` calls) on the tiny demo slides plus a
broken one (slide tasks), or on tiny TFRecords plus a corrupt one (tile tasks), with random-init models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_task

LABELS = ["tumor", "stroma", "necrosis"]
BROKEN = "broken"
TILE_PX, TILE_UM = 32, 16


def _summary(path: Path) -> dict[str, tuple[str, str]]:
    t = pd.read_csv(path)
    assert list(t.columns[:4]) == ["slide", "status", "reason", "seconds"]
    return {s: (st, r) for s, st, r in zip(t["slide"], t["status"], t["reason"].fillna(""))}


def _check_outcome(overrides: list[str], out: Path, summary: str, reason: str, good: set[str]) -> dict:
    """Exit 2 with the broken slide failed (``reason`` in its reason) and the good slides not failed; exit 0 with
    ``task.allow_failures=true`` (run into the same product folders: finished slides are skipped). Returns the first
    run's summary."""
    assert run_task(overrides, out / "strict") == 2
    rows = _summary(out / "strict" / summary)
    assert rows[BROKEN][0] == "failed" and reason in rows[BROKEN][1], rows[BROKEN]
    assert {s for s, (st, _) in rows.items() if st != "failed"} == good, rows
    assert run_task([*overrides, "task.allow_failures=true"], out / "lenient") == 0
    return rows


# ------------------------------------------------------------------ cohorts and models


@pytest.fixture(scope="module")
def slide_cohort(tiny_demo, tmp_path_factory) -> tuple[list[str], set[str]]:
    """Dataset overrides for the tiny demo slides (symlinked) plus ``broken.svs`` (not a slide), and the good names."""
    d = tmp_path_factory.mktemp("cohort_with_broken") / "slides"
    d.mkdir()
    good = set()
    for p in sorted((tiny_demo / "slides").iterdir()):
        (d / p.name).symlink_to(p)
        good.add(p.name.rsplit(".", 1)[0])
    (d / f"{BROKEN}.svs").write_bytes(b"this is not a slide\n" * 64)
    ov = ["dataset=folder", f"dataset.slides={d}", f"dataset.rois={tiny_demo / 'rois'}", "dataset.name=tiny"]
    return ov, good


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    """A random-init multiclass segmentation model folder (8 um/px, small timm encoder)."""
    from histolight.segment import SegmentConfig
    from histolight.segment.io import save_model
    from histolight.segment.model import SegmentModel

    cfg = SegmentConfig(mode="multiclass", labels=LABELS, mpp=8, size=64, encoder_name="tu-mobilenetv3_small_100")
    return save_model(SegmentModel(cfg), tmp_path_factory.mktemp("seg_model") / "model")


@pytest.fixture(scope="module")
def tile_work(tmp_path_factory) -> tuple[Path, list[str], set[str]]:
    """paths.work_dir with ``tiles/tiny/32px_16um/``: two good TFRecords and a corrupt one; a random-init classifier
    of that geometry. Returns (work dir, overrides, good slide names)."""
    import cv2

    from histolight.classify.artifacts import make_model_config, save_model
    from histolight.classify.labels import LabelMap
    from histolight.classify.module import create_timm_model
    from histolight.io.tfrecord import TFRecordWriter
    from histolight.io.tilestore import tile_folder

    work = tmp_path_factory.mktemp("tile_work")
    d = tile_folder(work / "tiles", "tiny", TILE_PX, TILE_UM)
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for slide, n in (("s1", 5), ("s2", 3)):
        with TFRecordWriter(d / f"{slide}.tfrecords", slide=slide) as w:
            for i in range(n):
                ok, buf = cv2.imencode(".png", rng.integers(0, 255, (TILE_PX, TILE_PX, 3), dtype=np.uint8))
                w.write_tile(buf.tobytes(), 16 + 32 * i, 16)
    (d / f"{BROKEN}.tfrecords").write_bytes(b"not a tfrecord" * 64)
    cfg = make_model_config("resnet10t", LabelMap(["a", "b"]), TILE_PX, TILE_UM, mean=[0.5] * 3, std=[0.25] * 3)
    model = save_model(work / "model", create_timm_model("resnet10t", 2), cfg)
    ov = ["dataset=folder", f"dataset.slides={work}", "dataset.name=tiny", f"paths.work_dir={work}", f"task.model={model}"]
    return work, ov, {"s1", "s2"}


# ------------------------------------------------------------------ slide tasks


def test_info(slide_cohort, tmp_path):
    ov, good = slide_cohort
    rows = _check_outcome(["task=info", *ov], tmp_path, "slides.csv", "cannot read slide", good)
    t = pd.read_csv(tmp_path / "strict" / "slides.csv").set_index("slide")
    assert (t.loc[sorted(good), "width"] == 1024).all() and (t.loc[sorted(good), "rois"] > 0).all()
    assert rows[BROKEN][0] == "failed"
    assert run_task(["task=info", "task.max_failed=0.5", *ov], tmp_path / "fraction") == 0  # 1 of 4 failed
    assert run_task(["task=info", "task.max_failed=0.2", *ov], tmp_path / "fraction") == 2


def test_info_in_worker_processes(slide_cohort, tmp_path):
    ov, good = slide_cohort
    assert run_task(["task=info", "task.workers=2", *ov], tmp_path) == 2
    rows = _summary(tmp_path / "slides.csv")
    assert rows[BROKEN][0] == "failed" and {s for s, (st, _) in rows.items() if st == "done"} == good


def test_export_masks(slide_cohort, tmp_path):
    ov, good = slide_cohort
    dest = tmp_path / "export"
    task = ["task=export_masks", "data=seg", "data.mode=multiclass", f"data.labels=[{','.join(LABELS)}]", "data.mpp=8"]
    _check_outcome([*task, f"task.dest={dest}", *ov], tmp_path, "export_report.csv", "cannot read slide", good)
    assert sorted(p.stem for p in dest.glob("*.npz")) == sorted(good)
    rows = _summary(tmp_path / "lenient" / "export_report.csv")  # the second run found the first one's exports
    assert all(rows[s] == ("skipped", "exists") for s in good)


def test_segment(slide_cohort, seg_model, tmp_path):
    ov, good = slide_cohort
    _check_outcome(["task=segment", f"task.model={seg_model}", *ov], tmp_path, "segment_report.csv", "cannot read slide", good)
    seg = tmp_path / "strict" / "segment"
    assert sorted(p.name.split(".")[0] for p in seg.glob("*.pred.png")) == sorted(good)
    assert len(list(seg.glob("*.pred.json"))) == len(list(seg.glob("*.overlay.png"))) == len(good)


@pytest.mark.slow
def test_segment_in_worker_processes(slide_cohort, seg_model, tmp_path):
    ov, good = slide_cohort
    assert run_task(["task=segment", f"task.model={seg_model}", "task.workers=2", *ov], tmp_path) == 2
    rows = _summary(tmp_path / "segment_report.csv")
    assert rows[BROKEN][0] == "failed" and {s for s, (st, _) in rows.items() if st == "done"} == good


def test_generate_rois(slide_cohort, seg_model, tmp_path):
    ov, good = slide_cohort
    dest = tmp_path / "rois"
    task = ["task=generate_rois", f"task.model={seg_model}", f"task.dest={dest}", "task.min_area_mm2=0"]
    _check_outcome([*task, *ov], tmp_path, "rois_report.csv", "cannot read slide", good)
    assert sorted(p.stem for p in dest.glob("*.csv")) == sorted(good)
    rows = _summary(tmp_path / "lenient" / "rois_report.csv")
    assert all(rows[s] == ("skipped", "exists") for s in good)


# ------------------------------------------------------------------ tile tasks (the broken slide is a corrupt TFRecord)


def test_predict(tile_work, tmp_path):
    work, ov, good = tile_work
    _check_outcome(["task=predict", *ov], tmp_path, "slides.csv", "bad TFRecord", good)
    pred = pd.read_parquet(tmp_path / "strict" / "predictions.parquet")
    assert sorted(set(pred["slide"])) == sorted(good) and len(pred) == 8
    assert sorted(p.stem for p in (tmp_path / "strict" / "heatmaps").glob("*.png") if p.stem != "legend") == sorted(good)
    t = pd.read_csv(tmp_path / "strict" / "slides.csv").set_index("slide")
    assert t.loc["s1", "n_tiles"] == 5 and abs(t.loc["s1", ["prob_a", "prob_b"]].sum() - 1) < 1e-5


def test_features(tile_work, tmp_path):
    work, ov, good = tile_work
    rows = _check_outcome(["task=features", *ov], tmp_path, "features/summary.csv", "bad TFRecord", good)
    assert all(rows[s][0] == "done" for s in good)
    assert sorted(p.stem for p in (tmp_path / "strict" / "features").glob("*.pt")) == sorted(good)
