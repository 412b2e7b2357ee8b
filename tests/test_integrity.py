"""Integrity of tiles by default: TFRecord CRCs are checked wherever tiles feed a model, images decode strictly, and a
corrupt tile is attributed (tile id, file, record, byte offset) and then skipped and counted (prediction) or fatal
(training), as ``on_corrupt`` says; ``verify=false`` is the fast path.

The tiles are demo-like (smooth colour noise, JPEG) in ``<work>/tiles/tiny/64px_32um/``, written by the TFRecord
writer, with a random-init classifier of that geometry.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from histolight.classify import LabelMap, StreamingTileDataset, TileDataModule, TileDataset, index_tfrecords
from histolight.errors import ConfigError
from histolight.io import ImageDecodeError, TFRecordError, TFRecordReader, decode_image, load_index
from tests.conftest import run_task

PX, UM = 64, 32
N = {"s1": 5, "s2": 3}


def _tile(rng) -> bytes:
    img = cv2.GaussianBlur(rng.integers(0, 256, (PX, PX, 3), dtype=np.uint8), (0, 0), 3)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return buf.tobytes()


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A work dir with two slides' TFRecords and ``model/`` (a random-init resnet10t for 64 px / 32 um tiles)."""
    from histolight.classify.artifacts import make_model_config, save_model
    from histolight.classify.module import create_timm_model
    from histolight.io.tfrecord import TFRecordWriter
    from histolight.io.tilestore import tile_folder

    work = tmp_path_factory.mktemp("integrity")
    d = tile_folder(work / "tiles", "tiny", PX, UM)
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for slide, n in N.items():
        with TFRecordWriter(d / f"{slide}.tfrecords", slide=slide) as w:
            for i in range(n):
                w.write_tile(_tile(rng), 32 + 64 * i, 32)
    cfg = make_model_config("resnet10t", LabelMap(["a", "b"]), PX, UM, mean=[0.5] * 3, std=[0.25] * 3)
    save_model(work / "model", create_timm_model("resnet10t", 2), cfg)
    return work


@pytest.fixture
def work(clean, tmp_path) -> Path:
    """A private copy of ``clean`` to damage."""
    return Path(shutil.copytree(clean, tmp_path / "work"))


def _tfrecord(work: Path, slide: str) -> Path:
    return work / "tiles" / "tiny" / f"{PX}px_{UM}um" / f"{slide}.tfrecords"


def _flip(path: Path, record: int, n: int = 64, fill: int | None = None) -> int:
    """Overwrite ``n`` bytes three quarters into ``record`` (inside its JPEG's entropy-coded data) with other bytes
    (each byte + 0x5A, or ``fill``); the record's offset."""
    off, total = (int(v) for v in load_index(str(path).replace(".tfrecords", ".index.npz"))[0][record])
    data = bytearray(path.read_bytes())
    mid = off + total * 3 // 4
    data[mid : mid + n] = bytes((b + 0x5A) % 256 if fill is None else fill for b in data[mid : mid + n])
    path.write_bytes(bytes(data))
    return off


def _truncate(path: Path, record: int) -> int:
    """Cut the file inside ``record`` (records from it on are lost); its offset."""
    off = int(load_index(str(path).replace(".tfrecords", ".index.npz"))[0][record, 0])
    path.write_bytes(path.read_bytes()[: off + 40])
    return off


def _predict(work: Path, out: Path, *extra: str) -> int:
    ov = ["task=predict", "dataset=folder", f"dataset.slides={work}", "dataset.name=tiny"]
    ov += [f"paths.work_dir={work}", f"task.model={work / 'model'}", *extra]
    return run_task(ov, out)
    return 0


