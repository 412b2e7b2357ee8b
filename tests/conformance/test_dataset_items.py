"""Issue 11, dataset / ROI / classifier items: each test failed on the code before its fix.

Items: 2 (``dataset.filter({'slide': [...]})``), 4 (one-class tile classifier), 5 (QuPath detections read as ROIs),
11 (one repair warning per polygon), and the documented calls ``Dataset.rois()``, ``Dataset.split(val_fraction=...,
method=...)`` and a per-slide ``get_tile_dataframe()``. Runs on the tiny demo cohort (3 slides, 2 patients).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from histolight.classify import LabelMap, TileDataModule
from histolight.dataset import Dataset
from histolight.errors import HistolightError
from histolight.roi import read_rois

PX, UM = 32, 32  # 64 base px tiles at 0.5 um/px
OPTIM = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}


def _dataset(root: Path, **kw) -> Dataset:
    return Dataset(root / "slides", rois=root / "rois", annotations=root / "annotations.csv", name="demo", **kw)


# ------------------------------------------------------------------------------------------ item 2: filter


def test_filter_dict_form_keeps_the_listed_slides(tiny_demo):
    ds = _dataset(tiny_demo)
    keep = ds.names[:2]
    sub = ds.filter({"slide": keep})
    assert sub.names == keep
    assert ds.filter(filters={"slide": keep[0]}).names == keep[:1]


def test_filter_dict_form_by_annotation_columns(tiny_demo):
    ds = _dataset(tiny_demo)
    ann = ds.annotations
    for label in ann["label"].unique():
        want = sorted(ann.index[ann["label"] == label])
        assert ds.filter({"label": [label]}).names == want
    # columns combine (AND); slide list and dict together
    both = ds.filter({"split": "train", "label": ["stroma", "tumor"]}).names
    assert both == sorted(ann.index[(ann["split"] == "train") & ann["label"].isin(["stroma", "tumor"])])


def test_filter_unknown_column_names_the_columns(tiny_demo):
    ds = _dataset(tiny_demo)
    with pytest.raises(HistolightError, match=r"'site'.*\['slide', 'patient', 'label', 'split'\]|'site'.*patient"):
        ds.filter({"site": ["A"]})


# ------------------------------------------------------------------------------------------ item 4: one class


def _fake_tiles(labels: list[str]) -> pd.DataFrame:
    n = len(labels)
    slides = [f"s{i % 4}" for i in range(n)]
    return pd.DataFrame(
        {
            "tfrecord": [f"/nowhere/{s}.tfrecords" for s in slides],
            "record": np.arange(n),
            "slide": slides,
            "patient": slides,
            "label": labels,
            "split": ["train" if i % 4 < 3 else "val" for i in range(n)],
        },
        index=pd.Index([f"t{i}" for i in range(n)], name="tile_id"),
    )


def test_one_class_datamodule_is_refused_with_the_labels_found():
    tiles = _fake_tiles(["tumor"] * 16)
    with pytest.raises(HistolightError, match=r"at least 2 classes.*tumor.*16"):
        TileDataModule(tiles, LabelMap(["tumor"]), tile_px=PX)


def test_one_class_training_is_refused_before_any_training(tiny_demo, tmp_path, monkeypatch):
    from histolight.classify import pipeline
    from histolight.classify.config import TileDataConfig, TimmModelConfig
    from histolight.classify.training import train

    tiles = _fake_tiles(["stroma"] * 12)
    monkeypatch.setattr(pipeline, "prepare_tiles", lambda *a, **k: (tiles, pipeline.PreparedTiles(None, [])))
    data = TileDataConfig(tile_px=PX, tile_um=UM, tiles_root=str(tmp_path / "tiles"), split={"method": "random"})
    with pytest.raises(HistolightError, match=r"at least 2 classes.*'stroma': 12"):
        train(data, TimmModelConfig(name="resnet10t", optimizer=OPTIM), _dataset(tiny_demo), tmp_path / "run", epochs=1)
    assert not (tmp_path / "run" / "model").exists()


# ------------------------------------------------------------------------------------------ item 5: detections

SQ = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]


def _feature(dx: int, props: dict, fid: str | None = None) -> dict:
    f = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x + dx, y] for x, y in SQ]]}, "properties": props}
    if fid:
        f["id"] = fid
    return f


def _qupath_with_detections(path: Path) -> Path:
    feats = [
        _feature(0, {"objectType": "annotation", "name": "T1", "classification": {"name": "tumor"}}),
        _feature(200, {"objectType": "cell", "classification": {"name": "Positive"}}),
        _feature(400, {"objectType": "cell"}),
        _feature(600, {"objectType": "detection", "classification": {"name": "tumor"}}),
        _feature(800, {"isLocked": False}, fid="PathCellObject"),  # QuPath 0.2 export: the type is the feature id
        _feature(1000, {}, fid="PathDetectionObject"),
        _feature(1200, {"name": "legacy annotation"}, fid="PathAnnotationObject"),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_qupath_detections_are_skipped_with_one_warning(tmp_path, caplog):
    p = _qupath_with_detections(tmp_path / "s.geojson")
    with caplog.at_level(logging.WARNING, logger="histolight"):
        rois = read_rois(p)
    assert [r.name for r in rois] == ["T1", "legacy annotation"]
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1, [r.getMessage() for r in warns]
    msg = warns[0].getMessage()
    assert "s.geojson" in msg and "5 detection" in msg and "include_detections" in msg


def test_qupath_detections_included_on_request(tmp_path, tiny_demo):
    p = _qupath_with_detections(tmp_path / "s.geojson")
    assert len(read_rois(p, include_detections=True)) == 7
    # the dataset option (config key dataset.include_detections) reaches Dataset.rois()
    rois = tmp_path / "rois"
    rois.mkdir()
    _qupath_with_detections(rois / "demo_000.geojson")
    kw = dict(slides=str(tiny_demo / "slides"), rois=str(rois), annotations=None, name="demo")
    from histolight.tasks.common import load_dataset

    default = load_dataset(OmegaConf.create({"dataset": kw}))
    assert len(default.rois("demo_000")) == 2
    on = load_dataset(OmegaConf.create({"dataset": {**kw, "include_detections": True}}))
    assert on.include_detections and len(on.rois("demo_000")) == 7


# ------------------------------------------------------------------------------------------ item 11: repairs


@pytest.mark.parametrize("ext", [".csv", ".geojson"])
def test_polygon_repairs_are_one_warning_per_file(tmp_path, caplog, ext):
    bowties = [[(dx, 0), (dx + 100, 100), (dx + 100, 0), (dx, 100)] for dx in range(0, 2000, 200)]  # 10 self-intersections
    p = tmp_path / f"s{ext}"
    if ext == ".csv":
        rows = [f"bow{k},{x},{y},t" for k, b in enumerate(bowties) for x, y in b]
        p.write_text("roi_name,x_base,y_base,label\n" + "\n".join(rows) + "\n")
    else:
        feats = [_feature(0, {"objectType": "annotation", "name": f"bow{k}"}) for k in range(len(bowties))]
        for f, b in zip(feats, bowties):
            f["geometry"]["coordinates"] = [[list(v) for v in b] + [list(b[0])]]
        p.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    with caplog.at_level(logging.WARNING, logger="histolight"):
        rois = read_rois(p)
    assert len(rois) == 10 and all(r.geometry.is_valid for r in rois)
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1, warns
    assert p.name in warns[0] and "repaired 10 invalid polygon" in warns[0] and "bow0" in warns[0]


# ------------------------------------------------------------------------------------------ documented calls


def test_dataset_rois_lists_roi_files(tiny_demo):
    ds = _dataset(tiny_demo)
    files = ds.rois()
    assert len(files) == len(ds) == 3
    assert [Path(f).name for f in files] == [f"{n}.csv" for n in ds.names]
    assert _dataset(tiny_demo).filter({"slide": ds.names[:1]}).rois() == files[:1]


def test_dataset_split_is_patient_level(tiny_demo):
    ds = _dataset(tiny_demo)
    train, val = ds.split(val_fraction=0.3, method="random")
    assert sorted(train.names + val.names) == ds.names and not set(train.names) & set(val.names)
    assert len(val) >= 1 and len(train) >= 1
    pat = {s: ds.patient(s) for s in ds.names}
    assert not {pat[s] for s in train.names} & {pat[s] for s in val.names}
    assert ds.split(val_fraction=0.3, method="random")[1].names == val.names  # seeded
    a_train, a_val = ds.split(method="annotations")
    ann = ds.annotations
    assert a_train.names == sorted(ann.index[ann["split"] == "train"]) and a_val.names == sorted(ann.index[ann["split"] == "val"])
    with pytest.raises(HistolightError, match="method"):
        ds.split(method="bootstrap")


def test_per_slide_get_tile_dataframe_matches_the_dataset(tiny_demo):
    from histolight.compat.slideflow import WSI

    ds = _dataset(tiny_demo)
    name = ds.names[0]
    wsi = WSI(ds.path(name), tile_px=PX, tile_um=UM, rois=ds.roi_path(name))
    df = wsi.get_tile_dataframe()
    assert list(df.columns) == ["loc_x", "loc_y", "grid_x", "grid_y", "roi_name", "roi_desc", "label", "slide"]
    assert df.index.name == "tile_id" and len(df) > 0
    ref = ds.get_tile_dataframe(PX, UM, slides=[name])
    pd.testing.assert_frame_equal(df, ref)
    assert df["label"].notna().all()  # roi_method='auto' with ROIs: only tiles inside labelled ROIs
    # without ROIs: the whole grid, no ROI columns filled
    bare = WSI(ds.path(name), tile_px=PX, tile_um=UM).get_tile_dataframe()
    assert len(bare) > len(df) and bare["roi_name"].isna().all()


def test_detections_option_reaches_tile_tables_and_extraction(tiny_demo, tmp_path):
    """``include_detections`` decides which tiles are inside ROIs, in the tile table and in extraction workers."""
    rois = tmp_path / "rois"
    rois.mkdir()
    sq = lambda x0, s: [[[x0, 0], [x0 + s, 0], [x0 + s, s], [x0, s], [x0, 0]]]  # noqa: E731
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": sq(0, 320)},
            "properties": {"objectType": "annotation"},
        },
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": sq(512, 320)}, "properties": {"objectType": "cell"}},
    ]
    (rois / "demo_000.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    kw = dict(roi_method="inside", slides=["demo_000"])
    counts = {}
    for inc in (False, True):
        ds = Dataset(tiny_demo / "slides", rois=rois, name="demo", include_detections=inc)
        grid = len(ds.get_tile_dataframe(PX, UM, **kw))
        res = ds.extract_tiles(
            PX, UM, outdir=str(tmp_path / f"t{inc}"), qc=None, grayspace_fraction=1, workers=1, progress=False, report=False, **kw
        )
        counts[inc] = (grid, res.n_tiles)
    assert counts[False][0] == counts[False][1] == 25  # 5 x 5 tiles of 64 base px in the 320 px annotation
    assert counts[True][0] == counts[True][1] == 50  # and as many in the cell


def test_dataset_tfrecord_report_reads_the_extracted_folder(tiny_demo, tmp_path):
    """Slideflow's ``dataset.tfrecord_report()``: the report on the dataset's own TFRecords, in that folder."""
    ds = _dataset(tiny_demo).filter({"slide": ["demo_000"]})
    out = str(tmp_path / "tiles")
    res = ds.extract_tiles(PX, UM, outdir=out, qc=None, grayspace_fraction=1, workers=1, progress=False, report=False)
    rep = ds.tfrecord_report(PX, UM, outdir=out, progress=False)
    folder = tmp_path / "tiles" / "demo" / f"{PX}px_{UM}um"
    assert rep.html == folder / "tfrecord_report.html" and rep.pdf is None
    t = pd.read_csv(folder / "tfrecord_report.csv").set_index("slide")
    assert list(t.index) == ["demo_000"] and t.loc["demo_000", "status"] == "done"
    assert t.loc["demo_000", "n_tiles"] == res.n_tiles > 0 and t.loc["demo_000", "tile_px"] == f"{PX}x{PX}"
    other = ds.tfrecord_report(PX, UM, tmp_path / "r", outdir=out, progress=False)
    assert other.html == tmp_path / "r" / "tfrecord_report.html"
