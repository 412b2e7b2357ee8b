"""Feature bags from TFRecords: timm backbones and trained classifiers, resume, bad input."""

import cv2
import numpy as np
import pytest
import torch

from histolight.errors import ConfigError, HistolightError
from histolight.features import build_extractor, extract_features, load_bag
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


def test_timm_backbone_bags_and_resume(tfr, tmp_path):
    ext = build_extractor("resnet18")
    assert ext.dim == 512
    out = tmp_path / "bags"
    res = extract_features(ext, tfr, out, batch_size=2, progress=False)
    assert list(res.table.status) == ["done", "done"] and res.summary_path == out / "summary.csv"
    feats, locs = load_bag(out, "s1")
    assert feats.shape == (5, 512) and feats.dtype == torch.float32
    np.testing.assert_array_equal(locs[:, 0], 100 + 64 * np.arange(5))
    # deterministic: the same tile gives the same vector whatever the batch it is in
    ext.net.eval()
    res2 = extract_features(ext, tfr, tmp_path / "bags2", batch_size=5, progress=False)
    torch.testing.assert_close(load_bag(tmp_path / "bags2", "s1")[0], feats, rtol=1e-4, atol=1e-4)
    assert res2.table.tiles.sum() == 8
    # re-running skips finished slides; another extractor in the same folder is refused
    again = extract_features(ext, tfr, out, progress=False)
    assert set(again.table.status) == {"skipped"} and set(again.table.reason) == {"exists"}
    with pytest.raises(HistolightError, match="another extractor"):
        extract_features(build_extractor("resnet10t"), tfr, out, progress=False)


def test_classifier_features_are_its_pre_logits(tfr, tmp_path):
    from histolight.classify.artifacts import load_model, make_model_config, save_model
    from histolight.classify.labels import LabelMap
    from histolight.classify.module import create_timm_model

    net = create_timm_model("resnet10t", 3)
    cfg = make_model_config("resnet10t", LabelMap(["a", "b", "c"]), 64, 32, mean=[0.5] * 3, std=[0.25] * 3)
    save_model(tmp_path / "model", net, cfg)
    ext = build_extractor(str(tmp_path / "model"))
    assert ext.tile_px == 64 and ext.config["source"] == "classifier"
    extract_features(ext, tfr, tmp_path / "bags", progress=False)
    feats, _ = load_bag(tmp_path / "bags", "s2")
    m = load_model(tmp_path / "model")
    from histolight.io.tfrecord import TFRecordReader, decode_image

    r = TFRecordReader(tfr / "s2.tfrecords")
    x = torch.stack([torch.from_numpy(decode_image(r.read(i)["image_raw"]).transpose(2, 0, 1).copy()) for i in range(len(r))])
    with torch.no_grad():
        want = m.net.forward_head(m.net.forward_features(m.preprocess(x)), pre_logits=True)
        logits = m.net.get_classifier()(want)
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, m.net(m.preprocess(x)), rtol=1e-4, atol=1e-4)
    # the classifier's tile size must match the TFRecords'
    other = tmp_path / "128px_64um"
    _write_slide(other, "s3", 1, px=128)
    with pytest.raises(ConfigError, match="do not match the model's tiles"):
        extract_features(ext, other, tmp_path / "bags3", progress=False)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="neither a trained classifier path .* nor a timm model name"):
        build_extractor("not_a_model_xyz")
    with pytest.raises(ConfigError, match="not found"):
        extract_features(build_extractor("resnet10t"), tmp_path / "nothing", tmp_path / "o", progress=False)
