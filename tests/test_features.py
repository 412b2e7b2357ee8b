"""Feature bags: TFRecords and slides as sources, resume, bags_config.json and exact rebuilds, several encoders in one
pass, trained classifiers, the Slideflow facades, bad input."""

import json

import cv2
import numpy as np
import pytest
import torch

from histolight.errors import ConfigError, HistolightError
from histolight.features import (
    DatasetFeatures,
    build_extractor,
    build_feature_extractor,
    extract_features,
    load_bag,
    rebuild_extractor,
)
from histolight.io.tfrecord import TFRecordWriter


def _write_slide(d, slide, n, px=64, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    with TFRecordWriter(d / f"{slide}.tfrecords", slide=slide) as w:
        for i in range(n):
            img = rng.integers(0, 255, (px, px, 3), dtype=np.uint8)
            ok, buf = cv2.imencode(".png", img)
            w.write_tile(buf.tobytes(), 100 + 64 * i, 200)


@pytest.fixture
def tfr(tmp_path):
    d = tmp_path / "64px_32um"
    _write_slide(d, "s1", 5)
    _write_slide(d, "s2", 3, seed=1)
    return d


@pytest.fixture(scope="module")
def r18():
    return build_feature_extractor("resnet18_imagenet", device="cpu")


def test_bags_config_rebuild_is_exact_and_resume(r18, tfr, tmp_path, caplog):
    out = tmp_path / "bags"
    res = extract_features(r18, tfr, out, batch_size=2, progress=False)
    assert list(res.table.status) == ["done", "done"] and res.summary_path == out / "summary.csv"
    feats = torch.load(out / "s1.pt", weights_only=True)
    assert feats.shape == (5, 512) and feats.dtype == torch.float32
    _, locs = load_bag(out, "s1")
    np.testing.assert_array_equal(locs[:, 0], 100 + 64 * np.arange(5))
    cfg = json.loads((out / "bags_config.json").read_text())
    assert {"extractor", "normalizer", "num_features", "tile_px", "tile_um"} <= set(cfg)
    assert cfg["extractor"]["class"] and cfg["extractor"]["kwargs"]["name"] == "resnet18_imagenet"
    assert cfg["num_features"] == 512 == feats.shape[1] and (cfg["tile_px"], cfg["tile_um"]) == (64, 32)
    assert cfg["random_init"] is True and cfg["normalizer"] is None
    # the config rebuilds the extractor, which reproduces the bags bit for bit (same seeded random init)
    ext2, norm = rebuild_extractor(out / "bags_config.json")
    assert norm is None and ext2.random_init
    extract_features(ext2, tfr, tmp_path / "again", batch_size=2, progress=False)
    assert torch.equal(load_bag(tmp_path / "again", "s1")[0], feats)
    # a single TFRecord: (bags, coords)
    bags, coords = ext2(str(tfr / "s1.tfrecords"), batch_size=2)
    assert torch.equal(bags, feats) and coords.shape == (5, 2) and coords.dtype == torch.int64
    # re-running skips finished slides; another extractor in the same folder is refused
    again = extract_features(r18, tfr, out, progress=False)
    assert set(again.table.status) == {"skipped"} and set(again.table.reason) == {"exists"}
    with pytest.raises(HistolightError, match="another extractor"):
        extract_features(build_feature_extractor("resnet10t_imagenet", device="cpu"), tfr, out, progress=False)


@pytest.mark.slow
def test_two_encoders_one_pass(r18, tfr, tmp_path):
    other = build_feature_extractor("resnet18_imagenet", device="cpu", seed=3, layers=["layer2", "layer3"], pooling="max")
    assert other.num_features == 128 + 256
    a, b = tmp_path / "a", tmp_path / "b"
    res = extract_features([r18, other], tfr, [a, b], progress=False)
    assert set(res.table.status) == {"done"}
    fa, la = load_bag(a, "s2")
    fb, lb = load_bag(b, "s2")
    assert fa.shape == (3, 512) and fb.shape == (3, 384) and np.array_equal(la, lb)
    assert json.loads((b / "bags_config.json").read_text())["num_features"] == 384
    with pytest.raises(ConfigError, match="one outdir per extractor"):
        extract_features([r18, other], tfr, a, progress=False)


@pytest.mark.slow
def test_classifier_features_are_its_pre_logits(tfr, tmp_path):
    from histolight.classify.artifacts import load_model, make_model_config, save_model
    from histolight.classify.labels import LabelMap
    from histolight.classify.module import create_timm_model

    net = create_timm_model("resnet10t", 3)
    cfg = make_model_config("resnet10t", LabelMap(["a", "b", "c"]), 64, 32, mean=[0.5] * 3, std=[0.25] * 3)
    save_model(tmp_path / "model", net, cfg)
    ext = build_extractor(str(tmp_path / "model"), device="cpu")
    assert ext.tile_px == 64 and ext.name == "classifier" and not ext.random_init
    extract_features(ext, tfr, tmp_path / "bags", progress=False)
    feats, _ = load_bag(tmp_path / "bags", "s2")
    m = load_model(tmp_path / "model")
    from histolight.io.tfrecord import TFRecordReader, decode_image

    r = TFRecordReader(tfr / "s2.tfrecords")
    x = torch.stack([torch.from_numpy(decode_image(r.read(i)["image_raw"]).transpose(2, 0, 1).copy()) for i in range(len(r))])
    with torch.no_grad():
        want = m.net.forward_head(m.net.forward_features(m.preprocess(x)), pre_logits=True)
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-4)
    ext2, _ = rebuild_extractor(tmp_path / "bags")
    extract_features(ext2, tfr, tmp_path / "bags2", progress=False)
    assert torch.equal(load_bag(tmp_path / "bags2", "s2")[0], feats)
    # the classifier's tile size must match the TFRecords'
    other = tmp_path / "128px_64um"
    _write_slide(other, "s3", 1, px=128)
    with pytest.raises(ConfigError, match="do not match the model's tiles"):
        extract_features(ext, other, tmp_path / "bags3", progress=False)


