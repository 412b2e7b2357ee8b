"""Tile extraction on small exact VirtualSlides: grid, reading, records, filters, QC threshold, ROIs, config."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon

from histolight.errors import ConfigError, MissingMPPError
from histolight.extract import (
    ExtractConfig,
    extract_slide,
    load_extract_config,
    make_config,
    make_grid,
    plan_slide,
    tile_dir_name,
)
from histolight.extract.filters import grayspace_fraction, tile_reject_reason, whitespace_fraction
from histolight.io import TFRecordReader, decode_example_typed, decode_image, load_index
from histolight.qc import QCMask
from histolight.roi import ROI
from histolight.wsi import VirtualSlide


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Saturated, spatially varying colours (a misplaced read is detected)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR)
    img[..., 1] //= 3  # keep it far from grey
    return img


def cfg(**kw) -> ExtractConfig:
    base = dict(tile_px=50, tile_um=50, qc=None, report=False, grayspace_fraction=1.0)
    base.update(kw)
    return ExtractConfig(**base)


def records(path):
    r = TFRecordReader(path)
    return [r.read(i) for i in range(len(r))], r


# ------------------------------------------------------------------------------------------- grid


def test_grid_microns_positions_centres_and_ids():
    s = VirtualSlide(textured(600, 1000), mpp=0.5)
    g = make_grid(s, tile_px=50, tile_um=50)  # 100 base px per tile
    assert g.extract_px == 100 and g.level == 0 and g.shape == (6, 10) and len(g) == 60
    assert g.x[:3].tolist() == [0, 100, 200] and g.y[10] == 100
    assert g.loc_x[0] == 50 and g.loc_y[0] == 50 and g.grid_x[11] == 1 and g.grid_y[11] == 1
    assert math.isclose(g.tile_mpp, 1.0)


def test_grid_stride_div_and_edge_tiles():
    s = VirtualSlide(textured(620, 1050), mpp=0.5)
    assert make_grid(s, 50, 50).shape == (6, 10)
    g2 = make_grid(s, 50, 50, stride_div=2)
    assert g2.shape == (11, 20) and g2.x[1] - g2.x[0] == 50
    ge = make_grid(s, 50, 50, edge_tiles=True)
    assert ge.shape == (7, 11) and ge.x.max() == 1000 and ge.y.max() == 600
    # edge tiles are padded white outside the slide
    i = int(np.flatnonzero((ge.x == 1000) & (ge.y == 600))[0])
    img = ge.read_tile(s, i)
    assert img.shape == (50, 50, 3)
    assert (img[15:, :] == 255).all() and (img[:, 30:] == 255).all() and not (img[:5, :20] == 255).all()


def test_grid_tile_larger_than_slide_is_empty():
    s = VirtualSlide(textured(200, 300), mpp=0.5)
    assert len(make_grid(s, 64, 256)) == 0  # 512 base px tiles
    assert len(make_grid(s, 64, 256, edge_tiles=True)) == 1


def test_magnification_uses_nearest_level_without_resizing():
    img = textured(1024, 1536)
    s = VirtualSlide(img, mpp=0.25, downsamples=(1, 4, 16))  # 40x, 10x, 2.5x
    g = make_grid(s, 64, mag=10)
    assert g.level == 1 and g.extract_px == 256 and math.isclose(g.tile_mpp, 1.0)
    t = g.read_tile(s, 7)
    np.testing.assert_array_equal(t, s.read_region((int(g.x[7]), int(g.y[7])), 1, (64, 64)))
    # no level within 10% of 5x or 3x: read from the closest finer level (10x) and resized to the exact magnification
    g5 = make_grid(s, 16, mag=5)
    assert g5.level == 1 and not g5.as_stored and g5.extract_px == 128 and math.isclose(g5.tile_mpp, 2.0)
    assert make_grid(s, 16, mag=3).level == 1
    assert tile_dir_name(256, "10x") == "256px_10x" and tile_dir_name(299, 302) == "299px_302um"


def test_read_run_equals_per_tile_reads_on_odd_downsamples():
    s = VirtualSlide(textured(803, 1001), mpp=0.5, downsamples=(1, 4))  # level-1 downsample 4.004
    g = make_grid(s, 16, 41, stride_div=3)  # 82 base px tiles read from level 1, overlapping
    assert g.level == 1
    idx = np.flatnonzero(g.grid_y == 2)
    runs = g.runs(idx, max_px=60)
    assert len(runs) > 1 and sum(len(r) for r in runs) == len(idx)
    for run in runs:
        for i, t in zip(run, g.read_run(s, run)):
            np.testing.assert_array_equal(t, g.read_tile(s, i))
            np.testing.assert_array_equal(t, s.read((int(g.x[i]), int(g.y[i])), (82, 82), 41 / 16, out_size=(16, 16)))


# ------------------------------------------------------------------------------------------- records


def test_records_decode_and_point_at_their_pixels(tmp_path):
    img = textured(480, 640)
    s = VirtualSlide(img, mpp=0.5, name="vs")
    c = cfg(tile_px=40, tile_um=40, img_format="png")  # 80 base px -> 40 px, area-resized from level 0
    res = extract_slide(s, c, tmp_path)
    assert res.status == "done" and res.kept == 48 == res.grid_tiles
    recs, reader = records(tmp_path / "vs.tfrecords")
    table = res.table
    assert len(recs) == len(table) == 48
    for i, rec in enumerate(recs):
        tile = decode_image(rec["image_raw"])
        assert rec["slide"] == b"vs"
        x, y = rec["loc_x"] - 40, rec["loc_y"] - 40
        np.testing.assert_array_equal(tile, s.read((x, y), (80, 80), 1.0, out_size=(40, 40)))
        np.testing.assert_array_equal(tile, cv2.resize(img[y : y + 80, x : x + 80], (40, 40), interpolation=cv2.INTER_AREA))
        row = table.iloc[i]
        assert (row.loc_x, row.loc_y, row.record) == (rec["loc_x"], rec["loc_y"], i)
        assert row.tile_id == f"vs-{rec['loc_x']}-{rec['loc_y']}"
    np.testing.assert_array_equal(reader.locations, table[["loc_x", "loc_y"]].to_numpy())


def test_record_layout_is_slideflows(tmp_path):
    s = VirtualSlide(textured(200, 200), mpp=0.5, name="sf")
    extract_slide(s, cfg(), tmp_path)
    raw = TFRecordReader(tmp_path / "sf.tfrecords").read_raw(0)
    typed = decode_example_typed(raw)
    assert {k: v[0] for k, v in typed.items()} == {"image_raw": "bytes", "slide": "bytes", "loc_x": "int", "loc_y": "int"}
    assert typed["image_raw"][1][0][:2] == b"\xff\xd8"  # JPEG by default
    with np.load(tmp_path / "sf.index.npz") as z:
        assert set(z.files) == {"arr_0", "locations"}
        assert z["arr_0"].shape == (4, 2) and z["locations"].shape == (4, 2)
        assert z["arr_0"][0, 0] == 0 and (z["arr_0"][1:, 0] == np.cumsum(z["arr_0"][:-1, 1])).all()
    idx, locs = load_index(tmp_path / "sf.index.npz")
    assert locs.tolist() == [[50, 50], [150, 50], [50, 150], [150, 150]]


def test_jpeg_quality_is_configurable(tmp_path):
    s = VirtualSlide(textured(300, 300), mpp=0.5, name="q")
    extract_slide(s, cfg(quality=30), tmp_path / "a")
    extract_slide(s, cfg(quality=98), tmp_path / "b")
    assert (tmp_path / "a/q.tfrecords").stat().st_size < 0.6 * (tmp_path / "b/q.tfrecords").stat().st_size


# ------------------------------------------------------------------------------------------- filters


def test_filter_fractions_on_tiles():
    t = np.zeros((10, 10, 3), np.uint8)
    t[:] = (200, 60, 120)  # saturated
    t[:, :4] = (128, 128, 128)  # grey: saturation 0
    assert grayspace_fraction(t, 0.05) == pytest.approx(0.4)
    t[:, 8:] = (255, 235, 235)  # bright but saturation 0.078
    assert grayspace_fraction(t, 0.05) == pytest.approx(0.4)
    assert grayspace_fraction(t, 0.1) == pytest.approx(0.6)
    assert whitespace_fraction(t, 230) == pytest.approx(0.2)
    assert tile_reject_reason(t, 0.05, 0.3) == "grayspace"
    assert tile_reject_reason(t, 0.05, 0.6, 230, 0.1) == "whitespace"
    assert tile_reject_reason(t, 0.05, 0.6, 230, 1.0) is None


def test_filter_counts_follow_settings(tmp_path):
    img = textured(400, 800)
    img[:, 400:600] = 128  # 2 columns of grey tiles (grayspace)
    img[:, 600:700] = (255, 235, 235)  # 1 column of bright pink (whitespace only)
    s = VirtualSlide(img, mpp=0.5, name="f")
    r = extract_slide(s, cfg(grayspace_fraction=0.6), None, dry_run=True)
    assert (r.grid_tiles, r.kept, r.rejected_grayspace, r.rejected_whitespace) == (32, 24, 8, 0)
    r = extract_slide(s, cfg(grayspace_fraction=0.6, whitespace_fraction=0.5), None, dry_run=True)
    assert (r.kept, r.rejected_grayspace, r.rejected_whitespace) == (20, 8, 4)
    r = extract_slide(s, cfg(grayspace_fraction=1.0, whitespace_fraction=1.0), None, dry_run=True)
    assert r.kept == 32


class BoxQC:
    """A QC plug-in (as the segmentation model's): mask True inside a fixed base-px box, at 2 um/px."""

    name = "boxqc"

    def __init__(self, box):
        self.box = box

    def __call__(self, slide):
        f = slide.mpp / 2.0
        w, h = slide.size_at_mpp(2.0)
        m = np.zeros((h, w), bool)
        x0, y0, x1, y1 = (round(v * f) for v in self.box)
        m[y0:y1, x0:x1] = True
        return QCMask(m, 2.0, self.name)


def test_qc_filter_threshold_and_plugin_interface(tmp_path):
    s = VirtualSlide(textured(400, 400), mpp=0.5, name="qc")
    # tiles are 100 base px (= 25 mask px); the boxes mask 20% / 40% / 80% of three tiles in row 0
    qc = [BoxQC((80, 0, 100, 100)), BoxQC((160, 0, 200, 100)), BoxQC((220, 0, 300, 100))]
    r = extract_slide(s, cfg(filter_threshold=0.6), None, qc_methods=qc, dry_run=True)
    assert (r.kept, r.rejected_qc) == (15, 1) and r.qc == "boxqc+boxqc+boxqc"
    r = extract_slide(s, cfg(filter_threshold=0.3), None, qc_methods=qc, dry_run=True)
    assert (r.kept, r.rejected_qc) == (14, 2)
    r = extract_slide(s, cfg(filter_threshold=0.0), None, qc_methods=qc, dry_run=True)
    assert r.rejected_qc == 3
    plan = plan_slide(s, cfg(), None, qc_methods=qc)
    np.testing.assert_allclose(plan.qc_fraction[:4], [0.2, 0.4, 0.8, 0.0])


def test_missing_mpp_is_an_error_naming_the_fix(tmp_path):
    s = VirtualSlide(textured(200, 200), mpp=None, name="nompp")
    with pytest.raises(MissingMPPError, match="mpp"):
        extract_slide(s, cfg(), tmp_path)
    assert not list(tmp_path.glob("*.tfrecords"))


# ------------------------------------------------------------------------------------------- ROIs


def _rois():
    # the hole takes 36% of each of the tiles (1,1), (2,1), (1,2), (2,2) and holds their centres
    a = Polygon([(0, 0), (400, 0), (400, 400), (0, 400)], holes=[[(140, 140), (260, 140), (260, 260), (140, 260)]])
    b = Polygon([(400, 0), (800, 0), (800, 130), (400, 130)])  # covers row 0 fully, row 1 by 30%
    c = Polygon([(0, 600), (230, 600), (230, 800), (0, 800)])  # cols 0-1 fully, col 2 by 30%
    d = Polygon([(230, 600), (300, 600), (300, 800), (230, 800)])  # col 2 by 70%
    return [ROI("A", a, "tumor", "with hole"), ROI("B", b, "stroma"), ROI("C", c, "necrosis"), ROI("D", d, "tumor", "sliver")]


def _label_map(df):
    return {(int(r.grid_x), int(r.grid_y)): (r.roi_name, r.label) for r in df.itertuples()}


def test_roi_center_respects_holes_and_labels(tmp_path):
    s = VirtualSlide(textured(800, 800), mpp=0.5, name="roi")
    r = extract_slide(s, cfg(roi_method="inside"), tmp_path, _rois())
    m = _label_map(r.table)
    # A: 16 tiles minus the 4 whose centre lies in the hole; B: row 0 (centre y=50), row 1 centre y=150 is outside
    assert sum(1 for v in m.values() if v[0] == "A") == 12 and (1, 1) not in m and (2, 2) not in m
    assert [k for k, v in m.items() if v[0] == "B"] == [(4, 0), (5, 0), (6, 0), (7, 0)]
    # C/D: centre of column 2 is x=250 -> in D
    assert m[(0, 6)] == ("C", "necrosis") and m[(2, 6)] == ("D", "tumor") and m[(2, 7)] == ("D", "tumor")
    assert r.kept == 12 + 4 + 4 + 2 and r.rejected_roi == 64 - r.kept
    assert set(r.table.roi_desc.dropna()) == {"with hole", "sliver"}


def test_roi_fraction_threshold_and_majority_label(tmp_path):
    s = VirtualSlide(textured(800, 800), mpp=0.5, name="roi")
    r = extract_slide(s, cfg(roi_method="inside", roi_filter_method=0.5), tmp_path, _rois())
    m = _label_map(r.table)
    # tiles around the hole are 64% inside A: kept at 0.5 (where centre filtering drops them)
    assert sum(1 for v in m.values() if v[0] == "A") == 16 and m[(1, 1)] == ("A", "tumor")
    assert sum(1 for v in m.values() if v[0] == "B") == 4  # row 1 only 30% covered
    # column 2 of C/D: 30% C + 70% D = 100% inside; the majority ROI (D) labels it
    assert m[(2, 6)] == ("D", "tumor") and m[(1, 6)] == ("C", "necrosis")
    assert all(v[1] is not None for v in m.values())  # every kept tile is labelled
    fr = r.table.set_index(["grid_x", "grid_y"]).roi_fraction
    assert fr[(1, 1)] == pytest.approx(0.64) and fr[(0, 0)] == pytest.approx(1.0)
    r2 = extract_slide(s, cfg(roi_method="inside", roi_filter_method=0.2), tmp_path / "b", _rois())
    m2 = _label_map(r2.table)
    assert m2[(4, 1)] == ("B", "stroma") and len(m2) == len(m) + 4
    r3 = extract_slide(s, cfg(roi_method="inside", roi_filter_method=0.7), None, _rois(), dry_run=True)
    assert r3.kept == len(m) - 4


def test_roi_outside_ignore_auto(tmp_path):
    s = VirtualSlide(textured(800, 800), mpp=0.5, name="roi")
    inside = extract_slide(s, cfg(roi_method="inside"), None, _rois(), dry_run=True)
    outside = extract_slide(s, cfg(roi_method="outside"), tmp_path / "o", _rois())
    assert outside.kept == 64 - inside.kept and outside.roi_mode == "outside"
    assert outside.table.label.isna().all()
    ign = extract_slide(s, cfg(roi_method="ignore"), None, _rois(), dry_run=True)
    assert ign.kept == 64 and ign.roi_mode == "ignore"
    auto = extract_slide(s, cfg(roi_method="auto"), None, _rois(), dry_run=True)
    assert auto.kept == inside.kept and auto.roi_mode == "inside"
    whole = extract_slide(s, cfg(roi_method="auto"), None, None, dry_run=True)
    assert whole.kept == 64 and whole.roi_mode == "whole"


def test_missing_or_unusable_rois_skip_the_slide():
    from histolight.extract import SlideSkipped

    s = VirtualSlide(textured(400, 400), mpp=0.5, name="noroi")
    with pytest.raises(SlideSkipped, match="no ROI file"):
        extract_slide(s, cfg(roi_method="inside"), None, None, dry_run=True)
    with pytest.raises(SlideSkipped, match="no ROI file"):
        extract_slide(s, cfg(roi_method="outside"), None, None, dry_run=True)
    with pytest.raises(SlideSkipped, match="no ROI inside the slide"):
        extract_slide(s, cfg(roi_method="auto"), None, [], dry_run=True)


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("tile_px", -1, "integer >= 8"),
        ("tile_um", "abc", "magnification string"),
        ("tile_um", 0, "positive number"),
        ("roi_method", "insde", "auto, inside, outside, ignore"),
        ("roi_filter_method", 1.5, "(0, 1)"),
        ("stride_div", 0.5, ">= 1"),
        ("qc", ["otsu", "bluur"], "Did you mean 'blur'"),
        ("img_format", "tiff", "'jpg' or 'png'"),
        ("quality", 0, "1..100"),
        ("grayspace_threshold", 5, "[0, 1]"),
        ("whitespace_threshold", 300, "[0, 255]"),
        ("shard_index", 3, "0..1"),
        ("max_failed", 1.5, "between 0 and 1"),
        ("allow_failures", "yes", "true or false"),
    ],
)
def test_config_errors_name_key_value_and_allowed(key, value, allowed):
    node = {"name": "extract", key: value}
    if key == "shard_index":
        node["num_shards"] = 2
    with pytest.raises(ConfigError) as e:
        load_extract_config(node, "task")
    msg = str(e.value)
    assert f"task.{key}" in msg and allowed in msg, msg
    if key != "qc":
        assert repr(value) in msg, msg


