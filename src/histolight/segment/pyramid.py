"""Full-resolution predictions: tiled, pyramidal TIFF files that OpenSlide and QuPath open, written as inference runs.

**Format** (:class:`PyramidTiff`): one greyscale channel (uint8, or uint16 for a multilabel bitmask of 9-16 labels),
zlib-compressed square tiles, level 0 first and then 2x reductions in the main IFD chain (``NewSubfileType`` =
reduced image), down to one tile: the generic tiled TIFF layout OpenSlide reads (QuPath opens it through OpenSlide
or Bio-Formats). The resolution tags (pixels per centimetre) hold the mpp of each level, so OpenSlide reports
``openslide.mpp-x`` / ``openslide.mpp-y``. Reductions keep one pixel of every 2 x 2 block (``nearest``: class indices
stay class indices) or average it (``mean``: probabilities). BigTIFF when the level-0 pixels exceed 2 GiB.

**Streaming**: rows arrive top to bottom (:meth:`PyramidTiff.write`); a writer thread turns each band of ``tile``
rows into tiles of level 0 as soon as it is complete and appends its 2x reduction to a raw temp file beside the
output, from which the next level is written after level 0 (and so on). Memory is a few bands of ``tile`` rows
(a bounded queue), whatever the image size; disk holds the reduced levels (a third of level 0, raw) until the file
is complete. The file appears atomically (:mod:`histolight.io.atomic`).

**Resampling** (:func:`grid_index`, :func:`resample_rows`): a prediction at the model's mpp becomes one at ``out_mpp``
by nearest neighbour in base px: output pixel ``i`` (base px ``[i*o, (i+1)*o)``, ``o`` = out_mpp / base mpp) takes
the prediction pixel holding its centre, ``floor((i + 0.5) * o / d)`` with ``d`` = model mpp / base mpp. The
output grid is the slide's ``size_at_mpp(out_mpp)`` (the slide's level-0 size for ``out_mpp`` = base mpp).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from histolight.errors import HistolightError
from histolight.io.atomic import AtomicFile

REDUCTIONS = ("nearest", "mean")
_END = object()


def grid_index(n_out: int, out_step: float, src_step: float, n_src: int) -> np.ndarray:
    """Per output pixel along one axis, the index of the source pixel holding its centre.

    Args:
        n_out: output pixels; ``out_step`` / ``src_step``: base px per output / source pixel; n_src: source pixels.

    Returns ``(n_out,)`` int64 in ``[0, n_src)``.
    """
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (out_step / src_step)).astype(np.int64)
    return np.clip(idx, 0, n_src - 1)


def resample_rows(
    bands: Iterator[tuple[int, np.ndarray]], src_hw: tuple[int, int], out_hw: tuple[int, int], out_step: float, src_step: float
) -> Iterator[np.ndarray]:
    """Nearest-neighbour resampling of a stream of row bands (module docstring).

    Args:
        bands: ``(y0, rows)`` with ``rows`` ``(..., n, W_src)``, consecutive from ``y0 = 0``, covering ``H_src`` rows.
        src_hw, out_hw: source and output ``(H, W)`` in px.
        out_step, src_step: base px per output / source pixel.

    Yields consecutive output bands ``(..., m, W_out)`` covering the ``H_out`` output rows, each as soon as the source
    rows it needs have arrived (memory: one source band and its output rows).
    """
    ys = grid_index(out_hw[0], out_step, src_step, src_hw[0])
    xs = grid_index(out_hw[1], out_step, src_step, src_hw[1])
    done = 0
    for y0, rows in bands:
        end = y0 + rows.shape[-2]
        stop = out_hw[0] if end >= src_hw[0] else int(np.searchsorted(ys, end, side="left"))
        if stop > done:
            yield np.take(np.take(rows, ys[done:stop] - y0, axis=-2), xs, axis=-1)
            done = stop
    if done < out_hw[0]:
        raise HistolightError(f"prediction stream ended at output row {done} of {out_hw[0]}")


def _reduce(band: np.ndarray, how: str) -> np.ndarray:
    """2x reduction of an ``(h, w)`` band whose first row is even (``nearest``: the top-left pixel of each block;
    ``mean``: the block's mean, rounded)."""
    if how == "nearest":
        return band[::2, ::2]
    h, w = band.shape
    p = np.pad(band.astype(np.float32), ((0, h % 2), (0, w % 2)), mode="edge")
    m = (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) / 4
    return np.rint(m).astype(band.dtype)


class PyramidTiff:
    """Write an ``height x width`` single-channel image as a pyramidal tiled TIFF, rows streaming in.

    Args:
        path: the output file (written atomically; its folder must exist).
        height, width: level-0 size in px.
        mpp: level-0 microns per pixel (the resolution tags; level ``k`` records ``mpp * 2**k``).
        dtype: ``uint8`` or ``uint16``.
        tile: tile side in px (a multiple of 16).
        reduce: ``nearest`` (class maps) or ``mean`` (probabilities) for the reduced levels.
        description: the TIFF ``ImageDescription`` of level 0 (e.g. what the values mean).
        queue_bands: bands of ``tile`` rows the writer may hold in flight.

    Use as a context manager: :meth:`write` rows in order, the file is complete on a clean exit (an error discards it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        height: int,
        width: int,
        mpp: float,
        dtype=np.uint8,
        tile: int = 256,
        reduce: str = "nearest",
        description: str | None = None,
        queue_bands: int = 2,
    ):
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} is invalid: must be one of {list(REDUCTIONS)}")
        if tile <= 0 or tile % 16:
            raise ValueError(f"tile={tile} is invalid: must be a positive multiple of 16 px")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"dtype={self.dtype} is invalid: must be uint8 or uint16")
        self.path, self.height, self.width, self.mpp = Path(path), int(height), int(width), float(mpp)
        self.tile, self.reduce, self.description = int(tile), reduce, description
        self.levels = [(self.height, self.width)]
        while max(self.levels[-1]) > self.tile:
            h, w = self.levels[-1]
            self.levels.append(((h + 1) // 2, (w + 1) // 2))
        self._rows_in = 0
        self._pending: list[np.ndarray] = []
        self._pending_n = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_bands))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"pyramid-{self.path.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer side
    def write(self, rows: np.ndarray) -> None:
        """Append ``(n, width)`` rows (the next ``n`` rows of level 0)."""
        self._raise_if_failed()
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(
                f"rows of shape {rows.shape} do not fit a {self.height} x {self.width} image: expected (n, {self.width})"
            )
        if self._rows_in + rows.shape[0] > self.height:
            raise ValueError(f"{self._rows_in + rows.shape[0]} rows written to an image of {self.height} rows")
        self._rows_in += rows.shape[0]
        self._pending.append(rows.astype(self.dtype, copy=False))
        self._pending_n += rows.shape[0]
        while self._pending_n >= self.tile or (self._rows_in == self.height and self._pending_n):
            allrows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            band, rest = allrows[: self.tile], allrows[self.tile :]
            self._put(np.ascontiguousarray(band))
            self._pending, self._pending_n = ([rest] if len(rest) else []), len(rest)

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_if_failed()
                    raise HistolightError(f"{self.path}: the TIFF writer stopped") from None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise HistolightError(f"writing {self.path} failed: {self._error}") from self._error

    def close(self) -> Path:
        """Finish the file (every row must have been written); returns its path."""
        if self._rows_in != self.height:
            self.abort()
            raise HistolightError(f"{self.path}: {self._rows_in} of {self.height} rows were written")
        self._put(_END)
        self._thread.join()
        self._raise_if_failed()
        return self.path

    def abort(self) -> None:
        """Stop the writer and discard the file."""
        if self._thread.is_alive():
            self._error = self._error or HistolightError("aborted")
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join()

    def __enter__(self) -> PyramidTiff:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------------ writer thread
    def _bands(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is None or self._error is not None:
                raise HistolightError("aborted")
            yield item

    def _tiles(self, bands: Iterator[np.ndarray], width: int, spill) -> Iterator[np.ndarray]:
        """Tiles of each band (padded to full tiles), row-major; each band's 2x reduction goes to ``spill``."""
        t = self.tile
        nx = math.ceil(width / t)
        for band in bands:
            if spill is not None:
                _reduce(band, self.reduce).tofile(spill)
            padded = np.zeros((t, nx * t), self.dtype)
            padded[: band.shape[0], :width] = band
            for j in range(nx):
                yield padded[:, j * t : (j + 1) * t]

    def _read_level(self, fname: str, height: int, width: int) -> Iterator[np.ndarray]:
        with open(fname, "rb") as fh:
            for y in range(0, height, self.tile):
                rows = min(self.tile, height - y)
                yield np.fromfile(fh, self.dtype, count=rows * width).reshape(rows, width)

    def _run(self) -> None:
        import tifffile

        af = None
        try:
            af = AtomicFile(self.path, "wb")
            big = self.height * self.width * self.dtype.itemsize > 2**31
            with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=f".{self.path.name}.levels-") as tmp:
                # tifffile writes the temp file by name; the atomic file then fsyncs and renames it
                with tifffile.TiffWriter(af.tmp_path, bigtiff=big) as tw:
                    source: Iterator[np.ndarray] = self._bands()
                    for k, (h, w) in enumerate(self.levels):
                        last = k + 1 == len(self.levels)
                        fname = os.path.join(tmp, f"level{k + 1}.raw")
                        with contextlib.nullcontext() if last else open(fname, "wb") as spill:
                            res = 1e4 / (self.mpp * 2**k)  # pixels per centimetre
                            tw.write(
                                self._tiles(source, w, spill),
                                shape=(h, w),
                                dtype=self.dtype,
                                tile=(self.tile, self.tile),
                                photometric="minisblack",
                                compression="zlib",
                                resolution=(res, res),
                                resolutionunit="CENTIMETER",
                                subfiletype=0 if k == 0 else 1,
                                description=self.description if k == 0 else None,
                                metadata=None,
                                software="histolight",
                                buffersize=self.tile * max(w, self.tile) * self.dtype.itemsize,  # compress a band at a time
                            )
                        if k:
                            os.unlink(os.path.join(tmp, f"level{k}.raw"))
                        if not last:
                            source = self._read_level(fname, *self.levels[k + 1])
            af.commit()
        except BaseException as e:  # noqa: BLE001 - handed to the producer, which raises it
            self._error = self._error or e
            if af is not None:
                af.abort()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break


