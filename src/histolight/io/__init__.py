"""File I/O: Slideflow/TensorFlow-compatible TFRecords of tiles, tf.train.Example codec, atomic writes."""

from histolight.io.atomic import AtomicFile, atomic_save_npz, atomic_write, atomic_write_json, atomic_write_text
from histolight.io.example import ExampleDecodeError, decode_example, decode_example_typed, encode_example
from histolight.io.tfrecord import (
    ImageDecodeError,
    TFRecordError,
    TFRecordReader,
    TFRecordWriter,
    TileRecord,
    build_index,
    decode_image,
    find_index,
    frame_record,
    index_path_for,
    iter_records,
    load_index,
    masked_crc32c,
    save_index,
)

__all__ = [
    "AtomicFile",
    "atomic_write",
    "atomic_save_npz",
    "atomic_write_text",
    "atomic_write_json",
    "ExampleDecodeError",
    "encode_example",
    "decode_example",
    "decode_example_typed",
    "TFRecordError",
    "ImageDecodeError",
    "TileRecord",
    "TFRecordReader",
    "TFRecordWriter",
    "masked_crc32c",
    "frame_record",
    "index_path_for",
    "find_index",
    "load_index",
    "save_index",
    "build_index",
    "iter_records",
    "decode_image",
]
