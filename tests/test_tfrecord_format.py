"""TFRecord bytes: checksums and framing against TensorFlow-written bytes, and the tf.train.Example codec against
TensorFlow's literal bytes and the protobuf runtime (no TensorFlow needed)."""

from __future__ import annotations

import random
import struct

import crc32c
import numpy as np
import pytest

from histolight.io import (
    ExampleDecodeError,
    TFRecordReader,
    decode_example,
    decode_example_typed,
    encode_example,
    frame_record,
    iter_records,
    masked_crc32c,
)

# --- known bytes --------------------------------------------------------------------------------

# Printed by `tf.train.Example.SerializeToString()` in the TensorFlow "TFRecord and tf.train.Example"
# tutorial: {feature0: int64 0, feature1: int64 4, feature2: bytes b"goat", feature3: float 0.9876}.
TF_TUTORIAL_EXAMPLE = (
    b"\nR\n\x11\n\x08feature0\x12\x05\x1a\x03\n\x01\x00\n\x11\n\x08feature1\x12\x05\x1a\x03\n\x01\x04"
    b"\n\x14\n\x08feature2\x12\x08\n\x06\n\x04goat\n\x14\n\x08feature3\x12\x08\x12\x06\n\x04[\xd3|?"
)
# Read back by tf.data.TFRecordDataset in the same tutorial: map entries NOT sorted by key.
TF_TUTORIAL_UNSORTED = (
    b"\nS\n\x15\n\x08feature2\x12\t\n\x07\n\x05horse\n\x11\n\x08feature1\x12\x05\x1a\x03\n\x01\x03"
    b"\n\x14\n\x08feature3\x12\x08\x12\x06\n\x04\x95\xce\xbd>\n\x11\n\x08feature0\x12\x05\x1a\x03\n\x01\x00"
)
# Two records of a TFRecord (event file) written by TensorFlow, as dumped with xxd in TensorBoard's
# tests (tensorboard/data/server/tf_record.rs): header, length CRC, payload, payload CRC.
TF_FILE_PAYLOADS = [
    b"\x09\x00\x00\x80\x38\x99\xd6\xd7\x41\x1a\x0dbrain.Event:2",
    b"\x09\xc4\x05\xb7\x3d\x99\xd6\xd7\x41\x10\x4d\x2a\x25\x0a\x23\x0a\x08accuracy"
    b"\x42\x0a\x08\x01\x12\x00\x22\x04\xa4\x70\x7d\x3f\x4a\x0b\x0a\x09\x0a\x07scalars",
]
TF_FILE_BYTES = (
    b"\x18\x00\x00\x00\x00\x00\x00\x00"
    b"\xa3\x7f\x4b\x22" + TF_FILE_PAYLOADS[0] + b"\x12\x4b\x36\xab" + b"\x32\x00\x00\x00\x00\x00\x00\x00"
    b"\x24\x19\x56\xec" + TF_FILE_PAYLOADS[1] + b"\xa5\x5b\x64\x33"
)


