"""The code snippets of the Slideflow pages in ``../shared/seeds`` run as their histolight equivalents.

One test per documented call (or per short walkthrough), named after it; ``docs/slideflow.md`` maps every snippet to
its test or says why it has none. Tiny demo cohort (3 slides of 1024 x 768 px at 0.5 um/px, 2 patients), 32 px
tiles, random-init models; the slides are extracted once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from histolight import qc
from histolight.dataset import Dataset
from histolight.wsi import Slide

PX, UM = 32, 32  # 64 base px per tile
TABLE = ["loc_x", "loc_y", "grid_x", "grid_y", "roi_name", "roi_desc", "label", "slide"]
LABELS = ["tumor", "stroma", "necrosis"]
SEG_ENCODER = "tu-mobilenetv3_small_100"


@pytest.fixture(scope="module")
def ds(tiny_demo) -> Dataset:
    return Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=tiny_demo / "annotations.csv", name="demo")


@pytest.fixture(scope="module")
def extracted(ds, tmp_path_factory):
    """``dataset.extract_tiles(tile_px, tile_um, qc=qc.Otsu(), save_tiles=True)`` into a fresh tiles root."""
    root = tmp_path_factory.mktemp("snippet_tiles")
    res = ds.extract_tiles(tile_px=PX, tile_um=UM, outdir=str(root), qc=qc.Otsu(), save_tiles=True, workers=1, progress=False)
    return root, res


@pytest.fixture(scope="module")
def r18():
    from histolight.features import build_feature_extractor

    return build_feature_extractor("resnet18_imagenet", tile_px=PX, device="cpu", mixed_precision=False)


# ---------------------------------------------------------------------------------------------- slide processing


def test_extract_tiles_writes_one_tfrecord_per_slide_report_and_loose_tiles(ds, extracted):
    root, res = extracted
    tile_dir = root / "demo" / f"{PX}px_{UM}um"
    assert Path(res.tile_dir) == tile_dir
    assert sorted(p.name for p in tile_dir.glob("*.tfrecords")) == [f"{n}.tfrecords" for n in ds.names]
    assert res.n_tiles == int(res.summary["kept"].sum()) > 0
    assert res.report_path is not None and res.report_path.parent == tile_dir  # the report lives with the TFRecords
    loose = list((tile_dir / "tiles").rglob("*.jpg"))
    assert len(loose) == res.n_tiles


def test_extract_tiles_needs_no_arguments_and_dry_run_writes_only_a_report(ds, tmp_path):
    res = ds.extract_tiles(outdir=str(tmp_path), dry_run=True, workers=1, progress=False)
    d = tmp_path / "demo" / "256px_128um" / "dry_run"
    assert res.report_path is not None and res.report_path.parent == d and res.report_path.exists()
    assert not list(tmp_path.rglob("*.tfrecords"))


def test_roi_methods(ds, tiny_demo, tmp_path):
    """'auto' (ROIs where a slide has them, else the whole slide), 'inside', 'outside', 'ignore'."""
    n = {m: len(ds.get_tile_dataframe(PX, UM, roi_method=m)) for m in ("auto", "inside", "outside", "ignore")}
    assert n["inside"] + n["outside"] == n["ignore"] and n["auto"] == n["inside"] > 0
    rois = tmp_path / "rois"
    rois.mkdir()
    first, second = ds.names[:2]
    (rois / f"{first}.csv").write_bytes((tiny_demo / "rois" / f"{first}.csv").read_bytes())
    part = Dataset(tiny_demo / "slides", rois=rois, name="demo").filter({"slide": [first, second]})
    auto = part.get_tile_dataframe(PX, UM, roi_method="auto").groupby("slide").size()
    whole = part.get_tile_dataframe(PX, UM, roi_method="ignore").groupby("slide").size()
    assert auto[second] == whole[second] and auto[first] < whole[first]
    inside = part.get_tile_dataframe(PX, UM, roi_method="inside")
    assert set(inside["slide"]) == {first}  # a slide without ROIs is skipped


def test_roi_filter_method_fraction(ds):
    """``roi_filter_method=0.7``: a tile is kept when more than 70 % of it lies inside an ROI."""
    counts = [len(ds.get_tile_dataframe(PX, UM, roi_method="inside", roi_filter_method=f)) for f in (0.1, 0.5, 0.9)]
    assert counts[0] >= counts[1] >= counts[2] > 0 and counts[0] > counts[2]
    df = ds.get_tile_dataframe(PX, UM, roi_method="inside", roi_filter_method=0.7, columns="all")
    assert (df["roi_fraction"] > 0.7).all()


def test_get_tile_dataframe_columns_and_tfrecord_locations(ds, extracted):
    df = ds.get_tile_dataframe(PX, UM)
    assert list(df.columns) == TABLE and df.index.name == "tile_id"
    assert (df.index == df["slide"] + "-" + df["loc_x"].astype(str) + "-" + df["loc_y"].astype(str)).all()
    from histolight.classify import index_tfrecords

    root, res = extracted
    records = index_tfrecords(sorted(Path(res.tile_dir).glob("*.tfrecords")))
    assert len(records) == res.n_tiles and set(records.index) <= set(df.index)  # the same locations as the TFRecords


def test_qc_otsu_and_a_list_of_methods(ds, tmp_path):
    """``qc=qc.Otsu()`` and ``qc=[...]`` (several slide-level masks, here Otsu + Gaussian blur by name)."""
    kw = dict(tile_px=PX, tile_um=UM, roi_method="ignore", workers=1, progress=False, report=False)
    one = ds.extract_tiles(outdir=str(tmp_path / "a"), qc=qc.Otsu(), **kw)
    two = ds.extract_tiles(outdir=str(tmp_path / "b"), qc=[qc.Otsu(), "blur"], **kw)
    none = ds.extract_tiles(outdir=str(tmp_path / "c"), qc=None, **kw)
    assert none.n_tiles > one.n_tiles >= two.n_tiles > 0


def test_grayspace_and_whitespace_filters(ds, tmp_path):
    """Defaults 0.05 / 0.6 (grayspace) and 230 / 1.0 (whitespace, off); ``grayspace_fraction=1`` disables the filter."""
    from histolight.extract import make_config

    cfg = make_config()
    assert (cfg.grayspace_threshold, cfg.grayspace_fraction) == (0.05, 0.6)
    assert (cfg.whitespace_threshold, cfg.whitespace_fraction) == (230, 1.0)
    kw = dict(tile_px=PX, tile_um=UM, qc=None, roi_method="ignore", workers=1, progress=False, report=False, slides=ds.names[:1])
    default = ds.extract_tiles(outdir=str(tmp_path / "a"), **kw)
    off = ds.extract_tiles(outdir=str(tmp_path / "b"), grayspace_fraction=1, **kw)
    white = ds.extract_tiles(outdir=str(tmp_path / "c"), grayspace_fraction=1, whitespace_fraction=0.5, **kw)
    assert off.n_tiles == len(ds.get_tile_dataframe(PX, UM, roi_method="ignore", slides=ds.names[:1]))  # every tile
    assert default.n_tiles < off.n_tiles and white.n_tiles < off.n_tiles  # the background is gray and white


def test_stain_normalizers(ds, tmp_path):
    from histolight.norm import StainNormalizer, available_methods

    documented = [
        "macenko",
        "macenko_fast",
        "reinhard",
        "reinhard_fast",
        "reinhard_mask",
        "reinhard_fast_mask",
        "vahadane",
        "augment",
    ]
    assert set(documented) <= set(available_methods())
    with ds.open(ds.names[0]) as s:
        img = s.read((256, 256), (128, 128), s.mpp)
    out = StainNormalizer("reinhard").transform(img)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    res = ds.extract_tiles(
        tile_px=PX,
        tile_um=UM,
        outdir=str(tmp_path),
        normalizer="reinhard_fast",
        normalizer_source="v2",
        workers=1,
        progress=False,
        report=False,
        slides=ds.names[:1],
    )
    assert res.n_tiles > 0 and res.config.normalizer == "reinhard_fast"


# ---------------------------------------------------------------------------------------------- strong supervision


def test_strong_supervision_walkthrough(ds, extracted):
    """ROIs in place, tile label dataframe, filter to labelled slides, patient split, labels for training."""
    from histolight.classify import prepare_tiles

    assert len(ds.rois()) == 3
    df = ds.get_tile_dataframe(PX, UM)
    df = df.loc[df.label.notnull()]
    assert set(df["label"]) <= set(LABELS) and len(df) > 0
    sub = ds.filter({"slide": list(df.slide.unique())})
    assert sub.names == sorted(df.slide.unique())
    train, val = sub.split(val_fraction=0.3)
    assert len(train) and len(val) and not {sub.patient(s) for s in train.names} & {sub.patient(s) for s in val.names}
    labels = df[["label"]]
    # Slideflow's build_trainer(..., labels=df): histolight's data.label_source=table takes the same tile-id table
    root, _ = extracted
    tiles, _ = prepare_tiles(
        sub, tile_px=PX, tile_um=UM, tiles_root=root, extract=False, label_source="table", label_table=labels
    )
    assert len(tiles) > 0 and (tiles["label"] == labels.loc[tiles.index, "label"]).all()


# ---------------------------------------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def seg_models(tmp_path_factory) -> dict[str, Path]:
    """A random-init model folder per mode (as ``segment.train`` writes it)."""
    from histolight.segment import SegmentConfig, save_model
    from histolight.segment.model import SegmentModel

    root = tmp_path_factory.mktemp("seg_models")
    out = {}
    for mode in ("binary", "multiclass", "multilabel"):
        cfg = SegmentConfig(
            mpp=8, mode=mode, arch="FPN", encoder_name=SEG_ENCODER, labels=None if mode == "binary" else LABELS, size=64
        )
        out[mode] = save_model(SegmentModel(cfg), root / mode)
    return out


def test_segment_config_documented_arguments():
    from histolight.segment import SegmentConfig

    cfg = SegmentConfig(mpp=20, mode="binary", arch="FPN")
    assert (cfg.mpp, cfg.mode, cfg.arch) == (20, "binary", "FPN")
    cfg = SegmentConfig(mpp=20, size=1024, labels=LABELS, mode="multiclass")
    assert (cfg.size, cfg.labels) == (1024, LABELS)


def test_export_thumbs_and_masks_binary(ds, tmp_path):
    from histolight.segment import export_thumbs_and_masks, load_thumb_mask

    files = export_thumbs_and_masks(ds, mpp=20, dest=tmp_path / "masks")
    assert sorted(files) == ds.names
    tm = load_thumb_mask(files[ds.names[0]])
    h, w = round(768 * 0.5 / 20), round(1024 * 0.5 / 20)  # base px * um/px / (20 um/px)
    assert tm.image.shape[:2] == tm.mask.shape == (h, w) and tm.image.shape[2] == 3
    assert set(np.unique(tm.mask)) <= {0, 1} and tm.mask.any()


@pytest.mark.parametrize(
    "mode,lead",
    [
        ("binary", ()),
        pytest.param("multiclass", (4,), marks=pytest.mark.slow),
        pytest.param("multilabel", (3,), marks=pytest.mark.slow),
    ],
)
def test_load_model_and_config_and_inference_shapes(ds, seg_models, mode, lead):
    """(H, W) for binary, (N+1, H, W) multiclass, (N, H, W) multilabel; slides are predicted at the model's mpp."""
    from histolight.segment import SegmentConfig, load_model_and_config

    model, config = load_model_and_config(seg_models[mode])
    assert isinstance(config, SegmentConfig) and config.mode == mode
    img = np.full((70, 90, 3), 200, np.uint8)
    assert model.run_tiled_inference(img).shape == (*lead, 70, 90)
    with Slide(ds.path(ds.names[0])) as wsi:
        pred = model.run_slide_inference(wsi)
    assert pred.shape == (*lead, 768 * 0.5 / 8, 1024 * 0.5 / 8)


