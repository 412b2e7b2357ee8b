"""ROI files: Slideflow CSV and QuPath GeoJSON, holes, repair, clear errors."""

import json
import logging

import numpy as np
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from histolight.errors import ROIError
from histolight.roi import ROI, rasterize_rois, read_rois, write_rois

SQ = [(0, 0), (100, 0), (100, 100), (0, 100)]
INNER = [(30, 30), (70, 30), (70, 70), (30, 70)]


def _csv(path, rows, header="roi_name,x_base,y_base,label"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_csv_nested_same_label_becomes_hole(tmp_path):
    rows = [("a", x, y, "tumor") for x, y in SQ] + [("b", x, y, "tumor") for x, y in INNER]
    rois = read_rois(_csv(tmp_path / "s.csv", rows))
    assert len(rois) == 1
    assert rois[0].label == "tumor" and rois[0].n_holes == 1
    assert rois[0].area == pytest.approx(100 * 100 - 40 * 40)


def test_csv_nested_other_label_is_separate(tmp_path):
    rows = [("a", x, y, "tumor") for x, y in SQ] + [("b", x, y, "necrosis") for x, y in INNER]
    rois = read_rois(_csv(tmp_path / "s.csv", rows))
    assert sorted(r.label for r in rois) == ["necrosis", "tumor"]
    assert all(r.n_holes == 0 for r in rois)


def test_csv_island_inside_hole(tmp_path):
    island = [(45, 45), (55, 45), (55, 55), (45, 55)]
    rows = [("a", x, y, "t") for x, y in SQ] + [("b", x, y, "t") for x, y in INNER] + [("c", x, y, "t") for x, y in island]
    rois = read_rois(_csv(tmp_path / "s.csv", rows))
    assert sorted(r.name for r in rois) == ["a", "c"]
    assert {r.name: r.n_holes for r in rois} == {"a": 1, "c": 0}


def test_csv_uppercase_header_and_no_label(tmp_path):
    rows = [("ROI_0", x, y) for x, y in SQ]
    rois = read_rois(_csv(tmp_path / "s.csv", rows, header="ROI_Name,X_base,Y_base"))
    assert len(rois) == 1 and rois[0].label is None


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "empty ROI file"),
        ("name,x,y\na,1,2\n", r"missing required column\(s\) \['roi_name', 'x_base', 'y_base'\]"),
        ("roi_name,x_base,y_base\n", "no vertices"),
        ("roi_name,x_base,y_base\na,1,zz\n", "line 2: cannot parse"),
    ],
)
def test_csv_errors_are_clear(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(ROIError, match=match) as e:
        read_rois(p)
    assert "bad.csv" in str(e.value)


def test_invalid_geometry_is_repaired_and_degenerate_dropped(tmp_path, caplog):
    bowtie = [(0, 0), (100, 100), (100, 0), (0, 100)]
    line = [(0, 0), (10, 10), (20, 20)]
    rows = (
        [("bow", x, y, "t") for x, y in bowtie]
        + [("line", x, y, "t") for x, y in line]
        + [("two", 1, 1, "t"), ("two", 2, 2, "t")]
    )
    with caplog.at_level(logging.WARNING):
        rois = read_rois(_csv(tmp_path / "s.csv", rows))
    assert [r.name for r in rois] == ["bow"]
    assert rois[0].geometry.is_valid and rois[0].area == pytest.approx(5000)
    log = caplog.text
    assert "ROI 'bow'" in log and "repaired" in log
    assert "ROI 'line'" in log and "ROI 'two'" in log


def test_geojson_qupath_variants(tmp_path):
    poly = {"type": "Polygon", "coordinates": [SQ + [SQ[0]], INNER + [INNER[0]]]}
    multi = {
        "type": "MultiPolygon",
        "coordinates": [[[(200, 0), (300, 0), (300, 100), (200, 0)]], [[(400, 0), (500, 0), (500, 100), (400, 0)]]],
    }
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": poly,
                "properties": {
                    "objectType": "annotation",
                    "name": "T1",
                    "classification": {"name": "tumor", "color": [200, 0, 0]},
                },
            },
            {"type": "Feature", "id": "abc", "geometry": multi, "properties": {"classification": {"names": ["stroma", "dense"]}}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {"name": "pt"}},
            {"type": "Feature", "geometry": poly, "properties": {}},
        ],
    }
    p = tmp_path / "s.geojson"
    p.write_text(json.dumps(fc))
    rois = read_rois(p)
    assert [r.name for r in rois] == ["T1", "abc", "roi_3"]
    assert rois[0].label == "tumor" and rois[0].n_holes == 1
    assert rois[1].label == "stroma: dense" and isinstance(rois[1].geometry, MultiPolygon)
    assert rois[2].label is None
    # a bare list of features (older QuPath export) and a single Feature both work
    p2 = tmp_path / "list.json"
    p2.write_text(json.dumps(fc["features"][:1]))
    assert read_rois(p2)[0].name == "T1"
    p3 = tmp_path / "one.geojson"
    p3.write_text(json.dumps(fc["features"][0]))
    assert read_rois(p3)[0].n_holes == 1


