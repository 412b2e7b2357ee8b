"""TFRecord files of tiles, byte-compatible with TensorFlow and Slideflow (no TensorFlow needed).

File framing, per record (all little endian)::

    uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

masked_crc = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32), crc = CRC-32C.

Tile records are `tf.train.Example`s with `image_raw` (bytes, JPEG/PNG), `slide` (bytes, utf-8),
`loc_x`, `loc_y` (int64, tile centre in level-0 pixels).

Index (Slideflow layout, `slideflow/util/tfrecord2idx.py`): `<stem>.index.npz` next to
`<stem>.tfrecords`, written with `np.savez(arr_0=..., locations=...)`:
`arr_0` int64 (n, 2) = [start byte offset, total record bytes incl. the 16 framing bytes];
`locations` int64 (n, 2) = [loc_x, loc_y] (an empty float array when records carry no location,
as Slideflow writes it). Also read: Slideflow's plain-text `<stem>.index` ("offset length" per
line) and `<stem>.index.npy`. A missing, unreadable or stale index is rebuilt by scanning.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import crc32c as _crc32c
import numpy as np

from histolight.errors import HistolightError
from histolight.io.atomic import AtomicFile, atomic_save_npz
from histolight.io.example import ExampleDecodeError, decode_example, encode_example

__all__ = [
    "TFRecordError",
    "ImageDecodeError",
    "TileRecord",
    "TFRecordWriter",
    "TFRecordReader",
    "masked_crc32c",
    "frame_record",
    "index_path_for",
    "find_index",
    "load_index",
    "save_index",
    "build_index",
    "iter_records",
    "decode_image",
]

log = logging.getLogger(__name__)

HEADER_BYTES = 12  # uint64 length + uint32 crc
FOOTER_BYTES = 4  # uint32 crc
FRAME_BYTES = HEADER_BYTES + FOOTER_BYTES
_GZIP_MAGIC = b"\x1f\x8b"
_MASK_DELTA = 0xA282EAD8
_CHUNK = 1 << 26  # largest single read, bytes (bounds memory on garbage lengths)


class TFRecordError(HistolightError, ValueError):
    """A TFRecord file (or its index) is corrupt, truncated or unusable. Names file, byte offset, reason."""

    def __init__(self, path: Any, reason: str, offset: int | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.offset = None if offset is None else int(offset)
        self.reason = reason
        where = "" if offset is None else f" at byte offset {int(offset)}"
        super().__init__(f"bad TFRecord '{self.path}'{where}: {reason}")


class ImageDecodeError(HistolightError, ValueError):
    """Bytes could not be decoded as a JPEG/PNG image."""


class TileRecord(NamedTuple):
    """One decoded tile record. loc_x/loc_y: tile centre, level-0 pixels (None when absent)."""

    image_raw: bytes
    slide: str
    loc_x: int | None
    loc_y: int | None


# ----------------------------------------------------------------------------- framing


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord checksum: CRC-32C of `data`, rotated right by 15 bits plus 0xa282ead8 (uint32)."""
    crc = _crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes | bytearray | memoryview) -> bytes:
    """Full on-disk bytes of one record: header (12 B) + data + footer (4 B)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + bytes(data) + struct.pack("<I", masked_crc32c(data))


def _read_exact(f, n: int) -> bytes:
    """Read up to n bytes (fewer only at EOF), in bounded chunks."""
    if n <= _CHUNK:
        b = f.read(n)
        if len(b) == n or not b:
            return b
        parts = [b]
        n -= len(b)
    else:
        parts = []
    while n > 0:
        b = f.read(min(n, _CHUNK))
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _iter_frames(f, path: str, verify: bool, size: int | None) -> Iterator[tuple[int, memoryview]]:
    """Yield (start offset, record data) from a binary stream at offset 0.

    size: total stream size in bytes when known (plain files), used to report truncation early.
    Offsets for GZIP streams are offsets in the decompressed stream.
    """
    try:
        yield from _frames(f, path, verify, size)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # damaged GZIP stream
        raise TFRecordError(path, f"corrupt GZIP stream ({type(e).__name__}: {e})") from None


def _frames(f, path: str, verify: bool, size: int | None) -> Iterator[tuple[int, memoryview]]:
    off = 0
    while True:
        header = _read_exact(f, HEADER_BYTES)
        if not header:
            return
        if len(header) < HEADER_BYTES:
            raise TFRecordError(path, f"truncated record header ({len(header)} of {HEADER_BYTES} bytes)", off)
        length, length_crc = struct.unpack("<QI", header)
        if verify and masked_crc32c(header[:8]) != length_crc:
            raise TFRecordError(path, f"length checksum mismatch (length field reads {length})", off)
        if size is not None and off + FRAME_BYTES + length > size:
            raise TFRecordError(
                path,
                f"truncated record: header says {length} data bytes + {FOOTER_BYTES} checksum bytes, "
                f"only {size - off - HEADER_BYTES} bytes remain",
                off,
            )
        body = _read_exact(f, length + FOOTER_BYTES)
        if len(body) < length + FOOTER_BYTES:
            raise TFRecordError(
                path,
                f"truncated record: header says {length} data bytes + {FOOTER_BYTES} checksum bytes, "
                f"only {len(body)} bytes remain",
                off,
            )
        data = memoryview(body)[:length]
        if verify and masked_crc32c(data) != struct.unpack_from("<I", body, length)[0]:
            raise TFRecordError(path, f"data checksum mismatch ({length}-byte record)", off)
        yield off, data
        off += length + FRAME_BYTES


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _open_stream(path: str):
    """(binary stream, size or None, is_gzip)."""
    if _is_gzip(path):
        return gzip.open(path, "rb"), None, True
    return open(path, "rb", buffering=1 << 20), os.path.getsize(path), False


def _decode(data, path: str, offset: int | None, unwrap: bool = True) -> dict:
    try:
        return decode_example(data, unwrap=unwrap)
    except ExampleDecodeError as e:
        raise TFRecordError(path, f"record is not a valid tf.train.Example: {e}", offset) from None


def iter_records(path: str | os.PathLike, *, verify: bool = True, raw: bool = False, unwrap: bool = True) -> Iterator[Any]:
    """Sequentially yield decoded records (dicts, see `decode_example`) or raw bytes (`raw=True`).

    Works on plain and GZIP-compressed files; no index needed. verify: check both CRCs per record.
    """
    path = os.fspath(path)
    f, size, _ = _open_stream(path)
    with f:
        for off, data in _iter_frames(f, path, verify, size):
            yield bytes(data) if raw else _decode(data, path, off, unwrap)


# ----------------------------------------------------------------------------- index


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def index_path_for(path: str | os.PathLike) -> str:
    """`<dir>/<stem>.index.npz` for `<dir>/<stem>.tfrecords` (Slideflow naming)."""
    path = os.fspath(path)
    return os.path.join(os.path.dirname(path), _stem(path) + ".index.npz")


def find_index(path: str | os.PathLike) -> str | None:
    """First existing index for a TFRecord: `.index.npz`, then Slideflow's text `.index`, then `.index.npy`."""
    path = os.fspath(path)
    base = os.path.join(os.path.dirname(path), _stem(path) + ".index")
    for cand in (base + ".npz", base, base + ".npy"):
        if os.path.isfile(cand):
            return cand
    return None


