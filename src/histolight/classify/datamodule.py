"""LightningDataModule over labelled TFRecord tiles with patient-level splits.

The tile table it takes (one row per tile, index tile id) needs ``tfrecord``, ``record``, ``slide``,
``label`` (class name) and ``split`` (``train``/``val``/``test``/None) columns -- see
:func:`histolight.classify.pipeline.prepare_tiles`. Labels are encoded with the fixed
:class:`~histolight.classify.labels.LabelMap`; a label outside it is an error naming the tile.

Training: map-style random access with a (weighted) sampler, or ``streaming=True`` (interleave across
slides with a shuffle buffer). Evaluation: map-style, in order, each tile exactly once across DDP ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from histolight.classify.augment import build_transform
from histolight.classify.data import (
    EvalDistributedSampler,
    StreamingTileDataset,
    TileDataset,
    WeightedDistributedSampler,
    collate_tiles,
)
from histolight.classify.labels import LabelMap, check_classes
from histolight.classify.splits import balance_weights, check_splits
from histolight.errors import HistolightError

log = logging.getLogger(__name__)


class _StreamLoader(DataLoader):
    """DataLoader that advances the streaming dataset's (shared-memory) epoch on every new iteration."""

    def __iter__(self):
        ds = self.dataset
        ds.set_epoch(getattr(self, "_hl_epoch", 0))
        self._hl_epoch = getattr(self, "_hl_epoch", 0) + 1
        return super().__iter__()


