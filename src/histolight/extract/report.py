"""Extraction report: per-slide images (QC/ROI overlay, tile map, sample tiles) and one HTML page.

The HTML is self-contained (images embedded as base64 JPEG) so it can be mailed or opened from
anywhere; cohort totals and a "needs attention" list come first, then one row per slide and one
section per slide. A CSV summary (one row per slide) sits beside it.
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

log = logging.getLogger(__name__)

THUMB_PX = 640
SAMPLE_COLS = 6

#: RGB colours of tile states on the tile map (None = not drawn).
STATE_COLORS = {"kept": (40, 200, 60), "qc": (120, 120, 120), "grayspace": (240, 200, 0), "whitespace": (0, 200, 230)}
QC_COLORS = {"background": (70, 110, 230), "blur": (230, 30, 30), "other": (170, 60, 200)}
ROI_COLORS = {"tumor": (200, 0, 0), "stroma": (230, 120, 180), "necrosis": (40, 40, 40), "tissue": (20, 120, 200)}


def _roi_color(label: str | None) -> tuple[int, int, int]:
    if label in ROI_COLORS:
        return ROI_COLORS[label]
    import zlib

    h = zlib.crc32((label or "").encode())
    return (h & 255, (h >> 8) & 255, (h >> 16) & 255)


def _tint(img: np.ndarray, mask: np.ndarray, color, alpha: float) -> None:
    """Blend ``color`` into ``img`` (in place) where ``mask``: ``img * (1 - alpha) + color * alpha``, truncated."""
    if mask is None or not mask.any():
        return
    lut = (np.arange(256, dtype=np.float32)[:, None] * (1 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)
    cv2.copyTo(cv2.LUT(img, lut.reshape(256, 1, 3)), mask.view(np.uint8), img)


def _save_jpg(img: np.ndarray, path: Path, quality: int = 85) -> None:
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
            _tint(ov, bg_s, QC_COLORS["background"], 0.35)
        if blur_s is not None:
            other &= ~blur_s
            _tint(ov, blur_s & ~bg_s if bg_s is not None else blur_s, QC_COLORS["blur"], 0.5)
        _tint(ov, other, QC_COLORS["other"], 0.45)
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
                _tint(tm, layer == s, col, 0.3 if name == "qc" else 0.55)
        # grid lines of kept tiles when they are large enough to see
        if (x1 - x0).mean() >= 6:
            for i in np.flatnonzero(plan.status == 0).tolist():
                cv2.rectangle(tm, (int(x0[i]), int(y0[i])), (int(x1[i]), int(y1[i])), (20, 120, 30), 1)
    for r in plan.rois:
        col = _roi_color(r.label)
        for poly in r.polygons:
            pts = np.round(np.asarray(poly.exterior.coords)[:, :2] * [sx, sy]).astype(np.int32)
            cv2.polylines(tm, [pts], True, col, 1, lineType=cv2.LINE_AA)
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
    _save_jpg(ov, md / f"{name}.overlay.jpg")
    _save_jpg(tm, md / f"{name}.tilemap.jpg")
    mont = sample_montage(kept_samples, rejected_samples)
    p = md / f"{name}.samples.jpg"
    if mont is not None:
        _save_jpg(mont, p, 90)
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
.imgs img{max-width:640px;max-height:480px;border:1px solid #ccc}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:3px;vertical-align:middle;border:1px solid #999}
.attn li{margin:2px 0} .reason{color:#a00}
"""


def _img_tag(path: Path, alt: str, embed: bool, rel_to: Path) -> str:
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
    def sw(c):
        return f"background:rgb{tuple(c)}"

    qc = "".join(f'<span><i style="{sw(c)}"></i>{k}</span>' for k, c in QC_COLORS.items())
    st = "".join(f'<span><i style="{sw(c)}"></i>{k}</span>' for k, c in STATE_COLORS.items())
    return (
        f'<div class="legend">QC overlay: {qc} &nbsp; ROI outlines coloured by label</div>'
        f'<div class="legend">Tile map: {st} (tiles outside ROIs not drawn)</div>'
    )


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
        out.append("0 tiles kept")
    if row.get("blur_flagged"):
        out.append(f"blur burden {_fmt_pct(row.get('blur_burden'))}")
    tf = row.get("tissue_fraction")
    if (
        is_extracted(row)
        and st != "empty"
        and tf is not None
        and not (isinstance(tf, float) and np.isnan(tf))
        and tf < low_tissue
    ):
        out.append(f"little tissue ({_fmt_pct(tf)})")
    return out


