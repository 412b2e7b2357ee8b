"""Structure of tiled TIFF pyramids (Aperio SVS, generic tiled TIFF): which page holds each OpenSlide level, where
its tiles are (``TileOffsets`` / ``TileByteCounts``), its ``JPEGTables`` and colour space, and why a page cannot be
read directly.

Refused with a reason (:class:`UnsupportedTiff`): TIFF flavours that store levels their own way (NDPI, Philips, SCN,
...), compression other than JPEG (JPEG 2000 Aperio 33003/33005, deflate, LZW, ...), photometric other than
RGB/YCbCr, planar configuration, predictor, extra samples, bit depth, sample format, orientation, fill order, 3-D
tiles, a level without a page of exactly OpenSlide's size and tile size, inconsistent tile tables.

Units: level px (pixel coordinates at a pyramid level); offsets and counts in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histolight.wsi.jpeg_tiles import jpeg_prefix

_COMPRESSION_JPEG = 7
_PHOTOMETRIC_COLORSPACE = {2: "RGB", 6: "YCBCR"}  # TIFF Photometric -> JPEG colour space forced on the decoder
_COMPRESSION_NAMES = {
    1: "none",
    5: "LZW",
    7: "JPEG",
    8: "deflate",
    32946: "deflate",
    33003: "Aperio JPEG 2000 YCbCr",
    33005: "Aperio JPEG 2000 RGB",
    34712: "JPEG 2000",
    50001: "WebP",
    50002: "JPEG XL",
}


class UnsupportedTiff(Exception):
    """The file (or one of its levels) cannot be read directly; ``reason`` says why. Use OpenSlide instead."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class TiffLevel:
    """One pyramid level as stored: TIFF page ``page``, ``width`` x ``height`` level px in ``tile_w`` x ``tile_h`` tiles.

    ``offsets`` / ``counts``: raw byte range of each tile (row-major, ``tiles_across`` per row; count 0 = missing).
    ``tables``: the page's JPEGTables (or None). ``colorspace``: JPEG colour space forced on the decoder.
    ``prefix``: SOI + Adobe marker for ``colorspace`` + the tables' segments (see
    :func:`histolight.wsi.jpeg_tiles.jpeg_stream`).
    """

    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    tables: bytes | None
    colorspace: str
    prefix: bytes

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)


def _tag(page, code: int, default=None):
    """Value of TIFF tag ``code`` of a tifffile page, ``default`` when absent or unreadable."""
    try:
        v = page.tags.valueof(code, default)
    except Exception:  # noqa: BLE001
        return default
    return v


def page_problem(page) -> str | None:
    """Why this tiled page cannot be read directly, or None."""
    comp = int(_tag(page, 259, 1))
    if comp != _COMPRESSION_JPEG:
        return f"compression {comp} ({_COMPRESSION_NAMES.get(comp, 'unknown')}) is not JPEG"
    photometric = _tag(page, 262)
    if photometric is None or int(photometric) not in _PHOTOMETRIC_COLORSPACE:
        return f"photometric {photometric} is not RGB (2) or YCbCr (6)"
    spp = int(_tag(page, 277, 1))
    if spp != 3:
        return f"{spp} samples per pixel (need 3)"
    bps = _tag(page, 258, 1)
    bps = tuple(bps) if isinstance(bps, (tuple, list)) else (bps,)
    if any(int(b) != 8 for b in bps):
        return f"bits per sample {bps} (need 8)"
    planar = int(_tag(page, 284, 1))
    if planar != 1:
        return f"planar configuration {planar} (need 1, contiguous)"
    pred = int(_tag(page, 317, 1))
    if pred != 1:
        return f"predictor {pred}"
    if _tag(page, 338) not in (None, (), 0):
        return "extra samples (alpha)"
    fmt = _tag(page, 339, 1)
    fmt = tuple(fmt) if isinstance(fmt, (tuple, list)) else (fmt,)
    if any(int(f) != 1 for f in fmt):
        return f"sample format {fmt} (need unsigned integer)"
    orient = int(_tag(page, 274, 1))
    if orient != 1:
        return f"orientation {orient} (need 1, top-left)"
    fill = int(_tag(page, 266, 1))
    if fill != 1:
        return f"fill order {fill}"
    if int(_tag(page, 32997, 1)) != 1 or int(_tag(page, 32998, 1)) != 1:
        return "3-D (depth) tiles"
    return None