class TileDataModule(L.LightningDataModule):
    """Train/val/test DataLoaders over labelled tiles.

    Args:
        tiles: tile table (see module docstring).
        label_map: the class names <-> indices map (fixed for the model).
        tile_px: tiles are resized to this when their stored size differs.
        batch_size, eval_batch_size: per-device batch sizes.
        num_workers: DataLoader workers (decode + augmentation run there).
        streaming: training tiles through :class:`StreamingTileDataset` instead of random access.
        shuffle_buffer: streaming shuffle buffer (tiles per worker).
        balance: ``none`` | ``tile`` | ``slide`` class balancing by weighted sampling.
        samples_per_epoch: training tiles per epoch (default: the number of training tiles).
        augment: ``data.augment`` options (:mod:`histolight.training.augment`; None = no augmentation);
            normalizer: StainNormalizer applied on the fly (or None).
            Items are uint8 tiles; the model normalizes batches (mean/std) on its device.
        seed: sampling seed. pin_memory, persistent_workers, prefetch_factor: DataLoader options.
        verify: check TFRecord CRCs on every read (default). on_corrupt: ``fail`` (default: a damaged record or
            image stops training with an error naming tile, file, record and byte offset) or ``skip`` (logged and
            left out of its batch). max_open_files: open TFRecords per worker.
    """

    def __init__(
        self,
        tiles: pd.DataFrame,
        label_map: LabelMap,
        *,
        tile_px: int,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        streaming: bool = False,
        shuffle_buffer: int = 1024,
        balance: str = "tile",
        samples_per_epoch: int | None = None,
        augment: Mapping | None = None,
        normalizer: Any = None,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        verify: bool = True,
        on_corrupt: str = "fail",
        max_open_files: int = 128,
        required_splits: Sequence[str] = ("train", "val"),
    ):
        super().__init__()
        for c in ("tfrecord", "record", "slide", "label", "split"):
            if c not in tiles.columns:
                raise HistolightError(f"tile table needs a '{c}' column")
        self.label_map = label_map
        self.tiles = tiles[tiles["split"].notna()].copy()
        check_classes(self.tiles["label"], "the tiles of the train/val/test splits")
        self.tiles["y"] = label_map.encode(self.tiles["label"], list(self.tiles.index))
        check_splits(self.tiles, label_map.names, required=required_splits)
        self.slides = sorted(self.tiles["slide"].astype(str).unique())
        self.tile_px = int(tile_px)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.streaming = bool(streaming)
        self.shuffle_buffer = int(shuffle_buffer)
        self.balance = balance
        self.samples_per_epoch = samples_per_epoch
        self.augment = augment
        self.normalizer = normalizer
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.prefetch_factor = prefetch_factor if self.num_workers > 0 else None
        self.verify = verify
        self.on_corrupt = on_corrupt
        self.max_open_files = max_open_files
        self._datasets: dict[str, Any] = {}

    # ------------------------------------------------------------------ info
    def split(self, name: str) -> pd.DataFrame:
        """The tiles of split ``name`` (in a fixed order: slide, then record)."""
        t = self.tiles[self.tiles["split"] == name]
        return t.sort_values(["slide", "tfrecord", "record"], kind="stable")

    def summary(self) -> pd.DataFrame:
        """Tiles per split and class (and slides / patients per split)."""
        tab = pd.crosstab(self.tiles["split"], self.tiles["label"])
        tab["slides"] = self.tiles.groupby("split")["slide"].nunique()
        if "patient" in self.tiles.columns:
            tab["patients"] = self.tiles.groupby("split")["patient"].nunique()
        return tab

    # ------------------------------------------------------------------ distributed
    def _dist(self) -> tuple[int, int]:
        tr = getattr(self, "trainer", None)
        if tr is not None:
            return int(tr.global_rank), int(tr.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------ datasets
    def dataset(self, name: str, train: bool | None = None):
        """The dataset of split ``name`` (``train`` augmentation defaults to ``name == 'train'``)."""
        train = (name == "train") if train is None else train
        key = f"{name}:{int(train)}:{int(self.streaming and train)}"
        if key in self._datasets:
            return self._datasets[key]
        t = self.split(name)
        if t.empty:
            raise HistolightError(f"the '{name}' split is empty")
        tf = build_transform(train, self.augment, self.normalizer)
        kw = dict(
            labels=t["y"].to_numpy(),
            slides=self.slides,
            transform=tf,
            tile_px=self.tile_px,
            verify=self.verify,
            on_corrupt=self.on_corrupt,
            max_open=self.max_open_files,
        )
        if train and self.streaming:
            rank, world = self._dist()
            w = balance_weights(t["y"].to_numpy(), t["slide"].to_numpy(), self.balance)
            ds = StreamingTileDataset(
                t,
                weights=w,
                samples_per_epoch=self.samples_per_epoch or len(t),
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                rank=rank,
                world_size=world,
                **kw,
            )
        else:
            ds = TileDataset(t, **kw)
        self._datasets[key] = ds
        return ds

    def _loader_kw(self) -> dict:
        kw: dict = dict(
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_tiles,
        )
        if self.prefetch_factor:
            kw["prefetch_factor"] = self.prefetch_factor
        return kw

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset("train", train=True)
        rank, world = self._dist()
        if self.streaming:
            ds.rank, ds.world_size = rank, world
            return _StreamLoader(ds, batch_size=self.batch_size, drop_last=False, **self._loader_kw())
        t = self.split("train")
        w = balance_weights(t["y"].to_numpy(), t["slide"].to_numpy(), self.balance)
        n = self.samples_per_epoch or len(t)
        if w is not None:
            sampler: DistributedSampler = WeightedDistributedSampler(w, n, num_replicas=world, rank=rank, seed=self.seed)
        else:
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=False)
        # drop a ragged last batch (a batch of 1 breaks BatchNorm) unless it is the only one
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, drop_last=len(sampler) > self.batch_size, **self._loader_kw()
        )

    def eval_dataloader(self, name: str) -> DataLoader:
        """In-order loader over split ``name``; under DDP each tile goes to exactly one rank."""
        ds = self.dataset(name, train=False)
        rank, world = self._dist()
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=EvalDistributedSampler(len(ds), num_replicas=world, rank=rank),
            **self._loader_kw(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def has_split(self, name: str) -> bool:
        return bool((self.tiles["split"] == name).any())


__all__ = ["TileDataModule"]