# Minimal independent protobuf writer for hand-built test messages.
def _vi(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def _tag(field: int, wt: int) -> bytes:
    return _vi(field << 3 | wt)


def _ld(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + _vi(len(payload)) + payload


# --- checksums and framing ------------------------------------------------------------------------


def test_masked_crc_known_values():
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    c = 0xE3069283
    assert masked_crc32c(b"123456789") == ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF) == 0xC78AB0E5
    # From a real TensorFlow event file (TensorBoard's masked_crc.rs test vector).
    assert masked_crc32c(b"\x1a\x11CRC test, one two") == 0x5794D08A
    # Header CRC of a 24-byte record in a real TF file.
    assert masked_crc32c(struct.pack("<Q", 24)) == 0x224B7FA3
    assert masked_crc32c(b"") == ((0 + 0xA282EAD8) & 0xFFFFFFFF)


def test_reads_and_reproduces_tensorflow_written_file(tmp_path):
    assert b"".join(frame_record(p) for p in TF_FILE_PAYLOADS) == TF_FILE_BYTES
    p = tmp_path / "events.tfrecord"
    p.write_bytes(TF_FILE_BYTES)
    assert list(iter_records(p, raw=True)) == TF_FILE_PAYLOADS
    r = TFRecordReader(p)
    assert len(r) == 2
    assert np.array_equal(r.index, [[0, 24 + 16], [40, 50 + 16]])
    assert bytes(r.read_raw(1)) == TF_FILE_PAYLOADS[1]
    assert bytes(r.read_raw(-2)) == TF_FILE_PAYLOADS[0]
    assert r.locations is None  # Event protos carry no loc_x/loc_y


# --- tf.train.Example codec -----------------------------------------------------------------------


def test_encoder_reproduces_tensorflow_bytes():
    feats = {"feature3": 0.9876, "feature1": 4, "feature2": b"goat", "feature0": False}
    assert encode_example(feats) == TF_TUTORIAL_EXAMPLE
    dec = decode_example(TF_TUTORIAL_EXAMPLE)
    assert dec == {"feature0": 0, "feature1": 4, "feature2": b"goat", "feature3": pytest.approx(0.9876, abs=1e-7)}


def test_decoder_accepts_tensorflow_unsorted_map():
    dec = decode_example(TF_TUTORIAL_UNSORTED)
    assert list(dec) == ["feature2", "feature1", "feature3", "feature0"]
    assert dec["feature2"] == b"horse" and dec["feature1"] == 3 and dec["feature0"] == 0
    assert dec["feature3"] == struct.unpack("<f", b"\x95\xce\xbd>")[0]
    assert decode_example(TF_TUTORIAL_UNSORTED, unwrap=False)["feature1"] == [3]


def test_negative_int64_literal_bytes():
    # Example{a: Int64List[-1]}: -1 is a 10-byte varint (two's complement).
    lit = b"\x0a\x15\x0a\x13\x0a\x01a\x12\x0e\x1a\x0c\x0a\x0a" + b"\xff" * 9 + b"\x01"
    assert encode_example({"a": -1}) == lit
    assert decode_example(lit) == {"a": -1}
    big = [-(2**63), -(2**31) - 1, -1, 0, 1, 2**31, 2**62 + 12345, 2**63 - 1]
    assert decode_example(encode_example({"v": big}))["v"] == big
    with pytest.raises(OverflowError):
        encode_example({"v": 2**63})
    with pytest.raises(OverflowError):
        encode_example({"v": -(2**63) - 1})


def test_decoder_unpacked_unknown_fields_and_merges():
    i64_unpacked = _ld(3, _tag(1, 0) + _vi(-5) + _tag(1, 0) + _vi(7) + _ld(1, _vi(-(2**63)) + _vi(9)))
    f_unpacked = _ld(2, _tag(1, 5) + struct.pack("<f", 1.5) + _ld(1, struct.pack("<2f", -2.0, 0.25)))
    bytes_two = _ld(1, _ld(1, b"x") + _ld(1, b"") + _tag(7, 0) + _vi(99))  # unknown field in BytesList
    feature_unknown = _tag(9, 0) + _vi(1) + _ld(3, _ld(1, _vi(42))) + _tag(10, 5) + b"abcd"
    entries = [
        _ld(2, i64_unpacked) + _ld(1, b"ints"),  # value before key
        _ld(1, b"floats") + _ld(2, f_unpacked),
        _ld(1, b"strs") + _ld(2, bytes_two),
        _ld(1, b"empty") + _ld(2, b""),  # Feature with no kind
        _ld(1, b"dup") + _ld(2, _ld(3, _ld(1, _vi(1)))),
        _ld(1, b"unk") + _ld(2, feature_unknown),
        _ld(1, b"dup") + _ld(2, _ld(1, _ld(1, b"last"))),  # duplicate key: last wins
        _ld(1, "naïve".encode()) + _ld(2, _ld(3, b"")),  # empty packed int list
    ]
    features = b"".join(_ld(1, e) for e in entries)
    # Unknown top-level fields of every wire type, and Features split in two (protobuf merges them).
    example = (
        _tag(5, 0)
        + _vi(300)
        + _tag(6, 1)
        + b"8bytes!!"
        + _ld(1, features[: len(_ld(1, entries[0]))])
        + _tag(15, 3)
        + _tag(1, 0)
        + _vi(1)
        + _tag(15, 4)  # a group
        + _ld(1, features[len(_ld(1, entries[0])) :])
        + _tag(7, 5)
        + b"\x00\x00\x00\x00"
    )
    dec = decode_example(example)
    assert dec["ints"] == [-5, 7, -(2**63), 9]
    assert dec["floats"] == [1.5, -2.0, 0.25]
    assert dec["strs"] == [b"x", b""]
    assert dec["empty"] == [] and dec["naïve"] == []
    assert dec["dup"] == b"last"
    assert dec["unk"] == 42
    typed = decode_example_typed(example)
    assert typed["empty"] == (None, []) and typed["naïve"] == ("int", []) and typed["floats"][0] == "float"


@pytest.mark.parametrize(
    "bad",
    [
        b"\x0a\x05\x0a\x03",  # length runs past end
        b"\x0a",  # truncated varint
        b"\x0a\x02\x0a\xff",  # nested truncated
        b"\x0f",  # wire type 7
        b"\x08" + b"\xff" * 11,  # varint too long
    ],
)
def test_decoder_rejects_garbage(bad):
    with pytest.raises(ExampleDecodeError):
        decode_example(bad)


def test_against_protobuf_runtime():
    """Cross-check with the protobuf library (an independent codec) using TF's exact .proto definitions."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="hl_tf_example.proto", package="hltf", syntax="proto3")
    for name, ftype in (("BytesList", F.TYPE_BYTES), ("FloatList", F.TYPE_FLOAT), ("Int64List", F.TYPE_INT64)):
        m = fdp.message_type.add(name=name)
        fld = m.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=ftype)
        if ftype != F.TYPE_BYTES:
            fld.options.packed = True
    feat = fdp.message_type.add(name="Feature")
    feat.oneof_decl.add(name="kind")
    for num, (fname, tname) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1
    ):
        feat.field.add(
            name=fname, number=num, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=f".hltf.{tname}", oneof_index=0
        )
    feats = fdp.message_type.add(name="Features")
    entry = feats.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".hltf.Feature")
    feats.field.add(
        name="feature", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".hltf.Features.FeatureEntry"
    )
    ex = fdp.message_type.add(name="Example")
    ex.field.add(name="features", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".hltf.Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    Example = message_factory.GetMessageClass(pool.FindMessageTypeByName("hltf.Example"))

    rng = random.Random(1)
    for _ in range(50):
        vals = {}
        for k in range(rng.randint(0, 6)):
            kind = rng.choice("bif")
            n = rng.randint(1, 4)
            if kind == "b":
                vals[f"k{k}é"] = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 20))) for _ in range(n)]
            elif kind == "i":
                vals[f"k{k}"] = [rng.randint(-(2**63), 2**63 - 1) for _ in range(n)]
            else:
                vals[f"k{k}"] = np.float32(np.array([rng.uniform(-1e6, 1e6) for _ in range(n)])).tolist()
        ours = encode_example(vals)
        msg = Example.FromString(ours)
        got = {}
        for key, f in msg.features.feature.items():
            got[key] = list(getattr(f, f.WhichOneof("kind")).value)
        assert got == vals
        assert msg.SerializeToString(deterministic=True) == ours  # byte-identical to protobuf's canonical form
        assert decode_example(msg.SerializeToString(), unwrap=False) == vals
