"""Issue 11, extraction / slide / QC items: magnification without a level (1), QC objects at the tile mpp (3),
upsampling limits (6), fluorescence slides (7), registered QC in worker processes (10), and the documented calls
``Slide.qc``, ``enable_downsample``, ``buffer``, ``qc.Gaussian``, ``qc.StridedDL``."""

from __future__ import annotations

import logging
import math
import os

import cv2
import numpy as np
import pytest

from histolight.errors import ConfigError
from histolight.extract import extract_slide, make_config, make_grid, plan_slide
from histolight.qc import GaussianV2, QCMask, build_qc
from histolight.wsi import Slide, VirtualSlide
from tests.conftest import shared_slide


def tissue_image(h: int = 768, w: int = 1024, seed: int = 0) -> np.ndarray:
    """White glass with a textured pink blob on the left half (sharp) and its blurred copy on the right."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    noise = rng.integers(0, 256, (h, w), dtype=np.uint8)
    tex = np.stack([200 - noise // 3, 80 + noise // 4, 160 - noise // 5], -1).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    img[blob] = tex[blob]
    img[:, w // 2 :] = cv2.GaussianBlur(img[:, w // 2 :], (0, 0), 6)
    return img


def cfg(**kw):
    base = dict(tile_px=64, tile_um=64, qc=None, report=False, grayspace_fraction=1.0, dry_run=True)
    return make_config(**{**base, **kw})


# ------------------------------------------------------------------------------------------- item 1: "10x" without a level


def test_magnification_without_a_level_is_resized_to_the_exact_magnification():
    s = VirtualSlide(tissue_image(), mpp=0.5, downsamples=(1, 4))  # 20x and 5x, like the demo slides
    res = extract_slide(s, cfg(tile_um="10x", tile_px=64), None)
    assert res.level == 0 and res.extract_px == 128 and math.isclose(res.tile_mpp, 1.0)  # was 20x tiles (0.5)
    g = make_grid(s, 64, mag=10)
    np.testing.assert_array_equal(g.read_tile(s, 3), s.read((int(g.x[3]), int(g.y[3])), (128, 128), 1.0, out_size=(64, 64)))
    assert make_grid(s, 64, mag=20).as_stored and make_grid(s, 16, mag=5).level == 1  # matching levels: read as stored
    with pytest.raises(ConfigError, match=r"tile_um=40x .*allow_upsample=true"):
        make_grid(s, 64, mag=40)  # no level at or above 40x
    up = make_grid(s, 64, mag=40, allow_upsample=True)
    assert up.extract_px == 32 and math.isclose(up.tile_mpp, 0.25)


def test_real_cmu_slide_at_10x_records_the_real_tile_mpp():
    with Slide(shared_slide("cmu_small_region.svs")) as s:  # 20x only
        res = extract_slide(s, cfg(tile_um="10x", tile_px=128), None)
        assert res.extract_px == 257 and res.tile_mpp == pytest.approx(1.0019, abs=1e-4) and res.kept > 20
        assert make_grid(s, 128, mag=20).as_stored


# ------------------------------------------------------------------------------------------- item 3: QC objects


def test_gaussian_v2_object_works_at_4x_the_tile_mpp_like_the_name():
    s = VirtualSlide(tissue_image(), mpp=0.25, downsamples=(1, 4, 16))
    c = cfg(tile_px=64, tile_um=64)  # tiles at 1 um/px: blur works at 4 um/px
    by_object = plan_slide(s, make_config(c, qc=[GaussianV2()]), None).qc.mask
    by_name = plan_slide(s, make_config(c, qc=["blur"]), None).qc.mask
    assert by_object.mpp == pytest.approx(4.0) and by_name.mpp == pytest.approx(4.0)
    np.testing.assert_array_equal(by_object.mask, by_name.mask)
    fixed = GaussianV2(mpp=2.0)
    assert build_qc([fixed], tile_mpp=1.0)[0] is fixed  # an explicit mpp is kept


# ------------------------------------------------------------------------------------------- item 6: upsampling


def test_extreme_upsampling_is_refused_before_qc_and_allowed_on_request(caplog):
    calls = []

    def counting_qc(slide):
        calls.append(slide.name)
        return QCMask(np.zeros((4, 4), bool), slide.mpp * slide.dimensions[0] / 4)

    s = VirtualSlide(tissue_image(400, 400), mpp=4.0, downsamples=(1,))
    with pytest.raises(ConfigError, match=r"max_upsample=4 .*enlarged 8x.*allow_upsample=true"):
        extract_slide(s, cfg(tile_px=256, tile_um=128, qc=[counting_qc]), None)  # 32 base px -> 256 px
    assert calls == []  # refused before any QC ran
    ok = extract_slide(s, cfg(tile_px=256, tile_um=128, allow_upsample=True), None)
    assert ok.extract_px == 32 and ok.tile_mpp == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="histolight.extract.grid"):
        mid = extract_slide(VirtualSlide(tissue_image(400, 400), mpp=1.5), cfg(tile_px=256, tile_um=128), None)
    assert mid.extract_px == 85 and mid.tile_mpp == pytest.approx(85 * 1.5 / 256)
    assert any("upsampled 3.01x" in r.getMessage() for r in caplog.records)
    assert extract_slide(s, cfg(tile_px=256, tile_um=128, max_upsample=8), None).extract_px == 32
    with pytest.raises(ConfigError, match="max_upsample"):
        cfg(max_upsample=0.5)


# ------------------------------------------------------------------------------------------- item 7: fluorescence


def fluorescence_image(h: int = 600, w: int = 800, seed: int = 1) -> np.ndarray:
    """Black glass; a tissue region of faint autofluorescence with bright blue nuclei (DAPI-like)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = rng.integers(0, 4, (h, w))
    yy, xx = np.mgrid[:h, :w]
    tissue = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
    img[..., 2][tissue] = rng.integers(10, 18, int(tissue.sum()))
    for _ in range(900):
        y, x = rng.integers(0, h), rng.integers(0, w)
        if tissue[y, x]:
            cv2.circle(img, (int(x), int(y)), 3, (0, 0, int(rng.integers(120, 250))), -1)
    return img


