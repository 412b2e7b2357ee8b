"""Direct tile reading (histolight.wsi.tiff_tiles) gives OpenSlide's pixels, falls back where it must, and is
thread- and fork-safe."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import struct
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from histolight.demo import write_aperio_svs
from histolight.errors import SlideError
from histolight.wsi import Slide
from histolight.wsi.slide import rgba_to_rgb
from histolight.wsi.tiff_tiles import TiffTileReader, TileCache, UnsupportedTiff, available_decoders, jpeg_stream
from tests.conftest import shared_slide

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

DECODERS = available_decoders()


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour texture with sharp-ish detail (exercises chroma subsampling)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), np.uint8)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-20, 21, (h, w, 3))
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _boxes(level_wh, tile, rng, n_random=25):
    """Aligned, unaligned, edge, corner, straddling and fully out-of-bounds boxes (level px: x, y, w, h)."""
    lw, lh = level_wh
    boxes = [
        (0, 0, lw, lh),  # whole level
        (0, 0, tile, tile),  # one stored tile, aligned
        (tile, 0, 2 * tile, tile),  # two tiles, aligned
        (tile // 2, tile // 3, tile, tile),  # straddles four tiles
        (3, 5, 7, 9),  # inside one tile, unaligned
        (lw - 37, lh - 29, 37, 29),  # bottom-right corner (edge tile padding must not leak)
        (lw - 20, lh - 10, 64, 48),  # over the right/bottom edge
        (-30, -17, 80, 60),  # over the top/left edge
        (-5, 3, lw + 10, 11),  # wider than the level on both sides
        (lw + 3, 4, 16, 16),  # fully outside
        (-100, -100, 50, 50),  # fully outside (negative)
    ]
    for _ in range(n_random):
        w, h = int(rng.integers(1, min(600, lw + 40))), int(rng.integers(1, min(600, lh + 40)))
        boxes.append((int(rng.integers(-50, lw)), int(rng.integers(-50, lh)), w, h))
    return boxes


def assert_same_as_openslide(path, decoder=None, n_random=25):
    """Slide(fast) == Slide(fast=False) == raw OpenSlide read_region at every level; returns #regions compared."""
    fast = Slide(path, mpp=0.5)
    if decoder is not None:
        fast.tile_reader = TiffTileReader.from_openslide(fast._osr, path, decoder=decoder)
    plain = Slide(path, mpp=0.5, fast=False)
    osr = openslide.OpenSlide(str(path))
    assert fast.tile_reader is not None, fast.tile_reader_note
    assert plain.tile_reader is None
    rng = np.random.default_rng(0)
    n = 0
    for level in range(fast.level_count):
        ds = fast.level_downsamples[level]
        tile = fast.tile_reader.levels[level].tile_w
        for x, y, w, h in _boxes(fast.level_dimensions[level], tile, rng, n_random):
            loc = (round(x * ds), round(y * ds))
            a = fast.read_region(loc, level, (w, h))
            b = plain.read_region(loc, level, (w, h))
            assert a.shape == b.shape == (h, w, 3) and a.dtype == np.uint8
            diff = int(np.abs(a.astype(np.int16) - b).max())
            assert diff == 0, f"level {level} box {(x, y, w, h)}: max abs diff {diff}"
            lw, lh = fast.level_dimensions[level]
            if x >= 0 and y >= 0 and x + w <= lw and y + h <= lh:  # raw OpenSlide, no wrapper involved
                raw = rgba_to_rgb(np.asarray(osr.read_region(loc, level, (w, h))))
                assert np.array_equal(a, raw), f"level {level} box {(x, y, w, h)} differs from raw OpenSlide"
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("decoder", DECODERS)
def test_real_aperio_cmu_equals_openslide(decoder):
    """Real Aperio slide: JPEG tiles stored as RGB (photometric RGB, no JFIF/Adobe marker), shared JPEGTables."""
    path = shared_slide("cmu_small_region.svs")
    s = Slide(path)
    assert s.tile_reader is not None, s.tile_reader_note
    lv = s.tile_reader.levels[0]
    assert lv.colorspace == "RGB" and lv.tables is not None and (lv.tile_w, lv.tile_h) == (240, 240)
    assert s.tile_reader.verified_maxdiff == {0: 0}
    assert assert_same_as_openslide(path, decoder) > 30


