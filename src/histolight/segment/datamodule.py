"""Training data: random crops of slide thumbnails and their masks, augmented identically.

- Train: ``crops_per_epoch`` crops of ``size`` px per epoch (Slideflow draws one per slide per
  epoch). Each crop comes from a slide drawn uniformly; with probability ``fg_crop_prob`` it is
  centred near a random labelled pixel, else placed uniformly. Thumbnails smaller than ``size``
  are padded with white; padded pixels have weight 0 (ignored by losses and metrics).
- Augmentation: ``data.augment`` through the shared schema of :mod:`histolight.training.augment`
  (albumentations; geometry applied to image, mask and weights alike, colour and stain to the image only).
- Validation: whole thumbnails of the validation slides (one per batch); the LightningModule runs
  them through the same tiled inference as :meth:`SegmentModel.run_tiled_inference`.

Batches are dicts: ``image`` float (B, 3, H, W) in [0, 1], ``mask`` (B, H, W) int64 (binary /
multiclass) or (B, N, H, W) uint8 (multilabel), ``weight`` float (B, H, W) (0 = ignore) and
``name`` (slide names).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import lightning.pytorch as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from histolight.segment.config import SegmentConfig
from histolight.segment.data import ThumbMask
from histolight.segment.losses import edge_weight_map
from histolight.training.augment import build_augmentation

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------- datasets


def _pad_to(image: np.ndarray, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad (bottom/right) to at least (h, w): image white, mask 0, valid 0 in the padding."""
    ih, iw = image.shape[:2]
    ph, pw = max(0, h - ih), max(0, w - iw)
    valid = np.ones((ih, iw), np.uint8)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=255)
        valid = np.pad(valid, ((0, ph), (0, pw)))
        if mask.ndim == 3:
            mask = np.pad(mask, ((0, 0), (0, ph), (0, pw)))
        else:
            mask = np.pad(mask, ((0, ph), (0, pw)))
    return image, mask, valid


def to_sample(image, mask, valid, cfg: SegmentConfig) -> dict:
    """To tensors: image float (3, H, W) in [0, 1]; mask int64 or uint8; weight float (H, W)."""
    if cfg.edge_weight > 0:
        weight = edge_weight_map(mask, cfg.edge_weight, cfg.edge_sigma) * valid
    else:
        weight = valid.astype(np.float32)
    m = torch.from_numpy(np.ascontiguousarray(mask))
    m = m.to(torch.uint8) if cfg.mode == "multilabel" else m.long()
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
        "mask": m,
        "weight": torch.from_numpy(np.ascontiguousarray(weight, np.float32)),
    }


def augment_sample(transform, image: np.ndarray, mask: np.ndarray, valid: np.ndarray, mode: str):
    """Apply an albumentations ``transform`` to ``(image, mask, valid)``: every mask channel and the validity map get
    the image's geometry (colour and stain touch the image only). Returns the augmented triple."""
    chans = list(mask) if mask.ndim == 3 else [mask]
    r = transform(image=image, masks=[*chans, valid])
    ms = r["masks"]
    return r["image"], (np.stack(ms[:-1]) if mode == "multilabel" else ms[0]), ms[-1]