def test_qc_segment_masks_and_slide_rois(ds, seg_models):
    """``qc.Segment(path)``, ``class_idx=1``, ``threshold_direction='greater'``, ``segmenter.generate_rois(wsi)``."""
    from histolight.roi import ROI

    with Slide(ds.path(ds.names[0])) as wsi:
        for seg in (
            qc.Segment(seg_models["binary"]),
            qc.Segment(seg_models["multiclass"], class_idx=1),
            qc.Segment(seg_models["binary"], threshold_direction="greater"),
        ):
            m = seg(wsi)
            assert m.mask.shape == (48, 64) and m.mask.dtype == bool  # a QC mask at the model's 8 um/px
        kept = wsi.qc(qc.Segment(seg_models["binary"]))  # ``wsi.qc(segmenter)``: the slide keeps the mask
        np.testing.assert_array_equal(kept.mask, qc.Segment(seg_models["binary"])(wsi).mask)
        wsi.remove_qc()
        rois = qc.Segment(seg_models["multiclass"]).generate_rois(wsi, min_area_mm2=0)
    assert all(isinstance(r, ROI) and r.label in LABELS for r in rois)


@pytest.mark.slow
def test_dataset_generate_rois_dest_and_overwrite(ds, seg_models, tmp_path):
    one = ds.filter({"slide": ds.names[:1]})
    model = seg_models["multiclass"]
    assert one.generate_rois(model, dest=tmp_path / "rois", min_area_mm2=0).metrics()["n_done"] == 1
    assert list((tmp_path / "rois").glob(f"{ds.names[0]}.*"))
    assert one.generate_rois(model, dest=tmp_path / "rois").metrics()["n_skipped"] == 1  # existing ROIs are kept
    assert one.generate_rois(model, dest=tmp_path / "rois", overwrite=True).metrics()["n_done"] == 1