@pytest.mark.parametrize("decoder", DECODERS)
def test_demo_slides_equal_openslide_every_level(tiny_demo, decoder):
    """Demo SVS written by tifffile: YCbCr 4:2:0 JFIF tiles, no JPEGTables, 3 levels (downsample 1, 4, 16)."""
    for path in sorted((tiny_demo / "slides").glob("*.svs")):
        s = Slide(path)
        assert s.tile_reader is not None, s.tile_reader_note
        assert s.level_count == 3 and all(lv.colorspace == "YCBCR" for lv in s.tile_reader.levels)
        assert assert_same_as_openslide(path, decoder) > 100


def test_decoding_colour_space_matters():
    """Negative control: decoding the CMU RGB-coded tiles as YCbCr (libjpeg's default guess) is visibly wrong."""
    imagecodecs = pytest.importorskip("imagecodecs")
    path = shared_slide("cmu_small_region.svs")
    r = Slide(path).tile_reader
    lv = r.levels[0]
    idx = int(np.argmax(lv.counts))
    with open(path, "rb") as fh:
        fh.seek(int(lv.offsets[idx]))
        data = fh.read(int(lv.counts[idx]))
    good = r.read_tile(0, idx % lv.tiles_across, idx // lv.tiles_across)
    wrong = imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace="YCBCR", outcolorspace="RGB")
    assert np.abs(good.astype(int) - wrong).max() > 50


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("stream_cs,tag_photometric", [("RGB", 6), ("YCBCR", 2)])
def test_photometric_tag_wins_like_openslide(tmp_path, stream_cs, tag_photometric, decoder):
    """OpenSlide forces the JPEG colour space from the TIFF Photometric tag, whatever the stream's markers say:
    a tile file whose tag and stream disagree must still give OpenSlide's (odd-coloured) pixels."""
    path = tmp_path / "mismatch.tiff"
    img = _texture(300, 400)
    tifffile.imwrite(
        path,
        img,
        tile=(64, 64),
        compression="jpeg",
        photometric="rgb",
        compressionargs={"level": 90, "outcolorspace": stream_cs},
        metadata=None,
    )
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[262]
        byteorder, off = tif.byteorder, tag.valueoffset
    with open(path, "r+b") as fh:  # patch Photometric in place (inline SHORT value)
        fh.seek(off)
        fh.write(struct.pack(byteorder + "H", tag_photometric))
    s = Slide(path, mpp=0.5)
    assert s.tile_reader is not None, s.tile_reader_note
    assert s.tile_reader.levels[0].colorspace == {2: "RGB", 6: "YCBCR"}[tag_photometric]
    # the mismatch is real: OpenSlide's pixels are far from the image that was written
    assert np.abs(Slide(path, mpp=0.5, fast=False).read_region((0, 0), 0, (400, 300)).astype(int) - img).mean() > 20
    assert_same_as_openslide(path, decoder, n_random=10)


def test_generic_tiff_rgb_pyramid_equals_openslide(tmp_path):
    """Generic tiled TIFF (OpenSlide vendor generic-tiff), RGB-coded JPEG with Adobe marker, two levels."""
    path = tmp_path / "pyr.tiff"
    img = _texture(300, 400, seed=3)
    with tifffile.TiffWriter(path) as tw:
        for k, lv in enumerate([img, cv2.resize(img, (200, 150), interpolation=cv2.INTER_AREA)]):
            tw.write(
                lv,
                tile=(64, 64),
                compression="jpeg",
                photometric="rgb",
                compressionargs={"level": 85, "outcolorspace": "RGB"},
                subfiletype=0 if k == 0 else 1,
                metadata=None,
            )
    s = Slide(path, mpp=0.5)
    assert s.vendor == "generic-tiff" and s.tile_reader is not None, s.tile_reader_note
    assert [lv.colorspace for lv in s.tile_reader.levels] == ["RGB", "RGB"]
    assert_same_as_openslide(path, n_random=10)