class CropDataset(Dataset):
    """``n`` random augmented crops of ``cfg.size`` from ``items`` (length = ``n``; new crops each epoch)."""

    def __init__(self, items: Sequence[ThumbMask], cfg: SegmentConfig, n: int, augment: bool = True, seed: int | None = None):
        if not items:
            raise ValueError("CropDataset needs at least one slide")
        self.items = list(items)
        self.cfg = cfg
        self.n = int(n)
        self.augment = augment
        self.transform = build_augmentation(cfg.augment, prefix="data.augment") if augment else None
        self.seed = seed
        self._rng: np.random.Generator | None = None
        # candidate centres for foreground crops: labelled pixels, subsampled
        self._fg = []
        for it in self.items:
            fg = it.mask.any(0) if it.mask.ndim == 3 else it.mask > 0
            ys, xs = np.nonzero(fg)
            step = max(1, len(ys) // 20000)
            self._fg.append(np.stack([ys[::step], xs[::step]], 1) if len(ys) else np.zeros((0, 2), int))

    def __len__(self) -> int:
        return self.n

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:  # one stream per process (DataLoader workers get distinct torch seeds)
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self._rng = np.random.default_rng(seed)
            if self.transform is not None:  # albumentations draws from its own generator: seed it from ours
                self.transform.set_random_seed(int(self._rng.integers(0, 2**31)))
        return self._rng

    def crop(self, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        it = self.items[k]
        s = self.cfg.size
        image, mask, valid = _pad_to(it.image, it.mask, s, s)
        h, w = image.shape[:2]
        fg = self._fg[k]
        if len(fg) and rng.random() < self.cfg.fg_crop_prob:
            cy, cx = fg[rng.integers(len(fg))]
            y0 = int(np.clip(cy - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, h - s))
            x0 = int(np.clip(cx - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, w - s))
        else:
            y0 = int(rng.integers(0, h - s + 1))
            x0 = int(rng.integers(0, w - s + 1))
        sl = (slice(y0, y0 + s), slice(x0, x0 + s))
        m = mask[(slice(None), *sl)] if mask.ndim == 3 else mask[sl]
        return image[sl], m, valid[sl]

    def __getitem__(self, i: int) -> dict:
        rng = self.rng
        k = int(rng.integers(len(self.items)))
        image, mask, valid = self.crop(k, rng)
        if self.transform is not None:
            image, mask, valid = augment_sample(self.transform, image, mask, valid, self.cfg.mode)
        out = to_sample(image, mask, valid, self.cfg)
        out["name"] = self.items[k].name
        return out


class WholeDataset(Dataset):
    """Whole thumbnails (padded to a multiple of 32), one per item: validation and overlays."""

    def __init__(self, items: Sequence[ThumbMask], cfg: SegmentConfig):
        self.items = list(items)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        h, w = it.shape
        image, mask, valid = _pad_to(it.image, it.mask, math.ceil(h / 32) * 32, math.ceil(w / 32) * 32)
        out = to_sample(image, mask, valid, self.cfg)
        out["weight"] = torch.from_numpy(valid.astype(np.float32))  # metrics: plain validity, no edge weighting
        out["name"] = it.name
        return out


def _collate(batch: list[dict]) -> dict:
    out = {k: torch.stack([b[k] for b in batch]) for k in ("image", "mask", "weight")}
    out["name"] = [b["name"] for b in batch]
    return out


def _collate_pad(batch: list[dict]) -> dict:
    """Stack samples of different sizes by padding to the largest (image white, weight 0)."""
    if len({tuple(b["image"].shape) for b in batch}) == 1:
        return _collate(batch)
    H = max(b["image"].shape[1] for b in batch)
    W = max(b["image"].shape[2] for b in batch)
    out = {"image": [], "mask": [], "weight": [], "name": [b["name"] for b in batch]}
    for b in batch:
        h, w = b["image"].shape[1:]
        out["image"].append(torch.nn.functional.pad(b["image"], (0, W - w, 0, H - h), value=1.0))
        out["mask"].append(torch.nn.functional.pad(b["mask"], (0, W - w, 0, H - h)))
        out["weight"].append(torch.nn.functional.pad(b["weight"], (0, W - w, 0, H - h)))
    return {k: (torch.stack(v) if k != "name" else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- module


class SegmentDataModule(L.LightningDataModule):
    """Lightning data module over in-memory thumbnails (they are small: a slide at 20 um/px is ~1-2 MP).

    Created by :func:`histolight.segment.train` from exported :class:`ThumbMask` items; usable
    directly: ``SegmentDataModule(cfg, train_items, val_items)``.
    """

    def __init__(
        self, cfg: SegmentConfig, train_items: Sequence[ThumbMask], val_items: Sequence[ThumbMask] = (), seed: int | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.train_items = list(train_items)
        self.val_items = list(val_items)
        self.seed = seed

    #: validation samples per batch (whole thumbnails differ in size: one at a time)
    val_batch_size = 1

    def train_dataset(self) -> Dataset:
        """This epoch's training samples (subclasses read them elsewhere, e.g. :mod:`histolight.segment.patches`)."""
        return CropDataset(self.train_items, self.cfg, self.cfg.crops_per_epoch, augment=True)

    def val_dataset(self) -> Dataset | None:
        """The validation samples (None = no validation)."""
        return WholeDataset(self.val_items, self.cfg) if self.val_items else None

    def train_dataloader(self):
        nw = self.cfg.num_workers
        return DataLoader(
            self.train_dataset(),
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=nw,
            collate_fn=_collate,
            drop_last=False,
            persistent_workers=nw > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self):
        ds = self.val_dataset()
        if ds is None or len(ds) == 0:
            return []
        return DataLoader(ds, batch_size=self.val_batch_size, shuffle=False, num_workers=0, collate_fn=_collate_pad)


class DatasetsDataModule(SegmentDataModule):
    """A data module over given datasets (patch mode, :mod:`histolight.segment.patches` and
    :mod:`histolight.segment.patch_cache`): ``train`` draws new samples every epoch; ``val`` samples are all of one
    size (``val_batch_size`` per batch)."""

    val_batch_size = 4

    def __init__(self, cfg: SegmentConfig, train: Dataset, val: Dataset | None = None):
        super().__init__(cfg, [], [])
        self._train, self._val = train, val

    def train_dataset(self) -> Dataset:
        return self._train

    def val_dataset(self) -> Dataset | None:
        return self._val