def _labelled(work: Path) -> pd.DataFrame:
    """The tiles, labelled a/b alternately; s1 in the train split, s2 in val."""
    t = index_tfrecords(sorted((work / "tiles" / "tiny" / f"{PX}px_{UM}um").glob("*.tfrecords")))
    return t.assign(label=["a", "b"] * (len(t) // 2), split=np.where(t["slide"] == "s1", "train", "val"))


# ---------------------------------------------------------------------------------------------- prediction


@pytest.mark.slow
def test_predict_skips_a_flipped_record_counts_it_and_names_it(work, tmp_path):
    p = _tfrecord(work, "s1")
    off = _flip(p, 2)
    assert _predict(work, tmp_path / "out") == 0
    rows = pd.read_csv(tmp_path / "out" / "slides.csv").set_index("slide")
    assert rows.loc["s1", "status"] == "done" and rows.loc["s1", "n_tiles"] == 4 and rows.loc["s1", "n_corrupt"] == 1
    assert rows.loc["s2", "n_tiles"] == 3 and rows.loc["s2", "n_corrupt"] == 0
    why = rows.loc["s1", "reason"]
    assert str(p) in why and f"record 2, byte offset {off}" in why and "data checksum mismatch" in why and "s1-160-32" in why
    pred = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert len(pred) == 7 and "s1-160-32" not in set(pred["tile_id"])
    # on_corrupt=fail: the slide fails with the same attribution (exit status 2)
    assert _predict(work, tmp_path / "strict", "task.on_corrupt=fail") == 2
    rows = pd.read_csv(tmp_path / "strict" / "slides.csv").set_index("slide")
    assert rows.loc["s1", "status"] == "failed" and f"record 2, byte offset {off}" in rows.loc["s1", "reason"]
    assert rows.loc["s2", "status"] == "done"


@pytest.mark.slow
def test_predict_without_verify_catches_the_damaged_jpeg_and_matches_on_clean_files(clean, work, tmp_path):
    assert _predict(clean, tmp_path / "crc") == 0
    assert _predict(clean, tmp_path / "fast", "task.verify=false") == 0
    a, b = (pd.read_parquet(tmp_path / d / "predictions.parquet") for d in ("crc", "fast"))
    pd.testing.assert_frame_equal(a, b)
    # no CRC check: the damaged bytes reach the JPEG decoder, which is strict (OpenCV would decode garbage); damage
    # that still decodes (some does) goes unnoticed without the CRC: the reason verify=true is the default
    p = _tfrecord(work, "s1")
    off = _flip(p, 3, fill=0xFF)
    assert _predict(work, tmp_path / "damaged", "task.verify=false") == 0
    rows = pd.read_csv(tmp_path / "damaged" / "slides.csv").set_index("slide")
    why = rows.loc["s1", "reason"]
    assert rows.loc["s1", "n_corrupt"] == 1 and f"record 3, byte offset {off}" in why and "corrupt JPEG" in why


def test_predict_tiles_of_a_truncated_file(work):
    from histolight.classify.data import CorruptTileError
    from histolight.classify.predict import predict_tiles

    p = _tfrecord(work, "s1")
    off = _truncate(p, 3)
    pred, bad = predict_tiles(work / "model", [p], progress=False)
    assert len(pred) == 3 and [b.record for b in bad] == [3, 4]
    assert bad[0].offset == off and bad[0].tfrecord == str(p) and "truncated file" in bad[0].reason
    with pytest.raises(CorruptTileError, match=rf"s1-224-32 \('{p}' record 3, byte offset {off}\): truncated file"):
        predict_tiles(work / "model", [p], progress=False, on_corrupt="fail")


def test_predict_config_checks_the_policy(clean, tmp_path):
    assert _predict(clean, tmp_path / "o", "task.on_corrupt=ignore") == 1
    assert _predict(clean, tmp_path / "o", "task.verify=maybe") == 1


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_fails_on_a_flipped_record_naming_it(work):
    import lightning as L

    from histolight.classify import TileClassifier
    from histolight.classify.data import CorruptTileError

    p = _tfrecord(work, "s1")
    off = _flip(p, 1)
    dm = TileDataModule(
        _labelled(work), LabelMap(["a", "b"]), tile_px=PX, batch_size=8, balance="none", required_splits=("train",)
    )
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(CorruptTileError, match=rf"tile s1-96-32 \('{p}' record 1, byte offset {off}\): data checksum mismatch"):
        trainer.fit(TileClassifier("resnet10t", ["a", "b"]), datamodule=dm)


def test_training_data_policies(work):
    from histolight.classify.data import CorruptTileError, collate_tiles

    p = _tfrecord(work, "s1")
    _flip(p, 1, fill=0xFF)
    t = _labelled(work)
    y = (t["label"] == "b").to_numpy().astype(int)
    # map-style, skip: the corrupt item is marked, and the collate function lists it apart from the batch
    ds = TileDataset(t, labels=y, on_corrupt="skip")
    batch = collate_tiles([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (7, 3, PX, PX) and [c.record for c in batch["corrupt"]] == [1]
    assert collate_tiles([ds[1]]) == {"corrupt": [ds[1]["corrupt"]]}
    # streaming, skip: the quota is met from the readable tiles only
    st = StreamingTileDataset(t, labels=y, on_corrupt="skip", shuffle_buffer=2, samples_per_epoch=20)
    got = [it["index"] for it in st]
    assert len(got) == 20 and 1 not in got
    with pytest.raises(CorruptTileError, match="record 1"):
        list(StreamingTileDataset(t, labels=y, shuffle_buffer=1, samples_per_epoch=200))
    with pytest.raises(CorruptTileError, match="all its 1 tiles are corrupt"):
        list(StreamingTileDataset(t.iloc[[1]], on_corrupt="skip", samples_per_epoch=2))
    # verify=false: the record reads (the CRC is not checked), the JPEG decoder is what catches it
    with pytest.raises(CorruptTileError, match="corrupt JPEG"):
        TileDataset(t, verify=False)[1]
    with pytest.raises(ValueError, match="on_corrupt='ignore' is invalid"):
        TileDataset(t, on_corrupt="ignore")


def test_tile_data_config_integrity_keys():
    from histolight.classify.config import TileDataConfig
    from histolight.config.schema import from_config

    d = TileDataConfig()
    assert d.verify is True and d.on_corrupt == "fail"
    with pytest.raises(ConfigError, match=r"on_corrupt='drop' is invalid: must be fail .* or skip"):
        from_config(TileDataConfig, {"on_corrupt": "drop"}, "data")
    with pytest.raises(ConfigError, match=r"verify='no' is invalid"):
        from_config(TileDataConfig, {"verify": "no"}, "data")


# ---------------------------------------------------------------------------------------------- readers and decoding


def test_truncated_file_keeps_its_index_and_names_the_lost_records(work, caplog):
    p = _tfrecord(work, "s1")
    off = _truncate(p, 3)
    with caplog.at_level(logging.WARNING):
        r = TFRecordReader(p)
        assert len(r) == 5 and r.read_tile(2).slide == "s1"
    assert "is truncated" in caplog.text and "records 3-4 cannot be read" in caplog.text
    with pytest.raises(TFRecordError, match=rf"record 3 at byte offset {off}: truncated file"):
        r.read(3)


def test_strict_decoding():
    rng = np.random.default_rng(1)
    jpg = _tile(rng)
    assert decode_image(jpg).shape == (PX, PX, 3)
    bad = bytearray(jpg)
    at = len(bad) * 3 // 4
    bad[at : at + 64] = bytes(64)  # OpenCV decodes this, printing only "Corrupt JPEG data" on stderr
    assert cv2.imdecode(np.frombuffer(bytes(bad), np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(ImageDecodeError, match="corrupt JPEG"):
        decode_image(bytes(bad))
    with pytest.raises(ImageDecodeError, match="corrupt JPEG.*Premature end"):
        decode_image(jpg[:-100])
    png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    assert decode_image(png).shape == (8, 8, 3)
    with pytest.raises(ImageDecodeError, match="not a valid JPEG or PNG"):
        decode_image(png[:-20])
    # on intact data the strict decoder gives exactly what OpenCV gives (both libjpeg-turbo), in RGB order
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert np.array_equal(decode_image(jpg), ref)


def test_crc32c_is_the_c_implementation():
    import crc32c

    from histolight.io.tfrecord_format import masked_crc32c

    assert type(crc32c.crc32c).__name__ == "builtin_function_or_method"  # compiled, not a pure-Python fallback
    assert masked_crc32c(b"") == 0xA282EAD8 and crc32c.crc32c(b"123456789") == 0xE3069283
