"""Demo cohort generation and the Dataset (cohort) layer."""

import json
import logging

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from histolight.dataset import Dataset
from histolight.demo import CLASSES, DemoConfig, ensure_demo, generate_demo
from histolight.errors import ConfigError, HistolightError
from histolight.roi import rasterize_rois


def test_demo_slides_are_aperio_pyramids_with_mpp(tiny_demo):
    slides = sorted((tiny_demo / "slides").glob("*.svs"))
    assert [p.stem for p in slides] == ["demo_000", "demo_001", "demo_002"]
    osr = openslide.OpenSlide(str(slides[0]))
    assert osr.properties["openslide.vendor"] == "aperio"
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert osr.level_count >= 3
    assert osr.level_dimensions[0] == (1024, 768)
    # JPEG-compressed tiles
    import tifffile

    with tifffile.TiffFile(slides[0]) as tf:
        assert tf.pages[0].compression == 7 and tf.pages[0].is_tiled


def test_demo_truth_matches_pixels_and_rois(tiny_demo):
    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=tiny_demo / "annotations.csv")
    name = "demo_000"
    mask = cv2.imread(str(tiny_demo / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    with ds.open(name) as s:
        img = s.read_region((0, 0), 0, s.dimensions)
        rois = ds.rois(name, slide_dims=s.dimensions)
    # the mask is exactly the rasterized ROIs
    np.testing.assert_array_equal(rasterize_rois(rois, mask.shape, 1.0, labels=list(CLASSES)), mask)
    # at least one ROI with a hole, all three labels present
    assert any(r.n_holes for r in rois)
    assert {r.label for r in rois} == set(CLASSES)
    # background is bright, tissue classes differ in colour statistics
    inner = cv2.erode((mask == 0).astype(np.uint8), np.ones((15, 15))) > 0
    assert img[inner].mean() > 225
    means = {c: img[cv2.erode((mask == i + 1).astype(np.uint8), np.ones((9, 9))) > 0].mean(0) for i, c in enumerate(CLASSES)}
    for a in CLASSES:
        for b in CLASSES:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 10, (a, b, means)


def test_demo_geojson_equals_csv(tiny_demo):
    from histolight.roi import read_rois

    a = read_rois(tiny_demo / "rois" / "demo_001.csv")
    b = read_rois(tiny_demo / "rois_qupath" / "demo_001.geojson")
    assert sorted((r.label, round(r.area)) for r in a) == sorted((r.label, round(r.area)) for r in b)


def test_demo_is_deterministic(tmp_path):
    cfg = dict(n_slides=1, width=600, height=512, workers=1)
    generate_demo(tmp_path / "a", **cfg)
    generate_demo(tmp_path / "b", **cfg)
    for sub in ("slides/demo_000.svs", "rois/demo_000.csv", "masks/demo_000.png", "annotations.csv"):
        assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes(), sub


def test_ensure_demo_skips_when_complete_and_regenerates_on_change(tmp_path):
    cfg = DemoConfig(n_slides=1, width=600, height=512, workers=1)
    ensure_demo(tmp_path, cfg)
    m = tmp_path / "manifest.json"
    t0 = m.stat().st_mtime_ns
    ensure_demo(tmp_path, cfg)
    assert m.stat().st_mtime_ns == t0
    ensure_demo(tmp_path, DemoConfig(n_slides=1, width=640, height=512, workers=1))
    assert json.loads(m.read_text())["config"]["width"] == 640
    with pytest.raises(ValueError, match="n_slides must be >= 1"):
        DemoConfig(n_slides=0)


def test_regenerating_keeps_edited_files_and_removes_only_generated_ones(tmp_path, caplog):
    small = dict(width=600, height=512, workers=1)
    ensure_demo(tmp_path, DemoConfig(n_slides=3, **small))
    edited = tmp_path / "rois" / "demo_001.csv"
    edited.write_text(edited.read_text() + "user_roi,1,1,tumor\n")
    stale_edited = tmp_path / "qc" / "demo_002.json"
    stale_edited.write_text('{"mine": true}')
    added = tmp_path / "rois" / "notes.txt"
    added.write_text("mine")
    mask0 = (tmp_path / "masks" / "demo_000.png").read_bytes()
    with caplog.at_level(logging.WARNING):
        ensure_demo(tmp_path, DemoConfig(n_slides=2, **{**small, "width": 640}))
    assert "user_roi" in edited.read_text()  # kept, not regenerated
    assert stale_edited.read_text() == '{"mine": true}' and added.read_text() == "mine"
    assert "rois/demo_001.csv" in caplog.text and "qc/demo_002.json" in caplog.text
    # the generated files of the dropped slide are gone; the others are regenerated
    assert not (tmp_path / "slides" / "demo_002.svs").exists() and not (tmp_path / "rois" / "demo_002.csv").exists()
    assert (tmp_path / "masks" / "demo_000.png").read_bytes() != mask0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["width"] == 640 and "rois/demo_001.csv" not in manifest["files"]
    assert "slides/demo_001.svs" in manifest["files"]
    # the edited file stays the user's in later generations too
    ensure_demo(tmp_path, DemoConfig(n_slides=3, **small))
    assert "user_roi" in edited.read_text() and (tmp_path / "slides" / "demo_002.svs").exists()


def test_annotations_split_by_patient(tiny_demo):
    df = pd.read_csv(tiny_demo / "annotations.csv")
    assert list(df.columns) == ["patient", "slide", "label", "split"]
    assert df.groupby("patient")["split"].nunique().max() == 1


def test_dataset_discovery_and_annotations(tiny_demo, tmp_path, caplog):
    # a ROI file for a slide that is not in the cohort is reported, not fatal
    rois = tmp_path / "rois"
    rois.mkdir()
    for p in (tiny_demo / "rois").glob("*.csv"):
        (rois / p.name).write_bytes(p.read_bytes())
    (rois / "ghost.csv").write_text("roi_name,x_base,y_base\na,0,0\na,1,0\na,1,1\n")
    with caplog.at_level(logging.WARNING):
        ds = Dataset(tiny_demo / "slides", rois=rois, annotations=tiny_demo / "annotations.csv")
    assert "ghost.csv" in caplog.text
    assert ds.names == ["demo_000", "demo_001", "demo_002"]
    assert ds.patient("demo_000") == ds.patient("demo_001")  # slides 0-1 share a patient
    assert len(ds.filter(split="train")) + len(ds.filter(split=["val", "test"])) == 3
    assert ds.roi_path("demo_000").suffix == ".csv"


def test_dataset_mpp_override_from_annotations(tmp_path):
    from tests.conftest import shared_slide

    boxes = shared_slide("boxes.tiff")
    ann = pd.DataFrame({"slide": ["boxes"], "mpp": [0.5]})
    ds = Dataset([boxes], annotations=ann)
    with ds.open("boxes") as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"
    with Dataset([boxes], mpp_override=0.25).open("boxes") as s:
        assert s.mpp == 0.25


def test_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Dataset(tmp_path / "missing")
    with pytest.raises(ConfigError, match="ROI folder"):
        Dataset(tmp_path, rois=tmp_path / "nope")
    bad = tmp_path / "ann.csv"
    bad.write_text("name,label\na,b\n")
    with pytest.raises(HistolightError, match="missing required column 'slide'"):
        Dataset(tmp_path, annotations=bad)


def test_info_on_shared_slides_lists_failures_and_goes_on(tmp_path):
    from tests.conftest import SHARED_SLIDES

    if not SHARED_SLIDES.exists():
        pytest.skip("../shared/data/slides not found")
    res = Dataset(SHARED_SLIDES).info(report_dir=tmp_path, progress=False)
    df = res.table.set_index("slide")
    assert df.loc["cmu_small_region", "vendor"] == "aperio" and df.loc["cmu_small_region", "status"] == "done"
    assert df.loc["unopenable", "status"] == "failed" and "Unsupported TIFF compression" in df.loc["unopenable", "reason"]
    assert df.loc["unreadable", "status"] == "failed" and "reading pixels failed" in df.loc["unreadable", "reason"]
    assert df.loc["boxes", "status"] == "done" and "no mpp" in df.loc["boxes", "warning"]
    assert df.loc["test3-DAPI-2-(387)", "levels"] == 7
    assert res.metrics()["n_failed"] == 2 and (tmp_path / "slides.csv").exists()
