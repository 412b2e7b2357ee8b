"""TFRecord indices: Slideflow's `<stem>.index.npz` (written), its text `.index` and `.index.npy` (read).

Layout (Slideflow, `slideflow/util/tfrecord2idx.py`): `<stem>.index.npz` next to `<stem>.tfrecords`, written
with `np.savez(arr_0=..., locations=...)`: `arr_0` int64 (n, 2) = [start byte offset, total record bytes incl. the
16 framing bytes]; `locations` int64 (n, 2) = [loc_x, loc_y] in level-0 px (an empty float array when records
carry no location, as Slideflow writes it). Plain-text `<stem>.index` holds "offset length" per line.
`TFRecordReader` rebuilds a missing, unreadable or stale index by scanning (`scan_records`).
"""

from __future__ import annotations

import os
import struct

import numpy as np

from histolight.io.atomic import atomic_save_npz
from histolight.io.tfrecord_format import (
    FRAME_BYTES,
    HEADER_BYTES,
    TFRecordError,
    decode_record,
    is_gzip,
    iter_frames,
    open_stream,
    record_location,
)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def index_path_for(path: str | os.PathLike) -> str:
    """`<dir>/<stem>.index.npz` for `<dir>/<stem>.tfrecords` (Slideflow naming)."""
    return index_candidates(path)[0]


def index_candidates(path: str | os.PathLike) -> tuple[str, str, str]:
    """Index paths of a TFRecord, in order of preference: `<stem>.index.npz`, Slideflow's text `<stem>.index`,
    `<stem>.index.npy`."""
    path = os.fspath(path)
    base = os.path.join(os.path.dirname(path), _stem(path) + ".index")
    return base + ".npz", base, base + ".npy"


def find_index(path: str | os.PathLike) -> str | None:
    """First existing index for a TFRecord: `.index.npz`, then Slideflow's text `.index`, then `.index.npy`."""
    for cand in index_candidates(path):
        if os.path.isfile(cand):
            return cand
    return None


def load_index(index_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an index file -> (int64 (n, 2) [offset, total bytes], int64 (n, 2) [loc_x, loc_y] or None).

    Raises OSError/ValueError for unreadable or malformed files (callers rebuild).
    """
    idx, locs, _ = read_index_file(os.fspath(index_path))
    return idx, locs


def read_index_file(p: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
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


def scan_records(path: str, verify: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scan a TFRecord (plain or GZIP) -> (index, locations or None). GZIP offsets are decompressed offsets."""
    f, size, _ = open_stream(path)
    rows: list[tuple[int, int]] = []
    locs: list[tuple[int, int]] | None = []
    with f:
        for i, (off, data) in enumerate(iter_frames(f, path, verify, size)):
            rows.append((off, len(data) + FRAME_BYTES))
            if locs is not None:
                loc = record_location(decode_record(data, path, off, record=i))
                if loc is None:
                    locs = None
                else:
                    locs.append(loc)
    idx = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    return idx, (np.asarray(locs, dtype=np.int64).reshape(-1, 2) if locs and rows else None)


def build_index(path: str | os.PathLike, *, write: bool = True, verify: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Scan an uncompressed TFRecord, optionally (write=True) save `<stem>.index.npz`; return (index, locations)."""
    path = os.fspath(path)
    if is_gzip(path):
        raise TFRecordError(path, "cannot index a GZIP-compressed TFRecord (offsets need an uncompressed file)", 0)
    idx, locs = scan_records(path, verify)
    if write:
        save_index(index_path_for(path), idx, locs)
    return idx, locs


def index_problem(idx: np.ndarray, size: int) -> str | None:
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


def truncated_record(path: str, idx: np.ndarray, size: int) -> int | None:
    """The first record lost when the file `path` of `size` bytes was truncated after its index `idx` was written,
    else None (the index is simply wrong). Truncation: `idx` is consistent on its own, the file ends before its
    last record, and the length fields of the records around the cut (those whose header the file still holds,
    at least one) agree with `idx`."""
    if idx.shape[0] == 0:
        return None
    ends = idx[:, 0] + idx[:, 1]
    if size >= int(ends[-1]) or index_problem(idx, int(ends[-1])) is not None:
        return None
    lost = int(np.searchsorted(ends, size, side="right"))
    checked = 0
    with open(path, "rb") as f:
        for j in (lost - 1, lost):
            if j < 0 or int(idx[j, 0]) + HEADER_BYTES > size:
                continue
            f.seek(int(idx[j, 0]))
            if struct.unpack("<Q", f.read(8))[0] + FRAME_BYTES != int(idx[j, 1]):
                return None
            checked += 1
    return lost if checked else None
