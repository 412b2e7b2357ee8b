"""Patch training data for segmentation at any resolution (``data=seg_patches``): crops read straight from the slide.

Nothing larger than one crop is held per slide. A :class:`SlidePatches` record (picklable, no pixels) keeps

- the slide's path, base mpp and size (base px);
- its ROI polygons in base px (only the labels being segmented) and their bounding boxes;
- a low-resolution sampling map: the tissue pixels of an Otsu mask at ``map_mpp`` um/px (at most
  ``MAX_MAP_POINTS`` of them, as ``(x, y)`` map px);
- its fixed validation windows (top-left in base px), drawn once per slide from a seeded generator.

A crop of ``cfg.size`` px at ``cfg.mpp`` um/px covers ``size * mpp / base_mpp`` base px. It is read with
:meth:`histolight.wsi.Slide.read` (white outside the slide) and its mask is rasterized from the polygons that
touch it (translated to the crop, :func:`histolight.roi.rasterize_rois`: holes respected, all three modes).
``valid`` is 0 on pixels outside the slide (ignored by losses and metrics).

Sampling: with probability ``cfg.fg_crop_prob`` a crop is centred on a random point inside a labelled ROI (ROIs
drawn in proportion to their area), else on a random tissue pixel of the sampling map (the background share,
``1 - fg_crop_prob``); the centre is jittered by up to a quarter crop, and the crop is kept inside the slide when
the slide is larger than the crop. Slides are drawn uniformly.

Slide handles are opened lazily in the process that reads (one per slide per DataLoader worker), never pickled.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely.affinity
import torch
from torch.utils.data import Dataset

from histolight.errors import HistolightError
from histolight.roi import ROI, rasterize_rois
from histolight.segment.config import SegmentConfig
from histolight.segment.datamodule import augment_sample, to_sample
from histolight.training.augment import build_augmentation

log = logging.getLogger(__name__)

#: tissue points kept per slide in the sampling map (subsampled evenly beyond that)
MAX_MAP_POINTS = 20000
#: longest side of the sampling map, px
MAP_PX = 1024


@dataclass
class SlidePatches:
    """One slide as patch training sees it: geometry and a low-res sampling map, no pixels (see module docstring).

    Attributes:
        name, path: slide name and file; ``mpp_override`` the forced base um/px (None = the file's).
        base_mpp: level-0 um/px; ``dims``: level-0 ``(width, height)`` px.
        rois: the ROIs of the segmented labels, base px; ``bounds``: ``(n, 4)`` float ``xmin, ymin, xmax, ymax``.
        map_mpp: um/px of the sampling map; ``tissue``: ``(k, 2)`` int32 tissue pixels ``(x, y)`` of that map.
        windows: fixed validation windows, ``(m, 2)`` float top-left ``(x, y)`` in base px.
    """

    name: str
    path: str
    mpp_override: float | None
    base_mpp: float
    dims: tuple[int, int]
    rois: list[ROI]
    map_mpp: float
    tissue: np.ndarray
    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def __post_init__(self):
        self.bounds = np.array([r.geometry.bounds for r in self.rois], np.float64).reshape(-1, 4)
        self.areas = np.array([r.area for r in self.rois], np.float64)

    def crop_base(self, size: int, mpp: float) -> float:
        """Side in base px of a ``size`` px crop at ``mpp`` um/px."""
        return size * mpp / self.base_mpp


def slide_seed(seed: int, name: str) -> np.random.Generator:
    """A generator determined by ``seed`` and the slide name (same windows whatever the slide order)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def relevant_rois(rois: Sequence[ROI], cfg: SegmentConfig) -> list[ROI]:
    """The ROIs whose label is segmented (binary without labels: every ROI)."""
    if cfg.labels is None:
        return list(rois)
    return [r for r in rois if r.label in cfg.labels]


def describe_slide(dataset, name: str, cfg: SegmentConfig, seed: int = 0, val_windows: int = 0) -> SlidePatches:
    """Build the :class:`SlidePatches` of slide ``name`` of ``dataset`` (reads one low-res thumbnail).

    ``val_windows`` > 0 also draws that many fixed validation windows of ``cfg.tile_px`` px at ``cfg.mpp``.
    """
    from histolight.qc.otsu import otsu_tissue

    with dataset.open(name) as slide:
        dims = tuple(int(v) for v in slide.dimensions)
        base_mpp = float(slide.mpp)
        map_mpp = max(cfg.mpp * 4, max(dims) * base_mpp / MAP_PX)
        thumb = slide.thumbnail(mpp=map_mpp)
        rois = relevant_rois(dataset.rois(name, slide_dims=dims), cfg)
    tissue, _ = otsu_tissue(thumb, min_threshold=20)
    ys, xs = np.nonzero(tissue)
    step = max(1, len(ys) // MAX_MAP_POINTS)
    pts = np.stack([xs[::step], ys[::step]], 1).astype(np.int32)
    sp = SlidePatches(name, str(dataset.path(name)), dataset.mpp_for(name), base_mpp, dims, rois, map_mpp, pts)
    if val_windows:
        rng = slide_seed(seed, name)
        side = sp.crop_base(cfg.tile_px, cfg.mpp)
        n_fg = (val_windows + 1) // 2 if len(rois) else 0
        sp.windows = np.array([sample_window(sp, side, rng, fg=k < n_fg) for k in range(val_windows)], np.float64).reshape(-1, 2)
    return sp


def _point_in(geom, rng: np.random.Generator, tries: int = 64) -> tuple[float, float]:
    """A uniform random point inside ``geom`` (rejection sampling in its box; a representative point if unlucky)."""
    x0, y0, x1, y1 = geom.bounds
    xs, ys = rng.uniform(x0, x1, tries), rng.uniform(y0, y1, tries)
    inside = shapely.contains_xy(geom, xs, ys)
    if inside.any():
        k = int(np.argmax(inside))
        return float(xs[k]), float(ys[k])
    p = geom.representative_point()
    return float(p.x), float(p.y)


def sample_centre(sp: SlidePatches, rng: np.random.Generator, fg: bool) -> tuple[float, float]:
    """A crop centre in base px: inside a labelled ROI (``fg``, ROIs weighted by area) or on tissue / anywhere."""
    if fg and len(sp.rois):
        k = int(rng.choice(len(sp.rois), p=sp.areas / sp.areas.sum())) if sp.areas.sum() > 0 else int(rng.integers(len(sp.rois)))
        return _point_in(sp.rois[k].geometry, rng)
    f = sp.map_mpp / sp.base_mpp  # base px per map px
    if len(sp.tissue):
        mx, my = sp.tissue[rng.integers(len(sp.tissue))]
        return float((mx + rng.random()) * f), float((my + rng.random()) * f)
    return float(rng.uniform(0, sp.dims[0])), float(rng.uniform(0, sp.dims[1]))


def sample_window(sp: SlidePatches, side: float, rng: np.random.Generator, fg: bool) -> tuple[float, float]:
    """Top-left (base px) of a ``side`` base-px window around :func:`sample_centre`, jittered by up to a quarter
    window and kept inside the slide where it fits."""
    cx, cy = sample_centre(sp, rng, fg)
    cx += rng.uniform(-side / 4, side / 4)
    cy += rng.uniform(-side / 4, side / 4)
    out = []
    for c, dim in ((cx, sp.dims[0]), (cy, sp.dims[1])):
        v = c - side / 2
        out.append(float(np.clip(v, 0, dim - side)) if dim >= side else v)
    return out[0], out[1]


def rasterize_window(
    sp: SlidePatches, x0: float, y0: float, size_base: tuple[float, float], out_wh: tuple[int, int], mode: str, labels
) -> np.ndarray:
    """The mask of the base-px box ``(x0, y0)`` + ``size_base`` (w, h) drawn at ``out_wh`` (w, h) px: the ROIs
    touching it, translated to the box (:func:`histolight.roi.rasterize_rois`). Shapes as in :mod:`~.data`."""
    bw, bh = size_base
    b = sp.bounds
    hit = (b[:, 0] < x0 + bw) & (b[:, 2] > x0) & (b[:, 1] < y0 + bh) & (b[:, 3] > y0)
    rois = [ROI(r.name, shapely.affinity.translate(r.geometry, -x0, -y0), r.label) for r, h in zip(sp.rois, hit) if h]
    scale = out_wh[0] / bw
    labs = list(labels) if labels else None
    return rasterize_rois(rois, (int(out_wh[1]), int(out_wh[0])), scale, labels=labs, mode=mode)


def rasterize_crop(
    sp: SlidePatches, x0: float, y0: float, side: float, size: int, mode: str, labels: Sequence[str] | None
) -> np.ndarray:
    """The mask of the square window ``(x0, y0)`` + ``side`` base px at ``size`` px (:func:`rasterize_window`)."""
    return rasterize_window(sp, x0, y0, (side, side), (size, size), mode, labels)


def valid_crop(sp: SlidePatches, x0: float, y0: float, side: float, size: int) -> np.ndarray:
    """``(size, size)`` uint8: 1 where the pixel centre lies on the slide, 0 outside it."""
    c = (np.arange(size) + 0.5) * (side / size)
    vx = ((x0 + c) >= 0) & ((x0 + c) < sp.dims[0])
    vy = ((y0 + c) >= 0) & ((y0 + c) < sp.dims[1])
    return (vy[:, None] & vx[None, :]).astype(np.uint8)


class SlideHandles:
    """Slides opened lazily, once per process (DataLoader workers each open their own; nothing is pickled)."""

    def __init__(self):
        self._pid = None
        self._open: dict[str, object] = {}

    def get(self, sp: SlidePatches):
        from histolight.wsi import Slide

        if self._pid != os.getpid():
            self._open, self._pid = {}, os.getpid()
        s = self._open.get(sp.name)
        if s is None:
            s = self._open[sp.name] = Slide(sp.path, mpp=sp.mpp_override)
        return s

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def read_crop(
    handles: SlideHandles, sp: SlidePatches, x0: float, y0: float, cfg: SegmentConfig, size: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, mask, valid)`` of the window at ``(x0, y0)`` base px, ``size`` px (default ``cfg.size``) at
    ``cfg.mpp``: image ``(size, size, 3)`` uint8 (white outside the slide), mask (see :mod:`~.data`), valid."""
    size = int(size or cfg.size)
    side = sp.crop_base(size, cfg.mpp)
    image = handles.get(sp).read((x0, y0), (side, side), cfg.mpp, out_size=(size, size))
    valid = valid_crop(sp, x0, y0, side, size)
    mask = rasterize_crop(sp, x0, y0, side, size, cfg.mode, cfg.labels) * valid  # nothing is labelled off the slide
    return image, mask, valid


class _Normalize:
    """The stain normalizer of ``cfg.normalizer`` applied per crop (built lazily in each process)."""

    def __init__(self, spec: dict | None):
        self.spec = spec
        self._norm = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if not self.spec:
            return image
        if self._norm is None:
            from histolight.norm import build_normalizer

            self._norm = build_normalizer(self.spec)
        if getattr(self._norm, "use_context", False):
            self._norm.set_context(image)
        return self._norm.transform(image)

    def __getstate__(self):
        return {"spec": self.spec, "_norm": None}


class PatchDataset(Dataset):
    """``n`` random augmented crops per epoch read from ``slides`` (:class:`SlidePatches`); batches as in
    :mod:`histolight.segment.datamodule` (``image``, ``mask``, ``weight``, ``name``)."""

    def __init__(self, slides: Sequence[SlidePatches], cfg: SegmentConfig, n: int, augment: bool = True, seed: int | None = None):
        if not slides:
            raise HistolightError("patch training needs at least one training slide")
        self.slides = list(slides)
        self.cfg = cfg
        self.n = int(n)
        self.transform = build_augmentation(cfg.augment, prefix="data.augment") if augment else None
        self.seed = seed
        self.handles = SlideHandles()
        self.normalize = _Normalize(cfg.normalizer)
        self._rng: np.random.Generator | None = None
        self._rng_pid: int | None = None

    def __len__(self) -> int:
        return self.n

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():  # one stream per process
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self._rng, self._rng_pid = np.random.default_rng(seed), os.getpid()
            if self.transform is not None:
                self.transform.set_random_seed(int(self._rng.integers(0, 2**31)))
        return self._rng

    def sample(self, rng: np.random.Generator) -> tuple[SlidePatches, np.ndarray, np.ndarray, np.ndarray]:
        """One unaugmented random crop: ``(slide, image, mask, valid)``."""
        sp = self.slides[int(rng.integers(len(self.slides)))]
        side = sp.crop_base(self.cfg.size, self.cfg.mpp)
        x0, y0 = sample_window(sp, side, rng, fg=rng.random() < self.cfg.fg_crop_prob)
        image, mask, valid = read_crop(self.handles, sp, x0, y0, self.cfg)
        return sp, image, mask, valid

    def __getitem__(self, i: int) -> dict:
        sp, image, mask, valid = self.sample(self.rng)
        image = self.normalize(image)
        if self.transform is not None:
            image, mask, valid = augment_sample(self.transform, image, mask, valid, self.cfg.mode)
        out = to_sample(image, mask, valid, self.cfg)
        out["name"] = sp.name
        return out


class WindowDataset(Dataset):
    """The fixed validation windows of ``slides`` (``cfg.tile_px`` px at ``cfg.mpp``), unaugmented; ``weight`` is
    the plain validity (no edge weighting)."""

    def __init__(self, slides: Sequence[SlidePatches], cfg: SegmentConfig):
        self.slides = list(slides)
        self.cfg = cfg
        self.index = [(k, w) for k, sp in enumerate(self.slides) for w in range(len(sp.windows))]
        self.handles = SlideHandles()
        self.normalize = _Normalize(cfg.normalizer)

    def __len__(self) -> int:
        return len(self.index)

    def window(self, i: int) -> tuple[SlidePatches, np.ndarray, np.ndarray, np.ndarray]:
        k, w = self.index[i]
        sp = self.slides[k]
        x0, y0 = sp.windows[w]
        image, mask, valid = read_crop(self.handles, sp, x0, y0, self.cfg, size=self.cfg.tile_px)
        return sp, image, mask, valid

    def __getitem__(self, i: int) -> dict:
        sp, image, mask, valid = self.window(i)
        out = to_sample(self.normalize(image), mask, valid, self.cfg)
        out["weight"] = torch.from_numpy(valid.astype(np.float32))
        out["name"] = sp.name
        return out


def crop_stats(slides: Sequence[SlidePatches], cfg: SegmentConfig, n: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """Input mean/std (RGB, [0, 1] units) over ``n`` random training crops (stain-normalized if configured)."""
    from histolight.training.normalize import pixel_stats

    ds = PatchDataset(slides, cfg, n, augment=False, seed=seed)
    rng = np.random.default_rng(seed)

    def crops():
        for _ in range(n):
            _, image, _, valid = ds.sample(rng)
            yield ds.normalize(image)[valid > 0]

    return pixel_stats(crops())


__all__ = [
    "SlidePatches",
    "describe_slide",
    "sample_centre",
    "sample_window",
    "rasterize_window",
    "rasterize_crop",
    "valid_crop",
    "read_crop",
    "PatchDataset",
    "WindowDataset",
    "crop_stats",
]
