"""TFRecord files of tiles, byte-compatible with TensorFlow and Slideflow (no TensorFlow needed): reader and writer.

`TFRecordReader` reads records at random (through the index) or sequentially; `TFRecordWriter` writes a file and
its index atomically. The parts live in their own modules and are re-exported here:
framing, checksums and the tile-record schema in :mod:`histolight.io.tfrecord_format`, the `.index.npz` /
Slideflow indices in :mod:`histolight.io.tfrecord_index`, image bytes in :mod:`histolight.io.images`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from histolight.io.atomic import AtomicFile
from histolight.io.example import encode_example
from histolight.io.images import ImageDecodeError, decode_image
from histolight.io.tfrecord_format import (
    FRAME_BYTES,
    HEADER_BYTES,
    TFRecordError,
    TileRecord,
    decode_record,
    frame_footer,
    frame_header,
    frame_record,
    is_gzip,
    iter_records,
    masked_crc32c,
    record_location,
    tile_record,
)
from histolight.io.tfrecord_index import (
    build_index,
    find_index,
    index_candidates,
    index_path_for,
    index_problem,
    load_index,
    read_index_file,
    save_index,
    scan_records,
    truncated_record,
)

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


class TFRecordReader:
    """Random and sequential access to one TFRecord file.

    `len()`, `read(i)`, `read_raw(i)`, `read_tile(i)`, `locations`, `get_record_by_location(x, y)`
    use the index (loaded lazily; rebuilt and, if `write_index`, saved when missing or stale).
    `iter(reader)` scans sequentially without the index. verify: check record CRCs (both paths); errors name
    the file, the record number and its byte offset. A file truncated after its index was written keeps that index,
    so reading one of the records it lost raises a `TFRecordError` naming that record.
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
        self._gzip = is_gzip(self.path)

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
            self._index, locs = scan_records(self.path, self.verify)
            self._set_locations(locs)
            return self._index
        size = os.path.getsize(self.path)
        ipath = find_index(self.path)
        if ipath is not None:
            try:
                idx, locs, stated = read_index_file(ipath)
                problem = index_problem(idx, size)
                lost = None if problem is None else truncated_record(self.path, idx, size)
                if lost is not None:  # keep the index: reading a lost record names it (on_corrupt decides)
                    problem = None
                    log.warning(
                        "'%s' is truncated: it ends at byte %d, inside record %d of the %d its index lists; "
                        "records %d-%d cannot be read",
                        self.path,
                        size,
                        lost,
                        len(idx),
                        lost,
                        len(idx) - 1,
                    )
                elif problem is None and os.stat(self.path).st_mtime_ns > os.stat(ipath).st_mtime_ns:
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
        idx, locs = scan_records(self.path, self.verify)
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
                f"truncated file: the index says this record has {total} bytes, the file ends {len(buf)} bytes into it "
                "(a damaged copy, or a stale index: delete it to rebuild)",
                off,
                i,
            )
        length, length_crc = struct.unpack_from("<QI", buf)
        if length + FRAME_BYTES != total:
            raise TFRecordError(
                self.path,
                f"length field {length} does not match the index entry of {total} bytes "
                "(a damaged record, or a stale index: delete it to rebuild)",
                off,
                i,
            )
        data = memoryview(buf)[HEADER_BYTES : HEADER_BYTES + length]
        if self.verify:
            if masked_crc32c(buf[:8]) != length_crc:
                raise TFRecordError(self.path, "length checksum mismatch", off, i)
            if masked_crc32c(data) != struct.unpack_from("<I", buf, HEADER_BYTES + length)[0]:
                raise TFRecordError(self.path, "data checksum mismatch", off, i)
        return data, off

    def read_raw(self, i: int) -> bytes:
        """Serialized `tf.train.Example` bytes of record i (negative i counts from the end)."""
        return bytes(self._frame(i)[0])

    def read(self, i: int, unwrap: bool = True) -> dict:
        """Decoded record i: {name: bytes | int | float | list} (see `decode_example`)."""
        data, off = self._frame(i)
        return decode_record(data, self.path, off, unwrap, i % len(self))

    __getitem__ = read

    def read_tile(self, i: int) -> TileRecord:
        """Record i as a `TileRecord` (slide name decoded from utf-8)."""
        return tile_record(self.read(i))

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
        return (tile_record(r) for r in iter_records(self.path, verify=self.verify))


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
        f = self._af.file
        f.write(frame_header(len(data)))
        f.write(data)
        f.write(frame_footer(data))
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
        self.write_raw(encode_example(example, kinds), record_location(example))

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
            for stale in index_candidates(self.path)[1:]:
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
