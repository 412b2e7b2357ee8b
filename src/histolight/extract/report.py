"""Extraction report: per-slide images (QC/ROI overlay, tile map, sample tiles) and one HTML page.

The HTML is self-contained (images embedded as base64 JPEG) so it can be mailed or opened from
anywhere; cohort totals, the distribution of blur burden across slides and a "needs attention" list come first,
then one row per slide and one section per slide. A CSV summary (one row per slide) sits beside it, and
:data:`BLUR_LIST` (the slides over the blur-burden limit, one name per line) too.

Colours: ROI outlines in their label's colour and QC-rejected tiles in :data:`histolight.viz.QC_REJECTED`, the
colours of every histolight picture (:mod:`histolight.viz`); each overlay and tile map carries its key.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from histolight.extract.layout import REASONS, is_extracted
from histolight.io.atomic import atomic_write, atomic_write_text
from histolight.viz import QC_REJECTED, label_color, legend_html, legend_image

log = logging.getLogger(__name__)

THUMB_PX = 640
SAMPLE_COLS = 6

#: the slides over the blur-burden limit, one name per line, written beside the report (the TFRecords folder)
BLUR_LIST = "blur_flagged.txt"

#: RGB colours of tile states on the tile map (None = not drawn).
STATE_COLORS = {"kept": (40, 200, 60), "qc": QC_REJECTED, "grayspace": (240, 200, 0), "whitespace": (0, 200, 230)}
#: RGB tints of the QC overlay: not tissue (the tissue detector), blurry, rejected by another QC method
QC_COLORS = {"not tissue": (90, 90, 90), "blur": QC_REJECTED, "other QC": (255, 130, 0)}
_QC_ALPHA = {"not tissue": 0.35, "blur": 0.55, "other QC": 0.5}
_STATE_ALPHA = {"qc": 0.6}


def _roi_color(label: str | None) -> tuple[int, int, int]:
    return label_color(label or "unlabelled")


def _with_key(img: np.ndarray, entries: dict, title: str) -> np.ndarray:
    """``img`` over a colour key (``{name: rgb}``) as wide as the image."""
    key = legend_image(entries, title=title, font_px=16, max_width=img.shape[1])
    w = max(img.shape[1], key.shape[1])
    pad = [np.pad(a, ((0, 0), (0, w - a.shape[1]), (0, 0)), constant_values=255) for a in (img, key)]
    return np.concatenate(pad, 0)


def _tint(img: np.ndarray, mask: np.ndarray, color, alpha: float) -> None:
    """Blend ``color`` into ``img`` (in place) where ``mask``: ``img * (1 - alpha) + color * alpha``, truncated."""
    if mask is None or not mask.any():
        return
    lut = (np.arange(256, dtype=np.float32)[:, None] * (1 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)
    cv2.copyTo(cv2.LUT(img, lut.reshape(256, 1, 3)), mask.view(np.uint8), img)


def save_jpg(img: np.ndarray, path: Path, quality: int = 85) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    with atomic_write(path, "wb", fsync=False) as f:
        f.write(buf.tobytes())


def overlay_images(slide, plan, thumb: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(QC + ROI overlay, tile map) RGB images of the slide thumbnail (long side :data:`THUMB_PX`; the slide's overview,
    which reuses the picture its QC read)."""
    if thumb is None:
        thumb = slide.overview(max_size=THUMB_PX)
    th, tw = thumb.shape[:2]
    W, H = slide.dimensions
    sx, sy = tw / W, th / H
    ov = thumb.copy()
    q = plan.qc
    if q.mask is not None:

        def fit(m):
            return None if m is None else cv2.resize(m.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST) > 0

        comb = q.mask.resized((th, tw))
        bg_s, blur_s = fit(q.preview.get("tissue_background")), fit(q.preview.get("blur"))
        other = comb.copy()
        if bg_s is not None:
            other &= ~bg_s
            _tint(ov, bg_s, QC_COLORS["not tissue"], _QC_ALPHA["not tissue"])
        if blur_s is not None:
            other &= ~blur_s
            _tint(ov, blur_s & ~bg_s if bg_s is not None else blur_s, QC_COLORS["blur"], _QC_ALPHA["blur"])
        _tint(ov, other, QC_COLORS["other QC"], _QC_ALPHA["other QC"])
    lw = max(1, round(max(th, tw) / 320))
    for r in plan.rois:
        col = _roi_color(r.label)
        for poly in r.polygons:
            for ring in [poly.exterior, *poly.interiors]:
                pts = np.round(np.asarray(ring.coords)[:, :2] * [sx, sy]).astype(np.int32)
                cv2.polylines(ov, [pts], True, col, lw, lineType=cv2.LINE_AA)
    # tile map: states on a dimmed thumbnail
    tm = cv2.LUT(thumb, (np.arange(256, dtype=np.float32) * 0.55 + 255 * 0.45).astype(np.uint8))
    g = plan.grid
    if len(g):
        layer = np.zeros((th, tw), np.int8) - 1
        e = g.extract_px
        x0 = np.floor(g.x * sx).astype(int)
        y0 = np.floor(g.y * sy).astype(int)
        x1 = np.maximum(x0, np.ceil((g.x + e) * sx).astype(int) - 1)
        y1 = np.maximum(y0, np.ceil((g.y + e) * sy).astype(int) - 1)
        order = np.argsort(plan.status == 0, kind="stable")  # kept drawn last (on top)
        for i in order.tolist():
            s = int(plan.status[i])
            if REASONS[s] == "roi":
                continue
            layer[y0[i] : y1[i] + 1, x0[i] : x1[i] + 1] = s
        for s, name in enumerate(REASONS):
            col = STATE_COLORS.get(name)
            if col is not None:
                _tint(tm, layer == s, col, _STATE_ALPHA.get(name, 0.55))
        # grid lines of kept tiles when they are large enough to see
        if (x1 - x0).mean() >= 6:
            for i in np.flatnonzero(plan.status == 0).tolist():
                cv2.rectangle(tm, (int(x0[i]), int(y0[i])), (int(x1[i]), int(y1[i])), (20, 120, 30), 1)
    for r in plan.rois:
        col = _roi_color(r.label)
        for poly in r.polygons:
            pts = np.round(np.asarray(poly.exterior.coords)[:, :2] * [sx, sy]).astype(np.int32)
            cv2.polylines(tm, [pts], True, col, 1, lineType=cv2.LINE_AA)
    rois = {f"{r.label or 'unlabelled'}": _roi_color(r.label) for r in plan.rois}
    ov = _with_key(ov, {**QC_COLORS, **rois}, "QC tint, ROI outlines" if rois else "QC tint")
    tm = _with_key(tm, {**{k: c for k, c in STATE_COLORS.items() if c is not None}, **rois}, "tiles")
    return ov, tm


