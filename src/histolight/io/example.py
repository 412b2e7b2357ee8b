"""Hand-written `tf.train.Example` protobuf encoder/decoder (no TensorFlow, no protobuf).

Wire layout (tensorflow/core/example/{example,feature}.proto)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # entry: {1: key, 2: value}
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList{ repeated bytes value = 1; }
    FloatList{ repeated float value = 1 [packed]; }      # float32, little endian
    Int64List{ repeated int64 value = 1 [packed]; }      # varint, negatives are 10-byte two's complement

The encoder writes map entries sorted by key (protobuf's deterministic order; for the
tutorial example in the TF docs this reproduces TensorFlow's bytes exactly). The decoder
accepts anything a conforming protobuf writer produces: entries in any order, packed or
unpacked repeated fields, repeated/merged sub-messages, unknown fields (skipped).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from histolight.errors import HistolightError

__all__ = ["ExampleDecodeError", "encode_example", "decode_example", "decode_example_typed"]

Value = bytes | int | float | list

_BYTES, _FLOAT, _INT = 1, 2, 3  # Feature oneof field numbers
_KIND_NAMES = {"bytes": _BYTES, "byte": _BYTES, "float": _FLOAT, "int": _INT, "int64": _INT}
_U64 = (1 << 64) - 1


class ExampleDecodeError(HistolightError, ValueError):
    """Bytes are not a valid serialized `tf.train.Example`."""


# ----------------------------------------------------------------------------- encoding


def _varint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """Length-delimited field (wire type 2)."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _classify(name: str, value: Any, kind: str | None) -> tuple[int, list]:
    """Return (feature kind, list of values) for a python/numpy value."""
    if kind is not None:
        try:
            k = _KIND_NAMES[kind]
        except KeyError:
            raise ValueError(f"feature {name!r}: kind must be 'bytes', 'float' or 'int', got {kind!r}") from None
        vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        return k, vals
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "iub":
            return _INT, value.ravel().tolist()
        if value.dtype.kind == "f":
            return _FLOAT, value.ravel().tolist()
        value = value.ravel().tolist()
    if not isinstance(value, (list, tuple)):
        value = [value]
    if len(value) == 0:
        raise ValueError(f"feature {name!r}: empty list needs an explicit kind (kinds={{{name!r}: 'int'}})")
    if all(isinstance(v, (bytes, bytearray, memoryview, str, np.bytes_, np.str_)) for v in value):
        return _BYTES, list(value)
    if all(isinstance(v, (bool, int, np.integer, np.bool_)) for v in value):
        return _INT, list(value)
    if all(isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)) for v in value):
        return _FLOAT, list(value)
    raise TypeError(f"feature {name!r}: cannot encode values of type {sorted({type(v).__name__ for v in value})}")


def _encode_feature(name: str, kind: int, vals: list) -> bytes:
    if kind == _BYTES:
        body = b"".join(_ld(1, v.encode("utf-8") if isinstance(v, str) else bytes(v)) for v in vals)
    elif kind == _FLOAT:
        body = _ld(1, np.asarray(vals, dtype="<f4").tobytes()) if vals else b""
    else:
        parts = []
        for v in vals:
            v = int(v)
            if not -(1 << 63) <= v < (1 << 63):
                raise OverflowError(f"feature {name!r}: {v} does not fit in int64")
            parts.append(_varint(v & _U64))
        body = _ld(1, b"".join(parts)) if parts else b""
    return _ld(kind, body)


def encode_example(features: Mapping[str, Any], kinds: Mapping[str, str] | None = None) -> bytes:
    """Serialize `{name: value}` as a `tf.train.Example`.

    Values: bytes/str (str is utf-8 encoded) -> BytesList; int/bool/np.integer -> Int64List;
    float -> FloatList (stored as float32); list/tuple/ndarray -> list of the element kind
    (ints mixed with floats -> FloatList). `kinds` forces a kind per name
    ('bytes' | 'float' | 'int'), e.g. for empty lists. Entries are written sorted by key.
    """
    kinds = kinds or {}
    entries = []
    for name, value in features.items():
        if not isinstance(name, str):
            raise TypeError(f"feature names must be str, got {type(name).__name__}")
        kind, vals = _classify(name, value, kinds.get(name))
        key = name.encode("utf-8")
        entries.append((key, _ld(1, key) + _ld(2, _encode_feature(name, kind, vals))))
    entries.sort(key=lambda e: e[0])
    feats = b"".join(_ld(1, e) for _, e in entries)
    return _ld(1, feats)


