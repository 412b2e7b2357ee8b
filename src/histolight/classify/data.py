"""Tile datasets over TFRecords (ours and Slideflow's), read through their index files.

- :func:`find_tfrecords`, :func:`index_tfrecords`: the tiles of a set of TFRecords as a table
  (tile id -> file, record number, slide, loc_x, loc_y) from the ``.index.npz`` locations, no decoding.
- :class:`TileDataset` (map-style): random access ``pread`` of single records.
- :class:`StreamingTileDataset` (iterable): per worker, an interleave across slides read in file
  order, with a shuffle buffer; sharded across DataLoader workers and DDP ranks without overlap.
- :class:`WeightedDistributedSampler`, :class:`EvalDistributedSampler`: sampling for map-style use
  that is correct under DDP (weighted draws per rank; evaluation without padded duplicates).

Decoding (JPEG/PNG) and augmentation run in the DataLoader workers. Each worker process opens its
own file handles (readers are created lazily per process and never shared across a fork).
Items are dicts: ``image`` (uint8 tensor 3 x H x W; mean/std normalization runs on the batch, on the
device: :func:`histolight.training.normalize.normalize_batch`), ``label`` (int64, -1 when unlabelled),
``index`` (position in the dataset), ``slide`` (slide number in the dataset's ``slides`` list).

Integrity: every read checks the record's CRCs (``verify=True``, the default) and decodes strictly
(:func:`histolight.io.images.decode_image`). A tile that fails either is a :class:`CorruptTile` (tile id, TFRecord,
record number, byte offset, reason); ``on_corrupt='fail'`` (default) raises :class:`CorruptTileError` with it,
``on_corrupt='skip'`` logs it and leaves the tile out: the map-style item is then ``{"corrupt": CorruptTile,
"index": i}`` and :func:`collate_tiles` (the ``collate_fn`` to use) lists those under the batch's ``corrupt`` key.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, DistributedSampler, IterableDataset, default_collate, get_worker_info

from histolight.config.schema import check
from histolight.errors import HistolightError
from histolight.io.tfrecord import ImageDecodeError, TFRecordError, TFRecordReader, decode_image
from histolight.io.tilestore import TFRECORD_EXTENSIONS, find_tfrecords, index_tfrecords, tfrecord_slide_name

log = logging.getLogger(__name__)

#: what a tile dataset does with a tile whose record or image is damaged
ON_CORRUPT = ("fail", "skip")


class CorruptTile(NamedTuple):
    """A tile that could not be read or decoded: id (``slide-x-y``), TFRecord path, record number (0-based), byte
    offset of the record in the file (None when unknown) and the reason."""

    tile_id: str
    tfrecord: str
    record: int
    offset: int | None
    reason: str

    def __str__(self) -> str:
        at = "" if self.offset is None else f", byte offset {self.offset}"
        return f"tile {self.tile_id} ('{self.tfrecord}' record {self.record}{at}): {self.reason}"


class CorruptTileError(HistolightError):
    """A tile could not be read or decoded and the policy is ``on_corrupt='fail'``; the message names the tile,
    its TFRecord, record number and byte offset."""


def check_on_corrupt(value: str, key: str = "on_corrupt") -> str:
    """``value`` when it is a policy of :data:`ON_CORRUPT`, else ``ValueError`` naming ``key``."""
    check(value in ON_CORRUPT, key, value, "must be fail (stop at the first corrupt tile) or skip (leave it out, counted)")
    return value


def describe_corrupt(bad: Sequence[CorruptTile]) -> str | None:
    """One line for a per-slide summary: how many tiles were skipped and the first one (None when none were)."""
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more, each in the log)" if len(bad) > 1 else ""
    return f"{len(bad)} corrupt tile(s) skipped: {bad[0]}{more}"


def collate_tiles(items: list[dict]) -> dict:
    """``collate_fn`` for the tile datasets: the readable items batched (``image``, ``label``, ``index``, ``slide``;
    absent when no item of the batch was readable) and ``corrupt``: the :class:`CorruptTile` of each skipped item."""
    good = [it for it in items if "corrupt" not in it]
    batch = default_collate(good) if good else {}
    batch["corrupt"] = [it["corrupt"] for it in items if "corrupt" in it]
    return batch


# ------------------------------------------------------------------------------------------ readers


class _ReaderPool:
    """Per-process LRU of open :class:`TFRecordReader` s (at most ``max_open`` file handles)."""

    def __init__(self, paths: Sequence[str], verify: bool = True, max_open: int = 128):
        self.paths = list(paths)
        self.verify = verify
        self.max_open = max(1, int(max_open))
        self._pid: int | None = None
        self._open: OrderedDict[int, TFRecordReader] = OrderedDict()

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_open"] = OrderedDict()
        st["_pid"] = None
        return st

    def get(self, f: int) -> TFRecordReader:
        if self._pid != os.getpid():  # a fresh process (worker): never reuse the parent's handles
            self._open = OrderedDict()
            self._pid = os.getpid()
        r = self._open.get(f)
        if r is not None:
            self._open.move_to_end(f)
            return r
        r = TFRecordReader(self.paths[f], verify=self.verify, write_index=False)
        self._open[f] = r
        if len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            old.close()
        return r

    def image_bytes(self, f: int, record: int) -> bytes:
        rec = self.get(f).read(int(record))
        img = rec.get("image_raw")
        if not isinstance(img, (bytes, bytearray)):
            raise TFRecordError(self.paths[f], "record has no 'image_raw' bytes feature", self.offset(f, record), record)
        return img

    def offset(self, f: int, record: int) -> int:
        """Byte offset of ``record`` in file ``f`` (from its index)."""
        return int(self.get(f).index[int(record), 0])

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()


def load_tile(data: bytes, tile_px: int | None) -> np.ndarray:
    """Decode JPEG/PNG bytes to H x W x 3 uint8; resized (area) to ``tile_px`` when it differs."""
    img = decode_image(data)
    if tile_px and (img.shape[0] != tile_px or img.shape[1] != tile_px):
        import cv2

        interp = cv2.INTER_AREA if img.shape[0] > tile_px else cv2.INTER_LINEAR
        img = cv2.resize(img, (tile_px, tile_px), interpolation=interp)
    return img


def default_transform(img: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W uint8 tensor (used when no transform is given)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class _TileArrays:
    """What every tile dataset holds: parallel numpy arrays (cheap to pickle, no per-item Python objects)."""

    def _init_arrays(
        self,
        table: pd.DataFrame,
        labels: np.ndarray | None,
        slides: Sequence[str] | None,
        transform: Callable | None,
        tile_px: int | None,
        verify: bool,
        on_corrupt: str,
        max_open: int,
    ):
        for c in ("tfrecord", "record", "slide"):
            if c not in table.columns:
                raise HistolightError(f"tile table needs a '{c}' column (see index_tfrecords)")
        files = pd.Categorical(table["tfrecord"].astype(str))
        self.files: list[str] = [str(c) for c in files.categories]
        self.file_idx = np.asarray(files.codes, np.int32)
        self.record_idx = table["record"].to_numpy(np.int64)
        self.slides: list[str] = list(slides) if slides is not None else sorted(table["slide"].astype(str).unique())
        smap = {s: i for i, s in enumerate(self.slides)}
        self.slide_idx = table["slide"].astype(str).map(smap).fillna(-1).to_numpy(np.int64)
        self.labels = np.full(len(table), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        if len(self.labels) != len(table):
            raise ValueError("labels must align with the tile table")
        self.tile_ids = np.asarray(table.index.astype(str))
        self.transform = transform
        self.tile_px = tile_px
        self.on_corrupt = check_on_corrupt(on_corrupt)
        self._pool = _ReaderPool(self.files, verify=verify, max_open=max_open)

    def _corrupt(self, i: int, e: TFRecordError | ImageDecodeError) -> dict:
        """Tile ``i`` is corrupt: raise (``fail``) or log it and return its ``{"corrupt", "index"}`` item (``skip``)."""
        f, r = int(self.file_idx[i]), int(self.record_idx[i])
        if isinstance(e, TFRecordError):
            offset, reason = e.offset, e.reason
        else:
            offset, reason = self._pool.offset(f, r), str(e)
        bad = CorruptTile(str(self.tile_ids[i]), self.files[f], r, offset, reason)
        if self.on_corrupt == "fail":
            raise CorruptTileError(
                f"corrupt {bad}. Re-extract the slide's tiles, or set on_corrupt=skip to leave corrupt tiles out "
                "(counted per slide)"
            )
        log.warning("skipped corrupt %s", bad)
        return {"corrupt": bad, "index": int(i)}

    def _read(self, i: int) -> bytes | dict:
        """Encoded image of tile ``i``, or its corrupt item (see :meth:`_corrupt`)."""
        f, r = int(self.file_idx[i]), int(self.record_idx[i])
        try:
            return self._pool.image_bytes(f, r)
        except TFRecordError as e:
            if e.record != r:  # the file as a whole (its index, its compression) is unusable: not this tile's fault
                raise
            return self._corrupt(i, e)

    def _item(self, i: int, data: bytes) -> dict:
        try:
            img = load_tile(data, self.tile_px)
        except ImageDecodeError as e:
            return self._corrupt(i, e)
        x = self.transform(img) if self.transform is not None else default_transform(img)
        return {"image": x, "label": int(self.labels[i]), "index": int(i), "slide": int(self.slide_idx[i])}


class TileDataset(_TileArrays, Dataset):
    """Map-style tiles: item ``i`` is record ``table.record[i]`` of ``table.tfrecord[i]``, random access.

    Args:
        table: tile table (``tfrecord``, ``record``, ``slide`` columns; index tile id), e.g. from
            :func:`index_tfrecords` joined with labels.
        labels: int class index per row (None: -1).
        slides: slide list defining ``item['slide']`` numbers (default: sorted slides of the table).
        transform: ``H x W x 3 uint8 -> 3 x H x W tensor`` (run in the worker; default: uint8 CHW).
        tile_px: resize decoded tiles to this size when they differ.
        verify: check record CRCs on every read (``False``: faster, damaged records are then caught only when their
            image fails to decode).
        on_corrupt: ``fail`` (raise :class:`CorruptTileError`) or ``skip`` (item ``{"corrupt": CorruptTile,
            "index": i}``; batch with :func:`collate_tiles`).
        max_open: open file handles per worker.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        labels: np.ndarray | None = None,
        slides: Sequence[str] | None = None,
        transform: Callable | None = None,
        tile_px: int | None = None,
        verify: bool = True,
        max_open: int = 128,
        on_corrupt: str = "fail",
    ):
        self._init_arrays(table, labels, slides, transform, tile_px, verify, on_corrupt, max_open)

    def __len__(self) -> int:
        return len(self.record_idx)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        data = self._read(i)
        return data if isinstance(data, dict) else self._item(i, data)

    def raw(self, i: int) -> bytes:
        """Encoded image bytes of tile ``i`` (no decoding)."""
        return self._pool.image_bytes(int(self.file_idx[i]), int(self.record_idx[i]))