def sample_montage(
    kept: Sequence[tuple[np.ndarray, str]], rejected: Sequence[tuple[np.ndarray, str]], cols: int = SAMPLE_COLS
) -> np.ndarray | None:
    """A grid of sample tiles: kept first, then rejected ones framed in red with their reason."""
    items = [(im, "") for im, _ in kept] + [(im, tag) for im, tag in rejected]
    if not items:
        return None
    s = items[0][0].shape[0]
    pad = 4
    rows = (len(items) + cols - 1) // cols
    out = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad, 3), 255, np.uint8)
    for k, (im, tag) in enumerate(items):
        r, c = divmod(k, cols)
        y, x = pad + r * (s + pad), pad + c * (s + pad)
        out[y : y + s, x : x + s] = im
        if tag:
            cv2.rectangle(out, (x, y), (x + s - 1, y + s - 1), (220, 0, 0), 2)
            cv2.putText(out, tag[:5], (x + 3, y + s - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (220, 0, 0), 1, cv2.LINE_AA)
    return out


def save_slide_images(slide, plan, kept_samples, rejected_samples, meta_dir: str | os.PathLike) -> None:
    """Write ``<slide>.overlay.jpg``, ``.tilemap.jpg`` and ``.samples.jpg`` into ``meta_dir``."""
    md = Path(meta_dir)
    name = slide.name
    ov, tm = overlay_images(slide, plan)
    save_jpg(ov, md / f"{name}.overlay.jpg")
    save_jpg(tm, md / f"{name}.tilemap.jpg")
    mont = sample_montage(kept_samples, rejected_samples)
    p = md / f"{name}.samples.jpg"
    if mont is not None:
        save_jpg(mont, p, 90)
    else:
        p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222;background:#fafafa}
h1{margin:0 0 4px 0} .sub{color:#666;margin-bottom:16px}
.totals{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:22px} .card span{color:#666;font-size:12px}
.bad b{color:#c00} table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right} th{background:#f0f0f0}
td.l,th.l{text-align:left} tr.flag td{background:#fff0f0} tr.fail td{background:#ffe0e0}
.st{border-radius:3px;padding:1px 6px;font-size:12px;color:#fff}
.st-done,.st-earlier{background:#2a2}.st-empty{background:#d80}.st-failed{background:#c00}.st-skipped{background:#888}
.slide{background:#fff;border:1px solid #ddd;border-radius:6px;margin:16px 0;padding:10px 14px}
.slide.flagged{border:2px solid #d00}
.imgs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.imgs figure{margin:0} figcaption{font-size:12px;color:#555}
.imgs img{max-width:480px;max-height:480px;border:1px solid #ccc}
.legend{margin:6px 0} .legend span{display:inline-block;margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:3px;vertical-align:middle;border:1px solid #999}
.attn li{margin:2px 0} .reason{color:#a00} svg.plot{background:#fff;border:1px solid #ddd}
"""


def img_tag(path: Path, alt: str, embed: bool, rel_to: Path) -> str:
    if not path.is_file():
        return f'<div class="reason">({html.escape(alt)}: no image)</div>'
    if embed:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        src = f"data:image/jpeg;base64,{b64}"
    else:
        src = html.escape(os.path.relpath(path, rel_to))
    return f'<img src="{src}" alt="{html.escape(alt)}">'


def _fmt_pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.1f}%"


def _fmt_num(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{float(v):.3g}"


def _legend() -> str:
    qc = legend_html(QC_COLORS, "QC tint on the overlay")
    st = legend_html({k: c for k, c in STATE_COLORS.items() if c is not None}, "Tile map")
    return (
        f"{qc}{st}<div class='legend'>ROI outlines: coloured by label, the key under each overlay "
        "(tiles outside ROIs are not drawn on the tile map)</div>"
    )


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _txt(v, default: str = "-") -> str:
    """``v`` as escaped HTML text; ``default`` when missing (None, NaN, empty); whole floats without ``.0``."""
    if _missing(v) or v == "":
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return html.escape(str(v))


def _int(row: dict, key: str) -> int:
    v = row.get(key)
    return 0 if _missing(v) else int(v)


def empty_cause(row: dict) -> str:
    """Why an extracted slide kept 0 tiles: ``no tile fits the slide``, ``no tissue``, ``all outside ROIs``,
    ``all rejected by QC``, ``all grayspace/whitespace`` or ``rejected by several filters``."""
    grid = _int(row, "grid_tiles")
    if grid == 0:
        return "no tile fits the slide"
    tf = row.get("tissue_fraction")
    if not _missing(tf) and float(tf) == 0:
        return "no tissue"
    for key, why in (("rejected_roi", "all outside ROIs"), ("rejected_qc", "all rejected by QC")):
        if _int(row, key) >= grid:
            return why
    if _int(row, "rejected_grayspace") + _int(row, "rejected_whitespace") >= grid:
        return "all grayspace/whitespace"
    return "rejected by several filters"


def _roi_cell(row: dict) -> str:
    mode, n = row.get("roi_mode"), row.get("n_rois")
    if _missing(mode) or not mode:
        return "-"
    return html.escape(str(mode)) + ("" if _missing(n) else f" ({int(n)})")


def _zero_card(rows: list[dict]) -> tuple[str, str]:
    """(value, caption) of the "0 tiles kept" card: slides extracted with no tile kept, and why; failed slides apart."""
    causes: dict[str, int] = {}
    for r in rows:
        if r.get("status") == "empty":
            c = empty_cause(r)
            causes[c] = causes.get(c, 0) + 1
    why = ", ".join(f"{n} {c}" for c, n in sorted(causes.items(), key=lambda kv: -kv[1]))
    return str(sum(causes.values())), "extracted, 0 tiles kept" + (f" ({why})" if why else "")


def blur_plot_svg(burdens: Sequence[float], limit: float | None, width: int = 460, height: int = 150) -> str:
    """Inline SVG histogram of blur burden (fractions 0-1) across slides, bars over ``limit`` red, ``limit`` dashed."""
    b = np.asarray([float(v) for v in burdens], np.float64)
    top = max(0.1, 2 * (limit or 0), float(np.ceil(b.max() * 20) / 20) if len(b) else 0)
    counts, edges = np.histogram(b, bins=20, range=(0, top))
    ml, pw, ph = 34, width - 44, height - 44
    ymax = max(1, int(counts.max()))
    bw = pw / len(counts)
    out = [f'<svg class="plot" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">']
    for i, c in enumerate(counts.tolist()):
        h = ph * c / ymax
        col = "#c00" if limit is not None and edges[i] >= limit - 1e-12 else "#4a7"
        out.append(f'<rect x="{ml + i * bw + 1:.1f}" y="{10 + ph - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" fill="{col}"/>')
    y0 = 10 + ph
    out.append(f'<line x1="{ml}" y1="{y0}" x2="{ml + pw}" y2="{y0}" stroke="#333"/>')
    out.append(f'<line x1="{ml}" y1="10" x2="{ml}" y2="{y0}" stroke="#333"/>')
    for f in (0, 0.5, 1):
        out.append(f'<text x="{ml + f * pw:.1f}" y="{y0 + 14}" text-anchor="middle">{100 * f * top:.3g}%</text>')
    out.append(f'<text x="{ml - 4}" y="14" text-anchor="end">{ymax}</text><text x="{ml - 4}" y="{y0}" text-anchor="end">0</text>')
    out.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">blur burden (slides per bin)</text>')
    if limit is not None:
        x = ml + pw * min(limit, top) / top
        out.append(f'<line x1="{x:.1f}" y1="6" x2="{x:.1f}" y2="{y0}" stroke="#c00" stroke-dasharray="4,3"/>')
        out.append(f'<text x="{x + 3:.1f}" y="18" fill="#c00">limit {100 * limit:g}%</text>')
    out.append("</svg>")
    return "".join(out)


def write_blur_list(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """``path``: the names of the slides whose blur burden is over the limit (``blur_flagged``), one per line."""
    names = [str(r["slide"]) for r in rows if r.get("blur_flagged") is True or r.get("blur_flagged") == 1]
    atomic_write_text(path, "".join(f"{n}\n" for n in names))
    return Path(path)


def _badge(row: dict) -> str:
    """The status label of a slide (``skipped`` slides extracted by an earlier run say so)."""
    st = str(row.get("status"))
    if st == "skipped" and is_extracted(row):
        return f"<span class='st st-earlier' title='{html.escape(str(row.get('reason')))}'>skipped: already extracted</span>"
    return f"<span class='st st-{html.escape(st)}'>{html.escape(st)}</span>"


def attention(row: dict, low_tissue: float = 0.02) -> list[str]:
    """Why a slide deserves a look (empty list = fine)."""
    out = []
    st = row.get("status")
    if st == "failed":
        out.append(f"failed: {row.get('reason')}")
    elif st == "skipped" and not is_extracted(row):
        out.append(f"skipped: {row.get('reason')}")
    elif st == "empty":
        out.append(f"0 tiles kept: {empty_cause(row)}")
    if row.get("blur_flagged"):
        out.append(f"blur burden {_fmt_pct(row.get('blur_burden'))}")
    tf = row.get("tissue_fraction")
    if is_extracted(row) and st != "empty" and not _missing(tf) and tf < low_tissue:
        out.append(f"little tissue ({_fmt_pct(tf)})")
    return out


def html_head(title: str, settings: dict | None = None) -> list[str]:
    """The first lines of a report page: doctype, style, ``title`` and the ``settings`` line."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if settings:
        s = ", ".join(f"{k}={v}" for k, v in settings.items())
        out.append(f'<div class="sub">{html.escape(s)}</div>')
    return out


def html_cards(cards: Sequence[tuple[str, object, bool]]) -> str:
    """A row of total cards ``(caption, value, bad)`` (bad ones in red)."""
    body = "".join(
        f'<div class="card{" bad" if bad else ""}"><b>{html.escape(str(v))}</b><span>{html.escape(k)}</span></div>'
        for k, v, bad in cards
    )
    return f'<div class="totals">{body}</div>'


def write_report(
    summary: pd.DataFrame,
    meta_dir: str | os.PathLike,
    html_path: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    title: str = "Tile extraction",
    settings: dict | None = None,
    embed: bool | None = None,
    blur_limit: float | None = None,
    blur_list: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report (and the CSV summary) for ``summary`` (one row per slide, see ``SlideResult``;
    statuses ``done``, ``empty``, ``skipped``, ``failed``), and the list of slides over the blur-burden limit
    (``blur_list``; default :data:`BLUR_LIST` beside the report). ``blur_limit``: the limit (0-1) drawn on the
    blur-burden plot.

    ``embed``: embed images as base64 (default: when at most 300 slides; else link to ``meta_dir``).
    """
    html_path = Path(html_path)
    md = Path(meta_dir)
    rows = summary.to_dict("records") if len(summary) else []
    if embed is None:
        embed = len(rows) <= 300
    if csv_path is not None:
        cols = [c for c in summary.columns if c not in ("settings",)]
        atomic_write_text(csv_path, summary[cols].to_csv(index=False))
    write_blur_list(rows, blur_list if blur_list is not None else html_path.parent / BLUR_LIST)
    n = len(rows)
    by = lambda s: sum(1 for r in rows if r.get("status") == s)  # noqa: E731
    kept = sum(_int(r, "kept") for r in rows)
    rej = {k: sum(_int(r, f"rejected_{k}") for r in rows) for k in ("roi", "qc", "grayspace", "whitespace")}
    flagged = [(r["slide"], attention(r)) for r in rows if attention(r)]
    earlier = sum(1 for r in rows if r.get("status") == "skipped" and is_extracted(r))
    zero_v, zero_k = _zero_card(rows)
    blurred = sum(1 for r in rows if r.get("blur_flagged") is True or r.get("blur_flagged") == 1)
    cards = [
        ("slides", n, False),
        ("extracted", by("done"), False),
        ("already extracted", earlier, False),
        (zero_k, zero_v, by("empty") > 0),
        ("failed (see reason)", by("failed"), by("failed") > 0),
        ("skipped", by("skipped") - earlier, by("skipped") > earlier),
        ("tiles kept", kept, False),
        ("rejected: ROI", rej["roi"], False),
        ("rejected: QC", rej["qc"], False),
        ("rejected: grayspace", rej["grayspace"], False),
        ("rejected: whitespace", rej["whitespace"], False),
        ("over the blur-burden limit", blurred, blurred > 0),
        ("need attention", len(flagged), len(flagged) > 0),
    ]
    out = [*html_head(title, settings), html_cards(cards)]
    burdens = [float(r["blur_burden"]) for r in rows if not _missing(r.get("blur_burden"))]
    if burdens:
        out.append(
            f"<h2>Blur burden</h2><div>{len(burdens)} slide(s) with blur QC; {blurred} over the limit "
            f"(listed in {html.escape(BLUR_LIST if blur_list is None else os.path.basename(blur_list))} beside this "
            f"report)</div>{blur_plot_svg(burdens, blur_limit)}"
        )
    if flagged:
        out.append('<h2>Needs attention</h2><ul class="attn">')
        for name, why in flagged:
            out.append(
                f'<li><a href="#s-{html.escape(name)}">{html.escape(name)}</a>: '
                f'<span class="reason">{html.escape("; ".join(why))}</span></li>'
            )
        out.append("</ul>")
    out += _table(rows)
    out.append(_legend())
    for r in rows:
        out += _section(r, md, embed, html_path.parent)
    out.append("</body></html>")
    atomic_write_text(html_path, "\n".join(out))
    return html_path


def _table(rows: list[dict]) -> list[str]:
    out = [
        "<h2>Slides</h2><table><tr><th class='l'>slide</th><th class='l'>status</th><th>kept</th><th>grid</th>"
        "<th>ROI</th><th>QC</th><th>gray</th><th>white</th><th>tissue</th><th>blur burden</th><th class='l'>ROIs</th>"
        "<th>mpp</th><th>s</th></tr>"
    ]
    for r in rows:
        flag = attention(r)
        cls = "fail" if r.get("status") == "failed" else ("flag" if flag else "")
        head = (
            f"<tr class='{cls}'><td class='l'><a href='#s-{html.escape(r['slide'])}'>{html.escape(r['slide'])}</a></td>"
            f"<td class='l'>{_badge(r)}</td>"
        )
        if r.get("status") == "failed" or (r.get("status") == "skipped" and not is_extracted(r)):
            why = html.escape(str(r.get("reason") or "no reason recorded"))
            out.append(f"{head}<td class='l reason' colspan='10'>{why}</td><td>{float(r.get('seconds') or 0):.1f}</td></tr>")
            continue
        out.append(
            f"{head}<td>{_int(r, 'kept')}</td><td>{_int(r, 'grid_tiles')}</td><td>{_int(r, 'rejected_roi')}</td>"
            f"<td>{_int(r, 'rejected_qc')}</td><td>{_int(r, 'rejected_grayspace')}</td>"
            f"<td>{_int(r, 'rejected_whitespace')}</td><td>{_fmt_pct(r.get('tissue_fraction'))}</td>"
            f"<td{' class=reason' if r.get('blur_flagged') else ''}>{_fmt_pct(r.get('blur_burden'))}</td>"
            f"<td class='l'>{_roi_cell(r)}</td><td>{_fmt_num(r.get('mpp'))}</td>"
            f"<td>{float(r.get('seconds') or 0):.1f}</td></tr>"
        )
    out.append("</table>")
    return out


def _section(r: dict, md: Path, embed: bool, rel_to: Path) -> list[str]:
    name = r["slide"]
    flag = attention(r)
    out = [
        f'<div class="slide{" flagged" if flag else ""}" id="s-{html.escape(name)}">',
        f"<h3>{html.escape(name)} {_badge(r)}</h3>",
    ]
    if flag:
        out.append(f"<div class='reason'>{html.escape('; '.join(flag))}</div>")
    if not is_extracted(r):
        return [*out, "</div>"]
    det = _txt(r.get("tissue_detector"), "")
    det = f" Tissue detector: {det}." if det else ""
    out.append(
        f"<div>kept <b>{_int(r, 'kept')}</b> of {_int(r, 'grid_tiles')} grid tiles; rejected: "
        f"ROI {_int(r, 'rejected_roi')}, QC {_int(r, 'rejected_qc')}, grayspace {_int(r, 'rejected_grayspace')}, "
        f"whitespace {_int(r, 'rejected_whitespace')}. Tissue {_fmt_pct(r.get('tissue_fraction'))}, "
        f"blur burden {_fmt_pct(r.get('blur_burden'))}. QC: {_txt(r.get('qc'), 'none')};{det} "
        f"ROIs: {_roi_cell(r)}; level {_txt(r.get('level'))}, {_txt(r.get('extract_px'))} base px per tile.</div>"
    )
    if r.get("status") == "empty" and r.get("reason"):
        out.append(f"<div class='reason'>{html.escape(str(r.get('reason')))}</div>")
    out.append('<div class="imgs">')
    for suffix, cap in (
        ("overlay", "QC mask and ROIs"),
        ("tilemap", "tiles kept / rejected"),
        ("samples", "sample tiles (rejected framed red)"),
    ):
        tag = img_tag(md / f"{name}.{suffix}.jpg", f"{name} {cap}", embed, rel_to)
        out.append(f"<figure>{tag}<figcaption>{html.escape(cap)}</figcaption></figure>")
    out.append("</div></div>")
    return out
