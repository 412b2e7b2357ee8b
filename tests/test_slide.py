"""Slide reading with explicit units, on real slides and on a VirtualSlide."""

import numpy as np
import pytest

from histolight.errors import MissingMPPError, SlideError
from histolight.wsi import Slide, VirtualSlide, slide_name
from tests.conftest import shared_slide


def _gradient(h=800, w=1200):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)


def test_slide_name():
    assert slide_name("a/b/CMU-1.svs") == "CMU-1"
    assert slide_name("x.ome.tiff") == "x"
    assert slide_name("test3-DAPI-2-(387).ndpi") == "test3-DAPI-2-(387)"


def test_cmu_properties_and_reads():
    s = Slide(shared_slide("cmu_small_region.svs"))
    assert s.vendor == "aperio"
    assert s.dimensions == (2220, 2967)
    assert s.mpp == pytest.approx(0.499)
    assert s.mpp_source == "file"
    tile = s.read_region((100, 200), 0, (64, 32))
    assert tile.shape == (32, 64, 3) and tile.dtype == np.uint8
    # read at half resolution: 512 base px -> ~256 px at 0.998 um/px
    half = s.read((0, 0), (512, 512), mpp=0.998)
    assert half.shape == (256, 256, 3)
    thumb = s.thumbnail(mpp=10)
    assert thumb.shape[:2] == (round(2967 * 0.499 / 10), round(2220 * 0.499 / 10))
    # tissue is present: not all white
    assert thumb.mean() < 240


def test_read_region_outside_is_white():
    s = Slide(shared_slide("cmu_small_region.svs"))
    out = s.read_region((2200, 2950), 0, (40, 40))
    assert (out[25:, :] == 255).all() and (out[:, 25:] == 255).all()
    assert not (out[:15, :15] == 255).all()


def test_ndpi_deep_pyramid_and_awkward_name():
    s = Slide(shared_slide("test3-DAPI-2-(387).ndpi"))
    assert s.vendor == "hamamatsu" and s.level_count == 7
    assert s.name == "test3-DAPI-2-(387)"
    assert s.best_level_for_mpp(4 * s.mpp) == 2
    assert s.best_level_for_mpp(3 * s.mpp) == 1  # never upsample from a coarser level
    th = s.thumbnail(mpp=8)
    assert th.shape[:2] == s.size_at_mpp(8)[::-1]


def test_missing_mpp_needs_override():
    s = Slide(shared_slide("boxes.tiff"))
    assert not s.has_mpp and s.mpp_source == "missing"
    with pytest.raises(MissingMPPError, match="boxes.tiff.*implausible"):
        _ = s.mpp
    # max_size thumbnails work without mpp
    assert max(s.thumbnail(max_size=100).shape[:2]) == 100
    s2 = Slide(shared_slide("boxes.tiff"), mpp=1.0)
    assert s2.mpp == 1.0 and s2.mpp_source == "override"
    assert s2.read((0, 0), (100, 100), mpp=2.0).shape == (50, 50, 3)


@pytest.mark.parametrize("name,match", [("unopenable.tiff", "Unsupported TIFF compression"), ("nope.svs", "not found")])
def test_unopenable_files_raise_slide_error(name, match, tmp_path):
    path = shared_slide(name) if name != "nope.svs" else tmp_path / name
    with pytest.raises(SlideError, match=match) as e:
        Slide(path)
    assert str(path) in str(e.value)


def test_unreadable_pixels_raise_slide_error():
    s = Slide(shared_slide("unreadable.svs"))
    with pytest.raises(SlideError, match="unreadable.svs.*reading pixels failed"):
        s.read_region((0, 0), 0, (16, 16))


def test_virtual_slide_units():
    img = _gradient()
    s = VirtualSlide(img, mpp=0.25, downsamples=(1, 4))
    assert s.dimensions == (1200, 800) and s.level_count == 2
    assert s.level_mpp(1) == pytest.approx(1.0)
    np.testing.assert_array_equal(s.read_region((10, 20), 0, (30, 40)), img[20:60, 10:40])
    # reading at 1 um/px uses level 1 directly, no resize
    assert s.best_level_for_mpp(1.0) == 1
    np.testing.assert_array_equal(s.read((400, 400), (400, 400), mpp=1.0), s._levels[1][100:200, 100:200])
    # strips reassemble to the whole thumbnail
    full = s.thumbnail(mpp=2.0)
    assert full.shape == (100, 150, 3)
    parts = np.concatenate([st for _, st in s.iter_strips(mpp=2.0, strip_px=33)])
    np.testing.assert_array_equal(parts, full)
    with pytest.raises(MissingMPPError):
        _ = VirtualSlide(img, mpp=None).mpp


def test_read_with_non_integer_downsample_is_not_shifted():
    """boxes.tiff's level 2 has downsample 4.016: reads must start at the requested level pixel."""
    s = Slide(shared_slide("boxes.tiff"), mpp=1.0, fast=False)
    ds = s.level_downsamples[2]
    assert ds != int(ds)
    full = s.read_region((0, 0), 2, s.level_dimensions[2])
    for lx in range(1, 20):
        from histolight.wsi.slide import level_origin

        got = s.read_region((level_origin(lx, ds), 0), 2, (5, 5))
        np.testing.assert_array_equal(got, full[:5, lx : lx + 5])


def test_read_plan_is_what_read_and_read_region_do():
    img = _gradient()
    s = VirtualSlide(img, mpp=0.25, downsamples=(1, 3))  # level 1: downsample 3, 0.75 um/px
    p = s.read_plan((301, 10), (100, 50), mpp=1.0)
    # level 1 is the deepest at least as fine as 1 um/px; the box covers base px 301..401 x 10..60
    assert (p.level, p.x, p.y, p.w, p.h, p.out_size) == (1, 100, 3, 34, 17, (25, 12))
    np.testing.assert_array_equal(s.read_planned(p), s.read((301, 10), (100, 50), mpp=1.0))
    r = s.region_plan((301, 10), 1, (20, 7))
    assert (r.level, r.x, r.y, r.w, r.h, r.out_size) == (1, 100, 3, 20, 7, (20, 7))
    np.testing.assert_array_equal(s.read_planned(r), s.read_region((301, 10), 1, (20, 7)))
    np.testing.assert_array_equal(s.read_planned(r), s._levels[1][3:10, 100:120])
    edge = s.read_planned(s.region_plan((1190, 790), 0, (20, 20)))  # past the slide: white
    assert (edge[10:] == 255).all() and (edge[:, 10:] == 255).all()
    np.testing.assert_array_equal(edge[:10, :10], img[790:, 1190:])
    with pytest.raises(ValueError, match="level 2 out of range"):
        s.region_plan((0, 0), 2, (4, 4))
