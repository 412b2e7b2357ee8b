"""TFRecord files: writer/reader round trips, Slideflow index layouts, stale indices, corrupt files, atomicity,
image decoding and the atomic-write helpers."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from histolight.errors import HistolightError
from histolight.io import (
    ImageDecodeError,
    TFRecordError,
    TFRecordReader,
    TFRecordWriter,
    atomic_save_npz,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    build_index,
    decode_image,
    find_index,
    frame_record,
    index_path_for,
    iter_records,
    load_index,
    save_index,
)


def _jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _write_tiles(path, n, slide="slideA", seed=0):
    rng = random.Random(seed)
    expected = []
    with TFRecordWriter(path, slide=slide) as w:
        for _ in range(n):
            img = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
            x, y = rng.randint(0, 200_000), rng.randint(0, 200_000)
            w.write_tile(img, x, y)
            expected.append({"image_raw": img, "slide": slide.encode(), "loc_x": x, "loc_y": y})
        assert len(w) == n
    return expected


def _slideflow_scan(path):
    """Slideflow's create_index loop (slideflow/util/tfrecord2idx.py), re-implemented: [start, tell()-start]."""
    rows = []
    with open(path, "rb") as f:
        while True:
            cur = f.tell()
            byte_len = f.read(8)
            if len(byte_len) == 0:
                break
            f.read(4)
            proto_len = struct.unpack("q", byte_len)[0]
            f.read(proto_len)
            f.read(4)
            rows.append([cur, f.tell() - cur])
    return np.array(rows)


# --- writer / reader ------------------------------------------------------------------------------


def test_roundtrip_500_random_access_equals_sequential(tmp_path):
    p = tmp_path / "slideA.tfrecords"
    expected = _write_tiles(p, 500)
    r = TFRecordReader(p)
    assert len(r) == 500
    seq = list(r)
    assert seq == expected
    order = list(range(500))
    random.Random(3).shuffle(order)
    for i in order:
        assert r.read(i) == seq[i]
    assert r[-1] == expected[-1]
    with pytest.raises(IndexError):
        r.read(500)
    assert np.array_equal(r.locations, [[e["loc_x"], e["loc_y"]] for e in expected])
    e = expected[123]
    assert r.get_record_by_location(e["loc_x"], e["loc_y"]) == e
    with pytest.raises(KeyError):
        r.get_record_by_location(-1, -1)
    t = r.read_tile(5)
    assert t.image_raw == expected[5]["image_raw"] and t.slide == "slideA" and t.loc_x == expected[5]["loc_x"]
    assert [tt.loc_y for tt in r.iter_tiles()] == [e["loc_y"] for e in expected]
    # pickled (spawned DataLoader workers) and fresh readers work without an open handle
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._fd is None and r2.read(42) == expected[42]
    r.close()
    assert r.read(7) == expected[7]  # reopens lazily