def map_levels(path: str, dims: list[tuple[int, int]], tile_sizes) -> list[TiffLevel]:
    """One :class:`TiffLevel` per ``(w, h)`` in ``dims`` (level px): the first unused tiled page of exactly that size
    (and, when ``tile_sizes[i]`` is given, that ``(tile_w, tile_h)``). Raises :class:`UnsupportedTiff` with the reason
    when the file, a level or its page cannot be read directly."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001
        raise UnsupportedTiff(f"not a readable TIFF ({type(e).__name__}: {e})") from None
    with tif:
        for flag in ("is_ndpi", "is_philips", "is_scn", "is_bif", "is_qpi", "is_stk", "is_lsm"):
            if getattr(tif, flag, False):
                raise UnsupportedTiff(f"TIFF flavour {flag[3:]} stores levels in its own way")
        pages = []
        try:
            for i, page in enumerate(tif.pages):
                if int(_tag(page, 322, 0) or 0) and int(_tag(page, 323, 0) or 0):
                    pages.append((i, page))
        except Exception as e:  # noqa: BLE001
            raise UnsupportedTiff(f"cannot parse TIFF directories ({type(e).__name__}: {e})") from None
        used: set[int] = set()
        levels: list[TiffLevel] = []
        for li, (w, h) in enumerate(dims):
            want_tile = tile_sizes[li] if tile_sizes else None
            match = None
            for i, page in pages:
                if i in used or (int(_tag(page, 256)), int(_tag(page, 257))) != (w, h):
                    continue
                tsz = (int(_tag(page, 322)), int(_tag(page, 323)))
                if want_tile is not None and tuple(want_tile) != tsz:
                    continue
                match = (i, page, tsz)
                break
            if match is None:
                raise UnsupportedTiff(
                    f"level {li} ({w}x{h} px): no tiled TIFF page of exactly that size"
                    + (f" and tile size {want_tile[0]}x{want_tile[1]}" if want_tile else "")
                )
            i, page, (tw, th) = match
            used.add(i)
            why = page_problem(page)
            if why:
                raise UnsupportedTiff(f"level {li} (TIFF page {i}): {why}")
            offsets = np.asarray(_tag(page, 324, ()), np.int64).ravel()
            counts = np.asarray(_tag(page, 325, ()), np.int64).ravel()
            n_tiles = (-(-w // tw)) * (-(-h // th))
            if offsets.size != n_tiles or counts.size != n_tiles:
                raise UnsupportedTiff(
                    f"level {li} (TIFF page {i}): {offsets.size} tile offsets / {counts.size} byte counts for {n_tiles} tiles"
                )
            if (offsets < 0).any() or (counts < 0).any():
                raise UnsupportedTiff(f"level {li} (TIFF page {i}): negative tile offsets or byte counts")
            tables = _tag(page, 347)
            tables = bytes(tables) if tables else None
            if tables is not None and not (tables[:2] == b"\xff\xd8" and tables[-2:] == b"\xff\xd9"):
                raise UnsupportedTiff(f"level {li} (TIFF page {i}): JPEGTables is not an SOI ... EOI tables stream")
            cs = _PHOTOMETRIC_COLORSPACE[int(_tag(page, 262))]
            prefix = jpeg_prefix(cs, tables)
            offsets.flags.writeable = False
            counts.flags.writeable = False
            levels.append(TiffLevel(i, w, h, tw, th, offsets, counts, tables, cs, prefix))
    return levels