def test_dark_background_slide_uses_a_brightness_detector_and_blur_keeps_tissue():
    s = VirtualSlide(fluorescence_image(), mpp=0.5, downsamples=(1, 4))
    res = extract_slide(s, cfg(tile_px=50, tile_um=50, qc=["otsu", "blur"]), None)
    truth = math.pi * 0.42 * 0.42  # share of the slide covered by the tissue ellipse
    assert abs(res.tissue_fraction - truth) < 0.08  # Otsu on saturation called far more of it tissue
    assert res.blur_burden < 0.3 and res.kept > 0.6 * truth * res.grid_tiles
    assert res.tissue_detector == "triangle-brightness"
    light = extract_slide(VirtualSlide(tissue_image(), mpp=0.5), cfg(qc=["otsu"]), None)
    assert light.tissue_detector == "otsu-saturation"


def test_real_fluorescence_slide(tmp_path):
    import json

    with Slide(shared_slide("test3-DAPI-2-(387).ndpi")) as s:
        res = extract_slide(s, cfg(tile_px=256, tile_um=128, qc=["otsu", "blur"], dry_run=False), tmp_path)
    meta = json.loads((tmp_path / "meta" / f"{s.name}.json").read_text())
    assert 0.7 < res.tissue_fraction < 0.95 and res.blur_burden < 0.3 and res.kept > 0.7 * res.grid_tiles
    assert meta["tissue_detector"] == "triangle-brightness"  # the NDPI records its excitation filter


# ------------------------------------------------------------------------------------------- item 10: registered QC in workers


class PenQC:
    """A registered QC for the worker test: drops the top quarter of the slide."""

    name = "pen_test"

    def __call__(self, slide):
        m = np.zeros((4, 4), bool)
        m[0] = True
        return QCMask(m, slide.mpp * slide.dimensions[0] / 4, self.name)


@pytest.mark.slow
def test_registered_qc_runs_in_worker_processes(tiny_demo, tmp_path, monkeypatch):
    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles
    from histolight.qc.registry import QC_REGISTRY, register_qc

    monkeypatch.setitem(QC_REGISTRY, "pen_test", PenQC)
    register_qc("pen_test", PenQC)
    ds = Dataset(tiny_demo / "slides")
    res = extract_tiles(ds, tile_px=64, tile_um=64, outdir=tmp_path, qc=["pen_test"], workers=2, progress=False, report=False)
    assert res.run.metrics()["n_failed"] == 0, res.failed
    assert (res.summary["status"] == "done").all() and (res.summary["rejected_qc"] > 0).all()


# ------------------------------------------------------------------------------------------- documented calls