def write_report(
    summary: pd.DataFrame,
    meta_dir: str | os.PathLike,
    html_path: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    title: str = "Tile extraction",
    settings: dict | None = None,
    embed: bool | None = None,
) -> Path:
    """Write the HTML report (and the CSV summary) for ``summary`` (one row per slide, see ``SlideResult``;
    statuses ``done``, ``empty``, ``skipped``, ``failed``).

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
    n = len(rows)
    by = lambda s: sum(1 for r in rows if r.get("status") == s)  # noqa: E731
    kept = int(sum(int(r.get("kept") or 0) for r in rows))
    rej = {k: int(sum(int(r.get(f"rejected_{k}") or 0) for r in rows)) for k in ("roi", "qc", "grayspace", "whitespace")}
    flagged = [(r["slide"], attention(r)) for r in rows if attention(r)]
    earlier = sum(1 for r in rows if r.get("status") == "skipped" and is_extracted(r))
    cards = [
        ("slides", n, False),
        ("extracted", by("done"), False),
        ("already extracted", earlier, False),
        ("0 tiles", by("empty"), by("empty") > 0),
        ("failed", by("failed"), by("failed") > 0),
        ("skipped", by("skipped") - earlier, by("skipped") > earlier),
        ("tiles kept", kept, False),
        ("rejected: ROI", rej["roi"], False),
        ("rejected: QC", rej["qc"], False),
        ("rejected: grayspace", rej["grayspace"], False),
        ("rejected: whitespace", rej["whitespace"], False),
        ("need attention", len(flagged), len(flagged) > 0),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if settings:
        s = ", ".join(f"{k}={v}" for k, v in settings.items())
        out.append(f'<div class="sub">{html.escape(s)}</div>')
    out.append(
        '<div class="totals">'
        + "".join(
            f'<div class="card{" bad" if bad else ""}"><b>{v}</b><span>{html.escape(k)}</span></div>' for k, v, bad in cards
        )
        + "</div>"
    )
    if flagged:
        out.append('<h2>Needs attention</h2><ul class="attn">')
        for name, why in flagged:
            out.append(
                f'<li><a href="#s-{html.escape(name)}">{html.escape(name)}</a>: '
                f'<span class="reason">{html.escape("; ".join(why))}</span></li>'
            )
        out.append("</ul>")
    # summary table
    out.append(
        "<h2>Slides</h2><table><tr><th class='l'>slide</th><th class='l'>status</th><th>kept</th><th>grid</th>"
        "<th>ROI</th><th>QC</th><th>gray</th><th>white</th><th>tissue</th><th>blur burden</th><th class='l'>ROIs</th>"
        "<th>mpp</th><th>s</th></tr>"
    )
    for r in rows:
        flag = attention(r)
        cls = "fail" if r.get("status") == "failed" else ("flag" if flag else "")
        out.append(
            f"<tr class='{cls}'><td class='l'><a href='#s-{html.escape(r['slide'])}'>{html.escape(r['slide'])}</a></td>"
            f"<td class='l'>{_badge(r)}</td><td>{int(r.get('kept') or 0)}</td>"
            f"<td>{int(r.get('grid_tiles') or 0)}</td><td>{int(r.get('rejected_roi') or 0)}</td><td>{int(r.get('rejected_qc') or 0)}</td>"
            f"<td>{int(r.get('rejected_grayspace') or 0)}</td><td>{int(r.get('rejected_whitespace') or 0)}</td>"
            f"<td>{_fmt_pct(r.get('tissue_fraction'))}</td>"
            f"<td{' class=reason' if r.get('blur_flagged') else ''}>{_fmt_pct(r.get('blur_burden'))}</td>"
            f"<td class='l'>{html.escape(str(r.get('roi_mode') or '-'))} ({r.get('n_rois') if r.get('n_rois') is not None else '-'})</td>"
            f"<td>{_fmt_num(r.get('mpp'))}</td>"
            f"<td>{float(r.get('seconds') or 0):.1f}</td></tr>"
        )
    out.append("</table>")
    out.append(_legend())
    # per-slide sections
    for r in rows:
        name = r["slide"]
        flag = attention(r)
        out.append(f'<div class="slide{" flagged" if flag else ""}" id="s-{html.escape(name)}">')
        out.append(f"<h3>{html.escape(name)} {_badge(r)}</h3>")
        if flag:
            out.append(f"<div class='reason'>{html.escape('; '.join(flag))}</div>")
        if not is_extracted(r):
            out.append("</div>")
            continue
        out.append(
            f"<div>kept <b>{int(r.get('kept') or 0)}</b> of {int(r.get('grid_tiles') or 0)} grid tiles; rejected: "
            f"ROI {int(r.get('rejected_roi') or 0)}, QC {int(r.get('rejected_qc') or 0)}, grayspace {int(r.get('rejected_grayspace') or 0)}, "
            f"whitespace {int(r.get('rejected_whitespace') or 0)}. Tissue {_fmt_pct(r.get('tissue_fraction'))}, "
            f"blur burden {_fmt_pct(r.get('blur_burden'))}. QC: {html.escape(str(r.get('qc') or 'none'))}; "
            f"ROIs: {html.escape(str(r.get('roi_mode')))}; level {r.get('level')}, {r.get('extract_px')} base px per tile.</div>"
        )
        if r.get("status") == "empty" and r.get("reason"):
            out.append(f"<div class='reason'>{html.escape(str(r.get('reason')))}</div>")
        out.append('<div class="imgs">')
        for suffix, cap in (
            ("overlay", "QC mask and ROIs"),
            ("tilemap", "tiles kept / rejected"),
            ("samples", "sample tiles (rejected framed red)"),
        ):
            tag = _img_tag(md / f"{name}.{suffix}.jpg", f"{name} {cap}", embed, html_path.parent)
            out.append(f"<figure>{tag}<figcaption>{html.escape(cap)}</figcaption></figure>")
        out.append("</div></div>")
    out.append("</body></html>")
    atomic_write_text(html_path, "\n".join(out))
    return html_path