@pytest.mark.slow
def test_from_slides_grid_and_facades(r18, tiny_demo, tmp_path):
    from histolight.dataset import Dataset
    from histolight.wsi import Slide

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", name="tiny")
    name = ds.names[0]
    with Slide(ds.path(name)) as slide:
        grid = r18(slide, tile_px=32, tile_um=64, roi_method="ignore")
    W, H = 1024 // 128, 768 // 128
    assert grid.shape == (W, H, 512)
    kept = ~torch.isnan(grid[..., 0])
    assert 0 < int(kept.sum()) < W * H  # QC (otsu) dropped the white background
    res = ds.generate_feature_bags(
        r18, tmp_path / "bags", tile_px=32, tile_um=64, extract={"roi_method": "ignore"}, progress=False
    )
    assert set(res.table.status) == {"done"}
    feats = torch.load(tmp_path / "bags" / f"{name}.pt", weights_only=True)
    idx = np.load(tmp_path / "bags" / f"{name}.index.npz")
    g = torch.from_numpy(idx["grid"])
    torch.testing.assert_close(grid[g[:, 0], g[:, 1]], feats, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "bags" / "bags_config.json").read_text())["source"] == "slides"
    df = DatasetFeatures(r18, ds, tile_px=32, tile_um=64, roi_method="ignore")
    torch.testing.assert_close(df.bags[name], feats, rtol=1e-5, atol=1e-5)
    out = df.to_torch(tmp_path / "df")
    assert torch.equal(torch.load(out / f"{name}.pt", weights_only=True), df.bags[name])


def test_random_init_warns_once(caplog):
    with caplog.at_level("WARNING"):
        e = build_feature_extractor("resnet18_imagenet", device="cpu", seed=5)
    hits = [r for r in caplog.records if "RANDOM weights" in r.getMessage()]
    assert len(hits) == 1 and e.random_init


def test_bad_inputs(r18, tmp_path):
    with pytest.raises(ConfigError, match="unknown extractor 'not_a_model_xyz'"):
        build_extractor("not_a_model_xyz")
    with pytest.raises(ConfigError, match="not found"):
        extract_features(r18, tmp_path / "nothing", tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="layers="):
        build_feature_extractor("resnet18_imagenet", device="meta", layers=["no_such_layer"])
    with pytest.raises(HistolightError, match="do not exist"):
        build_feature_extractor("retccl", weights=tmp_path / "missing.pth", device="meta")
    with pytest.raises(ConfigError, match="tile_um"):
        r18(tmp_path / "x.svs")  # a slide needs its tile size