def test_reader_after_fork(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    p = tmp_path / "s.tfrecords"
    expected = _write_tiles(p, 20)
    r = TFRecordReader(p)
    assert r.read(0) == expected[0]
    parent_fd = r._fd
    pid = os.fork()
    if pid == 0:  # child: must reopen its own handle and read correctly
        try:
            ok = r.read(13) == expected[13] and r._fd != parent_fd and r._pid == os.getpid()
        except BaseException:  # noqa: BLE001 - the forked child must always reach os._exit
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert r._fd == parent_fd and r.read(19) == expected[19]


def test_generic_write_and_index_without_locations(tmp_path):
    p = tmp_path / "gen.tfrecords"
    with TFRecordWriter(p) as w:
        w.write({"label": 3, "emb": np.arange(4, dtype=np.float32), "name": "x"})
        w.write({"label": -1, "emb": [], "name": b"y"}, kinds={"emb": "float"})
    with np.load(index_path_for(p)) as z:
        assert sorted(z.files) == ["arr_0", "locations"]
        assert z["locations"].size == 0  # Slideflow writes an empty array when there are no locations
    r = TFRecordReader(p)
    assert r.read(0) == {"label": 3, "emb": [0.0, 1.0, 2.0, 3.0], "name": b"x"}
    assert r.read(1) == {"label": -1, "emb": [], "name": b"y"}
    assert r.locations is None
    with pytest.raises(ValueError):
        TFRecordWriter(tmp_path / "n.tfrecords").write_tile(b"img", 1, 2)  # no slide name


def test_index_matches_slideflow_layout(tmp_path):
    p = tmp_path / "TCGA-XX.tfrecords"
    expected = _write_tiles(p, 37)
    ipath = tmp_path / "TCGA-XX.index.npz"
    assert index_path_for(p) == str(ipath) and find_index(p) == str(ipath)
    with np.load(ipath, allow_pickle=False) as z:
        assert sorted(z.files) == ["arr_0", "locations"]
        arr, locs = z["arr_0"], z["locations"]
    assert arr.dtype == np.int64 and arr.shape == (37, 2)
    assert np.array_equal(arr, _slideflow_scan(p))  # [start offset, total bytes incl. 16 framing bytes]
    assert arr[0, 0] == 0 and arr[-1].sum() == os.path.getsize(p)
    assert locs.dtype == np.int64 and np.array_equal(locs, [[e["loc_x"], e["loc_y"]] for e in expected])
    idx, l2 = load_index(ipath)
    assert np.array_equal(idx, arr) and np.array_equal(l2, locs)
    assert np.array_equal(build_index(p, write=False)[0], arr)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_reads_slideflow_text_and_npy_indices(tmp_path):
    p = tmp_path / "old.tfrecords"
    expected = _write_tiles(p, 9)
    arr = _slideflow_scan(p)
    os.unlink(tmp_path / "old.index.npz")
    # Slideflow < 1.3 text index: "offset length" per line (tfrecord2idx.py)
    (tmp_path / "old.index").write_text("".join(f"{a} {b}\n" for a, b in arr))
    r = TFRecordReader(p)
    assert len(r) == 9 and r.read(8) == expected[8]
    assert not (tmp_path / "old.index.npz").exists()  # valid text index used as is
    assert np.array_equal(r.locations, [[e["loc_x"], e["loc_y"]] for e in expected])  # computed by one scan
    assert (tmp_path / "old.index.npz").exists()
    # .npy (Slideflow with SF_ALLOW_ZIP=0) and a one-record text index (loads 1-D)
    os.unlink(tmp_path / "old.index.npz")
    os.unlink(tmp_path / "old.index")
    np.save(tmp_path / "old.index.npy", arr)
    assert TFRecordReader(p).read(4) == expected[4]
    q = tmp_path / "one.tfrecords"
    with TFRecordWriter(q, "one", write_index=False) as w:
        w.write_tile(b"abc", 5, 6)
    (tmp_path / "one.index").write_text(f"0 {os.path.getsize(q)}\n")
    r1 = TFRecordReader(q)
    assert len(r1) == 1 and r1.read(0)["loc_y"] == 6
    # An npz written by Slideflow before locations were stored (arr_0 only)
    np.savez(tmp_path / "old.index", arr)  # -> old.index.npz with arr_0
    os.unlink(tmp_path / "old.index.npy")
    assert len(TFRecordReader(p)) == 9


def _set_mtimes(tfr, idx, tfr_s, idx_s):
    os.utime(tfr, (tfr_s, tfr_s))
    os.utime(idx, (idx_s, idx_s))


def test_missing_and_stale_index_rebuilt(tmp_path):
    p = tmp_path / "s.tfrecords"
    ip = tmp_path / "s.index.npz"
    _write_tiles(p, 10)
    os.unlink(ip)
    assert len(TFRecordReader(p)) == 10 and ip.exists()  # missing -> rebuilt and saved

    # file rewritten without index: record count and size change
    saved = ip.read_bytes()
    exp20 = _write_tiles(p, 20, seed=1)
    ip.write_bytes(saved)
    _set_mtimes(p, ip, 1_000_000, 2_000_000)  # index even claims to be newer
    r = TFRecordReader(p)
    assert len(r) == 20 and r.read(19) == exp20[19]
    assert len(load_index(ip)[0]) == 20

    # offsets beyond the file
    atomic_save_npz(ip, arr_0=np.array([[0, 10**9]], np.int64), locations=np.array([[1, 2]]))
    _set_mtimes(p, ip, 1_000_000, 2_000_000)
    assert len(TFRecordReader(p)) == 20

    # same layout but the TFRecord is newer than its index: rebuilt (locations would be stale)
    rng = random.Random(1)
    with TFRecordWriter(p, slide="slideA", write_index=False) as w:
        for e in exp20:
            w.write_tile(e["image_raw"], e["loc_x"] + 1, e["loc_y"])
            rng.random()
    _set_mtimes(p, ip, 3_000_000, 2_000_000)
    r = TFRecordReader(p)
    assert r.locations[0, 0] == exp20[0]["loc_x"] + 1

    # garbage index file
    ip.write_bytes(b"not a zip")
    assert len(TFRecordReader(p)) == 20
    # read-only use: nothing written
    os.unlink(ip)
    assert len(TFRecordReader(p, write_index=False)) == 20 and not ip.exists()


def test_truncated_and_corrupt_files_raise_with_offset(tmp_path):
    p = tmp_path / "t.tfrecords"
    expected = _write_tiles(p, 5)
    arr = load_index(index_path_for(p))[0]
    data = p.read_bytes()
    cut = int(arr[3, 0]) + 20  # inside record 3's payload
    p.write_bytes(data[:cut])
    with pytest.raises(TFRecordError) as ei:
        list(iter_records(p))
    err = ei.value
    assert err.offset == arr[3, 0] and err.path == str(p)
    assert str(p) in str(err) and f"offset {arr[3, 0]}" in str(err) and "truncated" in str(err)
    assert isinstance(err, HistolightError) and isinstance(err, ValueError)
    # header cut short
    p.write_bytes(data[: int(arr[2, 0]) + 5])
    with pytest.raises(TFRecordError, match=rf"offset {arr[2, 0]}.*truncated record header"):
        list(TFRecordReader(p, write_index=False))
    # the index written before the truncation is kept: the records before the cut read, the lost ones are named
    r = TFRecordReader(p, write_index=False)
    assert len(r) == 5 and r.read(1) == expected[1]
    for i in (2, 4):
        with pytest.raises(TFRecordError, match=rf"record {i} at byte offset {arr[i, 0]}: truncated file") as ei:
            r.read(i)
        assert ei.value.record == i and ei.value.offset == arr[i, 0]
    # without that index, the rebuild scan reports the truncation (and the record)
    os.unlink(index_path_for(p))
    with pytest.raises(TFRecordError, match=rf"record 2 at byte offset {arr[2, 0]}: truncated"):
        len(TFRecordReader(p, write_index=False))
    save_index(index_path_for(p), arr, None)

    # flipped payload byte (last byte of the slide name): CRC error when verifying, readable when not
    bad = bytearray(data)
    bad[int(arr[1].sum()) - 5] ^= 0x01
    p.write_bytes(bytes(bad))
    _set_mtimes(p, index_path_for(p), 1_000_000, 2_000_000)
    with pytest.raises(TFRecordError, match=rf"offset {arr[1, 0]}: data checksum mismatch"):
        list(iter_records(p))
    with pytest.raises(TFRecordError, match=rf"record 1 at byte offset {arr[1, 0]}: data checksum"):
        TFRecordReader(p).read(1)
    assert TFRecordReader(p, verify=False).read(2) == expected[2]
    assert [r["slide"] for r in iter_records(p, verify=False)][1] == b"slide@"
    # corrupted length field: length CRC catches it
    bad = bytearray(data)
    bad[int(arr[4, 0]) + 1] ^= 0x01
    p.write_bytes(bytes(bad))
    with pytest.raises(TFRecordError, match=rf"offset {arr[4, 0]}: length checksum mismatch"):
        list(iter_records(p))
    # payload that is not an Example
    p.write_bytes(frame_record(b"\x0a\x05\x0a"))
    with pytest.raises(TFRecordError, match="not a valid tf.train.Example"):
        list(iter_records(p))


def test_interrupted_writer_leaves_no_final_file(tmp_path):
    p = tmp_path / "w.tfrecords"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(p, slide="s") as w:
            for i in range(10):
                w.write_tile(b"img", i, i)
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    # an existing dataset survives a failed rewrite untouched
    expected = _write_tiles(p, 3)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    with pytest.raises(KeyboardInterrupt):
        with TFRecordWriter(p, slide="s") as w:
            w.write_tile(b"new", 0, 0)
            raise KeyboardInterrupt
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert list(TFRecordReader(p)) == expected
    with pytest.raises(FileExistsError):
        TFRecordWriter(p, slide="s", overwrite=False)
    # abandoned writer (never closed) is cleaned up
    w = TFRecordWriter(tmp_path / "x.tfrecords", slide="s")
    w.write_tile(b"a", 1, 1)
    del w
    assert sorted(os.listdir(tmp_path)) == sorted(before)
    # a killed process leaves at most a hidden temp file, never the final file
    q = tmp_path / "killed.tfrecords"
    code = textwrap.dedent(f"""
        import os
        from histolight.io import TFRecordWriter
        w = TFRecordWriter({str(q)!r}, slide="s")
        for i in range(100):
            w.write_tile(b"x" * 1000, i, i)
        w._af.file.flush()
        os._exit(3)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    assert not q.exists() and not (tmp_path / "killed.index.npz").exists()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".killed.tfrecords.tmp-")]


def test_writer_replaces_stale_slideflow_indices(tmp_path):
    p = tmp_path / "s.tfrecords"
    (tmp_path / "s.index").write_text("0 999\n")
    np.save(tmp_path / "s.index.npy", np.array([[0, 999]]))
    expected = _write_tiles(p, 4)
    assert sorted(os.listdir(tmp_path)) == ["s.index.npz", "s.tfrecords"]
    assert list(TFRecordReader(p)) == expected


def test_empty_file(tmp_path):
    p = tmp_path / "e.tfrecords"
    with TFRecordWriter(p, slide="e"):
        pass
    assert p.stat().st_size == 0
    r = TFRecordReader(p)
    assert len(r) == 0 and list(r) == [] and r.locations is None
    assert load_index(index_path_for(p))[0].shape == (0, 2)


def test_gzip_compressed_sequential(tmp_path):
    p = tmp_path / "g.tfrecords"
    expected = _write_tiles(p, 25)
    raw = p.read_bytes()
    os.unlink(index_path_for(p))
    p.write_bytes(gzip.compress(raw))
    r = TFRecordReader(p)
    assert list(r) == expected
    assert len(r) == 25
    assert np.array_equal(r.locations, [[e["loc_x"], e["loc_y"]] for e in expected])
    with pytest.raises(TFRecordError, match="GZIP"):
        r.read(0)
    assert not os.path.exists(index_path_for(p))
    p.write_bytes(gzip.compress(raw[:-3]))
    with pytest.raises(TFRecordError, match="truncated"):
        list(iter_records(p))
    p.write_bytes(gzip.compress(raw)[:-50])  # damaged compressed stream
    with pytest.raises(TFRecordError, match="GZIP"):
        list(iter_records(p))


# --- images and atomic helpers ----------------------------------------------------------------------


@pytest.mark.parametrize("rgb_flag", [True, False])
def test_decode_image_jpeg_png_rgb(rgb_flag, monkeypatch):
    if not rgb_flag:  # older OpenCV without IMREAD_COLOR_RGB: BGR decode + conversion
        monkeypatch.delattr(cv2, "IMREAD_COLOR_RGB", raising=False)
    elif not hasattr(cv2, "IMREAD_COLOR_RGB"):
        pytest.skip("OpenCV without IMREAD_COLOR_RGB")
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[2, 3] = (10, 20, 30)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = decode_image(png.tobytes())
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3) and np.array_equal(out, rgb)
    ok, jpg = cv2.imencode(
        ".jpg", cv2.cvtColor(np.full((16, 16, 3), (200, 30, 40), np.uint8), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
    )
    out = decode_image(memoryview(jpg.tobytes()))
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - (200, 30, 40)).max() <= 6
    ok, gray = cv2.imencode(".png", np.full((4, 5), 77, np.uint8))
    assert decode_image(gray.tobytes()).shape == (4, 5, 3)
    assert decode_image(_jpeg(0)).shape == (32, 32, 3)
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image")
    with pytest.raises(ImageDecodeError):
        decode_image(b"")


def test_atomic_helpers(tmp_path):
    t = tmp_path / "a.txt"
    atomic_write_text(t, "héllo")
    assert t.read_text(encoding="utf-8") == "héllo"
    umask = os.umask(0o022)
    os.umask(umask)
    assert (t.stat().st_mode & 0o777) == (0o666 & ~umask)
    with pytest.raises(ZeroDivisionError):
        with atomic_write(t, "w") as f:
            f.write("partial")
            raise ZeroDivisionError
    assert t.read_text(encoding="utf-8") == "héllo" and os.listdir(tmp_path) == ["a.txt"]
    atomic_write_json(tmp_path / "c.json", {"b": [1, 2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"b": [1, 2]}
    atomic_save_npz(tmp_path / "d.npz", x=np.arange(3))
    with np.load(tmp_path / "d.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]
    with atomic_write(tmp_path / "e.bin") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "e.bin").read_bytes() == b"\x00\x01"
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
