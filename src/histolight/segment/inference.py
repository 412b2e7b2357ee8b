"""Tiled inference: overlapping tiles, batched, blended with a smooth window; exact output size.

The window of a tile is 1 in its centre and falls off with a raised cosine over the overlap on
every side that borders another tile (sides on the image border are not tapered), so
the normalised blend is a partition of unity: no seams, and any input size ``H x W`` (square or
not, smaller or larger than a tile) gives exactly ``H x W`` outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def tile_positions(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px with at least ``overlap`` px overlap.

    Tiles are spread evenly; the first starts at 0 and the last ends at ``length``.
    """
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(n: int, ov_lo: int, ov_hi: int) -> np.ndarray:
    w = np.ones(n, np.float32)
    for ov, side in ((ov_lo, "lo"), (ov_hi, "hi")):
        if ov <= 0:
            continue
        ov = min(ov, n)
        r = (0.5 - 0.5 * np.cos(np.pi * (np.arange(ov) + 0.5) / ov)).astype(np.float32)
        if side == "lo":
            w[:ov] = np.minimum(w[:ov], r)
        else:
            w[n - ov :] = np.minimum(w[n - ov :], r[::-1])
    return np.maximum(w, 1e-4)


def window_1d(start: int, size: int, total: int, overlap: int) -> np.ndarray:
    """Blend weights of one tile along one axis: tapered only where a neighbouring tile exists."""
    return _ramp(size, overlap if start > 0 else 0, overlap if start + size < total else 0)


def ceil_to(v: int, m: int) -> int:
    return int(math.ceil(v / m) * m)


@torch.no_grad()
def tiled_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    tile: int,
    overlap: float,
    batch_size: int = 8,
    multiple: int = 32,
    pad_value: float = 1.0,
) -> torch.Tensor:
    """Blend ``forward`` over overlapping tiles of ``image``.

    Args:
        forward: ``(B, 3, h, w) -> (B, C, h, w)`` (the network, logits).
        image: ``(3, H, W)`` float tensor (network input units, e.g. [0, 1]), on the network's device.
        tile: tile side in px (a multiple of ``multiple``); smaller images use smaller tiles
            (the image side rounded up to ``multiple``).
        overlap: overlap as a fraction of the tile (0 <= overlap < 0.5).
        batch_size: tiles per forward pass.
        pad_value: fill for padding (1.0 = white in [0, 1] units).

    Returns: ``(C, H, W)`` float32 blended outputs on the image's device.
    """
    _, H, W = image.shape
    th = min(tile, ceil_to(H, multiple))
    tw = min(tile, ceil_to(W, multiple))
    Hp, Wp = max(H, th), max(W, tw)
    if (Hp, Wp) != (H, W):
        image = torch.nn.functional.pad(image, (0, Wp - W, 0, Hp - H), value=pad_value)
    ov_h, ov_w = int(round(overlap * th)), int(round(overlap * tw))
    ys, xs = tile_positions(Hp, th, ov_h), tile_positions(Wp, tw, ov_w)
    boxes = [(y, x) for y in ys for x in xs]
    acc = None
    wsum = torch.zeros((Hp, Wp), dtype=torch.float32, device=image.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i : i + batch_size]
        batch = torch.stack([image[:, y : y + th, x : x + tw] for y, x in chunk])
        out = forward(batch).float()
        if acc is None:
            acc = torch.zeros((out.shape[1], Hp, Wp), dtype=torch.float32, device=image.device)
        for (y, x), o in zip(chunk, out):
            wy = torch.from_numpy(window_1d(y, th, Hp, ov_h)).to(image.device)
            wx = torch.from_numpy(window_1d(x, tw, Wp, ov_w)).to(image.device)
            w = wy[:, None] * wx[None, :]
            acc[:, y : y + th, x : x + tw] += o * w
            wsum[y : y + th, x : x + tw] += w
    return (acc / wsum)[:, :H, :W]


@torch.no_grad()
def single_pass_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, multiple: int = 32, pad_value: float = 1.0
) -> torch.Tensor:
    """One forward pass over the whole ``(3, H, W)`` image (padded to ``multiple``); ``(C, H, W)``."""
    _, H, W = image.shape
    Hp, Wp = ceil_to(H, multiple), ceil_to(W, multiple)
    x = torch.nn.functional.pad(image, (0, Wp - W, 0, Hp - H), value=pad_value) if (Hp, Wp) != (H, W) else image
    return forward(x[None]).float()[0, :, :H, :W]
