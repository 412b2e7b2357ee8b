"""One colour per label across every picture (segmentation overlays, heatmaps, extraction report), legends, titles.

Colours are RGB ``(r, g, b)`` tuples of ints 0-255; images are ``H x W x 3`` uint8 RGB arrays.

- :func:`label_color`: the colour of a label name. The demo labels and common names are fixed
  (:data:`LABEL_COLORS`); any other name gets a deterministic colour from a CRC32 of the name (the same in every
  process, run and machine), a saturated hue kept away from the reserved magenta of :data:`QC_REJECTED`.
- :data:`BACKGROUND` (white: no tissue / no prediction / no tile) and :data:`QC_REJECTED` (magenta) are
  reserved and never given to a label.
- :func:`blend_labels`: tint an image by a label map so the label colours stay recognisable (the tissue
  under a label is shown in grey, then tinted, so pink stroma under a green label reads green, not grey).
- :func:`legend_image` / :func:`legend_html`: a colour key as pixels or HTML; :func:`titled`, :func:`panels`:
  title bars and side-by-side panels with a legend below.
"""

from __future__ import annotations

import colorsys
import functools
import html
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]

#: no tissue / no prediction / no tile (white, like the slide's glass)
BACKGROUND: Color = (255, 255, 255)
#: tiles or areas rejected by quality control (magenta: no label colour comes near it)
QC_REJECTED: Color = (230, 0, 200)

#: fixed colours of the demo labels and common names; any other label: :func:`label_color`
LABEL_COLORS: dict[str, Color] = {
    "background": BACKGROUND,
    "tumor": (215, 35, 45),
    "stroma": (35, 160, 65),
    "necrosis": (150, 95, 25),
    "tissue": (30, 110, 220),
    "nucleus": (0, 175, 200),
    "normal": (240, 170, 20),
    "lymphocytes": (95, 60, 190),
    "fat": (245, 225, 60),
}

_TEXT: Color = (30, 30, 30)


def label_color(label: str | None) -> Color:
    """RGB colour of ``label`` (None / empty: :data:`BACKGROUND`). Fixed for :data:`LABEL_COLORS`, else a hue from
    the CRC32 of the name (hue in 0-265 degrees, saturation 0.75, value 0.85): stable across processes and runs."""
    if not label:
        return BACKGROUND
    key = str(label)
    if key in LABEL_COLORS:
        return LABEL_COLORS[key]
    if key.lower() in LABEL_COLORS:
        return LABEL_COLORS[key.lower()]
    h = zlib.crc32(key.encode("utf-8"))
    hue = (h % 266) / 360.0  # red .. violet, never the magenta of QC_REJECTED
    sat = 0.65 + ((h >> 9) % 4) * 0.1
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.85)
    return (round(r * 255), round(g * 255), round(b * 255))


def label_colors(labels: Sequence[str]) -> dict[str, Color]:
    """``{label: colour}`` of ``labels`` (in order)."""
    return {str(lab): label_color(lab) for lab in labels}


def palette(labels: Sequence[str]) -> np.ndarray:
    """``(len(labels), 3)`` uint8 colours of ``labels``: row ``i`` = :func:`label_color` of ``labels[i]``, so a class
    map indexed like ``labels`` (e.g. ``["background", "tumor", ...]``) becomes RGB by ``palette(labels)[map]``."""
    return np.array([label_color(lab) for lab in labels], np.uint8).reshape(-1, 3)


