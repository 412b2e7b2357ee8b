"""The fast paths of issue #17 give the right results: stored JPEG tiles copied into TFRecords decode to exactly
OpenSlide's pixels, QC and report share one low-resolution read, and tiled (and streamed) segmentation inference
agrees with a single forward pass."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from histolight.extract import extract_slide, make_config
from histolight.io import TFRecordReader
from histolight.qc import Otsu
from histolight.segment.inference import iter_tiled_logits, plan_tiles, single_pass_logits, tiled_logits
from histolight.wsi import Slide, VirtualSlide
from histolight.wsi.tiff_tiles import jpeg_stream
from tests.conftest import shared_slide

openslide = pytest.importorskip("openslide")
simplejpeg = pytest.importorskip("simplejpeg")

ROOT = Path(__file__).resolve().parents[1]
EVERY_TILE = dict(qc=None, roi_method="ignore", report=False, grayspace_fraction=1.0, whitespace_fraction=1.0)


def _decoders(data: bytes) -> dict[str, np.ndarray]:
    """The bytes decoded by three independent libjpeg front-ends (RGB)."""
    out = {"simplejpeg": simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)}
    out["cv2"] = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    try:
        import io

        from PIL import Image

        out["PIL"] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except ImportError:
        pass
    return out


def _stored_stream(path, x: int, y: int) -> bytes:
    """The file's own bytes of the level-0 stored tile at level px (x, y), made standalone (tables merged)."""
    lv = Slide(path).tile_reader.levels[0]
    idx = (y // lv.tile_h) * lv.tiles_across + x // lv.tile_w
    with open(path, "rb") as fh:
        fh.seek(int(lv.offsets[idx]))
        return jpeg_stream(lv.prefix, fh.read(int(lv.counts[idx])))


@pytest.mark.parametrize("which", ["cmu", "demo"])
def test_stored_jpeg_tiles_are_copied_and_decode_to_openslide_pixels(which, tiny_demo, tmp_path):
    """Level-based extraction on the stored tile grid copies the slide's JPEG tiles (tables merged in): the record
    bytes are the file's own, and they decode to exactly OpenSlide's read_region of the tile (RGB-coded Aperio
    tiles with shared JPEGTables; YCbCr 4:2:0 JFIF tiles)."""
    path = shared_slide("cmu_small_region.svs") if which == "cmu" else tiny_demo / "slides" / "demo_000.svs"
    osr = openslide.OpenSlide(str(path))
    with Slide(path) as s:
        tile = s.tile_reader.levels[0].tile_w
        cfg = make_config(tile_px=tile, tile_um="20x", quality=50, **EVERY_TILE)  # quality would show if re-encoded
        res = extract_slide(s, cfg, tmp_path)
        assert res.level == 0 and res.extract_px == tile and res.kept > 10
    r = TFRecordReader(tmp_path / f"{s.name}.tfrecords")
    for i in range(len(r)):
        rec = r.read(i)
        x, y = rec["loc_x"] - tile // 2, rec["loc_y"] - tile // 2
        assert x % tile == 0 and y % tile == 0
        assert rec["image_raw"] == _stored_stream(path, x, y)
        ref = np.asarray(osr.read_region((x, y), 0, (tile, tile)).convert("RGB"))
        for name, img in _decoders(rec["image_raw"]).items():
            assert np.array_equal(img, ref), (which, i, name, int(np.abs(img.astype(int) - ref).max()))


def test_filters_see_decoded_pixels_of_copied_tiles(tiny_demo, tmp_path):
    """With the grayspace filter on, copied tiles are filtered on their pixels exactly as re-encoded ones are."""
    path = tiny_demo / "slides" / "demo_000.svs"
    kept = {}
    for fmt in ("jpg", "png"):  # png: never copied
        with Slide(path) as s:
            cfg = make_config(tile_px=256, tile_um="20x", qc=None, roi_method="ignore", report=False, img_format=fmt)
            res = extract_slide(s, cfg, tmp_path / fmt)
        kept[fmt] = res.table.tile_id.tolist()
        assert res.rejected_grayspace > 0
    assert kept["jpg"] == kept["png"]


def test_unaligned_grid_is_reencoded_and_said_once(caplog, monkeypatch, tmp_path):
    """Tiles that are not one stored tile each (256 px on 240 px stored tiles) are decoded and re-encoded; the
    reason is logged once per process, not once per slide."""
    import histolight.extract.slide as ex

    monkeypatch.setattr(ex, "_NOTED", set())
    path = shared_slide("cmu_small_region.svs")
    with caplog.at_level(logging.INFO, logger="histolight.extract.slide"):
        for k in range(2):
            with Slide(path) as s:
                res = extract_slide(s, make_config(tile_px=256, tile_um="20x", **EVERY_TILE), tmp_path / str(k))
    said = [m for m in caplog.messages if "not copied from the slide's JPEG tiles" in m]
    assert len(said) == 1 and "stores 240x240 px tiles" in said[0]
    rec = TFRecordReader(tmp_path / "0" / f"{s.name}.tfrecords").read(0)
    assert rec["image_raw"][2:4] == b"\xff\xe0" and res.kept > 10  # cv2's JFIF stream, not the slide's bytes


def test_otsu_and_report_share_one_low_resolution_read():
    """On a one-level slide with a stored thumbnail (CMU), Otsu reads that thumbnail instead of decoding the slide,
    its mask agrees with the pyramid-based one, and the report's picture is cut from what Otsu read."""
    path = shared_slide("cmu_small_region.svs")
    s = Slide(path)
    m = Otsu()(s)
    assert m.mpp == pytest.approx(4.0, rel=0.01) and len(s.tile_reader.cache) <= 1  # only the open-time probe tile
    ref = otsu_on_pyramid(s, m.mask.shape)  # tissue
    iou = ((~m.mask) & ref).sum() / ((~m.mask) | ref).sum()
    assert iou > 0.9, iou

    def no_read(*a, **k):
        raise AssertionError("read again")

    s.thumbnail = s.stored_overview = no_read
    pic = s.overview(max_size=640)
    assert max(pic.shape[:2]) == 640 and pic.mean() < 240


def otsu_on_pyramid(slide, shape):
    from histolight.qc.otsu import otsu_tissue

    img = cv2.resize(
        slide.thumbnail(downsample=slide.dimensions[0] / shape[1]), (shape[1], shape[0]), interpolation=cv2.INTER_AREA
    )
    return otsu_tissue(img)[0]


def test_overview_without_a_stored_thumbnail_is_the_thumbnail():
    img = np.random.default_rng(0).integers(0, 255, (400, 600, 3), np.uint8)
    s = VirtualSlide(img, mpp=0.5, downsamples=(1, 4))
    np.testing.assert_array_equal(s.overview(downsample=4), s.thumbnail(downsample=4))


# ------------------------------------------------------------------------------------------- tiled inference


class _Net(torch.nn.Module):
    """A small random fully convolutional net (stride-2 encoder, upsampling decoder; zero padding like a real one)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU()
        )
        self.dec = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x):
        return self.dec(self.enc(x))


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bilinear")[0]


@pytest.mark.parametrize("hw,tile,batch", [((200, 300), 64, 1), ((97, 250), 32, 2), ((130, 70), 64, 1), ((64, 64), 128, 8)])
def test_blending_weights_are_a_partition_of_unity(hw, tile, batch):
    """With an identity 'network' every layout returns the image itself: the weights sum to one everywhere."""
    img = _image(*hw)
    out = tiled_logits(lambda x: x, img, tile, 0.25, batch)
    assert out.shape == img.shape
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)


def test_tiled_inference_agrees_with_a_single_pass():
    net = _Net().eval()
    img = _image(256, 384)
    single = single_pass_logits(net, img)
    # fits the budget (8 x 128^2 px): one tile, exactly the single pass
    assert plan_tiles(256, 384, 128, 0.25, 8).n_tiles == 1
    torch.testing.assert_close(tiled_logits(net, img, 128, 0.25, 8), single, atol=0, rtol=0)
    # a small budget: many tiles, blended seams
    lay = plan_tiles(256, 384, 64, 0.25, 1)
    assert lay.n_tiles >= 6
    diff = (tiled_logits(net, img, 64, 0.25, 1) - single).abs()[:, 16:-16, 16:-16]
    assert diff.mean() < 0.03 * single.abs().mean(), (diff.mean(), single.abs().mean())
    # no overlap: tiles abut and their zero-padded borders show (what the blend bands hide)
    hard = (tiled_logits(net, img, 64, 0.0, 1) - single).abs()[:, 16:-16, 16:-16]
    assert hard.mean() > 2 * diff.mean() and hard.max() > 2 * diff.max()


def test_streamed_inference_is_the_same_tiles_read_top_down():
    net = _Net().eval()
    img = _image(300, 180)
    reads = []

    def read_rows(a, b):
        reads.append((a, b))
        return img[:, a:b]

    parts = list(iter_tiled_logits(net, read_rows, 300, 180, 64, 0.25, 1))
    lay = plan_tiles(300, 180, 64, 0.25, 1)
    assert [a for a, _ in reads] == list(lay.ys) and all(b - a <= lay.th for a, b in reads)
    assert [y for y, _ in parts] == sorted(y for y, _ in parts) and parts[0][0] == 0
    assert sum(p.shape[1] for _, p in parts) == 300
    torch.testing.assert_close(torch.cat([p for _, p in parts], 1), tiled_logits(net, img, 64, 0.25, 1), atol=0, rtol=0)


def test_tile_layout_costs_little_beyond_one_pass():
    """The defaults (overlap 0.25, batch 8): at most ~15% more pixels than one pass on a 1 MP image."""
    assert plan_tiles(1024, 1024, 256, 0.25, 8).cost <= 1.15
    assert plan_tiles(1024, 1024, 512, 0.25, 8).cost == 1.0
    assert plan_tiles(768, 1024, 256, 0.25, 8).cost <= 1.1
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(100, 100, 64, 0.5)


@pytest.mark.slow  # builds the demo segmentation architecture (timm encoder), ~5-10 s on 2 cores
def test_segment_model_tiled_agrees_with_forward():
    from histolight.segment import SegmentConfig
    from histolight.segment.model import SegmentModel

    torch.manual_seed(0)
    cfg = SegmentConfig(mode="multiclass", labels=["a", "b"], mpp=4, size=64, encoder_name="tu-mobilenetv3_large_100")
    model = SegmentModel(cfg).eval()
    img = np.ascontiguousarray(cv2.resize(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8), (320, 256)))
    p1 = model.run_forward(img)
    p2 = model.run_tiled_inference(img, tile_px=64, batch_size=2)
    assert p1.shape == p2.shape == (3, 256, 320)
    assert np.abs(p1 - p2)[:, 16:-16, 16:-16].mean() < 0.02


# ------------------------------------------------------------------------------------------- GPU suite


@pytest.mark.slow  # imports torch, lightning, timm and runs every part once on tiny inputs (~10-20 s on 2 cores)
def test_gpu_suite_smoke_mode_runs_on_cpu(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(ROOT / "bench"))
    os.environ["OUT"] = str(tmp_path)
    try:
        summary = gpu_suite.main(["--device", "cpu", "--tiny"])
    finally:
        os.environ.pop("OUT")
    parts = summary["parts"]
    assert set(parts) == set(gpu_suite.PARTS) and all("error" not in p for p in parts.values()), parts
    assert (tmp_path / "gpu_suite.json").is_file()
