"""File I/O: Slideflow/TensorFlow-compatible TFRecords of tiles (framing, index, reader, writer), tf.train.Example
codec, image bytes, atomic writes."""

from histolight.io.atomic import AtomicFile, atomic_save_npz, atomic_write, atomic_write_json, atomic_write_text
from histolight.io.example import ExampleDecodeError, decode_example, decode_example_typed, encode_example
from histolight.io.images import ImageDecodeError, decode_image
from histolight.io.tfrecord import TFRecordReader, TFRecordWriter
from histolight.io.tfrecord_format import TFRecordError, TileRecord, frame_record, iter_records, masked_crc32c
from histolight.io.tfrecord_index import build_index, find_index, index_path_for, load_index, save_index

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
