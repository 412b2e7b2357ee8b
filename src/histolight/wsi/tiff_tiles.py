"""Direct tile reading for tiled TIFF pyramids (Aperio SVS, generic tiled TIFF), bypassing OpenSlide's ``read_region``.

For each OpenSlide level the matching TIFF page (same size, same tile size) is found
(:mod:`histolight.wsi.tiff_structure`); tiles are read with ``os.pread`` from their raw byte ranges, decoded with
libjpeg-turbo the way OpenSlide decodes them (:mod:`histolight.wsi.jpeg_tiles`) and stitched here.
Zero-length (missing) tiles are filled with the slide's background colour, as OpenSlide leaves them transparent.

Anything else is refused with a reason (:class:`UnsupportedTiff`) and the caller keeps using OpenSlide:
vendors other than ``aperio`` / ``generic-tiff`` (Hamamatsu NDPI, Philips, Ventana, Leica, ...), pages that cannot
be read directly (see :mod:`histolight.wsi.tiff_structure`), a tile that does not decode to the tile size, or
(``verify=True``) a decoded tile that differs from OpenSlide's own ``read_region`` of it by more than ``tolerance``.

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

import numpy as np

from histolight.wsi.jpeg_tiles import available_decoders, check_jpeg, jpeg_stream
from histolight.wsi.jpeg_tiles import make_decoder as _make_decoder
from histolight.wsi.tiff_structure import TiffLevel, UnsupportedTiff, map_levels

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

# a module lock that is valid in a forked child even if the fork happened while another thread held it
_STATE_LOCK = threading.Lock()


def _reinit_lock() -> None:
    global _STATE_LOCK
    _STATE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_lock)


class TileReadError(Exception):
    """A stored tile could not be read or decoded (short read, corrupt JPEG, wrong size). Fall back to OpenSlide."""


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
        levels = map_levels(path, [tuple(int(v) for v in d) for d in level_dimensions], tile_sizes)
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
            self.cache.put((i, idx), self._decode_tile(i, idx))  # verification reads it again
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
            ours = self.read_tile(i, tx, ty)[:h, :w]
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

    def _raw_tile(self, lv: TiffLevel, idx: int) -> bytes:
        """The stored bytes of tile ``idx`` of ``lv`` (count > 0). Raises :class:`TileReadError` on a short read."""
        n, off = int(lv.counts[idx]), int(lv.offsets[idx])
        try:
            data = os.pread(self._state().fd, n, off)
        except OSError as e:
            raise TileReadError(f"reading tile {idx} ({n} bytes at offset {off}) failed: {e}") from None
        if len(data) != n:
            raise TileReadError(f"tile {idx}: short read ({len(data)} of {n} bytes at offset {off}; file truncated?)")
        return data

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
        data = self._raw_tile(lv, idx)
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

    def stored_jpeg(self, level: int, x: int, y: int, w: int, h: int) -> bytes | None:
        """The file's own JPEG for the box ``(x, y, w, h)`` (level px) when it is exactly one whole stored tile inside
        the level, as a standalone stream (:func:`~histolight.wsi.jpeg_tiles.jpeg_stream`: the page's tables merged in,
        the colour space marked), else None (another size, unaligned, an edge tile with encoder padding, a missing
        tile).

        Any libjpeg decoder with default settings decodes the stream to the pixels :meth:`read_level` returns for that
        box (the same bytes this reader decodes). The stream is checked structurally (header parses, ends with EOI),
        not decoded. Raises :class:`TileReadError` on a read failure or a malformed stream.
        """
        lv = self.levels[level]
        tw, th = lv.tile_w, lv.tile_h
        if (w, h) != (tw, th) or x % tw or y % th or x < 0 or y < 0 or x + w > lv.width or y + h > lv.height:
            return None
        idx = (y // th) * lv.tiles_across + x // tw
        if int(lv.counts[idx]) == 0:
            return None
        try:
            stream = jpeg_stream(lv.prefix, self._raw_tile(lv, idx))
        except ValueError as e:
            raise TileReadError(f"tile {idx}: {e}") from None
        if not check_jpeg(stream, tw, th):
            raise TileReadError(f"tile {idx}: not a complete {tw}x{th} JPEG stream")
        return stream

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
