"""Image bytes and files in one place: PNG/JPEG encoding and decoding of RGB or grey arrays, PNG and TIFF files (atomic)."""

from __future__ import annotations

import os

import numpy as np

from histolight.errors import HistolightError
from histolight.io.atomic import atomic_write

#: the first bytes of every JPEG (start-of-image marker)
JPEG_SOI = b"\xff\xd8"


class ImageDecodeError(HistolightError, ValueError):
    """Bytes could not be decoded as a JPEG/PNG image (damaged, truncated, or another format)."""


def encode_image(img: np.ndarray, fmt: str = "png", quality: int = 95, png_compression: int = 3) -> bytes:
    """Encode ``img`` (H x W x 3 uint8 RGB, or H x W grey uint8/uint16) as ``png`` or ``jpg`` bytes.

    Raises ``ValueError`` when OpenCV cannot encode it (instead of writing an empty file)."""
    import cv2

    fmt = fmt.lower().lstrip(".")
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise ValueError(f"image format must be png or jpg, got {fmt!r}")
    arr = np.ascontiguousarray(img)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)] if fmt == "png" else [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    ok, buf = cv2.imencode("." + fmt, arr, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {img.dtype} array of shape {img.shape} as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode JPEG/PNG bytes -> (H, W, 3) uint8 RGB, strictly. EXIF orientation is ignored (as in tf.io.decode_jpeg).

    JPEG goes through libjpeg-turbo (``simplejpeg``) with ``strict=True``: its recoverable-error warnings ("Corrupt
    JPEG data: N extraneous bytes before marker", "Premature end of JPEG file"), which OpenCV only prints to stderr
    while returning a garbage image, raise :class:`ImageDecodeError`. Other formats (PNG, ...) go through OpenCV,
    whose libpng fails on checksum, stream and truncation errors. Callers attribute the error to their tile.
    """
    import cv2

    arr = np.frombuffer(data, dtype=np.uint8)
    if arr[:2].tobytes() == JPEG_SOI:
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(arr, colorspace="RGB", strict=True)
        except ValueError as e:
            raise ImageDecodeError(f"corrupt JPEG ({arr.size} bytes): {e}") from None
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)  # newer OpenCV decodes straight to RGB
    flags = (cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag) | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(arr, flags) if arr.size else None
    if img is None:
        head = bytes(arr[:8]).hex()
        raise ImageDecodeError(f"cannot decode image ({arr.size} bytes, starting {head!r}): not a valid JPEG or PNG")
    return img if rgb_flag is not None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write ``img`` (H x W x 3 RGB or H x W grey) as a PNG file, atomically."""
    data = encode_image(img, "png")
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_tif(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write ``arr`` ((C, H, W) or (H, W)) as a zlib-compressed greyscale TIFF, atomically."""
    import io

    import tifffile

    buf = io.BytesIO()  # tifffile wants a named file or an in-memory buffer, not the atomic file's descriptor
    tifffile.imwrite(buf, arr, compression="zlib", photometric="minisblack")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
