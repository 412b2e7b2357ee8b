"""Patch cache (the U-Net blog's "database"): sampled training patches and the fixed validation windows, with their
masks, written once into a chunked HDF5 file and read back every epoch.

Why HDF5 (h5py) rather than zarr: h5py installs from the package registry as one self-contained wheel (libhdf5
bundled) with no further dependencies, a cache is one file (one atomic rename, one path to delete or copy), and
per-sample chunks give random access at the cost of one small read per patch. zarr would store one file per chunk
(tens of thousands of files for a large cache) and adds several packages.

Layout (``<cache_dir>/patches_<key>.h5``)::

    attrs: format, key (JSON: what must match for reuse: mpp, size, tile_px, mode, labels, n, seed, slides, ROI
           digests), split (JSON {"train": [...], "val": [...]}, slide names)
    train/image  uint8 (N, size, size, 3)     chunks of one patch      val/image  uint8 (M, tile, tile, 3)
    train/mask   uint8 (N, size, size) or (N, L, size, size)           val/mask   ...
    train/valid  uint8 (N, size, size)        1 = on the slide         val/valid  ...
    train/slide  int32 (N,)                   index into split.train   val/slide  int32 (M,) into split.val

Patches are drawn like on-the-fly training (:class:`~histolight.segment.patches.PatchDataset`, unaugmented);
augmentation happens when they are read. The file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from histolight.segment.config import SegmentConfig
from histolight.segment.datamodule import augment_sample, to_sample
from histolight.training.augment import build_augmentation

log = logging.getLogger(__name__)

FORMAT = "histolight.segment.patch_cache/1"


def cache_key(train: Sequence, val: Sequence, cfg: SegmentConfig, n: int, seed: int) -> dict:
    """What a cache must have been built from to be reused (slides by name, size and ROI geometry digest)."""

    def digest(sp) -> str:
        h = hashlib.sha1()
        for r in sp.rois:
            h.update(f"{r.label}:{r.geometry.wkb_hex}".encode())
        return h.hexdigest()[:16]

    return {
        "mpp": cfg.mpp,
        "size": cfg.size,
        "tile_px": cfg.tile_px,
        "mode": cfg.mode,
        "labels": cfg.labels,
        "fg_crop_prob": cfg.fg_crop_prob,
        "normalizer": cfg.normalizer,
        "n": int(n),
        "seed": int(seed),
        "train": [[sp.name, list(sp.dims), digest(sp)] for sp in train],
        "val": [[sp.name, list(sp.dims), digest(sp), sp.windows.tolist()] for sp in val],
    }


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """``<cache_dir>/patches_<sha1 of the key>.h5``."""
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"patches_{h}.h5"


def _write_group(f, name: str, samples, n: int, size: int, cfg: SegmentConfig, progress: bool) -> None:
    from tqdm.auto import tqdm

    mshape = (n, len(cfg.labels), size, size) if cfg.mode == "multilabel" else (n, size, size)
    g = f.create_group(name)
    # one patch per chunk; resizable along N so that an empty group (no validation window) may be chunked too
    img = g.create_dataset("image", (n, size, size, 3), np.uint8, chunks=(1, size, size, 3), maxshape=(None, size, size, 3))
    msk = g.create_dataset("mask", mshape, np.uint8, chunks=(1, *mshape[1:]), maxshape=(None, *mshape[1:]), compression="lzf")
    val = g.create_dataset(
        "valid", (n, size, size), np.uint8, chunks=(1, size, size), maxshape=(None, size, size), compression="lzf"
    )
    sl = g.create_dataset("slide", (n,), np.int32)
    for i, (k, image, mask, valid) in enumerate(tqdm(samples, total=n, desc=f"patch cache: {name}", disable=not progress)):
        img[i], msk[i], val[i], sl[i] = image, mask, valid, k


def build_patch_cache(
    cache_dir: str | os.PathLike,
    train: Sequence,
    val: Sequence,
    cfg: SegmentConfig,
    n: int,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write (or reuse) the cache of ``n`` training patches of ``train`` and the validation windows of ``val``
    (:class:`~histolight.segment.patches.SlidePatches`). Returns its path (module docstring)."""
    import h5py

    from histolight.segment.patches import PatchDataset, WindowDataset

    key = cache_key(train, val, cfg, n, seed)
    path = cache_path(cache_dir, key)
    if path.exists():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") == FORMAT and json.loads(f.attrs["key"]) == json.loads(json.dumps(key)):
                    log.info("reusing the patch cache %s", path)
                    return path
        except (OSError, KeyError, ValueError):
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pds = PatchDataset(train, cfg, n, augment=False, seed=seed)
    index = {sp.name: k for k, sp in enumerate(train)}
    rng = np.random.default_rng(seed)

    def train_samples():
        for _ in range(n):
            sp, image, mask, valid = pds.sample(rng)
            yield index[sp.name], pds.normalize(image), mask, valid

    wds = WindowDataset(val, cfg)
    vindex = {sp.name: k for k, sp in enumerate(val)}

    def val_samples():
        for i in range(len(wds)):
            sp, image, mask, valid = wds.window(i)
            yield vindex[sp.name], wds.normalize(image), mask, valid

    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["key"] = json.dumps(key)
            f.attrs["split"] = json.dumps({"train": [sp.name for sp in train], "val": [sp.name for sp in val]})
            _write_group(f, "train", train_samples(), n, cfg.size, cfg, progress)
            _write_group(f, "val", val_samples(), len(wds), cfg.tile_px, cfg, progress)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("patch cache: %d training patches, %d validation windows -> %s", n, len(wds), path)
    return path


def read_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """The ``{"train": [...], "val": [...]}`` slide names recorded in a cache."""
    import h5py

    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["split"])


class CachedPatches(Dataset):
    """Samples of one group (``train`` or ``val``) of a patch cache, as in :mod:`histolight.segment.datamodule`.

    ``train``: ``n`` random cached patches per epoch (``None`` = each once), augmented; ``val``: every window once,
    unaugmented, ``weight`` = plain validity. The HDF5 file is opened lazily in each process.
    """

    def __init__(self, path: str | os.PathLike, group: str, cfg: SegmentConfig, n: int | None = None, seed: int | None = None):
        import h5py

        self.path = str(path)
        self.group = group
        self.cfg = cfg
        with h5py.File(self.path, "r") as f:
            self.size = int(f[group]["image"].shape[0])
            self.names = json.loads(f.attrs["split"])[group]
        self.n = self.size if n is None else int(n)
        self.augment = group == "train"
        self.transform = build_augmentation(cfg.augment, prefix="data.augment") if self.augment else None
        self.seed = seed
        self._file = None
        self._pid = None
        self._rng = None

    def __len__(self) -> int:
        return self.n

    def _open(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self._rng = np.random.default_rng(seed)
            if self.transform is not None:
                self.transform.set_random_seed(int(self._rng.integers(0, 2**31)))
        return self._file[self.group]

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_pid": None, "_rng": None}

    def __getitem__(self, i: int) -> dict:
        g = self._open()
        k = int(self._rng.integers(self.size)) if self.augment else int(i)
        image, mask, valid = g["image"][k], g["mask"][k], g["valid"][k]
        if self.transform is not None:
            image, mask, valid = augment_sample(self.transform, image, mask, valid, self.cfg.mode)
        out = to_sample(image, mask, valid, self.cfg)
        if not self.augment:
            out["weight"] = torch.from_numpy(valid.astype(np.float32))
        out["name"] = self.names[int(g["slide"][k])]
        return out


__all__ = ["FORMAT", "build_patch_cache", "cache_key", "cache_path", "read_split", "CachedPatches"]
