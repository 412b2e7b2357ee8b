"""Direct tile reading for tiled TIFF pyramids (Aperio SVS, generic tiled TIFF), bypassing OpenSlide's ``read_region``.

For each OpenSlide level the matching TIFF page (same size, same tile size) is found; tiles are read with
``os.pread`` from their raw byte ranges (``TileOffsets`` / ``TileByteCounts``), decoded with libjpeg-turbo and
stitched. Colour handling replicates OpenSlide's direct JPEG path (``openslide-decode-tiff.c``): the page's
``JPEGTables`` are loaded first, the JPEG colour space is forced from the TIFF ``Photometric`` tag (``YCbCr`` ->
YCbCr-to-RGB conversion, ``RGB`` -> no conversion, whatever JFIF/Adobe markers the stream carries; Aperio stores
RGB-coded JPEG without markers), default (ISLOW) IDCT and fancy upsampling.
Zero-length (missing) tiles are filled with the slide's background colour, as OpenSlide leaves them transparent.

Decoders (same pixels, measured in ``experiments/fast_tile_reading.md``):

- ``simplejpeg`` (preferred when installed): ``strict=True`` turns libjpeg warnings ("Premature end of JPEG file",
  "Corrupt JPEG data: ...") into errors exactly as OpenSlide does, so a damaged tile fails here too (and the caller
  falls back to OpenSlide, which raises). The tables and the colour space are given to it by rewriting the stream
  header: SOI + an Adobe APP14 marker whose transform flag says RGB (0) or YCbCr (1) + the JPEGTables segments + the
  tile without its SOI and without its own APP0 (JFIF) / APP14 (Adobe) markers.
- ``imagecodecs.jpeg8_decode`` (fallback): tables and colour space passed directly; it ignores libjpeg warnings, so a
  damaged tile may decode to wrong pixels where OpenSlide would raise.

Anything else is refused with a reason (:class:`UnsupportedTiff`) and the caller keeps using OpenSlide:
vendors other than ``aperio`` / ``generic-tiff`` (Hamamatsu NDPI, Philips, Ventana, Leica, ...), compression other
than JPEG (JPEG 2000 Aperio 33003/33005, deflate, LZW, ...), photometric other than RGB/YCbCr, planar
configuration, predictor, extra samples, bit depth, orientation, 3-D tiles, a level without a page of exactly
OpenSlide's size and tile size, a tile that does not decode to the tile size, or (``verify=True``) a decoded tile
that differs from OpenSlide's own ``read_region`` of it by more than ``tolerance``.

Pixels are identical to OpenSlide's ``read_region`` (measured max abs difference 0) at level 0 and at every level
whose downsample is an integer. At a level with a non-integer downsample (real Aperio files: e.g. 4.000121)
OpenSlide is asked for base px ``round(x * ds)``, which maps back to a fractional level position, and draws the
tiles there with sub-pixel (bilinear) resampling; this reader returns the stored pixels at level px ``(x, y)``.

Units: level px (pixel coordinates at a pyramid level), images ``H x W x 3`` uint8 RGB.

Concurrency: the reader holds no open file until the first read in a process; each process lazily opens its own
descriptor (``os.pread`` has no shared file position, so threads share it) and its own tile cache, so it is safe
across threads, after ``fork`` (DataLoader workers, ``ProcessPoolExecutor``) and when pickled (spawn).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "TiffTileReader",
    "TiffLevel",
    "TileCache",
    "UnsupportedTiff",
    "TileReadError",
    "open_tile_reader",
    "SUPPORTED_VENDORS",
    "DEFAULT_CACHE_BYTES",
    "available_decoders",
    "jpeg_stream",
]

#: OpenSlide vendors whose levels are plain tiled TIFF pages read the way this module reads them.
SUPPORTED_VENDORS = ("aperio", "generic-tiff")
#: Default bound of the decoded-tile cache, bytes, per reader and process.
DEFAULT_CACHE_BYTES = 32 << 20

_COMPRESSION_JPEG = 7
_PHOTOMETRIC_COLORSPACE = {2: "RGB", 6: "YCBCR"}  # TIFF Photometric -> JPEG colour space forced on the decoder
# Adobe APP14 marker (version 100, flags 0, 0, transform): transform 0 = RGB, 1 = YCbCr (libjpeg honours it when
# there is no JFIF marker)
_ADOBE = {
    "RGB": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00",
    "YCBCR": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01",
}
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

# a module lock that is valid in a forked child even if the fork happened while another thread held it
_STATE_LOCK = threading.Lock()


def _reinit_lock() -> None:
    global _STATE_LOCK
    _STATE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_lock)


class UnsupportedTiff(Exception):
    """The file (or one of its levels) cannot be read directly; ``reason`` says why. Use OpenSlide instead."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class TileReadError(Exception):
    """A stored tile could not be read or decoded (short read, corrupt JPEG, wrong size). Fall back to OpenSlide."""


