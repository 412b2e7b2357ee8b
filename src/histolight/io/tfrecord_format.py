"""TFRecord framing and tile-record schema, byte-compatible with TensorFlow and Slideflow (no TensorFlow needed).

File framing, per record (all little endian)::

    uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

masked_crc = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32), crc = CRC-32C.

Tile records are `tf.train.Example`s with `image_raw` (bytes, JPEG/PNG), `slide` (bytes, utf-8),
`loc_x`, `loc_y` (int64, tile centre in level-0 pixels). Files may be GZIP-compressed (sequential reads only).
"""

from __future__ import annotations

import gzip
import itertools
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import crc32c as _crc32c
import numpy as np

from histolight.errors import HistolightError
from histolight.io.example import ExampleDecodeError, decode_example

HEADER_BYTES = 12  # uint64 length + uint32 crc
FOOTER_BYTES = 4  # uint32 crc
FRAME_BYTES = HEADER_BYTES + FOOTER_BYTES
_GZIP_MAGIC = b"\x1f\x8b"
_MASK_DELTA = 0xA282EAD8
_CHUNK = 1 << 26  # largest single read, bytes (bounds memory on garbage lengths)


class TFRecordError(HistolightError, ValueError):
    """A TFRecord file (or its index) is corrupt, truncated or unusable. Names file, record number (0-based, when
    known), byte offset of the record and the reason."""

    def __init__(self, path: Any, reason: str, offset: int | None = None, record: int | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.offset = None if offset is None else int(offset)
        self.record = None if record is None else int(record)
        self.reason = reason
        rec = "" if record is None else f" record {int(record)}"
        where = "" if offset is None else f" at byte offset {int(offset)}"
        super().__init__(f"bad TFRecord '{self.path}'{rec}{where}: {reason}")


class TileRecord(NamedTuple):
    """One decoded tile record. loc_x/loc_y: tile centre, level-0 pixels (None when absent)."""

    image_raw: bytes
    slide: str
    loc_x: int | None
    loc_y: int | None


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TFRecord checksum: CRC-32C of `data`, rotated right by 15 bits plus 0xa282ead8 (uint32).

    CRC-32C comes from the `crc32c` package (C, with SSE4.2 / ARMv8 CRC instructions where the CPU has them:
    `crc32c.hardware_based`), several GB/s, so checking every record costs little next to decoding its image."""
    crc = _crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame_header(n: int) -> bytes:
    """The 12 header bytes of a record of `n` data bytes: uint64 length + uint32 masked CRC of those 8 bytes."""
    length = struct.pack("<Q", n)
    return length + struct.pack("<I", masked_crc32c(length))


def frame_footer(data: bytes | bytearray | memoryview) -> bytes:
    """The 4 footer bytes of a record: uint32 masked CRC of its data."""
    return struct.pack("<I", masked_crc32c(data))


def frame_record(data: bytes | bytearray | memoryview) -> bytes:
    """Full on-disk bytes of one record: header (12 B) + data + footer (4 B)."""
    return frame_header(len(data)) + bytes(data) + frame_footer(data)


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


def iter_frames(f, path: str, verify: bool, size: int | None) -> Iterator[tuple[int, memoryview]]:
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
    for i in itertools.count():
        header = _read_exact(f, HEADER_BYTES)
        if not header:
            return
        if len(header) < HEADER_BYTES:
            raise TFRecordError(path, f"truncated record header ({len(header)} of {HEADER_BYTES} bytes)", off, i)
        length, length_crc = struct.unpack("<QI", header)
        if verify and masked_crc32c(header[:8]) != length_crc:
            raise TFRecordError(path, f"length checksum mismatch (length field reads {length})", off, i)
        if size is not None and off + FRAME_BYTES + length > size:
            raise TFRecordError(
                path,
                f"truncated record: header says {length} data bytes + {FOOTER_BYTES} checksum bytes, "
                f"only {size - off - HEADER_BYTES} bytes remain",
                off,
                i,
            )
        body = _read_exact(f, length + FOOTER_BYTES)
        if len(body) < length + FOOTER_BYTES:
            raise TFRecordError(
                path,
                f"truncated record: header says {length} data bytes + {FOOTER_BYTES} checksum bytes, "
                f"only {len(body)} bytes remain",
                off,
                i,
            )
        data = memoryview(body)[:length]
        if verify and masked_crc32c(data) != struct.unpack_from("<I", body, length)[0]:
            raise TFRecordError(path, f"data checksum mismatch ({length}-byte record)", off, i)
        yield off, data
        off += length + FRAME_BYTES


def is_gzip(path: str) -> bool:
    """Whether the file starts with the GZIP magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_stream(path: str):
    """(binary stream, size or None, is_gzip)."""
    if is_gzip(path):
        return gzip.open(path, "rb"), None, True
    return open(path, "rb", buffering=1 << 20), os.path.getsize(path), False


def decode_record(data, path: str, offset: int | None, unwrap: bool = True, record: int | None = None) -> dict:
    """`decode_example(data)`, raising TFRecordError (naming `path`, `record` and byte `offset`) for invalid records."""
    try:
        return decode_example(data, unwrap=unwrap)
    except ExampleDecodeError as e:
        raise TFRecordError(path, f"record is not a valid tf.train.Example: {e}", offset, record) from None


def iter_records(path: str | os.PathLike, *, verify: bool = True, raw: bool = False, unwrap: bool = True) -> Iterator[Any]:
    """Sequentially yield decoded records (dicts, see `decode_example`) or raw bytes (`raw=True`).

    Works on plain and GZIP-compressed files; no index needed. verify: check both CRCs per record.
    """
    path = os.fspath(path)
    f, size, _ = open_stream(path)
    with f:
        for i, (off, data) in enumerate(iter_frames(f, path, verify, size)):
            yield bytes(data) if raw else decode_record(data, path, off, unwrap, i)


def record_location(rec: Mapping) -> tuple[int, int] | None:
    """(loc_x, loc_y) of a decoded or to-be-encoded record (level-0 px), None unless both are single integers."""
    xy = []
    for k in ("loc_x", "loc_y"):
        v = rec.get(k)
        if isinstance(v, (list, tuple, np.ndarray)) and len(v) == 1:
            v = v[0]
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            return None
        xy.append(int(v))
    return xy[0], xy[1]


def tile_record(rec: Mapping) -> TileRecord:
    """A decoded record as a `TileRecord` (slide name decoded from utf-8); KeyError without one `image_raw`."""
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