# ----------------------------------------------------------------------------- decoding


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ExampleDecodeError(f"truncated varint at byte {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise ExampleDecodeError(f"varint longer than 10 bytes at byte {pos}")


def _fields(buf: memoryview, pos: int, end: int):
    """Yield (field number, wire type, value, value_end) over a message body.

    value: int for wire types 0/1/5 (raw), start offset for wire type 2 (payload = buf[value:value_end]).
    Groups (wire types 3/4, unused by Example) are skipped.
    """
    while pos < end:
        tag, pos = _read_varint(buf, pos, end)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise ExampleDecodeError(f"invalid field number 0 at byte {pos}")
        if wt == 0:
            v, pos = _read_varint(buf, pos, end)
            yield field, wt, v, pos
        elif wt == 2:
            n, pos = _read_varint(buf, pos, end)
            if pos + n > end:
                raise ExampleDecodeError(f"field {field}: length {n} runs past end of message at byte {pos}")
            yield field, wt, pos, pos + n
            pos += n
        elif wt == 5:
            if pos + 4 > end:
                raise ExampleDecodeError(f"truncated fixed32 at byte {pos}")
            yield field, wt, pos, pos + 4
            pos += 4
        elif wt == 1:
            if pos + 8 > end:
                raise ExampleDecodeError(f"truncated fixed64 at byte {pos}")
            yield field, wt, pos, pos + 8
            pos += 8
        elif wt == 3:
            pos = _skip_group(buf, pos, end, field)
        else:
            raise ExampleDecodeError(f"unexpected wire type {wt} (field {field}) at byte {pos}")


def _skip_group(buf: memoryview, pos: int, end: int, field: int) -> int:
    """Skip a (deprecated) group body starting after its start tag; return the offset after its end tag."""
    while pos < end:
        tag, after = _read_varint(buf, pos, end)
        if tag & 7 == 4:
            if tag >> 3 != field:
                raise ExampleDecodeError(f"mismatched end-group tag at byte {pos}")
            return after
        pos = _field_end(buf, pos, end)
    raise ExampleDecodeError(f"unterminated group (field {field})")


def _field_end(buf: memoryview, pos: int, end: int) -> int:
    """Offset just past the field whose tag starts at `pos`."""
    tag, pos = _read_varint(buf, pos, end)
    wt = tag & 7
    if wt == 0:
        return _read_varint(buf, pos, end)[1]
    if wt == 2:
        n, pos = _read_varint(buf, pos, end)
        nxt = pos + n
    elif wt in (1, 5):
        nxt = pos + (8 if wt == 1 else 4)
    elif wt == 3:
        return _skip_group(buf, pos, end, tag >> 3)
    else:
        raise ExampleDecodeError(f"unexpected wire type {wt} at byte {pos}")
    if nxt > end:
        raise ExampleDecodeError(f"field runs past end of message at byte {pos}")
    return nxt


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _decode_list(buf: memoryview, kind: int, pos: int, end: int, out: list) -> None:
    for field, wt, a, b in _fields(buf, pos, end):
        if field != 1:
            continue  # unknown field
        if kind == _BYTES:
            if wt == 2:
                out.append(bytes(buf[a:b]))
        elif kind == _FLOAT:
            if wt == 2:  # packed
                if (b - a) % 4:
                    raise ExampleDecodeError(f"packed float list of {b - a} bytes is not a multiple of 4")
                out.extend(np.frombuffer(buf[a:b], dtype="<f4").tolist())
            elif wt == 5:
                out.append(struct.unpack_from("<f", buf, a)[0])
        else:
            if wt == 2:  # packed
                p = a
                while p < b:
                    v, p = _read_varint(buf, p, b)
                    out.append(_signed(v))
            elif wt == 0:
                out.append(_signed(a))


def _decode_feature(buf: memoryview, pos: int, end: int, prev: tuple[int, list] | None) -> tuple[int, list] | None:
    cur = prev
    for field, wt, a, b in _fields(buf, pos, end):
        if wt != 2 or field not in (_BYTES, _FLOAT, _INT):
            continue
        if cur is None or cur[0] != field:  # oneof: switching member clears the old one
            cur = (field, [])
        _decode_list(buf, field, a, b, cur[1])
    return cur


def decode_example_typed(data: bytes | bytearray | memoryview) -> dict[str, tuple[str | None, list]]:
    """Decode to `{name: (kind, values)}`, kind in {'bytes', 'float', 'int', None (empty Feature)}."""
    buf = memoryview(data)
    if buf.format != "B" or buf.ndim != 1:
        buf = buf.cast("B")
    feats: dict[str, tuple[int, list] | None] = {}
    try:
        for field, wt, a, b in _fields(buf, 0, len(buf)):
            if field != 1 or wt != 2:
                continue
            for f2, wt2, ea, eb in _fields(buf, a, b):  # Features
                if f2 != 1 or wt2 != 2:
                    continue
                key = ""
                val: tuple[int, list] | None = None
                for f3, wt3, c, d in _fields(buf, ea, eb):  # map entry
                    if wt3 != 2:
                        continue
                    if f3 == 1:
                        key = bytes(buf[c:d]).decode("utf-8")
                    elif f3 == 2:
                        val = _decode_feature(buf, c, d, val)
                feats[key] = val  # later duplicate keys win (protobuf map semantics)
    except UnicodeDecodeError as e:
        raise ExampleDecodeError(f"feature name is not valid utf-8: {e}") from None
    names = {_BYTES: "bytes", _FLOAT: "float", _INT: "int"}
    return {k: ((names[v[0]], v[1]) if v is not None else (None, [])) for k, v in feats.items()}


def decode_example(data: bytes | bytearray | memoryview, unwrap: bool = True) -> dict[str, Value]:
    """Decode a serialized `tf.train.Example` into `{name: value}`.

    BytesList -> bytes, Int64List -> int, FloatList -> float (float32 widened to Python float).
    unwrap=True: a single-element list becomes its element; empty and multi-element lists
    stay lists. unwrap=False: every value is a list. Use `decode_example_typed` for kinds.
    """
    out: dict[str, Value] = {}
    for k, (_, vals) in decode_example_typed(data).items():
        out[k] = vals[0] if unwrap and len(vals) == 1 else vals
    return out