@dataclass(frozen=True)
class TiffLevel:
    """One pyramid level as stored: TIFF page ``page``, ``width`` x ``height`` level px in ``tile_w`` x ``tile_h`` tiles.

    ``offsets`` / ``counts``: raw byte range of each tile (row-major, ``tiles_across`` per row; count 0 = missing).
    ``tables``: the page's JPEGTables (or None). ``colorspace``: JPEG colour space forced on the decoder.
    ``prefix``: SOI + Adobe marker for ``colorspace`` + the tables' segments (see :func:`jpeg_stream`).
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


class TileCache:
    """Thread-safe LRU cache of decoded tiles, bounded in bytes (``max_bytes`` <= 0 disables it)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            arr = self._d.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._d[key] = arr
            self.nbytes += arr.nbytes
            while self.nbytes > self.max_bytes and self._d:
                _, ev = self._d.popitem(last=False)
                self.nbytes -= ev.nbytes

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        return len(self._d)


class _ProcState:
    """What a reader owns in one process: the file descriptor and the tile cache."""

    __slots__ = ("pid", "fd", "cache")

    def __init__(self, path: str, cache_bytes: int):
        self.pid = os.getpid()
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
        self.cache = TileCache(cache_bytes)


def jpeg_stream(prefix: bytes, tile: bytes) -> bytes:
    """A self-contained JPEG stream: ``prefix`` (SOI + Adobe marker + tables) + ``tile`` without its SOI and without
    its own APP0 (JFIF) and APP14 (Adobe) segments, so libjpeg uses the colour space the prefix's marker names."""
    n = len(tile)
    if n < 4 or tile[0] != 0xFF or tile[1] != 0xD8:
        raise ValueError("tile data does not start with a JPEG SOI marker")
    i, start, parts = 2, 2, []
    while i + 3 < n:
        if tile[i] != 0xFF:
            break  # not a marker: leave it to the decoder to complain
        m = tile[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xDA or m == 0xD9:  # start of scan / end of image: header done
            break
        seg_end = i + 2 + ((tile[i + 2] << 8) | tile[i + 3])
        if m == 0xE0 or m == 0xEE:
            parts.append(tile[start:i])
            start = seg_end
        i = seg_end
    if not parts:
        return prefix + tile[2:]
    parts.append(tile[start:])
    return prefix + b"".join(parts)


def _make_decoder(name: str):
    """``decode(data, level) -> H x W x 3`` RGB for decoder ``name``."""
    if name == "simplejpeg":
        import simplejpeg

        dec = simplejpeg.decode_jpeg

        def decode(data: bytes, lv: TiffLevel) -> np.ndarray:
            return dec(jpeg_stream(lv.prefix, data), colorspace="RGB", fastdct=False, fastupsample=False, strict=True)

        return decode
    if name == "imagecodecs":
        import imagecodecs

        dec8 = imagecodecs.jpeg8_decode

        def decode(data: bytes, lv: TiffLevel) -> np.ndarray:
            return dec8(data, tables=lv.tables, colorspace=lv.colorspace, outcolorspace="RGB")

        return decode
    raise ValueError(f"unknown JPEG decoder {name!r} (choose from {available_decoders()})")


def available_decoders() -> list[str]:
    """Installed decoders, preferred first: ``simplejpeg`` (strict, like OpenSlide), ``imagecodecs``."""
    out = []
    for name in ("simplejpeg", "imagecodecs"):
        try:
            _make_decoder(name)
            out.append(name)
        except ImportError:
            pass
    return out


class TiffTileReader:
    """Read regions of a tiled-JPEG TIFF pyramid directly from the stored tiles.

    Build it with :meth:`open` (from level sizes) or :meth:`from_openslide` (from an open OpenSlide handle, with
    verification against OpenSlide). Both raise :class:`UnsupportedTiff` when the file is not read correctly this way.

    Args:
        path: the TIFF file.
        levels: one :class:`TiffLevel` per pyramid level (OpenSlide level order).
        background: RGB colour of missing (zero-length) tiles.
        cache_bytes: bound of the decoded-tile LRU cache per process.
        decoder: ``'simplejpeg'`` or ``'imagecodecs'``; None = the first of :func:`available_decoders`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        levels: Sequence[TiffLevel],
        background: Sequence[int] = (255, 255, 255),
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        decoder: str | None = None,
    ):
        self.path = os.fspath(path)
        self.levels = tuple(levels)
        self.background = tuple(int(v) for v in background)
        self.cache_bytes = int(cache_bytes)
        self.verified_maxdiff: dict[int, int] = {}  # level -> max abs diff against OpenSlide at verification
        self._st: _ProcState | None = None
        if decoder is None:
            avail = available_decoders()
            if not avail:
                raise UnsupportedTiff("no JPEG decoder installed (pip install simplejpeg, or imagecodecs)")
            decoder = avail[0]
        self.decoder = decoder
        self._decode = _make_decoder(decoder)
        self._blank: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        level_dimensions: Sequence[tuple[int, int]],
        tile_sizes: Sequence[tuple[int, int] | None] | None = None,
        **kwargs,
    ) -> TiffTileReader:
        """Map each ``(w, h)`` in ``level_dimensions`` (level px) to a tiled JPEG page of exactly that size.

        ``tile_sizes`` (optional, per level): the tile size the page must have (OpenSlide's
        ``openslide.level[i].tile-width/height``). Decodes one stored tile per level to check it.
        Raises :class:`UnsupportedTiff` with the reason when any level is not readable directly.
        """
        path = os.fspath(path)
        levels = _map_levels(path, [tuple(int(v) for v in d) for d in level_dimensions], tile_sizes)
        reader = cls(path, levels, **kwargs)
        for i in range(len(levels)):
            reader._check_level(i)
        return reader

    @classmethod
    def from_openslide(
        cls,
        osr,
        path: str | os.PathLike,
        background: Sequence[int] = (255, 255, 255),
        verify: bool = True,
        tolerance: int = 2,
        **kwargs,
    ) -> TiffTileReader:
        """Reader for the file open in the OpenSlide handle ``osr``, or :class:`UnsupportedTiff`.

        Checks the vendor, level sizes and tile sizes against OpenSlide's, and with ``verify`` compares one decoded
        tile per level (the largest stored one at a position OpenSlide reads without resampling) with
        ``osr.read_region``; a max abs difference above ``tolerance`` (0-255) refuses the file.
        """
        props = osr.properties
        vendor = props.get("openslide.vendor", "unknown")
        if vendor not in SUPPORTED_VENDORS:
            raise UnsupportedTiff(
                f"vendor {vendor!r} is not a plain tiled TIFF pyramid (supported: {', '.join(SUPPORTED_VENDORS)})"
            )
        dims = [tuple(int(v) for v in d) for d in osr.level_dimensions]
        tiles: list[tuple[int, int] | None] = []
        for i in range(len(dims)):
            tw, th = props.get(f"openslide.level[{i}].tile-width"), props.get(f"openslide.level[{i}].tile-height")
            tiles.append((int(tw), int(th)) if tw and th else None)
        reader = cls.open(path, dims, tiles, background=background, **kwargs)
        if verify:
            reader._verify(osr, tolerance)
        return reader

    def _check_level(self, i: int) -> None:
        lv = self.levels[i]
        nz = np.flatnonzero(lv.counts)
        if nz.size == 0:
            return  # every tile missing: nothing to decode (drawn as background, like OpenSlide)
        idx = int(nz[np.argmax(lv.counts[nz])])
        try:
            self._decode_tile(i, idx)
        except TileReadError as e:
            raise UnsupportedTiff(f"level {i} (page {lv.page}): {e}") from None

    def _verify(self, osr, tolerance: int) -> None:
        """Compare one decoded tile per level with OpenSlide's read_region of the same pixels."""
        ds_all = osr.level_downsamples
        for i, lv in enumerate(self.levels):
            ds = float(ds_all[i])
            n_across = lv.tiles_across
            # positions OpenSlide reads without sub-pixel resampling: any tile when ds is an integer, else tile (0, 0)
            if abs(ds - round(ds)) < 1e-9:
                cand = np.flatnonzero(lv.counts)
            else:
                cand = np.flatnonzero(lv.counts[:1])
            if cand.size == 0:
                continue
            idx = int(cand[np.argmax(lv.counts[cand])])
            tx, ty = idx % n_across, idx // n_across
            x0, y0 = tx * lv.tile_w, ty * lv.tile_h
            w, h = min(lv.tile_w, lv.width - x0), min(lv.tile_h, lv.height - y0)
            ours = self._decode_tile(i, idx)[:h, :w]
            try:
                ref = np.asarray(osr.read_region((round(x0 * ds), round(y0 * ds)), i, (w, h)))
            except Exception as e:  # noqa: BLE001 - any OpenSlide failure means we cannot vouch for the pixels
                raise UnsupportedTiff(f"level {i}: OpenSlide could not read the verification tile ({e})") from None
            if ref[..., 3].min() < 255:
                raise UnsupportedTiff(f"level {i}: OpenSlide returns transparent pixels inside stored tile {idx}")
            diff = int(np.abs(ours.astype(np.int16) - ref[..., :3]).max())
            self.verified_maxdiff[i] = diff
            if diff > tolerance:
                raise UnsupportedTiff(f"level {i}: decoded tile {idx} differs from OpenSlide by up to {diff} (> {tolerance})")

    # ------------------------------------------------------------------ per-process state
    def _state(self) -> _ProcState:
        st = self._st
        if st is not None and st.pid == os.getpid():
            return st
        with _STATE_LOCK:
            st = self._st
            if st is None or st.pid != os.getpid():
                # new process (or first use): own descriptor and cache; an inherited descriptor is left alone
                st = _ProcState(self.path, self.cache_bytes)
                self._st = st
        return st

    @property
    def cache(self) -> TileCache:
        """This process's decoded-tile cache."""
        return self._state().cache

    def close(self) -> None:
        """Close this process's file descriptor (reads reopen it)."""
        st, self._st = self._st, None  # no lock: also called from __del__
        if st is not None and st.pid == os.getpid():
            try:
                os.close(st.fd)
            except OSError:
                pass
            st.cache.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_st"] = None
        d["_decode"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._decode = _make_decoder(self.decoder)

    # ------------------------------------------------------------------ reading
    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self.levels)

    def _decode_tile(self, level: int, idx: int) -> np.ndarray:
        lv = self.levels[level]
        n = int(lv.counts[idx])
        if n == 0:
            blank = self._blank.get(level)
            if blank is None:
                blank = np.empty((lv.tile_h, lv.tile_w, 3), np.uint8)
                blank[:] = self.background
                blank.flags.writeable = False
                self._blank[level] = blank
            return blank
        off = int(lv.offsets[idx])
        st = self._state()
        try:
            data = os.pread(st.fd, n, off)
        except OSError as e:
            raise TileReadError(f"reading tile {idx} ({n} bytes at offset {off}) failed: {e}") from None
        if len(data) != n:
            raise TileReadError(f"tile {idx}: short read ({len(data)} of {n} bytes at offset {off}; file truncated?)")
        try:
            arr = self._decode(data, lv)
        except Exception as e:  # noqa: BLE001 - each decoder raises its own error types
            raise TileReadError(f"tile {idx}: JPEG decode failed ({type(e).__name__}: {e})") from None
        if arr.shape != (lv.tile_h, lv.tile_w, 3) or arr.dtype != np.uint8:
            raise TileReadError(
                f"tile {idx}: decoded to shape {arr.shape} {arr.dtype}, expected ({lv.tile_h}, {lv.tile_w}, 3) uint8"
            )
        arr.flags.writeable = False
        return arr

    def read_tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        """Stored tile ``(tx, ty)`` of ``level``, full tile size (edge tiles include the encoder's padding).

        Returns a read-only ``tile_h x tile_w x 3`` uint8 array (shared with the cache: copy before writing).
        Raises :class:`TileReadError` when the tile cannot be read or decoded.
        """
        lv = self.levels[level]
        if not (0 <= tx < lv.tiles_across and 0 <= ty < lv.tiles_down):
            raise IndexError(f"tile ({tx}, {ty}) outside level {level} ({lv.tiles_across} x {lv.tiles_down} tiles)")
        idx = ty * lv.tiles_across + tx
        cache = self._state().cache
        key = (level, idx)
        arr = cache.get(key)
        if arr is None:
            arr = self._decode_tile(level, idx)
            cache.put(key, arr)
        return arr

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read ``(w, h)`` level px with top-left at level px ``(x, y)`` of ``level``; outside the level is white.

        Returns a new writable ``h x w x 3`` uint8 RGB array. Raises :class:`TileReadError` on unreadable tiles.
        """
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} out of range (0..{len(self.levels) - 1})")
        w, h, x, y = int(w), int(h), int(x), int(y)
        if w <= 0 or h <= 0:
            raise ValueError(f"read size must be positive, got {(w, h)}")
        lv = self.levels[level]
        tw, th = lv.tile_w, lv.tile_h
        cx0, cy0 = max(0, x), max(0, y)
        cx1, cy1 = min(lv.width, x + w), min(lv.height, y + h)
        inside = cx0 == x and cy0 == y and cx1 == x + w and cy1 == y + h
        if inside and x // tw == (x + w - 1) // tw and y // th == (y + h - 1) // th:  # within one stored tile
            t = self.read_tile(level, x // tw, y // th)
            return t[y % th : y % th + h, x % tw : x % tw + w].copy()
        if inside:
            out = np.empty((h, w, 3), np.uint8)
        else:
            out = np.full((h, w, 3), 255, np.uint8)
            if cx1 <= cx0 or cy1 <= cy0:
                return out
        for ty in range(cy0 // th, (cy1 - 1) // th + 1):
            ty0 = ty * th
            sy0, sy1 = max(cy0, ty0), min(cy1, ty0 + th)
            for tx in range(cx0 // tw, (cx1 - 1) // tw + 1):
                tx0 = tx * tw
                sx0, sx1 = max(cx0, tx0), min(cx1, tx0 + tw)
                t = self.read_tile(level, tx, ty)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = t[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out

    def __repr__(self) -> str:
        lv = ", ".join(f"p{v.page}:{v.width}x{v.height}/{v.tile_w}x{v.tile_h}/{v.colorspace}" for v in self.levels)
        return f"TiffTileReader({os.path.basename(self.path)!r}, [{lv}], decoder={self.decoder!r})"


# ---------------------------------------------------------------------------------------------- TIFF parsing


def _tag(page, code: int, default=None):
    try:
        v = page.tags.valueof(code, default)
    except Exception:  # noqa: BLE001
        return default
    return v


def _page_problem(page) -> str | None:
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


def _map_levels(path: str, dims: list[tuple[int, int]], tile_sizes) -> list[TiffLevel]:
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
            why = _page_problem(page)
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
            prefix = b"\xff\xd8" + _ADOBE[cs] + (tables[2:-2] if tables else b"")
            offsets.flags.writeable = False
            counts.flags.writeable = False
            levels.append(TiffLevel(i, w, h, tw, th, offsets, counts, tables, cs, prefix))
    return levels


def open_tile_reader(
    osr, path: str | os.PathLike, background: Sequence[int] = (255, 255, 255), **kwargs
) -> tuple[TiffTileReader | None, str]:
    """``(reader, 'ok')`` when ``path`` (open in OpenSlide handle ``osr``) can be read directly, else ``(None, reason)``.

    Never raises: any problem means "use OpenSlide". Keyword arguments go to :meth:`TiffTileReader.from_openslide`.
    """
    try:
        reader = TiffTileReader.from_openslide(osr, path, background=background, **kwargs)
        note = (
            "ok"
            if reader.decoder == "simplejpeg"
            else (f"ok ({reader.decoder}: damaged tiles may decode silently; install simplejpeg for OpenSlide-like errors)")
        )
        return reader, note
    except UnsupportedTiff as e:
        return None, e.reason
    except Exception as e:
        log.debug("direct tile reader unavailable for %s", path, exc_info=True)
        return None, f"{type(e).__name__}: {e}"
