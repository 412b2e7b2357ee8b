"""A report on any folder of TFRecords (:func:`tfrecord_report`, ``task=report``), and HTML -> PDF (:func:`html_to_pdf`).

The TFRecords may come from histolight or from Slideflow: nothing but the records is needed (no tile table, no index
files; none is written). Each file is read sequentially with both CRCs of every record checked
(:func:`histolight.io.tfrecord.iter_records`), so a corrupt file fails its slide with the record and byte offset.
Per slide: the tile count, the tile size, a sample of tiles (drawn evenly over the file, the same every run) and,
when the records carry ``loc_x``/``loc_y``, a map of where the tiles lie; extraction details (blur burden, QC,
tissue detector) when histolight's per-slide summary (``meta/<slide>.json``) sits beside the files.

In ``dest``: ``tfrecord_report.html`` (self-contained), ``tfrecord_report.csv`` (one row per slide: ``slide, status,
reason, seconds, file, n_tiles, tile_px, n_locations, mb`` + the summary's ``blur_burden``, ``tissue_detector``),
``tfrecord_report/<slide>.samples.jpg`` and ``.locations.jpg``, and with ``pdf=True`` ``tfrecord_report.pdf``.
"""

from __future__ import annotations

import functools
import html
import os
import shutil
import subprocess
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histolight.cohort import CohortResult, report_progress, run_per_slide
from histolight.errors import HistolightError
from histolight.extract.layout import read_meta
from histolight.extract.report import (
    STATE_COLORS,
    blur_plot_svg,
    html_cards,
    html_head,
    img_tag,
    sample_montage,
    save_jpg,
)
from histolight.io.atomic import atomic_write_text
from histolight.io.images import decode_image
from histolight.io.tfrecord import iter_records
from histolight.io.tfrecord_format import tile_record
from histolight.io.tilestore import find_tfrecords, tfrecord_slide_name
from histolight.viz import legend_image

NAME = "tfrecord_report"
MAP_PX = 480
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """Path of a Chromium/Chrome executable on ``PATH`` (None when none is installed)."""
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def html_to_pdf(html_path: str | os.PathLike, pdf_path: str | os.PathLike | None = None, timeout: float = 180) -> Path:
    """Print ``html_path`` to PDF (default: beside it, ``.pdf``) with headless Chromium (``--print-to-pdf``), atomically.

    Raises :class:`HistolightError` when no Chromium is installed (saying how to install it) or printing fails."""
    src = Path(html_path).resolve()
    dst = Path(pdf_path) if pdf_path is not None else src.with_suffix(".pdf")
    exe = find_browser()
    if exe is None:
        raise HistolightError(
            f"a PDF of {src.name} needs headless Chromium, which is not installed (looked for {', '.join(BROWSERS)}): "
            "install it (e.g. apt-get install -y chromium) or set pdf=false; the HTML report is written anyway"
        )
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer", f"--print-to-pdf={tmp}"]
    try:
        p = subprocess.run([*cmd, src.as_uri()], capture_output=True, text=True, timeout=timeout)
        if not tmp.is_file() or tmp.read_bytes()[:5] != b"%PDF-":
            raise HistolightError(f"Chromium ({exe}) did not print {src} to PDF (exit {p.returncode}): {p.stderr[-500:]}")
        os.replace(tmp, dst)
    except subprocess.TimeoutExpired:
        raise HistolightError(f"Chromium ({exe}) took over {timeout:g} s to print {src} to PDF") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def location_map(locs: np.ndarray, dims: tuple[int, int] | None, tile: float) -> np.ndarray:
    """Picture of tile centres ``locs`` (``(N, 2)`` base px) on a slide of ``dims`` (w, h base px; None = the tiles'
    extent), each tile a ``tile`` base px square; long side :data:`MAP_PX`, with a key."""
    w, h = dims or (int(locs[:, 0].max() + tile / 2) + 1, int(locs[:, 1].max() + tile / 2) + 1)
    s = MAP_PX / max(w, h)
    img = np.full((max(1, round(h * s)), max(1, round(w * s)), 3), 245, np.uint8)
    half = tile / 2
    for x, y in locs.tolist():
        p0 = (int((x - half) * s), int((y - half) * s))
        p1 = (max(p0[0], int((x + half) * s) - 1), max(p0[1], int((y + half) * s) - 1))
        cv2.rectangle(img, p0, p1, STATE_COLORS["kept"], -1)
    cv2.rectangle(img, (0, 0), (img.shape[1] - 1, img.shape[0] - 1), (120, 120, 120), 1)
    what = "slide (from the extraction summary)" if dims else "extent of the tiles (no slide size recorded)"
    key = legend_image({"tile in the TFRecord": STATE_COLORS["kept"], what: (245, 245, 245)}, font_px=13, max_width=MAP_PX)
    wd = max(img.shape[1], key.shape[1])
    return np.concatenate([np.pad(a, ((0, 0), (0, wd - a.shape[1]), (0, 0)), constant_values=255) for a in (img, key)])