@pytest.mark.slow
def test_segment_train_writes_model_and_config(ds, tmp_path):
    from histolight import segment

    cfg = segment.SegmentConfig(
        mpp=8, mode="binary", arch="FPN", encoder_name=SEG_ENCODER, size=64, epochs=1, crops_per_epoch=4, batch_size=4
    )
    segment.train(cfg, ds, dest=tmp_path / "out")
    found = {p.name for p in (tmp_path / "out").rglob("*")}
    assert {"segment_config.json", "weights.safetensors"} <= found  # histolight's model.pth: safetensors (never pickled)


# ---------------------------------------------------------------------------------------------- features


def test_list_extractors_names_the_documented_models():
    from histolight.features import list_extractors

    assert {"virchow", "ctranspath", "retccl", "phikon", "plip", "uni", "gigapath", "simclr", "dinov2"} <= set(list_extractors())


def test_imagenet_extractor_layers_pooling_preprocessing(r18):
    from histolight.features import build_feature_extractor

    assert r18.dim == 512 and "imagenet" in r18.name
    two = build_feature_extractor("resnet18_imagenet", layers=["layer2", "layer3"], pooling="avg", tile_px=PX, device="cpu")
    assert two.dim == 128 + 256  # concatenated pooled activations
    custom = build_feature_extractor(
        "resnet18_imagenet", tile_px=PX, device="meta", resize=224, interpolation="bicubic", antialias=True
    )
    text = repr(custom.transform)
    assert "Resize" in text and "bicubic" in text and "antialias=True" in text
    assert isinstance(custom.license, str) and isinstance(custom.citation, str)


