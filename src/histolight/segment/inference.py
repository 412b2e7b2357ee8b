"""Tiled inference: as few overlapping tiles as a memory budget allows, batched, blended; exact output size; streamed.

**Layout** (:func:`plan_tiles`). ``tile`` and ``batch_size`` set the pixels one forward pass may hold:
``batch_size * tile**2`` (the memory a caller budgets for one pass). The image is cut into the grid of equal tiles
(sides a multiple of 32) that sends the fewest pixels through the network within that budget: an image that fits
is one tile (exactly the single forward pass), a larger one a few large tiles rather than many small ones. Tiles
that border each other share a band of ``overlap * tile`` px (the blend band; 0.25 of a 256 px tile = 64 px), so
the extra pixels are a thin band per seam, not a fraction of every tile: on a 1024 x 1024 image with 256 px tiles
and batch 8, 2 x 2 tiles of 544 px (1.13x the pixels of one pass) instead of 6 x 6 tiles of 256 px (2.25x).

``max_side`` caps the tile side: a segmentation model passes its training crop (``SegmentConfig.size``), because a
network trained on small crops predicts differently on larger tiles (its BatchNorm statistics were learnt on
feature maps dominated by the crop borders: a U-Net trained on 64 px crops of synthetic nuclei scored Dice 0.18 with
one 512 px tile and 0.99 with 64 px tiles, same weights); ``tile`` then only sets how many tiles share a pass.

**Blending**: along each axis a tile's weight is 1 except in the bands shared with its neighbours, where a raised
cosine hands over to the neighbour (complementary ramps over the actual shared interval); sides on the image border
are not tapered. Weights are separable and normalised by their sums, so they form a partition of unity: no seams,
and any ``H x W`` (square or not, smaller or larger than a tile) gives exactly ``H x W`` outputs.

**Streaming** (:func:`iter_tiled_logits`): tile rows are processed top to bottom from a row reader; output rows are
yielded as soon as no later tile touches them, so a whole slide is segmented with the same tiles, weights and code as
one in-memory image while holding one band of tile rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch


def ceil_to(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)


def _axis(length: int, n: int, margin: int, multiple: int) -> tuple[int, list[int]]:
    """Side and starts of ``n`` equal tiles covering ``length`` px, each sharing at least ``2 * margin`` px with its
    neighbours (the side rounded up to ``multiple``, never beyond ``length`` rounded up)."""
    full = ceil_to(length, multiple)
    if n <= 1:
        return full, [0]
    core = math.ceil(length / n)
    size = min(full, ceil_to(core + margin * (1 if n == 2 else 2), multiple))
    last = max(0, length - size)
    return size, sorted({min(max(0, k * core - margin), last) for k in range(n)})


def _fit(length: int, max_size: int, margin: int, multiple: int) -> tuple[int, list[int]] | None:
    """The fewest tiles along an axis of ``length`` px whose side is at most ``max_size``: ``(side, starts)``, or None
    when bands of ``2 * margin`` px would take most of each tile first."""
    n = max(1, math.ceil(length / max(1, max_size)))
    while True:
        size, starts = _axis(length, n, margin, multiple)
        if size <= max_size:
            return size, starts
        if math.ceil(length / (n + 1)) < 4 * margin or n >= length:
            return None
        n += 1


def _ramps(starts: list[int], size: int, total: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per tile, its blend weights along one axis (raised-cosine hand-over across each interval it shares with a
    neighbour, 1 elsewhere); and their sum over tiles (length ``total``)."""
    ws = []
    for k, s in enumerate(starts):
        w = np.ones(size, np.float64)
        if k > 0 and starts[k - 1] + size > s:  # shared with the previous tile: ramp up
            n = starts[k - 1] + size - s
            w[:n] = np.minimum(w[:n], 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n))
        if k + 1 < len(starts) and s + size > starts[k + 1]:  # shared with the next tile: ramp down
            n = s + size - starts[k + 1]
            w[size - n :] = np.minimum(w[size - n :], 0.5 + 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n))
        ws.append(np.maximum(w, 1e-6))
    tot = np.zeros(max(total, max(starts) + size), np.float64)
    for s, w in zip(starts, ws):
        tot[s : s + size] += w
    return ws, tot


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of an ``height x width`` image go (:func:`plan_tiles`).

    Attributes:
        th, tw: tile height and width in px (multiples of 32).
        ys, xs: tile row / column starts in px (every tile is ``(ys[i], xs[j])``).
        per_pass: tiles sent through the network at once.
        height, width: the image size; ``padded_h`` / ``padded_w``: at least one tile (padding at bottom/right).
    """

    th: int
    tw: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    per_pass: int
    height: int
    width: int

    @property
    def padded_h(self) -> int:
        return max(self.height, self.ys[-1] + self.th)

    @property
    def padded_w(self) -> int:
        return max(self.width, self.xs[-1] + self.tw)

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def cost(self) -> float:
        """Pixels sent through the network over the pixels of one forward pass of the padded image (>= 1)."""
        return self.n_tiles * self.th * self.tw / (ceil_to(self.height, 32) * ceil_to(self.width, 32))


def plan_tiles(
    height: int, width: int, tile: int, overlap: float, batch_size: int = 8, multiple: int = 32, max_side: int | None = None
) -> TileLayout:
    """The tile grid for an ``height x width`` image (see the module docstring): the fewest pixels through the network
    with at most ``batch_size * tile**2`` px per forward pass, tile sides of at most ``max_side`` px (None = no limit)
    and neighbours sharing ``overlap`` of the tile side (``overlap * min(tile, max_side)`` px)."""
    if not 0 <= overlap < 0.5:
        raise ValueError(f"overlap={overlap} must be in [0, 0.5) (a fraction of the tile)")
    tile = max(multiple, ceil_to(tile, multiple))
    budget = max(1, batch_size) * tile * tile
    cap = max(multiple, (max_side // multiple) * multiple) if max_side else None
    side = min(tile, cap) if cap else tile
    margin = int(math.ceil(overlap * side / 2))
    best = None
    top = ceil_to(height, multiple) if cap is None else min(ceil_to(height, multiple), cap)
    for max_h in range(top, multiple - 1, -multiple):  # every row-tile height, tallest first
        rows = _fit(height, max_h, margin, multiple)
        if rows is None:
            break
        th, ys = rows
        if best is not None and len(ys) * th * width >= best[0]:
            if th < max_h:
                continue
            break  # shorter tiles only add bands from here
        max_w = (budget // th) // multiple * multiple
        cols = _fit(width, max_w if cap is None else min(max_w, cap), margin, multiple)
        if cols is not None and (best is None or len(ys) * len(cols[1]) * th * cols[0] < best[0]):
            best = (len(ys) * len(cols[1]) * th * cols[0], th, ys, *cols)
    if best is None:  # the bands do not fit the budget: tiles of the given side
        (th, ys), (tw, xs) = (
            _axis(height, math.ceil(height / side), margin, multiple),
            _axis(width, math.ceil(width / side), margin, multiple),
        )
    else:
        _, th, ys, tw, xs = best
    return TileLayout(th, tw, tuple(ys), tuple(xs), max(1, budget // (th * tw)), height, width)


@torch.no_grad()
def iter_tiled_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    read_rows: Callable[[int, int], torch.Tensor],
    height: int,
    width: int,
    tile: int,
    overlap: float,
    batch_size: int = 8,
    multiple: int = 32,
    pad_value: float = 1.0,
    max_side: int | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Blend ``forward`` over the tiles of :func:`plan_tiles`, reading the image a band of rows at a time.

    Args:
        forward: ``(B, 3, h, w) -> (B, C, h, w)`` (the network, logits).
        read_rows: ``read_rows(r0, r1) -> (3, r1 - r0, width)`` float tensor of image rows ``r0 <= r < r1`` (network
            input units, e.g. [0, 1]) on the network's device; called once per tile row, top to bottom.
        height, width: image size in px.
        tile, overlap, batch_size, multiple, max_side: see :func:`plan_tiles`.
        pad_value: fill for padding (1.0 = white in [0, 1] units).

    Yields ``(y0, logits)``: ``(C, n, width)`` float32 blended outputs of rows ``y0 .. y0 + n``, in order, covering
    every row once; memory is one band of tile rows.
    """
    lay = plan_tiles(height, width, tile, overlap, batch_size, multiple, max_side)
    wys, tot_y = _ramps(list(lay.ys), lay.th, lay.padded_h)
    wxs, tot_x = _ramps(list(lay.xs), lay.tw, lay.padded_w)
    carry, done, wx_t = None, 0, {}
    for k, y in enumerate(lay.ys):
        rows = read_rows(y, min(height, y + lay.th))
        dev = rows.device
        if not wx_t:
            wx_t = {x: torch.from_numpy(w.astype(np.float32)).to(dev) for x, w in zip(lay.xs, wxs)}
        pad_b, pad_r = lay.th - rows.shape[1], lay.padded_w - rows.shape[2]
        if pad_b or pad_r:
            rows = torch.nn.functional.pad(rows, (0, pad_r, 0, pad_b), value=pad_value)
        band = None
        for i in range(0, len(lay.xs), lay.per_pass):
            xs = lay.xs[i : i + lay.per_pass]
            out = forward(torch.stack([rows[:, :, x : x + lay.tw] for x in xs])).float()
            if band is None:
                band = torch.zeros((out.shape[1], lay.th, lay.padded_w), dtype=torch.float32, device=dev)
            for x, o in zip(xs, out):
                band[:, :, x : x + lay.tw] += o * wx_t[x]
        band *= torch.from_numpy(wys[k].astype(np.float32)).to(dev)[:, None]
        if carry is not None:
            band[:, : carry.shape[1]] += carry
        end = min(height, lay.ys[k + 1] if k + 1 < len(lay.ys) else height)
        if end > done:
            norm = torch.from_numpy(np.outer(tot_y[done:end], tot_x[:width]).astype(np.float32)).to(dev)
            yield done, band[:, done - y : end - y, :width] / norm
            done = end
        carry = band[:, end - y :] if end - y < lay.th else None


@torch.no_grad()
def tiled_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: float,
    batch_size: int = 8,
    multiple: int = 32,
    pad_value: float = 1.0,
    max_side: int | None = None,
) -> torch.Tensor:
    """Blend ``forward`` over the tiles of ``image`` (``(3, H, W)`` float tensor on the network's device): the
    in-memory form of :func:`iter_tiled_logits` (same tiles and weights). Returns ``(C, H, W)`` float32."""
    _, H, W = image.shape
    rows = iter_tiled_logits(forward, lambda a, b: image[:, a:b], H, W, tile, overlap, batch_size, multiple, pad_value, max_side)
    parts = [o for _, o in rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


@torch.no_grad()
def single_pass_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, multiple: int = 32, pad_value: float = 1.0
) -> torch.Tensor:
    """One forward pass over the whole ``(3, H, W)`` image (padded to ``multiple``); ``(C, H, W)``."""
    _, H, W = image.shape
    Hp, Wp = ceil_to(H, multiple), ceil_to(W, multiple)
    x = torch.nn.functional.pad(image, (0, Wp - W, 0, Hp - H), value=pad_value) if (Hp, Wp) != (H, W) else image
    return forward(x[None]).float()[0, :, :H, :W]