def report_slide(name: str, files: dict[str, str], img_dir: str, samples: int = 12, verify: bool = True) -> dict:
    """Per-slide function of :func:`tfrecord_report`: count and sample the records of ``files[name]``, draw its images
    into ``img_dir``; returns its summary row (status ``empty`` for a file without records)."""
    path = files[name]
    for suffix in ("samples", "locations"):  # images of an earlier report on another file of that name
        (Path(img_dir) / f"{name}.{suffix}.jpg").unlink(missing_ok=True)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    picked: list[bytes] = []
    locs: list[tuple[int, int]] = []
    n = 0
    for rec in iter_records(path, verify=verify):
        t = tile_record(rec)
        if t.loc_x is not None and t.loc_y is not None:
            locs.append((t.loc_x, t.loc_y))
        j = n if n < samples else int(rng.integers(0, n + 1))  # reservoir sampling: every record equally likely
        if j < samples:
            picked[j : j + 1] = [t.image_raw]
        n += 1
        if n % 1000 == 0:
            report_progress(1000)
    meta = read_meta(Path(path).parent, name) or {}
    row = {"file": path, "n_tiles": n, "n_locations": len(locs), "mb": round(os.path.getsize(path) / 2**20, 3)}
    row.update({k: meta.get(k) for k in ("blur_burden", "tissue_detector", "qc") if meta.get(k) is not None})
    if n == 0:
        return {**row, "status": "empty", "reason": "the file holds no records"}
    tiles = [decode_image(b) for b in picked]
    row["tile_px"] = f"{tiles[0].shape[1]}x{tiles[0].shape[0]}"
    same = [t for t in tiles if t.shape == tiles[0].shape]
    save_jpg(sample_montage([(t, "") for t in same], []), Path(img_dir) / f"{name}.samples.jpg", 90)
    if locs:
        a = np.asarray(locs, np.float64)
        dims = (int(meta["width"]), int(meta["height"])) if meta.get("width") and meta.get("height") else None
        steps = [d.min() for d in (np.diff(np.unique(a[:, 0])), np.diff(np.unique(a[:, 1]))) if len(d)]
        tile = float(meta.get("extract_px") or (min(steps) if steps else max(1.0, a.min() * 2)))
        save_jpg(location_map(a, dims, tile), Path(img_dir) / f"{name}.locations.jpg")
    return row


@dataclass
class TFRecordReport:
    """What :func:`tfrecord_report` wrote: ``result`` (per-slide statuses, ``result.table``), ``html``, ``pdf`` (or None)."""

    result: CohortResult
    html: Path
    pdf: Path | None


def tfrecord_report(
    tfrecords: str | os.PathLike | Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    samples: int = 12,
    verify: bool = True,
    pdf: bool = False,
    workers: int = 1,
    title: str | None = None,
    progress: bool = True,
) -> TFRecordReport:
    """Report on the TFRecords of ``tfrecords`` (a folder, glob, file or list; e.g. Slideflow's) into ``dest``
    (format: module docstring), on the cohort runner. ``samples``: tiles shown per slide; ``verify``: check every
    record's CRCs; ``pdf``: also print the report to PDF (needs Chromium: :func:`html_to_pdf`).

    Returns a :class:`TFRecordReport` (the cohort result, the HTML and PDF paths)."""
    paths = find_tfrecords(tfrecords)
    if not paths:
        raise HistolightError(f"no TFRecords (*.tfrecords) found in {tfrecords!r}: give a folder, glob or file of TFRecords")
    files = {tfrecord_slide_name(p): str(p) for p in paths}
    dest = Path(dest)
    img_dir = dest / NAME
    img_dir.mkdir(parents=True, exist_ok=True)
    fn = functools.partial(report_slide, files=files, img_dir=str(img_dir), samples=samples, verify=verify)
    res = run_per_slide(
        sorted(files),
        fn,
        out_dir=dest,
        workers=workers,
        summary_name=f"{NAME}.csv",
        claims=False,
        desc="report",
        progress=progress,
    )
    rows = res.table.to_dict("records")
    source = tfrecords if isinstance(tfrecords, (str, os.PathLike)) else f"{len(paths)} files"
    page = write_tfrecord_html(rows, img_dir, dest / f"{NAME}.html", title or f"TFRecords {source}")
    return TFRecordReport(res, page, html_to_pdf(page) if pdf else None)