def resolve_out_mpp(out_mpp: float | str, base_mpp: float) -> float:
    """``out_mpp`` in um/px: a positive number, or ``base`` (the slide's level-0 mpp ``base_mpp``)."""
    if out_mpp == "base":
        return float(base_mpp)
    if isinstance(out_mpp, bool) or not isinstance(out_mpp, (int, float)) or out_mpp <= 0:
        raise HistolightError(f"out_mpp={out_mpp!r} is invalid: must be a positive number of um/px or 'base'")
    return float(out_mpp)


def predict_slide(
    slide,
    model,
    output: str,
    strip_px: int | None = None,
    out_mpp: float | str | None = None,
    folder: str | os.PathLike | None = None,
    name: str | None = None,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
    tile: int = 256,
) -> tuple[np.ndarray, dict | None]:
    """Segment ``slide`` with ``model`` (a :class:`~histolight.segment.model.SegmentModel`) at the model's mpp and,
    with ``out_mpp``, write the prediction at ``out_mpp`` as pyramidal TIFF files in ``folder`` while it runs.

    Args:
        output: ``labels`` or ``proba`` (as :meth:`SegmentModel.run_slide_inference`).
        strip_px: rows per inference strip at the model's mpp (None = the model's default).
        out_mpp: um/px of the full-resolution files, ``base`` (the slide's level-0 grid), or None (none written).
        folder, name: where the files go: ``<name>.full.tif`` (labels, values ``encode(labels)``, e.g. the class
            index) or one ``<name>.full.<class>.tif`` per output channel (``proba``: probability x 255, uint8).
        encode: labels ``(n, W)`` / ``(N, n, W)`` -> ``(n, W)`` uint8/uint16 values of the labels file.
        tile: TIFF tile side in px.

    Returns ``(prediction, info)``: the prediction at the model's mpp, as ``run_slide_inference`` returns it, and
    ``{"files", "mpp", "size": [W, H], "values"}`` of the full-resolution files (None without ``out_mpp``).
    """
    if out_mpp is None:
        return model.run_slide_inference(slide, output=output, strip_px=strip_px), None
    cfg = model.config
    W, H = slide.size_at_mpp(cfg.mpp)
    binary = cfg.mode == "binary"
    if output == "labels":
        pred = np.zeros((cfg.n_out, H, W) if cfg.mode == "multilabel" else (H, W), np.uint8)
    else:
        pred = np.zeros((1 if binary else cfg.n_out, H, W), np.float32)
    bands = model.iter_slide_inference(slide, output, strip_px)
    if folder is None or name is None or (output == "labels" and encode is None):
        raise ValueError("out_mpp needs folder, name (and encode for labels)")
    mpp = resolve_out_mpp(out_mpp, slide.mpp)
    Wo, Ho = slide.size_at_mpp(mpp)
    folder = Path(folder)
    if output == "labels":
        files = [folder / f"{name}.full.tif"]
        values = "as the model-resolution prediction file"
    else:
        names = [cfg.foreground_name] if binary else list(cfg.class_names if cfg.mode == "multiclass" else cfg.labels)
        files = [folder / f"{name}.full.{c}.tif" for c in names]
        values = "probability x 255"

    def encoded() -> Iterator[tuple[int, np.ndarray]]:
        for y0, rows in bands:
            pred[..., y0 : y0 + rows.shape[-2], :] = rows
            yield y0, (encode(rows)[None] if output == "labels" else (rows * 255 + 0.5).astype(np.uint8))

    with contextlib.ExitStack() as stack:
        writers = []
        for f in files:
            dtype = np.uint16 if output == "labels" and cfg.mode == "multilabel" and cfg.n_out > 8 else np.uint8
            desc = f"histolight {cfg.mode} segmentation of {name}: {values}; classes {cfg.class_names}"
            w = PyramidTiff(f, Ho, Wo, mpp, dtype, tile, "nearest" if output == "labels" else "mean", desc)
            stack.push(w.__exit__)
            writers.append(w)
        for rows in resample_rows(encoded(), (H, W), (Ho, Wo), mpp / slide.mpp, cfg.mpp / slide.mpp):
            for w, r in zip(writers, rows):
                w.write(r)
    info = {"files": [f.name for f in files], "mpp": mpp, "size": [Wo, Ho], "values": values}
    return (pred[0] if binary and output != "labels" else pred), info


def read_level0(path: str | os.PathLike) -> np.ndarray:
    """Level 0 of a TIFF written by :class:`PyramidTiff` as an ``(H, W)`` array (for checks and small images)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()


__all__ = ["PyramidTiff", "REDUCTIONS", "grid_index", "predict_slide", "read_level0", "resample_rows", "resolve_out_mpp"]