def _dist_info(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return int(rank), int(world)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamingTileDataset(_TileArrays, IterableDataset):
    """Streaming tiles: an interleave across slides, each read in file order, through a shuffle buffer.

    Every (DDP rank, DataLoader worker) pair is one shard. With at least two files per shard, whole
    files are dealt to shards (balanced by record count, so each file is opened by one worker); else
    records are dealt round-robin. Each shard yields exactly ``ceil(samples_per_epoch / shards)``
    tiles per epoch, so every rank sees the same number of batches under DDP.

    Sampling: at each step a slide (file) is drawn with probability proportional to its total
    sampling weight (its tile count without ``weights``), and its next record in file order is read
    (a rejection step with probability ``w / max w`` of that file applies per-tile weights). A file
    that runs out starts over (at a new random offset), so the stream never starves. Tiles then pass
    through a ``shuffle_buffer``-sized buffer before decoding. With ``on_corrupt='skip'`` a corrupt tile is logged,
    never drawn again and replaced by the next draw (a shard whose tiles are all corrupt is an error).

    Args: see :class:`TileDataset`, plus
        weights: per-tile sampling weights (class / slide balancing) or None.
        samples_per_epoch: tiles per epoch over all shards (default: the number of tiles).
        shuffle_buffer: buffered encoded tiles per worker (0/1 = no shuffling beyond the interleave).
        seed: base seed; the epoch (:meth:`set_epoch`, shared with persistent workers) and shard vary it.
        rank, world_size: DDP rank and size (default: from ``torch.distributed`` when initialised).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        labels: np.ndarray | None = None,
        slides: Sequence[str] | None = None,
        transform: Callable | None = None,
        tile_px: int | None = None,
        verify: bool = True,
        max_open: int = 128,
        weights: np.ndarray | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        on_corrupt: str = "fail",
    ):
        self._init_arrays(table, labels, slides, transform, tile_px, verify, on_corrupt, max_open)
        n = len(self.record_idx)
        if n == 0:
            raise HistolightError("streaming dataset has no tiles")
        self.weights = None if weights is None else np.asarray(weights, np.float64)
        if self.weights is not None and (len(self.weights) != n or (self.weights < 0).any() or self.weights.sum() <= 0):
            raise ValueError("weights must be non-negative, one per tile, not all zero")
        self.samples_per_epoch = int(samples_per_epoch or n)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (visible to persistent workers: the counter lives in shared memory)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def shard_length(self, n_shards: int) -> int:
        return math.ceil(self.samples_per_epoch / n_shards)

    def __len__(self) -> int:
        """Tiles per epoch delivered to this rank (all its workers together)."""
        rank, world = _dist_info(self.rank, self.world_size)
        return math.ceil(self.samples_per_epoch / world)

    def _shard(self, shard: int, n_shards: int) -> np.ndarray:
        """Positions (into the arrays) owned by ``shard``."""
        n_files = len(self.files)
        if n_files >= 2 * n_shards:
            counts = np.bincount(self.file_idx, minlength=n_files)
            load = np.zeros(n_shards, np.int64)
            owner = np.empty(n_files, np.int64)
            for f in sorted(range(n_files), key=lambda f: (-counts[f], f)):
                s = int(np.argmin(load))
                owner[f] = s
                load[s] += counts[f]
            return np.flatnonzero(owner[self.file_idx] == shard)
        return np.arange(shard, len(self.record_idx), n_shards)

    def __iter__(self) -> Iterator[dict]:
        wi = get_worker_info()
        n_workers, worker = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        rank, world = _dist_info(self.rank, self.world_size)
        n_shards, shard = world * n_workers, rank * n_workers + worker
        pos = self._shard(shard, n_shards)
        n_out = self.shard_length(n_shards)
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        if len(pos) == 0:  # more shards than tiles: draw from all tiles so every shard yields its quota
            log.warning("streaming shard %d of %d has no tiles of its own; sampling from all tiles", shard, n_shards)
            pos = np.arange(len(self.record_idx))
        # per file: positions in file order
        order = np.lexsort((self.record_idx[pos], self.file_idx[pos]))
        pos = pos[order]
        files, starts = np.unique(self.file_idx[pos], return_index=True)
        groups = np.split(pos, starts[1:])
        w = self.weights
        mass = np.array([len(g) if w is None else w[g].sum() for g in groups], np.float64)
        if mass.sum() <= 0:
            return
        p_file = mass / mass.sum()
        accept = [None if w is None else w[g] / max(float(w[g].max()), 1e-300) for g in groups]
        cursor = [int(rng.integers(len(g))) for g in groups]  # random start per file, then file order
        buf: list[tuple[int, bytes]] = []
        buf_size = max(1, min(self.shuffle_buffer, len(pos), n_out))
        yielded = 0
        draws = iter(())
        bad: set[int] = set()  # corrupt tiles met so far (skip policy): never drawn again

        def skip(i: int) -> None:
            bad.add(i)
            if len(bad) >= len(pos):
                raise CorruptTileError(f"streaming shard {shard} of {n_shards}: all its {len(pos)} tiles are corrupt")

        while yielded < n_out:
            try:
                k = next(draws)
            except StopIteration:
                draws = iter(rng.choice(len(groups), size=1024, p=p_file).tolist())
                continue
            g = groups[k]
            while True:  # next accepted record of file k (rejection on per-tile weight)
                j = cursor[k]
                cursor[k] = (j + 1) % len(g)
                if accept[k] is None or rng.random() < accept[k][j]:
                    break
            i = int(g[j])
            if i in bad:
                continue
            data = self._read(i)
            if isinstance(data, dict):
                skip(i)
                continue
            buf.append((i, data))
            if len(buf) < buf_size:
                continue
            r = int(rng.integers(len(buf)))
            i_out, d_out = buf[r]
            buf[r] = buf[-1]
            buf.pop()
            item = self._item(i_out, d_out)
            if "corrupt" in item:
                skip(i_out)
                continue
            yield item
            yielded += 1
        # the loop always exits with the quota met; the buffer is discarded


# ------------------------------------------------------------------------------------------ samplers


class WeightedDistributedSampler(DistributedSampler):
    """Weighted sampling with replacement, ``num_samples`` draws per epoch split across ranks.

    Each rank draws ``ceil(num_samples / world)`` indices from its own seeded generator
    (``seed``, epoch, rank), so ranks never share a random stream. Works without DDP (``num_replicas=1``).
    """

    def __init__(self, weights: np.ndarray, num_samples: int | None = None, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.weights = torch.as_tensor(np.asarray(weights, np.float64), dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = int(num_replicas), int(rank), int(seed), 0
        self.total = int(num_samples or len(self.weights))
        self.num_samples = math.ceil(self.total / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.shuffle, self.drop_last, self.dataset = True, False, None

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.rank)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalDistributedSampler(DistributedSampler):
    """Every index exactly once across ranks (rank r gets r, r + world, ...): no padding duplicates,
    so evaluation metrics gathered across ranks count each tile once. Ranks may differ by one item."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.n, self.num_replicas, self.rank, self.epoch = int(n), int(num_replicas), int(rank), 0
        self.num_samples = len(range(self.rank, self.n, self.num_replicas))
        self.total_size, self.shuffle, self.drop_last, self.seed, self.dataset = self.n, False, False, 0, None

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


__all__ = [
    "ON_CORRUPT",
    "CorruptTile",
    "CorruptTileError",
    "check_on_corrupt",
    "describe_corrupt",
    "collate_tiles",
    "TFRECORD_EXTENSIONS",
    "find_tfrecords",
    "index_tfrecords",
    "tfrecord_slide_name",
    "load_tile",
    "default_transform",
    "TileDataset",
    "StreamingTileDataset",
    "WeightedDistributedSampler",
    "EvalDistributedSampler",
]
