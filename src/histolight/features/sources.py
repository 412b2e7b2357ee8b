"""Where feature extraction gets its tiles: TFRecords, or the slide itself, in batches, read ahead in a thread.

- :func:`tfrecord_batches`: the tiles of one slide's TFRecord(s), in record order, decoded by a
  :class:`~histolight.classify.data.TileDataset` (optionally in DataLoader worker processes).
- :func:`slide_batches`: the tiles of a whole-slide image read straight from it, with the same grid, ROI rule, QC
  masks and grayspace/whitespace filters as ``task=extract`` (:func:`histolight.extract.plan.plan_slide`), and no
  TFRecord written.
- :class:`Prefetcher`: runs a slide's batch iterator in a background thread (a bounded queue), and starts the next
  slide(s) while the current one is being computed, so reading, decoding and QC overlap the network.

A batch is a :class:`TileBatch`: ``images`` ``(B, 3, H, W)`` uint8, ``locs`` ``(B, 2)`` int64 tile centres in base
px, ``grid`` ``(B, 2)`` int64 ``(grid_x, grid_y)`` for slides (None for TFRecords).
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class TileBatch:
    images: torch.Tensor
    locs: np.ndarray
    grid: np.ndarray | None = None
    corrupt: list = field(default_factory=list)  # CorruptTile records of tiles left out (on_corrupt='skip')

    def __len__(self) -> int:
        return int(self.images.shape[0])


class ToCHW:
    """Per-tile transform in DataLoader workers: optional stain normalization, then ``H x W x 3`` -> ``3 x H x W``
    uint8 tensor (picklable)."""

    def __init__(self, normalizer: Any = None):
        self.normalizer = normalizer

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        if self.normalizer is not None:
            img = self.normalizer.transform(img)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _stack(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2)))


def tfrecord_batches(
    paths: Sequence[str],
    batch_size: int = 64,
    num_workers: int = 0,
    normalizer: Any = None,
    tile_px: int | None = None,
    **dataset_options: Any,
) -> Iterator[TileBatch]:
    """Batches of the tiles in ``paths`` (one slide's TFRecords), in record order.

    ``dataset_options`` go to :class:`~histolight.classify.data.TileDataset` (``verify``: record CRCs, default on;
    ``on_corrupt``: ``fail`` or ``skip``, whose skipped tiles come back in ``TileBatch.corrupt``); ``tile_px``
    resizes tiles of another size as they are decoded.
    """
    from torch.utils.data import DataLoader

    from histolight.classify import data as tile_data
    from histolight.io.tilestore import index_tfrecords

    table = index_tfrecords(list(paths))
    if table.empty:
        return
    opts = {k: v for k, v in dataset_options.items() if v is not None}
    ds = tile_data.TileDataset(table, transform=ToCHW(normalizer), tile_px=tile_px, **opts)
    locs = table[["loc_x", "loc_y"]].to_numpy(np.int64)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=tile_data.collate_tiles)
    for b in dl:
        if "image" not in b:  # every tile of this batch was corrupt and skipped
            yield TileBatch(torch.empty((0, 3, 1, 1), dtype=torch.uint8), np.empty((0, 2), np.int64), corrupt=b["corrupt"])
            continue
        yield TileBatch(b["image"], locs[b["index"].numpy()], corrupt=b["corrupt"])


def count_tfrecord_tiles(paths: Sequence[str]) -> int:
    from histolight.io.tilestore import index_tfrecords

    return len(index_tfrecords(list(paths)))


def slide_batches(
    slide: Any,
    cfg: Any,
    rois: Any = None,
    *,
    roi_file: str | None = None,
    normalizer: Any = None,
    batch_size: int = 64,
    on_plan: Callable[[Any], None] | None = None,
) -> Iterator[TileBatch]:
    """Batches of the tiles kept from an open ``slide`` under the extraction options ``cfg``
    (:class:`~histolight.extract.config.ExtractConfig`), row-major, without writing anything.

    ``on_plan(plan)`` receives the slide's :class:`~histolight.extract.plan.SlidePlan` (grid, QC) before the first
    batch. A context-fitted stain normalizer is copied and fitted to this slide's thumbnail.
    """
    from histolight.extract.filters import tile_reject_reason
    from histolight.extract.plan import plan_slide

    plan = plan_slide(slide, cfg, rois, roi_file=roi_file)
    if on_plan is not None:
        on_plan(plan)
    if normalizer is not None and getattr(normalizer, "use_context", False):
        normalizer = copy.deepcopy(normalizer)
        normalizer.set_context(slide.thumbnail(max_size=2048))
    grid = plan.grid
    imgs: list[np.ndarray] = []
    idx: list[int] = []
    for run in grid.runs(plan.candidates):
        for i, img in zip(run, grid.read_run(slide, run)):
            why = tile_reject_reason(
                img, cfg.grayspace_threshold, cfg.grayspace_fraction, cfg.whitespace_threshold, cfg.whitespace_fraction
            )
            if why is not None:
                continue
            imgs.append(normalizer.transform(img) if normalizer is not None else img)
            idx.append(i)
            if len(imgs) == batch_size:
                yield _slide_batch(grid, imgs, idx)
                imgs, idx = [], []
    if imgs:
        yield _slide_batch(grid, imgs, idx)


def _slide_batch(grid, imgs: list[np.ndarray], idx: list[int]) -> TileBatch:
    i = np.asarray(idx, np.int64)
    locs = np.stack([grid.loc_x[i], grid.loc_y[i]], 1).astype(np.int64)
    return TileBatch(_stack(imgs), locs, np.stack([grid.grid_x[i], grid.grid_y[i]], 1).astype(np.int64))


# ---------------------------------------------------------------------------------------------- read-ahead

_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Producer(threading.Thread):
    """Runs one iterator in a daemon thread into a bounded queue."""

    def __init__(self, make: Callable[[], Iterator], depth: int, name: str):
        super().__init__(daemon=True, name=f"tiles:{name}")
        self.make, self.q, self.halt = make, queue.Queue(maxsize=max(1, depth)), threading.Event()

    def _put(self, item) -> bool:
        while not self.halt.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            for item in self.make():
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it in the slide's context
            self._put(_Failed(e))

    def __iter__(self) -> Iterator:
        while True:
            item = self.q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def cancel(self) -> None:
        self.halt.set()
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                return


class Prefetcher:
    """Per-slide batch iterators run in background threads; asking for slide ``order[i]`` also starts the next
    ``lookahead`` slides of ``order`` (those ``wanted`` says still need work), and cancels any started slide before it.

    Args:
        make: ``make(name) -> iterator of batches``.
        order: the slides in the order they will be asked for (None: no read-ahead across slides).
        depth: batches buffered per slide.
    """

    def __init__(
        self,
        make: Callable[[str], Iterator],
        order: Sequence[str] | None = None,
        depth: int = 4,
        lookahead: int = 1,
        wanted: Callable[[str], bool] | None = None,
    ):
        self.make, self.order, self.depth, self.lookahead = make, list(order or []), depth, lookahead
        self.wanted = wanted or (lambda _n: True)
        self._running: dict[str, _Producer] = {}
        self._lock = threading.Lock()

    def _start(self, name: str) -> _Producer:
        p = _Producer(lambda: self.make(name), self.depth, name)
        p.start()
        return p

    def batches(self, name: str) -> Iterator:
        with self._lock:
            p = self._running.pop(name, None) or self._start(name)
            if name in self.order:
                i = self.order.index(name)
                for before in self.order[:i]:
                    old = self._running.pop(before, None)
                    if old is not None:
                        old.cancel()
                for nxt in self.order[i + 1 : i + 1 + self.lookahead]:
                    if nxt not in self._running and self.wanted(nxt):
                        self._running[nxt] = self._start(nxt)
        return iter(p)

    def close(self) -> None:
        with self._lock:
            for p in self._running.values():
                p.cancel()
            self._running.clear()


__all__ = ["TileBatch", "ToCHW", "tfrecord_batches", "slide_batches", "Prefetcher", "count_tfrecord_tiles"]