def test_geojson_malformed(tmp_path):
    p = tmp_path / "bad.geojson"
    p.write_text("{not json")
    with pytest.raises(ROIError, match="bad.geojson: not valid JSON"):
        read_rois(p)
    p.write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(ROIError, match="unsupported GeoJSON type 'Topology'"):
        read_rois(p)


@pytest.mark.parametrize("ext", [".csv", ".geojson"])
def test_round_trip_keeps_rings_holes_labels(tmp_path, ext):
    g1 = Polygon(SQ, [INNER])
    g2 = MultiPolygon([box(200, 0, 300, 100), box(400, 0, 500, 100, ccw=False)])
    rois = [ROI("r1", g1, "tumor"), ROI("r2", g2, "stroma"), ROI("r3", box(45, 45, 55, 55), "necrosis")]
    p = write_rois(rois, tmp_path / f"s{ext}")
    back = read_rois(p)
    area = lambda rs, lab: sum(r.area for r in rs if r.label == lab)  # noqa: E731
    for lab in ("tumor", "stroma", "necrosis"):
        assert area(back, lab) == pytest.approx(area(rois, lab))
    assert sum(r.n_holes for r in back) == 1
    if ext == ".geojson":
        assert [r.name for r in back] == ["r1", "r2", "r3"]
        assert back[0].geometry.equals(g1) and back[1].geometry.equals(g2)
        doc = json.loads(p.read_text())
        assert doc["features"][0]["properties"]["classification"]["name"] == "tumor"


def test_clip_and_outside_warnings(tmp_path, caplog):
    rows = (
        [("in", x, y, "t") for x, y in SQ]
        + [("part", x + 50, y, "t") for x, y in SQ]
        + [("out", x + 1000, y, "t") for x, y in SQ]
    )
    p = _csv(tmp_path / "s.csv", rows)
    with caplog.at_level(logging.WARNING):
        rois = read_rois(p, slide_dims=(120, 120), nest=False)
    assert [r.name for r in rois] == ["in", "part"]
    assert rois[1].area == pytest.approx(70 * 100)
    assert "'out' lies entirely outside the slide" in caplog.text and "'part' extends outside" in caplog.text


def test_rasterize_modes_and_holes():
    rois = [ROI("a", Polygon(SQ, [INNER]), "tumor"), ROI("b", Polygon(INNER), "necrosis")]
    mc = rasterize_rois(rois, (100, 100), 1.0, labels=["tumor", "necrosis"], mode="multiclass")
    assert mc[10, 10] == 1 and mc[50, 50] == 2 and mc.dtype == np.uint8
    ml = rasterize_rois(rois, (50, 50), 0.5, labels=["tumor", "necrosis"], mode="multilabel")
    assert ml.shape == (2, 50, 50) and ml[0, 25, 25] == 0 and ml[1, 25, 25] == 1
    b = rasterize_rois(rois, (100, 100), 1.0, labels=["tumor"], mode="binary")
    assert b[50, 50] == 0 and b[10, 10] == 1
    assert abs(int(b.sum()) - (100 * 100 - 40 * 40)) < 300