def test_non_integer_downsample_levels_give_stored_pixels(tmp_path):
    """Levels whose downsample is not an integer: the direct reader returns the stored pixels exactly (tifffile
    decode); OpenSlide's read_region maps level px through base px and resamples by a sub-pixel offset there.
    Level 0 stays identical to OpenSlide."""
    path = tmp_path / "odd.svs"
    write_aperio_svs(path, _texture(770, 1030, seed=5), 0.5, tile=128, min_level_px=32)
    s = Slide(path)
    assert s.tile_reader is not None, s.tile_reader_note
    assert s.level_downsamples[1] != int(s.level_downsamples[1])
    plain = Slide(path, fast=False)
    rng = np.random.default_rng(2)
    with tifffile.TiffFile(path) as tif:
        stored = [tif.pages[lv.page].asarray() for lv in s.tile_reader.levels]
    for level in range(s.level_count):
        lw, lh = s.level_dimensions[level]
        for _ in range(30):
            x, y = int(rng.integers(0, lw - 2)), int(rng.integers(0, lh - 2))
            w, h = int(rng.integers(1, lw - x + 1)), int(rng.integers(1, lh - y + 1))
            got = s._read_level(level, x, y, w, h)
            assert np.array_equal(got, stored[level][y : y + h, x : x + w])
            if level == 0:
                assert np.array_equal(got, plain._read_level(0, x, y, w, h))