def _v(row: dict, key: str):
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


def write_tfrecord_html(rows: list[dict], img_dir: Path, html_path: Path, title: str) -> Path:
    """The HTML page of :func:`tfrecord_report` (images embedded)."""
    ok = [r for r in rows if r.get("status") == "done"]
    failed = [r for r in rows if r.get("status") == "failed"]
    burdens = [float(_v(r, "blur_burden")) for r in rows if _v(r, "blur_burden") is not None]
    cards = [
        ("slides", len(rows), False),
        ("tiles", sum(int(_v(r, "n_tiles") or 0) for r in rows), False),
        ("files without records", sum(r.get("status") == "empty" for r in rows), any(r.get("status") == "empty" for r in rows)),
        ("unreadable (see reason)", len(failed), bool(failed)),
        ("with tile locations", sum(int(_v(r, "n_locations") or 0) > 0 for r in ok), False),
    ]
    out = [*html_head(title), html_cards(cards)]
    if burdens:
        out.append(f"<h2>Blur burden</h2>{blur_plot_svg(burdens, None)}")
    out.append(
        "<h2>Slides</h2><table><tr><th class='l'>slide</th><th class='l'>status</th><th>tiles</th><th>tile px</th>"
        "<th>locations</th><th>MB</th><th>blur burden</th><th class='l'>tissue detector</th><th class='l'>reason</th></tr>"
    )
    for r in rows:
        bb = _v(r, "blur_burden")
        out.append(
            f"<tr class='{'fail' if r.get('status') == 'failed' else ''}'><td class='l'><a href='#s-{html.escape(r['slide'])}'>"
            f"{html.escape(r['slide'])}</a></td><td class='l'><span class='st st-{r['status']}'>{r['status']}</span></td>"
            f"<td>{int(_v(r, 'n_tiles') or 0)}</td><td>{html.escape(str(_v(r, 'tile_px') or '-'))}</td>"
            f"<td>{int(_v(r, 'n_locations') or 0)}</td><td>{_v(r, 'mb') or 0:.1f}</td>"
            f"<td>{'-' if bb is None else f'{100 * float(bb):.1f}%'}</td>"
            f"<td class='l'>{html.escape(str(_v(r, 'tissue_detector') or '-'))}</td>"
            f"<td class='l reason'>{html.escape(str(_v(r, 'reason') or ''))}</td></tr>"
        )
    out.append("</table>")
    for r in rows:
        name = r["slide"]
        out.append(f'<div class="slide" id="s-{html.escape(name)}"><h3>{html.escape(name)}</h3>')
        if r.get("status") != "done":
            out.append(f"<div class='reason'>{html.escape(str(_v(r, 'reason') or r.get('status')))}</div></div>")
            continue
        out.append('<div class="imgs">')
        for suffix, cap in (("samples", "sample tiles"), ("locations", "where the tiles lie")):
            p = img_dir / f"{name}.{suffix}.jpg"
            if suffix == "locations" and not p.is_file():
                out.append("<figure><figcaption>(the records carry no loc_x/loc_y)</figcaption></figure>")
                continue
            out.append(f"<figure>{img_tag(p, f'{name} {cap}', True, html_path.parent)}<figcaption>{cap}</figcaption></figure>")
        out.append("</div></div>")
    out.append("</body></html>")
    atomic_write_text(html_path, "\n".join(out))
    return html_path


__all__ = [
    "TFRecordReport",
    "tfrecord_report",
    "report_slide",
    "write_tfrecord_html",
    "location_map",
    "html_to_pdf",
    "find_browser",
]