def test_config_unknown_key_and_python_api_options():
    with pytest.raises(ConfigError, match=r"task.tile_pz.*Did you mean 'task.tile_px'"):
        load_extract_config({"tile_pz": 256}, "task")
    c = make_config(tile_px=128, tile_um="20x", roi_filter_method="0.4", stride_div=2)
    assert c.mag == 20 and c.tile_dir == "128px_20x" and c.roi_filter_method == 0.4 and c.tile_mpp == 0.5
    with pytest.raises(ConfigError, match="extract.roi_method"):
        make_config(roi_method="insde")


def test_task_config_composes_with_defaults(tmp_path):
    from tests.conftest import compose_config

    c = compose_config(["task=extract", f"paths.root_dir={tmp_path}"])
    e = load_extract_config(c.task, "task")
    assert (e.tile_px, e.tile_um, e.stride_div, e.roi_method, e.roi_filter_method, e.qc, e.filter_threshold) == (
        256,
        128,
        1,
        "auto",
        "center",
        ["otsu"],
        0.6,
    )
    assert (e.grayspace_threshold, e.grayspace_fraction, e.whitespace_threshold, e.whitespace_fraction) == (0.05, 0.6, 230, 1.0)
    assert (e.img_format, e.quality, e.workers, e.shard_index, e.num_shards) == ("jpg", 95, 2, 0, 1)
    assert (e.overwrite, e.dry_run, e.save_tiles, e.report, e.normalizer, e.normalizer_source) == (
        False,
        False,
        False,
        True,
        None,
        None,
    )
    assert e.outdir == f"{tmp_path}/outputs/work/tiles"
    assert (e.allow_failures, e.max_failed) == (False, None)
    assert not {"workers", "allow_failures", "max_failed", "outdir"} & set(e.settings())  # run options, not settings


def test_geometry_rounding_follows_mpp():
    s = VirtualSlide(textured(300, 300), mpp=0.499)
    g = make_grid(s, 64, 64)
    assert g.extract_px == round(64 / 0.499) == 128
    assert shapely.box(0, 0, 1, 1).area == 1  # shapely available for ROI geometry


def test_magnification_reads_match_read_region_on_odd_downsamples():
    s = VirtualSlide(textured(803, 1001), mpp=0.25, downsamples=(1, 4))  # level 1: downsample 4.004, ~1.0 um/px
    g = make_grid(s, 16, mag=10, stride_div=2)
    assert g.level == 1 and g.extract_px == round(16 * s.level_downsamples[1])
    idx = np.flatnonzero(g.grid_y == 3)
    for run in g.runs(idx):
        for i, t in zip(run, g.read_run(s, run)):
            np.testing.assert_array_equal(t, s.read_region((int(g.x[i]), int(g.y[i])), 1, (16, 16)))