def test_slide_qc_keeps_its_mask_for_extraction():
    s = VirtualSlide(tissue_image(), mpp=0.5, downsamples=(1, 4))
    m = s.qc("otsu")
    assert isinstance(m, QCMask) and m.mask.any() and not m.mask.all() and s.qc_result.tissue_fraction < 0.9
    res = extract_slide(s, cfg(qc=None), None)
    assert res.rejected_qc > 0 and res.tissue_fraction == pytest.approx(s.qc_result.tissue_fraction)
    s.qc(GaussianV2(mpp=2.0))
    assert s.qc_result.names == ["otsu", "blur"] and s.qc_result.blur_burden > 0.3  # the right half is blurred
    s.remove_qc()
    assert s.qc_mask is None and extract_slide(s, cfg(qc=None), None).rejected_qc == 0


def test_enable_downsample_false_reads_level_0_only():
    s = VirtualSlide(tissue_image(), mpp=0.5, downsamples=(1, 4))
    assert extract_slide(s, cfg(tile_px=32, tile_um=128), None).level == 1
    res = extract_slide(s, cfg(tile_px=32, tile_um=128, enable_downsample=False), None)
    assert res.level == 0 and s.best_level_for_mpp(8.0) == 0
    g = make_grid(s, 32, 128)
    np.testing.assert_array_equal(g.read_tile(s, 2), s.read_planned(s.read_plan((int(g.x[2]), 0), (256, 256), 4.0, (32, 32))))


def test_buffer_copies_each_slide_and_removes_it(tmp_path):
    from histolight.wsi.buffer import buffered

    src = tmp_path / "in" / "odd name (1).svs"
    src.parent.mkdir()
    src.write_bytes(b"slide bytes")
    with buffered(src, tmp_path / "buf") as local:
        assert os.path.basename(local) == src.name and open(local, "rb").read() == b"slide bytes"
        assert os.path.dirname(os.path.dirname(local)) == str(tmp_path / "buf")
    assert os.listdir(tmp_path / "buf") == []
    with buffered(src, None) as same:
        assert same == str(src)


def test_extract_tiles_with_a_buffer(tiny_demo, tmp_path):
    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles

    ds = Dataset(tiny_demo / "slides")
    res = extract_tiles(
        ds, tile_px=64, tile_um=64, outdir=tmp_path / "t", buffer=str(tmp_path / "buf"), workers=1, progress=False
    )
    assert (res.summary["status"] == "done").all() and os.listdir(tmp_path / "buf") == []
    assert "buffer" not in res.config.settings()  # where slides are read from does not change the tiles


def test_legacy_gaussian_agrees_with_gaussian_v2():
    from histolight.qc import Gaussian

    s = VirtualSlide(tissue_image(), mpp=0.5, downsamples=(1, 4))
    legacy = build_qc(["gaussian_v1"], tile_mpp=0.5)[0]
    assert isinstance(legacy, Gaussian) and legacy.working_mpp(s) == 2.0
    a, b = legacy(s), GaussianV2(tile_mpp=0.5)(s)
    assert a.mask.shape == b.mask.shape and (a.mask == b.mask).mean() > 0.98
    assert a.mask.shape == (192, 256)  # 2 um/px
    assert a.mask[60:130, 150:220].all() and a.mask[60:130, 40:100].mean() < 0.1  # blurred right half, sharp left


def test_strided_dl_subclass_is_a_few_lines():
    import pickle

    import torch

    from histolight.qc import StridedDL

    class MeanBrightness(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None]

    class Bright(StridedDL):
        def build_model(self):
            return MeanBrightness()

    img = np.zeros((512, 768, 3), np.uint8)
    img[:, :384] = 255  # left half bright
    s = VirtualSlide(img, mpp=0.5)
    qc = Bright(tile_px=16, tile_um=32, batch_size=7, device="cpu")  # 64 base px cells: 8 x 12
    scores = qc(s, threshold=False)
    assert scores.shape == (8, 12) and np.allclose(scores[:, :6], 1.0) and np.allclose(scores[:, 6:], 0.0)
    m = qc(s)
    assert m.mpp == pytest.approx(32.0) and m.mask[:, 6:].all() and not m.mask[:, :6].any()
    assert pickle.loads(pickle.dumps(StridedDL(None, tile_px=8)))._model is None
    res = extract_slide(s, cfg(tile_px=64, tile_um=32, qc=[qc]), None)
    assert res.kept == res.grid_tiles // 2 and res.rejected_qc == res.grid_tiles // 2
