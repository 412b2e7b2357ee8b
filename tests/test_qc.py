"""Slide-level QC: Otsu tissue masks, GaussianV2-style blur (strided, mpp override), blur burden, registry."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from histolight.errors import ConfigError
from histolight.qc import GaussianV2, Otsu, QCMask, blur_burden, build_qc, qc_names, register_qc
from histolight.qc.registry import QC_REGISTRY
from histolight.wsi import Slide, VirtualSlide


def he_texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Sharp H&E-like texture: pink background tissue with dark purple 'nuclei'."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (225, 150, 190)
    n = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), 1.2)
    nuc = n > 0.25
    img[nuc] = (90, 40, 140)
    return img


def disc_slide(h=1024, w=1536, mpp=0.5):
    img = np.full((h, w, 3), 242, np.uint8)
    img += np.random.default_rng(1).integers(0, 6, img.shape, dtype=np.uint8)  # noisy glass
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (0.35 * h) ** 2
    img[disc] = he_texture(h, w)[disc]
    return VirtualSlide(img, mpp=mpp, downsamples=(1, 4, 16)), disc


def test_otsu_finds_tissue_on_the_lowest_level():
    s, disc = disc_slide()
    m = Otsu()(s)
    assert isinstance(m, QCMask) and m.name == "otsu"
    assert m.mask.shape == (64, 96) and m.mpp == pytest.approx(8.0)  # level 2: downsample 16
    truth = cv2.resize(disc.astype(np.uint8), (96, 64), interpolation=cv2.INTER_NEAREST) > 0
    tissue = ~m.mask
    iou = (tissue & truth).sum() / (tissue | truth).sum()
    assert iou > 0.9, iou
    # a chosen mpp and the size cap
    m2 = Otsu(mpp=2.0)(s)
    assert m2.mask.shape == (256, 384) and m2.mpp == pytest.approx(2.0)
    m3 = Otsu(mpp=0.5, max_px=300)(s)
    assert max(m3.mask.shape) <= 300


def test_otsu_min_threshold_keeps_blank_slides_blank():
    img = np.full((512, 512, 3), 240, np.uint8) + np.random.default_rng(0).integers(0, 8, (512, 512, 3), dtype=np.uint8)
    s = VirtualSlide(img, mpp=0.5)
    assert Otsu(min_threshold=20)(s).mask.all()


def _half_blurred(h=1024, w=1024):
    img = he_texture(h, w)
    img[:, w // 2 :] = cv2.GaussianBlur(img, (0, 0), 8)[:, w // 2 :]
    return img


def test_blur_detects_the_blurred_half():
    s = VirtualSlide(_half_blurred(), mpp=0.5, downsamples=(1, 4))
    m = GaussianV2(tile_mpp=0.5)(s)  # works at 4 x 0.5 = 2 um/px
    assert m.name == "blur" and m.mpp == pytest.approx(2.0) and m.mask.shape == (256, 256)
    left, right = m.mask[:, 10:118], m.mask[:, 138:246]
    assert left.mean() < 0.05 and right.mean() > 0.95, (left.mean(), right.mean())


def test_blur_strips_equal_one_pass():
    s = VirtualSlide(_half_blurred(768, 1280), mpp=0.5, downsamples=(1, 4))
    a = GaussianV2(mpp=2.0, block_px=40)(s).mask
    b = GaussianV2(mpp=2.0, block_px=4096)(s).mask
    assert a.shape == b.shape == (192, 320)
    np.testing.assert_array_equal(a, b)


def test_blur_uses_the_mpp_override(tiny_demo):
    path = tiny_demo / "slides" / "demo_000.svs"
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.5)
        m = GaussianV2(tile_mpp=0.5)(s)
        assert m.mask.shape == (192, 256)  # 2 um/px on a 1024 x 768 slide at 0.5 um/px
    with Slide(path, mpp=0.25) as s:  # the override says the pixels are twice as small
        m = GaussianV2(tile_mpp=0.5)(s)
        assert m.mpp == pytest.approx(2.0) and m.mask.shape == (96, 128)
        assert s.size_at_mpp(m.mpp) == (128, 96)


def test_blur_burden_on_demo_slides(tiny_demo):
    import json

    from histolight.qc import run_qc

    burdens = {}
    for name in ("demo_000", "demo_002"):
        with Slide(tiny_demo / "slides" / f"{name}.svs") as s:
            q = run_qc(s, build_qc(["otsu", "blur"], tile_mpp=0.5))
            assert q.names == ["otsu", "blur"] and 0.05 < q.tissue_fraction < 0.6 and q.mask.mpp == pytest.approx(2.0)
            assert max(q.preview["blur"].shape) <= 1024 and q.preview["tissue_background"].shape == q.preview["blur"].shape
            burdens[name] = q.blur_burden
    truth = json.loads((tiny_demo / "qc" / "demo_000.json").read_text())["blur_tissue_fraction"]
    assert truth > 0.1 and burdens["demo_000"] > 0.05, burdens  # flagged at 5%
    assert burdens["demo_002"] < 0.05, burdens  # no blurred region (only the pen mark)


def test_blur_burden_function():
    blur = np.array([[1, 1, 0, 0]], bool)
    background = np.array([[0, 1, 0, 1]], bool)
    assert blur_burden(blur, background) == pytest.approx(0.5)
    assert blur_burden(blur, np.ones_like(blur)) == 0.0


def test_registry_builds_lists_dicts_aliases_and_plugins():
    ms = build_qc(["otsu", {"name": "blur", "sigma": 2, "threshold": 0.03}], tile_mpp=0.25)
    assert isinstance(ms[0], Otsu) and isinstance(ms[1], GaussianV2)
    assert ms[1].sigma == 2 and ms[1].tile_mpp == 0.25 and ms[1].working_mpp(None) == 1.0
    assert [type(m) for m in build_qc("both")] == [Otsu, GaussianV2]
    assert build_qc(None) == [] and build_qc("none") == [] and build_qc([]) == []
    with pytest.raises(ConfigError, match="Did you mean 'otsu'"):
        build_qc(["otsuu"])
    with pytest.raises(ConfigError, match="sigmaa"):
        build_qc([{"name": "blur", "sigmaa": 2}])
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_qc([{"sigma": 2}])

    class Fake:
        name = "fake"

        def __init__(self, model_path=None):
            self.model_path = model_path

        def __call__(self, slide):
            return QCMask(np.zeros((2, 2), bool), slide.mpp, self.name)

    try:
        register_qc("fake_segment", Fake)
        assert "fake_segment" in qc_names()
        (m,) = build_qc({"name": "fake_segment", "model_path": "x.pt"}, tile_mpp=0.5)
        assert isinstance(m, Fake) and m.model_path == "x.pt"  # tile_mpp only goes to factories that take it
    finally:
        QC_REGISTRY.pop("fake_segment", None)


def test_fluorescence_metadata_and_background_kind():
    from histolight.qc.otsu import background_kind, metadata_fluorescence

    ndpi = {"hamamatsu.;NDP Shading Data;CubeName=DA/FI": "ExcitationName=387/11-25;Exposure=20", "openslide.vendor": "x"}
    assert metadata_fluorescence(ndpi) is not None
    assert metadata_fluorescence({"ome.Channel": "IlluminationType=Fluorescence"}) == "ome.Channel"
    assert metadata_fluorescence({"aperio.Title": "H&E", "hamamatsu.AHEX[0].fluorescence": "00FF"}) is None
    dark = VirtualSlide(np.full((256, 256, 3), 5, np.uint8), mpp=0.5)
    light = VirtualSlide(np.full((256, 256, 3), 235, np.uint8), mpp=0.5)
    assert background_kind(dark)[0] == "dark" and background_kind(light)[0] == "light"
    assert "median brightness 5" in background_kind(dark)[1]


def test_qc_registry_entries_travel_to_another_process():
    import pickle

    from histolight.qc.registry import QC_ALIASES, capture_qc, register_qc_alias

    register_qc("travel_otsu", Otsu)
    register_qc_alias("travel_both", ["travel_otsu", "blur"])
    try:
        plugins = pickle.loads(pickle.dumps(capture_qc(["travel_both"])))
        assert plugins.methods["travel_otsu"] is Otsu and plugins.aliases == {"travel_both": ["travel_otsu", "blur"]}
    finally:
        QC_REGISTRY.pop("travel_otsu", None)
        QC_ALIASES.pop("travel_both", None)
    with pytest.raises(ConfigError, match="travel_both"):
        build_qc(["travel_both"])  # a fresh worker's registry
    try:
        ms = build_qc(["travel_both"], plugins=plugins, tile_mpp=0.5)
        assert [type(m) for m in ms] == [Otsu, GaussianV2]
    finally:
        QC_REGISTRY.pop("travel_otsu", None)
        QC_ALIASES.pop("travel_both", None)
