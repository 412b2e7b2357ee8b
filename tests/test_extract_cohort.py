"""Cohort extraction on the demo and real slides: records, labels, resume, interruption, bad inputs, report."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from histolight.cohort import shard
from histolight.dataset import Dataset
from histolight.demo import CLASSES
from histolight.extract import extract_tiles, get_tile_dataframe
from histolight.io import TFRecordReader, decode_image
from histolight.io.tilestore import tile_folder
from tests.conftest import ROOT, shared_slide

FAST = dict(tile_px=64, tile_um=64, workers=1, progress=False)  # 128 base px tiles on 0.5 um/px slides


@pytest.fixture()
def demo_ds(tiny_demo) -> Dataset:
    return Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", annotations=tiny_demo / "annotations.csv")


def check_records(res, ds, max_mad=6.0, shift_check=True):
    """Every record decodes, sits at its table row, and shows the slide pixels around (loc_x, loc_y):
    close to a re-read of that region (JPEG error only), and closer than re-reads shifted by 1/8 tile."""
    d = res.tile_dir
    table = res.tiles
    cfg = res.config
    n = 0
    for name in res.summary.loc[res.summary.status.isin(["done", "empty"]), "slide"]:
        r = TFRecordReader(d / f"{name}.tfrecords")
        rows = table[table.slide == name].sort_values("record")
        assert len(r) == len(rows)
        level = int(res.summary.set_index("slide").level[name])
        with ds.open(name) as s:

            def region(x, y, e, s=s, level=level):
                if cfg.mag is None:
                    return s.read((x, y), (e, e), cfg.tile_um / cfg.tile_px, out_size=(cfg.tile_px, cfg.tile_px)).astype(int)
                return s.read_region((x, y), level, (cfg.tile_px, cfg.tile_px)).astype(int)

            for i in range(len(r)):
                rec = r.read(i)
                tile = decode_image(rec["image_raw"]).astype(int)
                assert tile.shape == (cfg.tile_px, cfg.tile_px, 3)
                row = rows.iloc[i]
                assert (rec["loc_x"], rec["loc_y"]) == (row.loc_x, row.loc_y) and rec["slide"] == name.encode()
                e = int(row.size_base)
                x, y = rec["loc_x"] - e // 2, rec["loc_y"] - e // 2
                mad = np.abs(tile - region(x, y, e)).mean()
                assert mad < max_mad, (name, i, mad)
                if i < 3 and shift_check:
                    k = max(1, e // 8)
                    for dx, dy in ((k, 0), (-k, 0), (0, k), (0, -k)):
                        assert np.abs(tile - region(x + dx, y + dy, e)).mean() > mad, (name, i, dx, dy)
                n += 1
    return n


# ------------------------------------------------------------------------------------------- demo cohort


def test_demo_extraction_records_labels_and_table(demo_ds, tiny_demo, tmp_path):
    res = extract_tiles(demo_ds, outdir=tmp_path, qc=["otsu"], **FAST)
    assert res.tile_dir == tmp_path / demo_ds.name / "64px_64um" == tile_folder(tmp_path, "slides", 64, 64)
    s = res.summary.set_index("slide")
    assert (s.status == "done").all() and s.kept.sum() == res.n_tiles > 20
    assert (s.kept + s.rejected_roi + s.rejected_qc + s.rejected_grayspace + s.rejected_whitespace == s.grid_tiles).all()
    assert check_records(res, demo_ds) == res.n_tiles
    # centre filtering: the label is the class of the exact mask at the tile centre
    t = res.tiles
    agree = []
    for name, g in t.groupby("slide"):
        mask = cv2.imread(str(tiny_demo / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        truth = mask[g.loc_y.to_numpy(), g.loc_x.to_numpy()]
        agree.append(truth == np.array([CLASSES.index(lab) + 1 for lab in g.label]))
    assert np.concatenate(agree).mean() > 0.97
    # the cohort table == get_tile_dataframe(outdir) and == the parquet file
    df = demo_ds.get_tile_dataframe(64, 64, tmp_path)
    assert list(df.columns) == ["loc_x", "loc_y", "grid_x", "grid_y", "roi_name", "roi_desc", "label", "slide"]
    assert df.index.name == "tile_id" and len(df) == res.n_tiles and df.index.is_unique
    assert df.index[0] == f"{df.slide.iloc[0]}-{df.loc_x.iloc[0]}-{df.loc_y.iloc[0]}"
    assert len(pd.read_parquet(res.table_path)) == res.n_tiles
    m = res.metrics()
    assert m["n_done"] == 3 and m["n_tiles"] == res.n_tiles
    assert {k: m[k] for k in ("n_slides", "n_done", "n_skipped", "n_failed", "n_empty")} == dict(
        n_slides=3, n_done=3, n_skipped=0, n_failed=0, n_empty=0
    )
    assert m["summary"] == str(res.summary_path) and res.summary_line().startswith("3 slide(s): 3 done, 0 skipped")


def test_fractional_roi_labels_match_the_mask_majority(demo_ds, tiny_demo):
    df = get_tile_dataframe(demo_ds, 64, 64, roi_filter_method=0.5, columns="all")
    assert len(df) > 20 and df.label.notna().all()  # Slideflow leaves these unlabelled
    ok = []
    for name, g in df.groupby("slide"):
        mask = cv2.imread(str(tiny_demo / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        for r in g.itertuples():
            crop = mask[r.y : r.y + r.size_base, r.x : r.x + r.size_base]
            counts = np.bincount(crop.ravel(), minlength=4)
            assert counts[1:].sum() / crop.size > 0.45  # more than half inside ROIs (up to edge rasterization)
            ok.append(int(np.argmax(counts[1:])) + 1 == CLASSES.index(r.label) + 1)
    assert np.mean(ok) > 0.95
    centre = get_tile_dataframe(demo_ds, 64, 64)
    assert centre.label.notna().all() and abs(len(centre) - len(df)) < 0.3 * len(df)


def test_resume_skips_finished_slides_and_overwrite_redoes(demo_ds, tmp_path):
    res = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    rec = res.tile_dir / "demo_000.tfrecords"
    t0 = rec.stat().st_mtime_ns
    again = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    assert (again.summary.status == "skipped").all() and (again.summary.reason == "already extracted").all()
    assert rec.stat().st_mtime_ns == t0 and again.metrics()["n_skipped"] == 3
    assert again.n_tiles == res.n_tiles and len(again.tiles) == len(res.tiles)  # counts kept from the meta
    pd.testing.assert_series_equal(again.summary.kept, res.summary.kept)
    changed = extract_tiles(demo_ds, outdir=tmp_path, qc=None, stride_div=2, **FAST)  # different settings: warned, kept
    assert (changed.summary.status == "skipped").all() and changed.summary.reason.str.contains("stride_div").all()
    redo = extract_tiles(demo_ds, outdir=tmp_path, qc=None, overwrite=True, stride_div=2, **FAST)
    assert (redo.summary.status == "done").all() and rec.stat().st_mtime_ns != t0
    assert redo.n_tiles > 2.5 * res.n_tiles


def test_already_extracted_slides_keep_their_report_sections(demo_ds, tmp_path):
    extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    again = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    text = again.report_path.read_text()
    assert text.count("skipped: already extracted") == 6 and text.count("<img ") == 9  # badge in table + section
    assert "Needs attention" not in text


def test_cohorts_sharing_a_tiles_root_do_not_touch_each_other(tiny_demo, tmp_path):
    a = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", name="cohort_a")
    b = Dataset(tiny_demo / "slides", name="cohort_b")
    ra = extract_tiles(a, outdir=tmp_path, qc=None, **{**FAST, "slides": ["demo_000", "demo_001"]})
    before = {p: p.stat().st_mtime_ns for p in ra.tile_dir.rglob("*") if p.is_file()}
    rb = extract_tiles(b, outdir=tmp_path, qc=None, **FAST)
    assert ra.tile_dir == tmp_path / "cohort_a" / "64px_64um" and rb.tile_dir == tmp_path / "cohort_b" / "64px_64um"
    assert (rb.summary.status == "done").all() and rb.summary.roi_mode.eq("whole").all()  # b has no ROIs: extracted anew
    assert {p: p.stat().st_mtime_ns for p in ra.tile_dir.rglob("*") if p.is_file()} == before
    assert set(pd.read_parquet(ra.table_path).slide) == {"demo_000", "demo_001"} and len(rb.tiles) > len(ra.tiles)
    assert (
        len(get_tile_dataframe(a, 64, 64, tmp_path)) == ra.n_tiles and len(get_tile_dataframe(b, 64, 64, tmp_path)) == rb.n_tiles
    )


def test_a_slide_held_or_finished_by_another_run_is_never_deleted(demo_ds, tmp_path):
    import time

    from histolight.claims import Claims
    from histolight.extract.runner import ExtractJob, extract_one, make_config

    d = tile_folder(tmp_path, demo_ds.name, 64, 64)
    (d / "meta").mkdir(parents=True)
    (d / "meta" / "demo_002.json").write_text("{}")  # leftovers of an interrupted slide: removed, then redone
    claims = Claims(d / ".claims")
    assert claims.acquire("demo_001") is None  # another run is extracting demo_001
    try:
        res = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    finally:
        claims.close()
    st = res.summary.set_index("slide")
    assert st.status.to_dict() == {"demo_000": "done", "demo_001": "skipped", "demo_002": "done"}
    assert "being processed by another run" in st.reason["demo_001"] and not list(d.glob("demo_001*"))
    # overwrite=true keeps a slide that a concurrent run finished after this run started
    rec = d / "demo_000.tfrecords"
    t0 = rec.stat().st_mtime_ns
    cfg = make_config(tile_px=64, tile_um=64, qc=None, overwrite=True)
    info = {n: (str(demo_ds.path(n)), None, str(demo_ds.roi_path(n))) for n in demo_ds.names}
    row = extract_one(ExtractJob(cfg, str(d), info, started=rec.stat().st_mtime - 1), "demo_000")
    assert row["status"] == "skipped" and row["reason"] == "already extracted (by a concurrent run)"
    assert rec.stat().st_mtime_ns == t0 and row["kept"] == st.kept["demo_000"]
    row = extract_one(ExtractJob(cfg, str(d), info, started=time.time() + 1), "demo_000")  # finished before: redone
    assert row["status"] == "done" and rec.stat().st_mtime_ns != t0


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_interrupted_run_leaves_nothing_that_looks_complete(demo_ds, tmp_path, monkeypatch):
    from histolight.io.tfrecord import TFRecordWriter

    real = TFRecordWriter.write_tile
    calls = {"n": 0}

    def flaky(self, data, x, y, slide=None):
        if slide == "demo_001":
            calls["n"] += 1
            if calls["n"] == 3:  # in the middle of the second slide
                raise KeyboardInterrupt
        return real(self, data, x, y, slide=slide)

    monkeypatch.setattr(TFRecordWriter, "write_tile", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract_tiles(demo_ds, outdir=tmp_path, qc=None, save_tiles=True, **FAST)
    d = tile_folder(tmp_path, demo_ds.name, 64, 64)
    files = _listing(d)
    assert "demo_000.tfrecords" in files and "demo_001.tfrecords" not in files and "demo_002.tfrecords" not in files
    assert not [f for f in files if "tmp-" in f], files  # the aborted slide cleaned its temp files
    assert not (d / "tiles" / "demo_001").exists()
    t0 = (d / "demo_000.tfrecords").stat().st_mtime_ns
    monkeypatch.setattr(TFRecordWriter, "write_tile", real)
    res = extract_tiles(demo_ds, outdir=tmp_path, qc=None, save_tiles=True, **FAST)
    assert res.summary.status.tolist() == ["skipped", "done", "done"]
    assert (d / "demo_000.tfrecords").stat().st_mtime_ns == t0
    check_records(res, demo_ds)
    for name, g in res.tiles.groupby("slide"):  # loose tiles: one file per record, named by tile id
        assert sorted(p.stem for p in (d / "tiles" / name).iterdir()) == sorted(g.index)


def test_report_summary_and_tile_table_are_replaced_as_one_set(demo_ds, tmp_path, monkeypatch):
    import errno

    from histolight.extract import report

    first = extract_tiles(demo_ds, outdir=tmp_path, qc=None, slides=["demo_000", "demo_001"], **FAST)
    products = (first.table_path, first.summary_path, first.report_path)
    old = [p.read_bytes() for p in products]
    real = report.atomic_write_text

    def disk_full(path, text, **kw):  # the second write of the set (the report, after the summary CSV) fails
        if "report.html" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, **kw)

    monkeypatch.setattr(report, "atomic_write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)  # a third slide: every product changes
    assert [p.read_bytes() for p in products] == old  # the earlier set, whole
    assert sorted(pd.read_csv(first.summary_path).slide) == ["demo_000", "demo_001"]
    assert not [f for f in _listing(first.tile_dir) if ".set-" in f]  # no temp left behind
    monkeypatch.setattr(report, "atomic_write_text", real)
    again = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    assert sorted(pd.read_csv(again.summary_path).slide) == ["demo_000", "demo_001", "demo_002"]
    assert "demo_002" in again.report_path.read_text() and set(pd.read_parquet(again.table_path).slide) >= {"demo_002"}
    # without a report, an earlier run's report (describing another set) does not stay beside the new summary
    extract_tiles(demo_ds, outdir=tmp_path, qc=None, report=False, **FAST)
    assert not again.report_path.exists()


def test_killed_run_is_resumed(demo_ds, tiny_demo, tmp_path):
    """A SIGKILL in the middle of a slide leaves only hidden temp files; the next run removes them."""
    script = textwrap.dedent(f"""
        import os, signal
        from histolight.io.tfrecord import TFRecordWriter
        from histolight.dataset import Dataset
        from histolight.extract import extract_tiles
        real, n = TFRecordWriter.write_tile, [0]
        def killer(self, data, x, y, slide=None):
            if slide == "demo_001":
                n[0] += 1
                if n[0] == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(self, data, x, y, slide=slide)
        TFRecordWriter.write_tile = killer
        ds = Dataset({str(tiny_demo / "slides")!r}, rois={str(tiny_demo / "rois")!r})
        extract_tiles(ds, 64, 64, {str(tmp_path)!r}, qc=None, workers=1, progress=False)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    d = tile_folder(tmp_path, demo_ds.name, 64, 64)
    files = _listing(d)
    assert sorted(f for f in files if f.endswith(".tfrecords")) == ["demo_000.tfrecords"]
    assert [f for f in files if "demo_001" in f and "tmp-" in f]  # the killed slide's temp file, hidden
    res = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)
    assert res.summary.status.tolist() == ["skipped", "done", "done"]
    assert not [f for f in _listing(d) if "tmp-" in f]
    check_records(res, demo_ds)