def test_missing_tile_is_background_like_openslide(tmp_path):
    """A zero-length tile (seen in real Aperio files) is transparent in OpenSlide -> background colour here."""
    src = shared_slide("cmu_small_region.svs")
    path = tmp_path / "missing.svs"
    shutil.copy(src, path)
    os.chmod(path, 0o644)
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags[325]
        counts = np.asarray(tag.value)
        byteorder, off, fmt = tif.byteorder, tag.valueoffset, tifffile.TIFF.DATA_FORMATS[tag.dtype][-1]
    itemsize = struct.calcsize(fmt)
    victim = int(np.argsort(counts)[len(counts) // 2])  # a tissue tile, not the largest (verification) one
    with open(path, "r+b") as fh:
        fh.seek(off + victim * itemsize)
        fh.write(struct.pack(byteorder + fmt, 0))
    s = Slide(path)
    assert s.tile_reader is not None, s.tile_reader_note
    lv = s.tile_reader.levels[0]
    tx, ty = victim % lv.tiles_across, victim // lv.tiles_across
    region = s.read_region((tx * 240 - 20, ty * 240 - 20), 0, (280, 280))
    assert (region[20:260, 20:260] == 255).all()  # missing tile -> white background
    assert region[:20].mean() < 250 or region[-20:].mean() < 250  # neighbours are tissue
    assert np.array_equal(region, Slide(path, fast=False).read_region((tx * 240 - 20, ty * 240 - 20), 0, (280, 280)))
    assert_same_as_openslide(path, n_random=10)


# ---------------------------------------------------------------------------------------------- fallback


def test_ndpi_falls_back_to_openslide():
    path = shared_slide("test3-DAPI-2-(387).ndpi")
    s = Slide(path)
    assert s.tile_reader is None and "hamamatsu" in s.tile_reader_note
    assert s.read_region((1000, 1000), 0, (64, 64)).shape == (64, 64, 3)
    with pytest.raises(UnsupportedTiff, match="NDPI|ndpi|size"):  # the bare reader refuses it too
        TiffTileReader.open(path, s.level_dimensions)


def test_unsupported_compression_falls_back():
    path = shared_slide("boxes.tiff")  # generic tiled TIFF, deflate + predictor
    s = Slide(path, mpp=1.0)
    assert s.tile_reader is None and "compression 8" in s.tile_reader_note
    assert np.array_equal(
        s.read_region((10, 10), 0, (50, 40)), Slide(path, mpp=1.0, fast=False).read_region((10, 10), 0, (50, 40))
    )


def test_jpeg2000_tiles_are_refused(tmp_path):
    pytest.importorskip("imagecodecs")
    path = tmp_path / "j2k.tiff"
    tifffile.imwrite(path, _texture(128, 128), tile=(64, 64), compression="jpeg2000", photometric="rgb", metadata=None)
    with pytest.raises(UnsupportedTiff, match="compression 34712"):
        TiffTileReader.open(path, [(128, 128)])


def test_level_size_mismatch_is_refused(tiny_demo):
    path = next((tiny_demo / "slides").glob("*.svs"))
    with pytest.raises(UnsupportedTiff, match="no tiled TIFF page"):
        TiffTileReader.open(path, [(1024, 767)])
    with pytest.raises(UnsupportedTiff, match="tile size"):
        TiffTileReader.open(path, [(1024, 768)], [(240, 240)])


def test_unreadable_svs_still_raises_slide_error():
    path = shared_slide("unreadable.svs")
    s = Slide(path)
    assert s.tile_reader is None and "JPEG decode failed" in s.tile_reader_note  # the decoder's own wording
    with pytest.raises(SlideError, match="Bogus marker length"):  # OpenSlide's reason, as before
        s.read_region((0, 0), 0, (16, 16))


def test_unopenable_tiff_still_raises_slide_error():
    with pytest.raises(SlideError, match="unsupported or unrecognized|compression"):
        Slide(shared_slide("unopenable.tiff"))


@pytest.mark.skipif("simplejpeg" not in DECODERS, reason="strict decoding needs simplejpeg")
def test_corrupt_tile_raises_like_openslide(tiny_demo, tmp_path):
    """A damaged tile mid-slide: the strict decoder refuses it, Slide falls back to OpenSlide, which raises."""
    src = sorted((tiny_demo / "slides").glob("*.svs"))[1]
    path = tmp_path / "corrupt.svs"
    shutil.copy(src, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offs, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
    order = np.argsort(counts)
    victim = int(order[-2])  # large (tissue) tile, but not the largest one used for verification
    off, n = int(offs[victim]), int(counts[victim])
    with open(path, "r+b") as fh:  # zero the second half of its entropy-coded data
        fh.seek(off + n // 2)
        fh.write(bytes(n - n // 2))
    s = Slide(path)
    assert s.tile_reader is not None, s.tile_reader_note
    tiles_across = s.tile_reader.levels[0].tiles_across
    loc = ((victim % tiles_across) * 256, (victim // tiles_across) * 256)
    with pytest.raises(SlideError, match="JPEG"):
        s.read_region(loc, 0, (256, 256))
    with pytest.raises(Exception, match="JPEG"):
        s.tile_reader.read_level(0, loc[0], loc[1], 256, 256)


def test_jpeg_stream_rewrites_colour_markers():
    jfif = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xdb\x00\x03\x00\xff\xda\x00\x02"
    out = jpeg_stream(b"PFX", jfif + b"DATA\xff\xd9")
    assert out == b"PFX\xff\xdb\x00\x03\x00\xff\xda\x00\x02DATA\xff\xd9"
    plain = b"\xff\xd8\xff\xc0\x00\x03\x00\xff\xda\x00\x02xx"
    assert jpeg_stream(b"P", plain) == b"P" + plain[2:]
    with pytest.raises(ValueError):
        jpeg_stream(b"P", b"\x00\x00\x00\x00")


# ---------------------------------------------------------------------------------------------- cache, threads, fork


def test_cache_is_bounded_and_reused(tiny_demo):
    path = next((tiny_demo / "slides").glob("*.svs"))
    s = Slide(path)
    r = s.tile_reader
    tile_bytes = 256 * 256 * 3
    r.cache_bytes = 5 * tile_bytes
    r.close()  # new per-process state with the new bound
    for y in range(0, 768, 256):
        for x in range(0, 1024, 256):
            r.read_level(0, x, y, 256, 256)
    assert r.cache.nbytes <= 5 * tile_bytes and len(r.cache) == 5
    hits = r.cache.hits
    r.read_level(0, 1024 - 300, 768 - 300, 300, 300)  # the last tiles read: served from the cache
    assert r.cache.hits > hits
    c = TileCache(100)
    c.put("a", np.zeros(60, np.uint8))
    c.put("b", np.zeros(60, np.uint8))
    assert c.get("a") is None and c.get("b") is not None and c.nbytes == 60


def test_threads_read_the_same_pixels(tiny_demo):
    path = sorted((tiny_demo / "slides").glob("*.svs"))[0]
    s = Slide(path)
    s.tile_reader.cache_bytes = 4 * 256 * 256 * 3  # small cache: constant eviction while threads race
    s.tile_reader.close()
    rng = np.random.default_rng(7)
    boxes = [
        (int(rng.integers(-20, 1000)), int(rng.integers(-20, 740)), int(rng.integers(1, 400)), int(rng.integers(1, 400)))
        for _ in range(120)
    ]
    ref = [Slide(path, fast=False).read_region((x, y), 0, (w, h)) for x, y, w, h in boxes]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda b: s.read_region((b[0], b[1]), 0, (b[2], b[3])), boxes))
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))


_FORK_SLIDE: Slide | None = None


def _child_read(box):
    x, y, w, h = box
    r = _FORK_SLIDE.tile_reader
    img = _FORK_SLIDE.read_region((x, y), 0, (w, h))
    return os.getpid(), r._st.pid, r._st.fd, img


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_reads_after_fork(tiny_demo):
    """A Slide whose reader already holds a descriptor and cached tiles keeps working in forked workers: each
    child opens its own descriptor and cache, and reads the same pixels."""
    global _FORK_SLIDE
    path = sorted((tiny_demo / "slides").glob("*.svs"))[2]
    _FORK_SLIDE = Slide(path)
    r = _FORK_SLIDE.tile_reader
    boxes = [(0, 0, 300, 300), (100, 200, 512, 256), (900, 700, 200, 200), (-10, -10, 64, 64)]
    ref = [_FORK_SLIDE.read_region((x, y), 0, (w, h)) for x, y, w, h in boxes]
    parent_fd = r._st.fd
    try:
        with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
            out = list(ex.map(_child_read, boxes))
    finally:
        _FORK_SLIDE = None
    for (pid, st_pid, _fd, img), want in zip(out, ref):
        assert pid != os.getpid() and st_pid == pid
        assert np.array_equal(img, want)
    assert r._st.pid == os.getpid() and r._st.fd == parent_fd
    assert np.array_equal(r.read_level(0, 0, 0, 300, 300), ref[0])


def test_reader_pickles_without_its_descriptor(tiny_demo):
    path = sorted((tiny_demo / "slides").glob("*.svs"))[0]
    r = Slide(path).tile_reader
    a = r.read_level(1, 10, 10, 100, 80)
    r2 = pickle.loads(pickle.dumps(r))
    assert r2._st is None
    assert np.array_equal(r2.read_level(1, 10, 10, 100, 80), a)
    r2.close()
    r.close()
    assert np.array_equal(r.read_level(1, 10, 10, 100, 80), a)  # reopens lazily after close()
