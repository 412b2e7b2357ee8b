"""Pictures: one colour per label in every product (segmentation, heatmaps, extraction report, QuPath export),
titled overlays with legends, a colour prediction beside the class-index one, heatmaps covering the whole slide at a
fixed scale with a geometry sidecar, and an extraction report that says why a slide failed or kept no tile."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd

from histolight import viz
from tests.conftest import ROOT

LABELS = ["tumor", "stroma", "necrosis"]


def _read_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _has_color(img: np.ndarray, color, tol: int = 2) -> bool:
    return bool((np.abs(img.astype(int) - np.asarray(color)).max(-1) <= tol).any())


# ---------------------------------------------------------------------------------------------- palette


def test_label_colors_are_fixed_distinct_and_the_same_in_every_process():
    assert viz.label_color("tumor") == (215, 35, 45) and viz.label_color("stroma") == (35, 160, 65)
    names = ["tumor", "stroma", "necrosis", "tissue", "nucleus", "gland", "mucin", "lymphocytes", "Tumor Bed"]
    cols = [viz.label_color(n) for n in names]
    assert len(set(cols)) == len(cols)
    assert viz.QC_REJECTED not in cols and viz.BACKGROUND not in cols
    for c in cols:  # saturated enough to tell from grey tissue
        assert max(c) - min(c) >= 60, c
    # another process with another hash seed gives the same colours to names outside the fixed table
    code = "from histolight.viz import label_color; print([label_color(n) for n in ('gland', 'mucin', 'Tumor Bed')])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PYTHONHASHSEED": "123"}, timeout=60
    )
    assert out.stdout.strip() == str([viz.label_color(n) for n in ("gland", "mucin", "Tumor Bed")]), out.stderr


def test_every_product_uses_the_shared_palette():
    from histolight.extract.report import STATE_COLORS, _roi_color
    from histolight.roi.core import _color
    from histolight.segment.model import colorize

    lab = np.array([[0, 1], [2, 3]], np.uint8)
    rgb = colorize(lab, ["background", *LABELS])
    assert [tuple(v) for v in rgb.reshape(-1, 3)] == [viz.BACKGROUND, *(viz.label_color(n) for n in LABELS)]
    assert _roi_color("stroma") == viz.label_color("stroma") and _color("gland") == list(viz.label_color("gland"))
    assert STATE_COLORS["qc"] == viz.QC_REJECTED


def test_blend_keeps_label_hues_on_pink_tissue():
    pink = np.full((8, 8, 3), (235, 150, 200), np.uint8)  # eosin-pink stroma
    lab = np.full((8, 8), 2, np.uint8)  # stroma
    out = viz.blend_labels(pink, viz.colorize(lab, ["background", *LABELS]), lab > 0)
    r, g, b = out[0, 0].astype(int)
    assert g > r + 40 and g > b + 40  # still clearly green, not grey
    untouched = viz.blend_labels(pink, viz.colorize(lab, ["background", *LABELS]), np.zeros((8, 8), bool))
    assert np.array_equal(untouched, pink)


def test_legend_and_panels_draw_titles_and_swatches():
    key = viz.legend_image(viz.label_colors(LABELS), title="classes")
    for n in LABELS:
        assert _has_color(key, viz.label_color(n), 0)
    img = np.full((40, 60, 3), 128, np.uint8)
    out = viz.panels([(img, "slide"), (img, "prediction")], key)
    assert out.shape[0] > 40 + key.shape[0] and out.shape[1] >= 2 * 60
    t = viz.titled(img, "a title")
    assert t.shape[0] > 40 and (t[: t.shape[0] - 40] < 100).any()  # title text drawn above the image


# ---------------------------------------------------------------------------------------------- segmentation outputs


def test_segment_slide_writes_titled_overlay_and_colour_prediction(tiny_demo, tmp_path):
    from histolight.dataset import Dataset
    from histolight.segment import SegmentConfig
    from histolight.segment.model import SegmentModel
    from histolight.segment.outputs import segment_slide

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois")
    cfg = SegmentConfig(mode="multiclass", labels=LABELS, mpp=4, size=64, encoder_name="tu-mobilenetv3_small_100")
    model = SegmentModel(cfg).eval()
    name = ds.names[0]
    truth = cv2.imread(str(tiny_demo / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)

    def oracle(slide, output="labels", strip_px=None):  # the true classes, at the model's grid
        return cv2.resize(truth, slide.size_at_mpp(cfg.mpp), interpolation=cv2.INTER_NEAREST)

    model.run_slide_inference = oracle
    segment_slide(name, ds, model, str(tmp_path), rois=False, device="cpu")
    idx = cv2.imread(str(tmp_path / f"{name}.pred.png"), cv2.IMREAD_UNCHANGED)
    color = _read_rgb(tmp_path / f"{name}.pred_color.png")
    assert color.shape[:2] == idx.shape and np.array_equal(color, viz.palette(["background", *LABELS])[idx])
    meta = json.loads((tmp_path / f"{name}.pred.json").read_text())
    assert meta["color_file"] == f"{name}.pred_color.png" and meta["colors"]["stroma"] == list(viz.label_color("stroma"))
    ov = _read_rgb(tmp_path / f"{name}.overlay.png")
    h, w = idx.shape
    assert ov.shape[0] > h + 20 and ov.shape[1] > 2 * w  # two titled panels and a legend row
    for n in LABELS:  # the exact label colours appear only in the legend's swatches (the tint mixes in grey)
        assert _has_color(ov, viz.label_color(n), 0), n


# ---------------------------------------------------------------------------------------------- heatmaps


def _pred(locs, classes=("a", "b")) -> pd.DataFrame:
    locs = np.asarray(locs)
    p = np.linspace(0, 1, len(locs))
    return pd.DataFrame(
        {"slide": "s", "loc_x": locs[:, 0], "loc_y": locs[:, 1], f"prob_{classes[0]}": p, f"prob_{classes[1]}": 1 - p}
    )


def test_heatmaps_cover_the_whole_slide_at_a_fixed_scale_with_a_sidecar(tmp_path):
    from histolight.classify.heatmaps import (
        FROM_LOCATIONS,
        FROM_SUMMARY,
        cell_colors,
        slide_geometry,
        write_heatmap,
        write_legend,
    )

    tiles = tmp_path / "tiles"
    (tiles / "meta").mkdir(parents=True)
    meta = {"width": 1000, "height": 700, "mpp": 0.5, "extract_px": 64, "settings": {"stride_div": 1}}
    for s in ("s1", "s2"):
        (tiles / "meta" / f"{s}.json").write_text(json.dumps(meta))
    # identical slides, different tiles kept (QC): the same picture size
    one = _pred([(32 + 64 * i, 32 + 64 * j) for i in range(3) for j in range(2)])
    two = _pred([(32 + 64 * 14, 32 + 64 * 9), (32, 32)])
    out = tmp_path / "heatmaps"
    out.mkdir()
    shapes = []
    for s, df in (("s1", one), ("s2", two)):
        g = slide_geometry(tiles, s, df)
        assert g.source == FROM_SUMMARY
        shapes.append(cv2.imread(str(write_heatmap(df, ["a", "b"], out, s, g, 4))).shape)
    assert shapes[0] == shapes[1] == (11 * 4, 16 * 4, 3)  # ceil(700 / 64) x ceil(1000 / 64) cells of 4 px
    side = json.loads((out / "s2.json").read_text())
    assert side["slide_dims"] == [1000, 700] and side["mpp"] == 0.5 and side["origin"] == [0, 0]
    assert side["base_px_per_pixel"] == 16 and side["size"] == [64, 44] and side["geometry_source"] == FROM_SUMMARY
    img = _read_rgb(out / "s2.png")
    assert tuple(img[0, 0]) == viz.label_color("a") and tuple(img[9 * 4, 14 * 4]) == viz.label_color("b")
    assert tuple(img[20, 20]) == viz.BACKGROUND  # no tile there
    unsure = cell_colors(np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], np.float32), LABELS)
    assert tuple(np.rint(unsure[1])) == viz.label_color("stroma")  # the winner's colour, never a mix (red + green = brown)
    assert (unsure[0] > np.asarray(viz.label_color("tumor"))).all()  # paler when unsure
    write_legend(["a", "b"], out)
    assert json.loads((out / "legend.json").read_text()) == {"a": list(viz.label_color("a")), "b": list(viz.label_color("b"))}
    assert _has_color(_read_rgb(out / "legend.png"), viz.label_color("a"), 0)
    # TFRecords without a summary (e.g. Slideflow's): the tiles' extent and spacing, and the sidecar says so
    g = slide_geometry(tmp_path / "nowhere", "s3", one)
    assert g.source == FROM_LOCATIONS and g.stride == 64 and g.grid() == (2, 3)


# ---------------------------------------------------------------------------------------------- extraction report


def _summary_rows() -> pd.DataFrame:
    base = dict(grid_tiles=100, rejected_roi=0, rejected_grayspace=0, rejected_whitespace=0, mpp=0.5, level=0, extract_px=64)
    rows = [
        dict(base, slide="ok", status="done", kept=80, rejected_qc=20, tissue_fraction=0.4, blur_burden=0.12,
             blur_flagged=True, roi_mode="inside", n_rois=3, qc="otsu, blur", tissue_detector="dark-background"),
        dict(base, slide="allqc", status="empty", kept=0, rejected_qc=100, tissue_fraction=0.3, blur_burden=0.01,
             blur_flagged=False, reason="0 tiles kept"),
        dict(slide="broken", status="failed", reason="cannot read slide: bad TIFF directory", blur_flagged=False),
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_report_names_failures_and_empty_causes_and_lists_blurred_slides(tmp_path):
    from histolight.extract.report import BLUR_LIST, write_report

    (tmp_path / "meta").mkdir()
    page = write_report(_summary_rows(), tmp_path / "meta", tmp_path / "report.html", blur_limit=0.05)
    text = page.read_text()
    assert "nan" not in text.lower()
    assert "cannot read slide: bad TIFF directory" in text
    assert "all rejected by QC" in text and "extracted, 0 tiles kept (1 all rejected by QC)" in text
    assert "Tissue detector: dark-background" in text
    assert "<svg" in text and "limit 5%" in text  # blur burden distribution
    assert "ROI outlines" in text
    assert (tmp_path / BLUR_LIST).read_text() == "ok\n"