def load_index(index_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an index file -> (int64 (n, 2) [offset, total bytes], int64 (n, 2) [loc_x, loc_y] or None).

    Raises OSError/ValueError for unreadable or malformed files (callers rebuild).
    """
    idx, locs, _ = _load_index(os.fspath(index_path))
    return idx, locs


def _load_index(p: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(index, locations, whether the file states locations, i.e. an .npz with a 'locations' entry)."""
    locs = None
    stated = False
    if os.path.getsize(p) == 0:  # Slideflow writes empty indices for empty TFRecords
        idx = np.zeros((0, 2), np.int64)
    elif p.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            idx = z["arr_0"]
            if "locations" in z.files:
                locs, stated = z["locations"], True
    elif p.endswith(".npy"):
        idx = np.load(p, allow_pickle=False)
    else:
        idx = np.loadtxt(p, dtype=np.int64, ndmin=2)
    idx = np.asarray(idx)
    if idx.size == 0:
        idx = idx.reshape(0, 2)
    elif idx.ndim == 1:  # a single record saved 1-D
        idx = idx.reshape(1, -1)
    if idx.ndim != 2 or idx.shape[1] != 2:
        raise ValueError(f"index array has shape {idx.shape}, expected (n, 2)")
    if idx.dtype.kind not in "iu" and not (idx.dtype.kind == "f" and np.all(np.mod(idx, 1) == 0)):
        raise ValueError(f"index array has dtype {idx.dtype}, expected integers")
    idx = idx.astype(np.int64)
    if locs is not None:
        locs = np.asarray(locs)
        if locs.size == 0:  # Slideflow: empty array = records have no locations
            locs = None
        elif locs.shape != (idx.shape[0], 2) or locs.dtype.kind not in "iuf":
            locs, stated = None, False  # malformed: recompute when asked
        else:
            locs = locs.astype(np.int64)
    return idx, locs, stated


def save_index(index_path: str | os.PathLike, index: np.ndarray, locations: np.ndarray | None) -> None:
    """Atomically write a Slideflow `.index.npz` (arr_0 int64 (n, 2); locations int64 (n, 2) or empty)."""
    index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
    locs = np.array([]) if locations is None else np.asarray(locations, dtype=np.int64).reshape(-1, 2)
    atomic_save_npz(index_path, arr_0=index, locations=locs)


def _loc_of(rec: Mapping) -> tuple[int, int] | None:
    xy = []
    for k in ("loc_x", "loc_y"):
        v = rec.get(k)
        if isinstance(v, (list, tuple, np.ndarray)) and len(v) == 1:
            v = v[0]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            return None
        xy.append(int(v))
    return xy[0], xy[1]


def _scan(path: str, verify: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scan a TFRecord (plain or GZIP) -> (index, locations or None). GZIP offsets are decompressed offsets."""
    f, size, _ = _open_stream(path)
    rows: list[tuple[int, int]] = []
    locs: list[tuple[int, int]] | None = []
    with f:
        for off, data in _iter_frames(f, path, verify, size):
            rows.append((off, len(data) + FRAME_BYTES))
            if locs is not None:
                loc = _loc_of(_decode(data, path, off))
                if loc is None:
                    locs = None
                else:
                    locs.append(loc)
    idx = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    return idx, (np.asarray(locs, dtype=np.int64).reshape(-1, 2) if locs and rows else None)


def build_index(path: str | os.PathLike, *, write: bool = True, verify: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Scan an uncompressed TFRecord, optionally (write=True) save `<stem>.index.npz`; return (index, locations)."""
    path = os.fspath(path)
    if _is_gzip(path):
        raise TFRecordError(path, "cannot index a GZIP-compressed TFRecord (offsets need an uncompressed file)", 0)
    idx, locs = _scan(path, verify)
    if write:
        save_index(index_path_for(path), idx, locs)
    return idx, locs


def _index_problem(idx: np.ndarray, size: int) -> str | None:
    """Why `idx` cannot describe a file of `size` bytes (None when consistent)."""
    n = idx.shape[0]
    if n == 0:
        return None if size == 0 else f"index lists no records but file has {size} bytes"
    off, tot = idx[:, 0], idx[:, 1]
    if off[0] != 0:
        return f"first record offset is {off[0]}, not 0"
    if np.any(tot < FRAME_BYTES):
        return "record length smaller than the 16 framing bytes"
    if n > 1 and np.any(off[1:] != off[:-1] + tot[:-1]):
        return "record offsets are not contiguous"
    end = int(off[-1] + tot[-1])
    if end != size:
        return f"records end at byte {end} but file has {size} bytes"
    return None


# ----------------------------------------------------------------------------- reader


class TFRecordReader:
    """Random and sequential access to one TFRecord file.

    `len()`, `read(i)`, `read_raw(i)`, `read_tile(i)`, `locations`, `get_record_by_location(x, y)`
    use the index (loaded lazily; rebuilt and, if `write_index`, saved when missing or stale).
    `iter(reader)` scans sequentially without the index. verify: check record CRCs (both paths).
    The file descriptor opens lazily and is reopened after fork/unpickling, so one reader
    per DataLoader worker (or a reader shared into forked workers) is safe.
    GZIP-compressed files support iteration, `len()` and `locations` only.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, write_index: bool = True):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"TFRecord not found: '{self.path}'")
        self.verify = verify
        self.write_index = write_index
        self._fd: int | None = None
        self._pid: int | None = None
        self._index: np.ndarray | None = None
        self._locations: np.ndarray | None = None
        self._locations_known = False
        self._loc_map: dict[tuple[int, int], int] | None = None
        self._gzip = _is_gzip(self.path)

    # -- pickling / fork safety
    def __getstate__(self):
        st = self.__dict__.copy()
        st["_fd"] = None
        st["_pid"] = None
        return st

    def _fileno(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        """Close the file descriptor (reopened on next use)."""
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def __enter__(self) -> TFRecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        n = len(self._index) if self._index is not None else "?"
        return f"TFRecordReader('{self.path}', records={n})"

    # -- index
    def _load(self) -> np.ndarray:
        if self._index is not None:
            return self._index
        if self._gzip:  # no usable byte offsets: scan once, keep in memory
            self._index, locs = _scan(self.path, self.verify)
            self._set_locations(locs)
            return self._index
        size = os.path.getsize(self.path)
        ipath = find_index(self.path)
        if ipath is not None:
            try:
                idx, locs, stated = _load_index(ipath)
                problem = _index_problem(idx, size)
                if problem is None and os.stat(self.path).st_mtime_ns > os.stat(ipath).st_mtime_ns:
                    problem = "index is older than the TFRecord"
            except (OSError, ValueError, KeyError, EOFError) as e:
                problem = f"unreadable index ({type(e).__name__}: {e})"
            if problem is None:
                self._index = idx
                if stated or idx.shape[0] == 0:
                    self._set_locations(locs)
                return idx
            log.info("Rebuilding index for %s: %s (%s)", self.path, problem, ipath)
        self._rebuild()
        return self._index

    def _rebuild(self) -> None:
        idx, locs = _scan(self.path, self.verify)
        self._index = idx
        self._set_locations(locs)
        if self.write_index:
            try:
                save_index(index_path_for(self.path), idx, locs)
            except OSError as e:
                log.warning("Could not write index for %s (%s); using it in memory only.", self.path, e)

    def _set_locations(self, locs: np.ndarray | None) -> None:
        self._locations = locs
        self._locations_known = True
        self._loc_map = None

    @property
    def index(self) -> np.ndarray:
        """int64 (n, 2): [byte offset, total record bytes incl. 16 framing bytes] per record."""
        return self._load()

    @property
    def locations(self) -> np.ndarray | None:
        """int64 (n, 2) [loc_x, loc_y] per record (level-0 px), or None if records lack locations."""
        self._load()
        if not self._locations_known:  # index without locations (text/.npy): one scan, then upgrade it
            self._rebuild()
        return self._locations

    def __len__(self) -> int:
        return int(self._load().shape[0])

    # -- random access
    def _pread(self, n: int, off: int) -> bytes:
        fd = self._fileno()
        if hasattr(os, "pread"):
            buf = os.pread(fd, n, off)
            if len(buf) == n or not buf:
                return buf
            parts, got = [buf], len(buf)
            while got < n:
                b = os.pread(fd, n - got, off + got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
            return b"".join(parts)
        os.lseek(fd, off, os.SEEK_SET)  # pragma: no cover - platforms without pread
        return os.read(fd, n)

    def _frame(self, i: int) -> tuple[memoryview, int]:
        """(record data, byte offset) of record i via the index."""
        if self._gzip:
            raise TFRecordError(
                self.path,
                "random access is not supported for GZIP-compressed TFRecords; iterate sequentially or decompress the file",
            )
        idx = self._load()
        n = idx.shape[0]
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for '{self.path}' ({n} records)")
        i = i % n
        off, total = (int(v) for v in idx[i])
        buf = self._pread(total, off)
        if len(buf) != total:
            raise TFRecordError(
                self.path,
                f"record {i}: index says {total} bytes but only {len(buf)} remain (stale index? delete it to rebuild)",
                off,
            )
        length, length_crc = struct.unpack_from("<QI", buf)
        if length + FRAME_BYTES != total:
            raise TFRecordError(
                self.path,
                f"record {i}: length field {length} does not match index entry of "
                f"{total} bytes (stale index? delete it to rebuild)",
                off,
            )
        data = memoryview(buf)[HEADER_BYTES : HEADER_BYTES + length]
        if self.verify:
            if masked_crc32c(buf[:8]) != length_crc:
                raise TFRecordError(self.path, f"record {i}: length checksum mismatch", off)
            if masked_crc32c(data) != struct.unpack_from("<I", buf, HEADER_BYTES + length)[0]:
                raise TFRecordError(self.path, f"record {i}: data checksum mismatch", off)
        return data, off

    def read_raw(self, i: int) -> bytes:
        """Serialized `tf.train.Example` bytes of record i (negative i counts from the end)."""
        return bytes(self._frame(i)[0])

    def read(self, i: int, unwrap: bool = True) -> dict:
        """Decoded record i: {name: bytes | int | float | list} (see `decode_example`)."""
        data, off = self._frame(i)
        return _decode(data, self.path, off, unwrap)

    __getitem__ = read

    def read_tile(self, i: int) -> TileRecord:
        """Record i as a `TileRecord` (slide name decoded from utf-8)."""
        return _as_tile(self.read(i))

    def get_record_by_location(self, x: int, y: int) -> dict:
        """Decoded record whose (loc_x, loc_y) == (x, y); KeyError if none."""
        if self._loc_map is None:
            locs = self.locations
            if locs is None:
                raise KeyError(f"'{self.path}' has no tile locations")
            self._loc_map = {}
            for j, (lx, ly) in enumerate(locs.tolist()):
                self._loc_map.setdefault((lx, ly), j)
        j = self._loc_map.get((int(x), int(y)))
        if j is None:
            raise KeyError(f"no record at location ({x}, {y}) in '{self.path}'")
        return self.read(j)

    # -- sequential access
    def __iter__(self) -> Iterator[dict]:
        return iter_records(self.path, verify=self.verify)

    def iter_raw(self) -> Iterator[bytes]:
        """Sequentially yield serialized records."""
        return iter_records(self.path, verify=self.verify, raw=True)

    def iter_tiles(self) -> Iterator[TileRecord]:
        """Sequentially yield `TileRecord`s."""
        return (_as_tile(r) for r in iter_records(self.path, verify=self.verify))


def _as_tile(rec: Mapping) -> TileRecord:
    slide = rec.get("slide", b"")
    img = rec.get("image_raw")
    if not isinstance(img, bytes):
        raise KeyError("record has no single 'image_raw' bytes feature")
    return TileRecord(
        img,
        slide.decode("utf-8") if isinstance(slide, bytes) else str(slide),
        rec.get("loc_x") if isinstance(rec.get("loc_x"), int) else None,
        rec.get("loc_y") if isinstance(rec.get("loc_y"), int) else None,
    )


# ----------------------------------------------------------------------------- writer


class TFRecordWriter:
    """Write a TFRecord atomically: records go to `.<name>.tmp-<pid>-<token>` in the same directory,
    renamed onto `path` by `close()` (or a clean `with` exit), followed by `<stem>.index.npz`.

    On an exception inside `with`, or `abort()`, the temp file is removed and `path` is untouched.
    slide: default slide name for `write_tile`. overwrite=False: refuse an existing `path`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        slide: str | None = None,
        *,
        write_index: bool = True,
        overwrite: bool = True,
        fsync: bool = True,
    ):
        self.path = os.fspath(path)
        self.closed = True
        if not overwrite and os.path.exists(self.path):
            raise FileExistsError(f"'{self.path}' exists; pass overwrite=True to replace it")
        self.slide = slide
        self.write_index = write_index
        self._af = AtomicFile(self.path, "wb", buffering=1 << 20, fsync=fsync)
        self._rows: list[tuple[int, int]] = []
        self._locs: list[tuple[int, int]] | None = []
        self._pos = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def n_records(self) -> int:
        """Records written so far."""
        return len(self._rows)

    def write_raw(self, data: bytes | bytearray | memoryview, location: tuple[int, int] | None = None) -> None:
        """Append one serialized record; `location` (loc_x, loc_y) goes to the index."""
        if self.closed:
            raise ValueError(f"TFRecordWriter for '{self.path}' is closed")
        length = struct.pack("<Q", len(data))
        f = self._af.file
        f.write(length)
        f.write(struct.pack("<I", masked_crc32c(length)))
        f.write(data)
        f.write(struct.pack("<I", masked_crc32c(data)))
        total = len(data) + FRAME_BYTES
        self._rows.append((self._pos, total))
        self._pos += total
        if self._locs is not None:
            if location is None:
                self._locs = None
            else:
                self._locs.append((int(location[0]), int(location[1])))

    def write(self, example: Mapping[str, Any], kinds: Mapping[str, str] | None = None) -> None:
        """Encode `example` (see `encode_example`) and append it."""
        self.write_raw(encode_example(example, kinds), _loc_of(example))

    def write_tile(self, image_bytes: bytes, loc_x: int, loc_y: int, slide: str | None = None) -> None:
        """Append a tile: encoded image (JPEG/PNG bytes), centre (loc_x, loc_y) in level-0 px."""
        slide = self.slide if slide is None else slide
        if slide is None:
            raise ValueError("write_tile needs a slide name (pass slide= here or to TFRecordWriter)")
        x, y = int(loc_x), int(loc_y)
        self.write_raw(encode_example({"image_raw": bytes(image_bytes), "slide": slide, "loc_x": x, "loc_y": y}), (x, y))

    def close(self) -> None:
        """Finish: fsync, rename onto `path`, write the index (and drop stale Slideflow `.index`/`.index.npy`)."""
        if self.closed:
            return
        self.closed = True
        self._af.commit()
        if self.write_index:
            idx = np.asarray(self._rows, np.int64).reshape(-1, 2)
            locs = np.asarray(self._locs, np.int64).reshape(-1, 2) if self._locs and self._rows else None
            save_index(index_path_for(self.path), idx, locs)
            base = os.path.join(os.path.dirname(self.path), _stem(self.path) + ".index")
            for stale in (base, base + ".npy"):
                if os.path.isfile(stale):
                    os.unlink(stale)

    def abort(self) -> None:
        """Discard everything written; `path` is not created/changed."""
        self.closed = True
        self._af.abort()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        if not getattr(self, "closed", True):
            self.abort()


# ----------------------------------------------------------------------------- images


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode JPEG/PNG bytes -> (H, W, 3) uint8 RGB. EXIF orientation is ignored (as in tf.io.decode_jpeg)."""
    import cv2

    arr = np.frombuffer(data, dtype=np.uint8)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # newer OpenCV decodes straight to RGB
    flags = (cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag) | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(arr, flags) if arr.size else None
    if img is None:
        head = bytes(arr[:8]).hex()
        raise ImageDecodeError(f"cannot decode image ({arr.size} bytes, starting {head!r}); expected JPEG or PNG")
    return img if rgb_flag is not None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