def test_dry_run_writes_no_tiles_but_reports(demo_ds, tmp_path):
    real = extract_tiles(demo_ds, outdir=tmp_path / "real", qc=["otsu"], **FAST)
    dry = extract_tiles(demo_ds, outdir=tmp_path / "dry", qc=["otsu"], dry_run=True, **FAST)
    assert not list((tmp_path / "dry").rglob("*.tfrecords")) and not list((tmp_path / "dry").rglob("*.index.npz"))
    assert dry.report_path.is_file() and dry.tile_dir.name == "dry_run"
    cols = ["slide", "kept", "rejected_roi", "rejected_qc", "rejected_grayspace"]
    pd.testing.assert_frame_equal(dry.summary[cols], real.summary[cols])
    assert len(dry.tiles) == real.n_tiles


def test_shards_partition_the_cohort_and_parallel_equals_serial(demo_ds, tmp_path):
    names = demo_ds.names
    parts = [shard(names, i, 2) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == names and not set(parts[0]) & set(parts[1])
    r0 = extract_tiles(demo_ds, outdir=tmp_path, qc=None, shard_index=0, num_shards=2, **FAST)
    r1 = extract_tiles(demo_ds, outdir=tmp_path, qc=None, shard_index=1, num_shards=2, **FAST)
    assert r0.summary.slide.tolist() == parts[0] and r1.summary.slide.tolist() == parts[1]
    assert r0.table_path.name == "tiles.shard-0-of-2.parquet" and r1.report_path.name == "report.shard-1-of-2.html"
    merged = extract_tiles(demo_ds, outdir=tmp_path, qc=None, **FAST)  # final pass: all already extracted, cohort files written
    assert (merged.summary.status == "skipped").all() and len(merged.tiles) == r0.n_tiles + r1.n_tiles
    par = extract_tiles(demo_ds, outdir=tmp_path / "par", qc=None, **{**FAST, "workers": 2})
    pd.testing.assert_frame_equal(par.tiles.sort_index(), merged.tiles.sort_index())


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_in_a_cohort(tiny_demo, tmp_path, caplog):
    slides, rois = tmp_path / "slides", tmp_path / "rois"
    slides.mkdir()
    rois.mkdir()
    for n in ("demo_000", "demo_001", "demo_002"):
        os.symlink(tiny_demo / "slides" / f"{n}.svs", slides / f"{n}.svs")
    shutil.copy(tiny_demo / "rois" / "demo_000.csv", rois / "demo_000.csv")
    shutil.copy(tiny_demo / "rois" / "demo_002.csv", rois / "ghost.csv")  # ROI file for a missing slide
    (rois / "demo_001.csv").write_text("roi_name,x_base,y_base,label\nr,5000,5000,tumor\nr,6000,5000,tumor\nr,6000,6000,tumor\n")
    shutil.copy(shared_slide("unreadable.svs"), slides / "unreadable.svs")
    shutil.copy(shared_slide("boxes.tiff"), slides / "boxes.tiff")  # no usable mpp
    shutil.copy(shared_slide("unopenable.tiff"), slides / "unopenable.tiff")
    ds = Dataset(slides, rois=rois)
    res = extract_tiles(ds, outdir=tmp_path / "out", qc=["otsu"], **FAST)
    st = res.summary.set_index("slide")
    assert st.status.to_dict() == {
        "boxes": "failed",
        "demo_000": "done",
        "demo_001": "skipped",
        "demo_002": "done",
        "unopenable": "failed",
        "unreadable": "failed",
    }
    assert "microns-per-pixel" in st.reason["boxes"] and "mpp" in st.reason["boxes"]
    assert "reading pixels failed" in st.reason["unreadable"] and "OpenSlide" in st.reason["unopenable"]
    assert "no ROI inside the slide" in st.reason["demo_001"]
    assert st.roi_mode["demo_002"] == "whole" and st.roi_mode["demo_000"] == "inside"
    assert "ghost.csv" in caplog.text  # orphan ROI file reported by the Dataset
    assert not list((tmp_path / "out").rglob("unreadable*.tfrecords"))
    check_records(res, ds)
    # the slide without mpp works once an mpp is given (annotations column)
    ann = tmp_path / "ann.csv"
    ann.write_text("slide,mpp\nboxes,0.25\n")
    ds2 = Dataset(slides, annotations=ann)
    r2 = extract_tiles(
        ds2,
        outdir=tmp_path / "out2",
        qc=None,
        tile_px=32,
        tile_um=16,
        slides=["boxes"],
        grayspace_fraction=1.0,
        workers=1,
        progress=False,
    )
    assert r2.summary.status.tolist() == ["done"] and r2.n_tiles == (300 // 64) * (250 // 64)
    check_records(r2, ds2, shift_check=False)  # flat-coloured boxes: shifts can look identical


def test_tile_larger_than_slide_and_zero_tiles_kept(demo_ds, tmp_path, caplog):
    big = extract_tiles(
        demo_ds, tile_px=64, tile_um=1000, outdir=tmp_path, qc=None, workers=1, progress=False, slides=["demo_000"]
    )
    row = big.summary.iloc[0]
    assert row.status == "empty" and row.kept == 0 and "does not fit in the slide" in row.reason
    rec = big.tile_dir / "demo_000.tfrecords"
    assert rec.is_file() and rec.stat().st_size == 0 and len(TFRecordReader(rec)) == 0  # empty but valid
    assert len(big.tiles) == 0 and list(big.tiles.columns)[:8] == [
        "loc_x",
        "loc_y",
        "grid_x",
        "grid_y",
        "roi_name",
        "roi_desc",
        "label",
        "slide",
    ]
    none = extract_tiles(demo_ds, outdir=tmp_path, qc=None, grayspace_threshold=1.0, grayspace_fraction=0.0, **FAST)
    assert (none.summary.status == "empty").all() and none.n_tiles == 0
    assert none.summary.reason.str.contains("grayspace").all() and "0 tiles kept" in caplog.text
    again = extract_tiles(demo_ds, outdir=tmp_path, qc=None, grayspace_threshold=1.0, grayspace_fraction=0.0, **FAST)
    assert (again.summary.status == "skipped").all() and (again.summary.kept == 0).all()  # empty is finished too


def test_inside_without_rois_is_skipped_with_a_reason(tiny_demo, tmp_path):
    ds = Dataset(tiny_demo / "slides")  # no ROI folder
    res = extract_tiles(ds, outdir=tmp_path, qc=None, roi_method="inside", **FAST)
    assert (res.summary.status == "skipped").all() and res.summary.reason.str.contains("no ROI file").all()
    assert res.n_tiles == 0 and res.report_path.is_file()


# ------------------------------------------------------------------------------------------- real slides


def test_real_cmu_slide(tmp_path):
    p = shared_slide("cmu_small_region.svs")
    ds = Dataset(p)
    res = extract_tiles(
        ds, outdir=tmp_path, tile_px=128, tile_um=128, qc=["otsu", "blur"], workers=1, progress=False, img_format="png"
    )
    row = res.summary.iloc[0]
    assert row.status == "done" and row.mpp == pytest.approx(0.499) and row.extract_px == 257
    assert 20 < row.kept < row.grid_tiles and row.rejected_qc > 0 and row.blur_burden is not None
    assert check_records(res, ds, max_mad=1.0) == row.kept  # PNG: only the resampling differs (none)
    mag = extract_tiles(ds, outdir=tmp_path, tile_px=128, tile_um="20x", qc=["otsu"], workers=1, progress=False)
    r = mag.summary.iloc[0]
    assert mag.tile_dir.name == "128px_20x" and r.level == 0 and r.extract_px == 128 and r.status == "done"
    check_records(mag, ds, max_mad=10.0)  # JPEG (4:2:0 chroma) on real tissue


# ------------------------------------------------------------------------------------------- report


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.stack = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.ids.add(a["id"])
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def test_report_is_valid_html_with_images_for_every_slide(tiny_demo, tmp_path):
    import base64

    slides = tmp_path / "slides"
    slides.mkdir()
    for n in ("demo_000", "demo_001"):
        os.symlink(tiny_demo / "slides" / f"{n}.svs", slides / f"{n}.svs")
    shutil.copy(shared_slide("unreadable.svs"), slides / "unreadable.svs")
    ds = Dataset(slides, rois=tiny_demo / "rois")
    res = extract_tiles(ds, outdir=tmp_path, qc=["otsu", {"name": "blur", "mpp": 2.0}], **FAST)
    text = res.report_path.read_text()
    p = _Report()
    p.feed(text)
    p.close()
    assert p.stack == [] and text.startswith("<!DOCTYPE html>")
    assert {"s-demo_000", "s-demo_001", "s-unreadable"} <= p.ids
    assert len(p.imgs) == 6  # overlay, tile map, samples for each extracted slide
    for a in p.imgs:
        assert a["src"].startswith("data:image/jpeg;base64,")
        img = cv2.imdecode(np.frombuffer(base64.b64decode(a["src"].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and min(img.shape[:2]) > 50
    assert "Needs attention" in text and "reading pixels failed" in text  # the bad slide is called out
    assert "blur burden" in text
    summ = pd.read_csv(res.summary_path)
    assert summ.slide.tolist() == ["demo_000", "demo_001", "unreadable"] and "blur_burden" in summ.columns
    assert summ.set_index("slide").blur_flagged["demo_000"]  # 15% of its tissue is blurred


@pytest.mark.slow  # a run.py subprocess (~4-5 s)
def test_task_runs_from_the_command_line(tiny_demo, tmp_path):
    from tests.conftest import tiny_demo_overrides

    out = tmp_path / "tiles"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "task=extract",
        f"task.outdir={out}",
        "task.tile_px=64",
        "task.tile_um=64",
        "task.workers=2",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        *tiny_demo_overrides(tiny_demo),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (
        "3 slide(s): 3 done, 0 skipped, 0 failed, 0 empty" in p.stdout and (out / "demo" / "64px_64um" / "report.html").is_file()
    )
    assert len(list((out / "demo" / "64px_64um").glob("*.tfrecords"))) == 3 and (tmp_path / "run" / "summary.csv").is_file()
    bad = subprocess.run(cmd + ["task.roi_method=insde"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "task.roi_method" in bad.stderr + bad.stdout and "insde" in bad.stderr + bad.stdout


def test_normalization_hook(demo_ds, tmp_path):
    from histolight.errors import ConfigError

    one = dict(FAST, slides=["demo_000"], qc=None, img_format="png")
    plain = extract_tiles(demo_ds, outdir=tmp_path / "plain", **one)
    tiles = {}
    for src in ("v1", "context"):
        res = extract_tiles(demo_ds, outdir=tmp_path / src, normalizer="reinhard", normalizer_source=src, **one)
        row = res.summary.iloc[0]
        assert row.status == "done" and row.kept == plain.summary.iloc[0].kept and "reinhard" in row.normalizer
        assert ("context set" in row.normalizer) == (src == "context")
        tiles[src] = decode_image(TFRecordReader(res.tile_dir / "demo_000.tfrecords").read(0)["image_raw"])
    ref = decode_image(TFRecordReader(plain.tile_dir / "demo_000.tfrecords").read(0)["image_raw"])
    assert np.abs(tiles["v1"].astype(int) - ref).mean() > 2 and np.abs(tiles["context"].astype(int) - tiles["v1"]).mean() > 0.5
    with pytest.raises(ConfigError, match="macenkoo"):
        extract_tiles(demo_ds, outdir=tmp_path / "bad", normalizer="macenkoo", **one)
    with pytest.raises(ConfigError, match="sigmaa"):
        extract_tiles(demo_ds, outdir=tmp_path / "bad", **{**one, "qc": [{"name": "blur", "sigmaa": 1}]})
    assert not list((tmp_path / "bad").rglob("*.tfrecords"))


def test_report_renders_in_chromium(demo_ds, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no Chromium installed (apt-get install -y chromium) for the screenshot check")
    res = extract_tiles(demo_ds, outdir=tmp_path, qc=["otsu"], **{**FAST, "slides": ["demo_000"]})
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            exe,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,1400",
            f"--screenshot={shot}",
            res.report_path.as_uri(),
        ],
        capture_output=True,
        timeout=60,
    )
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (1400, 1200)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    assert (hsv[..., 1] > 60).mean() > 0.04  # the slide images (stained tissue, overlays) are drawn, not a blank page
