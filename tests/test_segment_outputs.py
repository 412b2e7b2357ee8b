"""Full-resolution segmentation outputs (issue 14 item 3: pyramidal TIFF that OpenSlide opens, streamed) and plain
images as the input of segmentation (issue 14 item 5: files, wildcards, CSV/TSV lists, given or assumed mpp)."""

from __future__ import annotations

import json
import logging
import tracemalloc

import numpy as np
import pytest
import torch

from tests.conftest import tiny_demo_overrides
from tests.test_segment import compose_cfg, small_config, tiny_dataset

openslide = pytest.importorskip("openslide")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-init multiclass model folder (4 um/px, 64 px crops): predictions vary over the slide."""
    from histolight.segment.io import save_model
    from histolight.segment.model import SegmentModel

    torch.manual_seed(0)
    model = SegmentModel(small_config("multiclass", size=64)).eval()
    return save_model(model, tmp_path_factory.mktemp("seg_model") / "model")


def test_pyramid_tiff_opens_in_openslide_with_mpp_levels_and_exact_pixels(tmp_path):
    from histolight.segment.pyramid import PyramidTiff

    H, W = 700, 1000
    img = (np.add.outer(np.arange(H) // 37, np.arange(W) // 53) % 5).astype(np.uint8)
    with PyramidTiff(tmp_path / "x.tif", H, W, mpp=0.25, tile=128) as pt:
        for y in range(0, H, 61):  # rows arrive in bands unrelated to the tile size
            pt.write(img[y : y + 61])
    o = openslide.OpenSlide(str(tmp_path / "x.tif"))
    assert o.dimensions == (W, H)
    assert o.level_dimensions == ((1000, 700), (500, 350), (250, 175), (125, 88))
    assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(o.properties["openslide.mpp-y"]) == pytest.approx(0.25)
    assert np.array_equal(np.asarray(o.read_region((0, 0), 0, (W, H)))[..., 0], img)
    assert np.array_equal(np.asarray(o.read_region((0, 0), 1, (500, 350)))[..., 0], img[::2, ::2])  # nearest: labels stay labels
    assert list(tmp_path.iterdir()) == [tmp_path / "x.tif"]  # temp level files removed
    # an aborted write leaves nothing behind
    with pytest.raises(RuntimeError), PyramidTiff(tmp_path / "y.tif", H, W, mpp=0.25, tile=128) as pt:
        pt.write(img[:100])
        raise RuntimeError("inference failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "x.tif"]


def test_pyramid_tiff_memory_is_flat_with_image_size(tmp_path):
    """Peak Python-tracked memory while streaming an image does not grow with its height (8x more rows)."""
    import tifffile  # noqa: F401 - imported before measuring

    from histolight.segment.pyramid import PyramidTiff

    W = 2048
    band = (np.arange(W)[None, :] // 97 % 3).astype(np.uint8).repeat(128, 0)
    peaks = {}
    for H in (1024, 8192):
        tracemalloc.start()
        try:
            with PyramidTiff(tmp_path / f"{H}.tif", H, W, mpp=0.5, tile=256) as pt:
                for _ in range(0, H, 128):
                    pt.write(band)
            peaks[H] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert openslide.OpenSlide(str(tmp_path / f"{H}.tif")).dimensions == (W, H)
    assert peaks[8192] < 1.3 * peaks[1024] + 2**20, peaks  # the 8192-row image is 16 MiB
    assert peaks[8192] < 8 * 2**20, peaks


@pytest.mark.slow
def test_task_segment_out_mpp_base_writes_full_resolution_tiff_agreeing_with_png(tiny_demo, model_dir, tmp_path):
    import cv2

    from histolight.tasks import get_task

    ov = tiny_demo_overrides(tiny_demo)
    cfg = compose_cfg(["task=segment", f"task.model={model_dir}", "task.out_mpp=base", "task.rois=false", *ov], tmp_path)
    assert get_task("segment")(cfg)["n_done"] == 3
    seg = tmp_path / "out" / "segment"
    for name in tiny_dataset(tiny_demo).names:
        meta = json.loads((seg / f"{name}.pred.json").read_text())
        full = meta["full_resolution"]
        assert full["mpp"] == 0.5 and full["size"] == [1024, 768] and full["files"] == [f"{name}.full.tif"]
        o = openslide.OpenSlide(str(seg / f"{name}.full.tif"))
        assert o.dimensions == (1024, 768)  # the slide's base size
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        got = np.asarray(o.read_region((0, 0), 0, o.dimensions))[..., 0]
        png = cv2.imread(str(seg / f"{name}.pred.png"), cv2.IMREAD_UNCHANGED)  # 128 x 96 at 4 um/px: 8 base px each
        assert png.shape == (96, 128) and len(np.unique(png)) > 1
        assert np.array_equal(got, png.repeat(8, 0).repeat(8, 1))
    # intermediate resolution and probabilities: one file per class, probability x 255
    cfg = compose_cfg(
        ["task=segment", f"task.model={model_dir}", "task.out_mpp=1", "task.output=proba", "task.rois=false", *ov], tmp_path / "p"
    )
    assert get_task("segment")(cfg)["n_done"] == 3
    seg = tmp_path / "p" / "out" / "segment"
    name = tiny_dataset(tiny_demo).names[0]
    meta = json.loads((seg / f"{name}.pred.json").read_text())
    assert meta["full_resolution"]["files"] == [f"{name}.full.{c}.tif" for c in meta["class_names"]]
    import tifffile

    proba = tifffile.imread(seg / f"{name}.pred.tif")  # (C, 96, 128) at 4 um/px
    for c, f in enumerate(meta["full_resolution"]["files"]):
        o = openslide.OpenSlide(str(seg / f))
        assert o.dimensions == (512, 384) and float(o.properties["openslide.mpp-x"]) == pytest.approx(1.0)
        got = np.asarray(o.read_region((0, 0), 0, o.dimensions))[..., 0].astype(int)
        assert np.abs(got - proba[c].repeat(4, 0).repeat(4, 1)).max() <= 1


def test_out_mpp_is_validated(tmp_path, model_dir, tiny_demo):
    from histolight.errors import ConfigError
    from histolight.tasks import get_task

    ov = tiny_demo_overrides(tiny_demo)
    for bad in ("full", "-1", "0"):
        cfg = compose_cfg(["task=segment", f"task.model={model_dir}", f"task.out_mpp={bad}", *ov], tmp_path)
        with pytest.raises(ConfigError, match=r"'task': out_mpp=.* is invalid: must be null, 'base' or a positive"):
            get_task("segment")(cfg)


# ---------------------------------------------------------------------------------------------- images as input


def _write_images(folder):
    """Two PNGs, one JPEG and one (strip) TIFF of odd sizes, and a TSV list of two with an mpp column."""
    import cv2
    import tifffile

    rng = np.random.default_rng(0)
    folder.mkdir()
    sizes = {"a.png": (70, 90), "b.png": (64, 33), "c.jpg": (50, 61), "d.tif": (45, 77)}
    for name, (h, w) in sizes.items():
        img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        if name.endswith(".tif"):
            tifffile.imwrite(folder / name, img)
        else:
            cv2.imwrite(str(folder / name), img[..., ::-1])
    (folder / "list.tsv").write_text("path\tmpp\na.png\t2\nc.jpg\t\n")
    return {n.rsplit(".", 1)[0]: s for n, s in sizes.items()}


@pytest.mark.slow
def test_task_segment_images_wildcards_lists_and_mpp(model_dir, tmp_path, caplog):
    from histolight.segment.pyramid import read_level0
    from histolight.tasks import get_task

    sizes = _write_images(tmp_path / "imgs")
    cfg = compose_cfg(
        ["task=segment", f"task.model={model_dir}", f"task.images={tmp_path / 'imgs'}/*.*g", "task.rois=false"], tmp_path
    )
    with caplog.at_level(logging.WARNING):
        r = get_task("segment")(cfg)
    assert r["n_done"] == 3  # a.png, b.png, c.jpg
    assert "ASSUMED to be at the model's 4 um/px" in caplog.text and "a.png" in caplog.text
    seg = tmp_path / "out" / "segment"
    for name in ("a", "b", "c"):
        assert read_level0(seg / f"{name}.full.tif").shape == sizes[name]  # masks of the image's size
        meta = json.loads((seg / f"{name}.pred.json").read_text())
        assert meta["size"] == [sizes[name][1], sizes[name][0]]  # assumed at the model's mpp: segmented as is
    # a TSV list (mpp column, else task.images_mpp) and a plain TIFF; no warning when every mpp is known
    caplog.clear()
    ov = [f"task.images=[{tmp_path / 'imgs' / 'list.tsv'},{tmp_path / 'imgs' / 'd.tif'}]", "task.images_mpp=8"]
    cfg = compose_cfg(["task=segment", f"task.model={model_dir}", "task.rois=false", *ov], tmp_path / "l")
    with caplog.at_level(logging.WARNING):
        r = get_task("segment")(cfg)
    assert r["n_done"] == 3 and "ASSUMED" not in caplog.text
    seg = tmp_path / "l" / "out" / "segment"
    for name, mpp in (("a", 2.0), ("c", 8.0), ("d", 8.0)):
        meta = json.loads((seg / f"{name}.pred.json").read_text())
        assert meta["base_mpp"] == mpp
        assert read_level0(seg / f"{name}.full.tif").shape == sizes[name]
    assert json.loads((seg / "a.pred.json").read_text())["size"] == [45, 35]  # 2 um/px read at 4 um/px


def test_image_lists_refuse_what_matches_nothing(tmp_path):
    from histolight.errors import ConfigError
    from histolight.segment.images import list_images

    _write_images(tmp_path / "imgs")
    with pytest.raises(ConfigError, match=r"images='.*\*\.bmp' matches no image file"):
        list_images(str(tmp_path / "imgs" / "*.bmp"))
    (tmp_path / "bad.csv").write_text("file\nmissing.png\n")
    with pytest.raises(ConfigError, match=r"image '.*missing.png' \(from images=.*bad.csv'\) does not exist"):
        list_images(tmp_path / "bad.csv")
    got = list_images([tmp_path / "imgs" / "list.tsv", str(tmp_path / "imgs" / "a.png")])
    assert [(p.name, m) for p, m in got] == [("a.png", 2.0), ("c.jpg", None)]  # each file once, the list's mpp kept


def test_a_tiled_tiff_image_brings_its_own_mpp(tmp_path):
    from histolight.segment.images import ImageSet, file_mpp
    from histolight.segment.pyramid import PyramidTiff

    img = np.tile((np.arange(300) % 200).astype(np.uint8), (200, 1))
    with PyramidTiff(tmp_path / "t.tif", 200, 300, mpp=0.25, tile=64) as pt:
        pt.write(img)
    _write_images(tmp_path / "imgs")
    assert file_mpp(tmp_path / "t.tif") == pytest.approx(0.25)
    assert file_mpp(tmp_path / "imgs" / "a.png") is None and file_mpp(tmp_path / "imgs" / "d.tif") is None
    with ImageSet([(tmp_path / "t.tif", file_mpp(tmp_path / "t.tif"))], default_mpp=4).open("t") as s:
        assert s.dimensions == (300, 200) and s.mpp == pytest.approx(0.25)