def colorize(labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 picture of a class map ``(H, W)`` (values index ``class_names``) or of a multilabel map
    ``(N, H, W)`` (0/1 per label ``class_names[i]``; pixels with several labels get the mean of their colours,
    pixels with none :data:`BACKGROUND`)."""
    if labels.ndim == 3:
        pal = palette(class_names).astype(np.float32)
        on = labels.astype(np.float32)
        cnt = on.sum(0)
        rgb = np.tensordot(on, pal, axes=(0, 0)) / np.maximum(cnt, 1)[..., None]
        rgb[cnt == 0] = BACKGROUND
        return rgb.astype(np.uint8)
    n = max(len(class_names), int(labels.max(initial=0)) + 1)
    names = [*class_names, *(f"class {i}" for i in range(len(class_names), n))]
    return palette(names)[labels]


def blend_labels(image: np.ndarray, colors: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``image`` with ``colors`` (``H x W x 3``) blended in where ``mask`` (``H x W`` bool), elsewhere untouched.

    Under the mask the image is first turned grey (its luminance), then mixed with the colour
    (``grey * (1 - alpha) + colour * alpha``): the hue is the label's alone, and the texture shows through."""
    out = image.copy()
    if not mask.any():
        return out
    im = image.astype(np.float32)
    grey = im @ np.array([0.299, 0.587, 0.114], np.float32)
    mixed = grey[..., None] * (1 - alpha) + colors.astype(np.float32) * alpha
    out[mask] = mixed[mask].clip(0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------- text, legends, panels


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def text_size(text: str, font_px: int = 14) -> tuple[int, int]:
    """``(width, height)`` px of ``text`` drawn at ``font_px``."""
    x0, y0, x1, y1 = _font(font_px).getbbox(text or " ")
    return int(x1), int(max(y1, font_px))


def titled(image: np.ndarray, title: str, font_px: int = 16, pad: int = 6) -> np.ndarray:
    """``image`` under a white title bar holding ``title`` (the result is at least as wide as the title)."""
    tw, th = text_size(title, font_px)
    h, w = image.shape[:2]
    out = np.full((h + th + 2 * pad, max(w, tw + 2 * pad), 3), 255, np.uint8)
    out[th + 2 * pad :, :w] = image
    pil = Image.fromarray(out)
    ImageDraw.Draw(pil).text((pad, pad), title, fill=_TEXT, font=_font(font_px))
    return np.asarray(pil).copy()


def legend_image(
    entries: Mapping[str, Sequence[int]], title: str | None = None, font_px: int = 14, max_width: int = 900
) -> np.ndarray:
    """A colour key: one framed swatch + name per entry (``{name: rgb}``), in rows wrapped at ``max_width`` px,
    after an optional ``title``; white background, ``H x W x 3`` uint8."""
    sw, gap, pad = font_px, 8, 6
    items: list[tuple[str, Sequence[int], int]] = []
    if title:
        items.append((title + ":", (), text_size(title + ":", font_px)[0]))
    items += [(str(k), c, sw + 4 + text_size(str(k), font_px)[0]) for k, c in entries.items()]
    rows, cur, width = [[]], pad, pad
    for it in items:
        if cur + it[2] > max_width and rows[-1]:
            rows.append([])
            cur = pad
        rows[-1].append((cur, it))
        cur += it[2] + 2 * gap
        width = max(width, cur)
    line = text_size("Ag", font_px)[1] + 6
    pil = Image.new("RGB", (width + pad, len(rows) * line + 2 * pad), (255, 255, 255))
    d = ImageDraw.Draw(pil)
    for r, row in enumerate(rows):
        y = pad + r * line
        for x, (name, col, _) in row:
            if len(col):
                d.rectangle([x, y + 2, x + sw - 1, y + sw + 1], fill=tuple(int(v) for v in col), outline=(90, 90, 90))
                x += sw + 4
            d.text((x, y), name, fill=_TEXT, font=_font(font_px))
    return np.asarray(pil).copy()


def legend_html(entries: Mapping[str, Sequence[int]], title: str | None = None, outline: bool = False) -> str:
    """A colour key as HTML: ``<div class="legend">`` of ``<span><i style=...></i>name</span>`` items;
    ``outline``: hollow swatches (for outline colours, e.g. ROI borders)."""

    def sw(c) -> str:
        rgb = f"rgb({int(c[0])},{int(c[1])},{int(c[2])})"
        return f"border:3px solid {rgb};background:transparent" if outline else f"background:{rgb}"

    body = "".join(f'<span><i style="{sw(c)}"></i>{html.escape(str(k))}</span>' for k, c in entries.items())
    head = f"{html.escape(title)}: " if title else ""
    return f'<div class="legend">{head}{body}</div>'


def panels(
    images: Sequence[tuple[np.ndarray, str]], legend: np.ndarray | None = None, gap: int = 8, font_px: int = 16
) -> np.ndarray:
    """``[(image, title), ...]`` side by side, each in a 1 px grey frame under its title bar, ``gap`` px apart
    (white), with ``legend`` (e.g. :func:`legend_image`) below; ``H x W x 3`` uint8."""
    tiles = [titled(np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=160), t, font_px) for im, t in images]
    h = max(t.shape[0] for t in tiles)
    w = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    rows = [np.full((h, w, 3), 255, np.uint8)]
    x = 0
    for t in tiles:
        rows[0][: t.shape[0], x : x + t.shape[1]] = t
        x += t.shape[1] + gap
    if legend is not None:
        lw = max(w, legend.shape[1])
        rows = [np.pad(r, ((0, 0), (0, lw - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
        rows.append(np.pad(legend, ((0, 0), (0, lw - legend.shape[1]), (0, 0)), constant_values=255))
    return np.concatenate(rows, 0)


__all__ = [
    "BACKGROUND",
    "QC_REJECTED",
    "LABEL_COLORS",
    "label_color",
    "label_colors",
    "palette",
    "colorize",
    "blend_labels",
    "text_size",
    "titled",
    "legend_image",
    "legend_html",
    "panels",
]
