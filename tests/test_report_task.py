"""``task=report`` / :func:`histolight.extract.tfreport.tfrecord_report`: a report on any folder of TFRecords (no tile
table, no index files, e.g. written by Slideflow), records read with CRC checks, and the report as PDF."""

from __future__ import annotations

import html
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from histolight.io.tfrecord import TFRecordWriter
from tests.conftest import compose_config, run_task


def _jpeg(seed: int, px: int = 32) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (px, px, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


@pytest.fixture
def slideflow_folder(tmp_path) -> Path:
    """TFRecords only: ``a`` (6 tiles with locations), ``b`` (3 tiles, no locations), ``empty`` (no records) and
    ``corrupt`` (a flipped byte in its second record)."""
    d = tmp_path / "tfrecords"
    d.mkdir()
    with TFRecordWriter(d / "a.tfrecords", "a", write_index=False) as w:
        for i in range(6):
            w.write_tile(_jpeg(i), 16 + 32 * (i % 3), 16 + 32 * (i // 3))
    with TFRecordWriter(d / "b.tfrecords", write_index=False) as w:
        for i in range(3):
            w.write({"image_raw": _jpeg(10 + i), "slide": b"b"})
    with TFRecordWriter(d / "empty.tfrecords", write_index=False):
        pass
    with TFRecordWriter(d / "corrupt.tfrecords", "corrupt", write_index=False) as w:
        for i in range(3):
            w.write_tile(_jpeg(20 + i), 16, 16 + 32 * i)
    raw = bytearray((d / "corrupt.tfrecords").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "corrupt.tfrecords").write_bytes(bytes(raw))
    return d


def test_task_report_on_a_folder_of_tfrecords_without_index_or_table(slideflow_folder, tmp_path):
    before = sorted(p.name for p in slideflow_folder.iterdir())
    out = tmp_path / "out"
    assert run_task(["task=report", f"task.tfrecords={slideflow_folder}", "task.samples=4"], out) == 2  # corrupt fails
    t = pd.read_csv(out / "tfrecord_report.csv").set_index("slide")
    assert t.loc["a", "status"] == "done" and t.loc["a", "n_tiles"] == 6 and t.loc["a", "n_locations"] == 6
    assert t.loc["a", "tile_px"] == "32x32"
    assert t.loc["b", "status"] == "done" and t.loc["b", "n_tiles"] == 3 and t.loc["b", "n_locations"] == 0
    assert t.loc["empty", "status"] == "empty" and "no records" in t.loc["empty", "reason"]
    assert t.loc["corrupt", "status"] == "failed" and "record 1" in t.loc["corrupt", "reason"]
    page = (out / "tfrecord_report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/jpeg;base64,") == 3  # a: samples+map, b: samples
    assert "carry no loc_x/loc_y" in page and html.escape(t.loc["corrupt", "reason"]) in page
    samples = cv2.imread(str(out / "tfrecord_report" / "a.samples.jpg"))
    assert samples is not None and samples.shape[1] > 4 * 32  # 4 tiles in a row
    assert sorted(p.name for p in slideflow_folder.iterdir()) == before  # nothing written into the user's folder
    assert run_task(["task=report", f"task.tfrecords={slideflow_folder}", "task.allow_failures=true"], tmp_path / "o2") == 0


def test_task_report_needs_a_source_and_says_so(tmp_path):
    from histolight.errors import ConfigError
    from histolight.tasks import get_task

    with pytest.raises(ConfigError, match="task.tfrecords=null needs task.tile_px and task.tile_um"):
        get_task("report")(compose_config(["logger=none", "task=report", "task.tile_px=null"], tmp_path))
    with pytest.raises(ConfigError, match="samples=0 is invalid: must be an integer >= 1"):
        get_task("report")(compose_config(["logger=none", "task=report", "task.tfrecords=x", "task.samples=0"], tmp_path))


@pytest.mark.slow  # headless Chromium prints the page (~5-10 s)
def test_report_as_pdf(slideflow_folder, tmp_path):
    from histolight.extract.tfreport import find_browser, html_to_pdf, tfrecord_report

    if find_browser() is None:
        pytest.skip("no Chromium installed (apt-get install -y chromium); CI installs it")
    rep = tfrecord_report(sorted(slideflow_folder.glob("[ab].tfrecords")), tmp_path / "r", pdf=True, progress=False)
    assert rep.pdf == tmp_path / "r" / "tfrecord_report.pdf"
    data = rep.pdf.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 5000
    assert html_to_pdf(rep.html, tmp_path / "copy.pdf").read_bytes().startswith(b"%PDF-")


def test_pdf_without_chromium_says_how_to_install_it(tmp_path, monkeypatch):
    from histolight.errors import HistolightError
    from histolight.extract import tfreport

    page = tmp_path / "r.html"
    page.write_text("<html><body>x</body></html>")
    monkeypatch.setattr(tfreport.shutil, "which", lambda name: None)
    with pytest.raises(HistolightError, match="apt-get install -y chromium"):
        tfreport.html_to_pdf(page)