def test_feature_bags_config_and_rebuild(ds, extracted, r18, tmp_path):
    from histolight.features import rebuild_extractor

    root, res = extracted
    out = tmp_path / "bags"
    result = ds.generate_feature_bags(r18, outdir=str(out), tfrecords=res.tile_dir, progress=False)
    assert result.metrics()["n_done"] == 3
    kept = dict(zip(res.summary["slide"], res.summary["kept"]))
    for n in ds.names:
        bag = torch.load(out / f"{n}.pt", weights_only=True)
        assert bag.shape == (kept[n], 512) and bag.dtype == torch.float32
    cfg = json.loads((out / "bags_config.json").read_text())
    assert {"extractor", "normalizer", "num_features", "tile_px", "tile_um"} <= set(cfg) and cfg["num_features"] == 512
    ext, normalizer = rebuild_extractor(out / "bags_config.json")
    assert ext.dim == 512 and normalizer is None


def test_features_from_a_tfrecord_and_a_slide(ds, extracted, r18):
    root, res = extracted
    name = ds.names[0]
    bags, coords = r18(str(Path(res.tile_dir) / f"{name}.tfrecords"))
    n = int(res.summary.set_index("slide").loc[name, "kept"])
    assert tuple(bags.shape) == (n, 512) and tuple(coords.shape) == (n, 2)
    with Slide(ds.path(name)) as wsi:
        grid = r18(wsi, tile_px=PX, tile_um=64)  # 128 base px tiles: 8 x 6 over 1024 x 768
    assert tuple(grid.shape) == (8, 6, 512)  # (width, height, n_features)


@pytest.mark.slow
def test_dataset_features_to_torch(ds, extracted, r18, tmp_path):
    from histolight.features import DatasetFeatures

    root, res = extracted
    DatasetFeatures(r18, ds, tfrecords=res.tile_dir).to_torch(str(tmp_path / "bags"))
    assert sorted(p.name for p in (tmp_path / "bags").glob("*.pt")) == [f"{n}.pt" for n in ds.names]


def test_tile_label_table_is_pandas_friendly(ds):
    """``df.loc[df.label.notnull()]`` then ``df[['label']]``: a one-column frame indexed by tile id."""
    df = ds.get_tile_dataframe(PX, UM)
    lab = df.loc[df.label.notnull()][["label"]]
    assert list(lab.columns) == ["label"] and lab.index.name == "tile_id"
    assert isinstance(lab, pd.DataFrame) and lab.index.is_unique


# ---------------------------------------------------------------------------------------------- the table


def test_slideflow_table_counts_and_test_names():
    """docs/slideflow.md: the counts line matches the table, and every conformance test it names exists."""
    import re
    from collections import Counter

    from tests.conformance import test_dataset_items
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "slideflow.md").read_text()
    rows = [line.split("|") for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [int(r[1]) for r in rows] == list(range(1, len(rows) + 1))
    counts = Counter(r[4].strip().split(" (")[0] for r in rows)
    assert set(counts) <= {"works", "deliberately different", "out of scope", "in progress", "gap"}
    line = f"{len(rows)} documented calls: " + ", ".join(
        f"{counts[k]} {k}" for k in ("works", "deliberately different", "out of scope", "in progress", "gap") if counts[k]
    )
    assert line in text
    for r in rows:  # a working row names its test; a different / out-of-scope / missing row says why
        assert r[4].strip().startswith("in progress") or r[5].strip(), r
    for prefix, names in (("S", globals()), ("D", vars(test_dataset_items))):
        for name in re.findall(rf"`{prefix}::(test_\w+)`", text):
            assert name in names, f"docs/slideflow.md names {prefix}::{name}, which does not exist"
