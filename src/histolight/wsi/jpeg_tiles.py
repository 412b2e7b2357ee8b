"""JPEG decoding of stored TIFF tiles with OpenSlide's colour handling (``openslide-decode-tiff.c``).

The page's ``JPEGTables`` are loaded first, the JPEG colour space is forced from the TIFF ``Photometric`` tag
(``YCbCr`` -> YCbCr-to-RGB conversion, ``RGB`` -> no conversion, whatever JFIF/Adobe markers the stream carries;
Aperio stores RGB-coded JPEG without markers), default (ISLOW) IDCT and fancy upsampling.

Decoders (same pixels, measured in ``experiments/fast_tile_reading.md``):

- ``simplejpeg`` (preferred when installed): ``strict=True`` turns libjpeg warnings ("Premature end of JPEG file",
  "Corrupt JPEG data: ...") into errors exactly as OpenSlide does, so a damaged tile fails here too (and the caller
  falls back to OpenSlide, which raises). The tables and the colour space are given to it by rewriting the stream
  header: SOI + an Adobe APP14 marker whose transform flag says RGB (0) or YCbCr (1) + the JPEGTables segments + the
  tile without its SOI and without its own APP0 (JFIF) / APP14 (Adobe) markers.
- ``imagecodecs.jpeg8_decode`` (fallback): tables and colour space passed directly; it ignores libjpeg warnings, so a
  damaged tile may decode to wrong pixels where OpenSlide would raise.

Decoded tiles are ``tile_h x tile_w x 3`` uint8 RGB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from histolight.wsi.tiff_structure import TiffLevel

# Adobe APP14 marker (version 100, flags 0, 0, transform): transform 0 = RGB, 1 = YCbCr (libjpeg honours it when
# there is no JFIF marker)
_ADOBE = {
    "RGB": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00",
    "YCBCR": b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01",
}


def jpeg_prefix(colorspace: str, tables: bytes | None) -> bytes:
    """SOI + the Adobe marker for ``colorspace`` (``'RGB'`` / ``'YCBCR'``) + the segments of a JPEGTables stream
    (``SOI ... EOI``, or None): the header :func:`jpeg_stream` puts before each tile."""
    return b"\xff\xd8" + _ADOBE[colorspace] + (tables[2:-2] if tables else b"")


def jpeg_stream(prefix: bytes, tile: bytes) -> bytes:
    """A self-contained JPEG stream: ``prefix`` (SOI + Adobe marker + tables) + ``tile`` without its SOI and without
    its own APP0 (JFIF) and APP14 (Adobe) segments, so libjpeg uses the colour space the prefix's marker names."""
    n = len(tile)
    if n < 4 or tile[0] != 0xFF or tile[1] != 0xD8:
        raise ValueError("tile data does not start with a JPEG SOI marker")
    i, start, parts = 2, 2, []
    while i + 3 < n:
        if tile[i] != 0xFF:
            break  # not a marker: leave it to the decoder to complain
        m = tile[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xDA or m == 0xD9:  # start of scan / end of image: header done
            break
        seg_end = i + 2 + ((tile[i + 2] << 8) | tile[i + 3])
        if m == 0xE0 or m == 0xEE:
            parts.append(tile[start:i])
            start = seg_end
        i = seg_end
    if not parts:
        return prefix + tile[2:]
    parts.append(tile[start:])
    return prefix + b"".join(parts)


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coding)
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def check_jpeg(stream: bytes, width: int, height: int) -> bool:
    """Structural check of a JPEG stream without decoding it: SOI, a frame header of ``width`` x ``height`` px before
    the first scan, and an EOI marker at the end (catches truncated and mis-sized tiles, not damaged entropy data)."""
    n = len(stream)
    if n < 4 or stream[:2] != b"\xff\xd8" or stream[-2:] != b"\xff\xd9":
        return False
    i = 2
    while i + 3 < n:
        if stream[i] != 0xFF:
            return False
        m = stream[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xDA:  # start of scan before any frame header
            return False
        if m in _SOF:
            if i + 8 >= n:
                return False
            h, w = (stream[i + 5] << 8) | stream[i + 6], (stream[i + 7] << 8) | stream[i + 8]
            return (w, h) == (width, height)
        i += 2 + ((stream[i + 2] << 8) | stream[i + 3])
    return False


def make_decoder(name: str):
    """``decode(data, level) -> H x W x 3`` RGB for decoder ``name``."""
    if name == "simplejpeg":
        import simplejpeg

        dec = simplejpeg.decode_jpeg

        def decode(data: bytes, lv: TiffLevel) -> np.ndarray:
            return dec(jpeg_stream(lv.prefix, data), colorspace="RGB", fastdct=False, fastupsample=False, strict=True)

        return decode
    if name == "imagecodecs":
        import imagecodecs

        dec8 = imagecodecs.jpeg8_decode

        def decode(data: bytes, lv: TiffLevel) -> np.ndarray:
            return dec8(data, tables=lv.tables, colorspace=lv.colorspace, outcolorspace="RGB")

        return decode
    raise ValueError(f"unknown JPEG decoder {name!r} (choose from {available_decoders()})")


def available_decoders() -> list[str]:
    """Installed decoders, preferred first: ``simplejpeg`` (strict, like OpenSlide), ``imagecodecs``."""
    out = []
    for name in ("simplejpeg", "imagecodecs"):
        try:
            make_decoder(name)
            out.append(name)
        except ImportError:
            pass
    return out
