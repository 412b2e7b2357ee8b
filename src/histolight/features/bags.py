"""Feature bags of a cohort, on the cohort runner, in Slideflow's layout.

Per output folder (one per extractor; several extractors share one pass over the tiles)::

    <outdir>/<slide>.pt           float32 tensor (N, D), one row per tile (torch.load(weights_only=True) reads it)
    <outdir>/<slide>.index.npz    arr_0 = int64 (N, 2) tile centres (loc_x, loc_y) in base px; grid = (grid_x, grid_y)
                                  when the tiles were read from the slide
    <outdir>/bags_config.json     Slideflow's schema (extractor.class/kwargs, normalizer.method/fit, num_features,
                                  tile_px, tile_um) + histolight's fields (random_init, license, source, ...)
    <outdir>/summary.csv          per slide: slide, status, reason, seconds, tiles, dim

Tiles come from TFRecords (``tfrecords=``; record order) or straight from the slides of a dataset
(``source='slides'``: ``task=extract``'s grid, ROI rule, QC and filters, nothing written). The next slide is read
while the current one is computed (:class:`~histolight.features.sources.Prefetcher`). A slide is done when its
``.pt`` exists (written atomically after the index); re-running skips it unless ``overwrite``.
``rebuild_extractor('bags_config.json')`` returns ``(extractor, normalizer)`` that reproduce the bags exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histolight.classify.data import describe_corrupt
from histolight.cohort import CohortResult, report_progress, run_per_slide
from histolight.errors import ConfigError, HistolightError
from histolight.features.extractor import FeatureExtractor, slide_extract_config
from histolight.features.registry import build_feature_extractor
from histolight.io.atomic import atomic_save_npz, atomic_write, atomic_write_json

log = logging.getLogger(__name__)

BAGS_FORMAT_VERSION = 1
CONFIG_NAME = "bags_config.json"


# ---------------------------------------------------------------------------------------------- config


def bags_config(
    ext: FeatureExtractor, *, source: str = "tfrecords", tile_px: Any = None, tile_um: Any = None, **extra: Any
) -> dict:
    """``bags_config.json``: Slideflow's keys first, then histolight's."""
    norm = ext.normalizer
    ncfg = norm.to_config() if norm is not None else None
    return {
        "extractor": {"class": "histolight.features.build_feature_extractor", "kwargs": ext.build_kwargs},
        "normalizer": None if ncfg is None else {"method": ncfg.get("method"), "fit": ncfg.get("fit"), **ncfg},
        "num_features": int(ext.num_features),
        "tile_px": tile_px if tile_px is not None else ext.tile_px,
        "tile_um": tile_um if tile_um is not None else ext.tile_um,
        "format": "histolight-bags",
        "format_version": BAGS_FORMAT_VERSION,
        "extractor_name": ext.name,
        "architecture": ext.info.arch,
        "random_init": bool(ext.random_init),
        "license": ext.license,
        "preprocessing": ext.preprocessing.kwargs(),
        "mixed_precision": ext.mixed_precision,
        "source": source,
        **extra,
    }


#: Slideflow extractor classes -> registry names (``rebuild_extractor`` of a Slideflow ``bags_config.json``)
SLIDEFLOW_CLASSES = {
    "CTransPathFeatures": "ctranspath",
    "RetCCLFeatures": "retccl",
    "UNIFeatures": "uni",
    "UNI2Features": "uni2",
    "VirchowFeatures": "virchow",
    "Virchow2Features": "virchow2",
    "PhikonFeatures": "phikon",
    "PhikonV2Features": "phikon2",
    "PLIPFeatures": "plip",
    "GigaPathTileFeatures": "gigapath",
    "HOptimus0Features": "h_optimus_0",
}


def rebuild_extractor(path: str | os.PathLike, device: str = "cpu", **overrides: Any) -> tuple[FeatureExtractor, Any]:
    """``(extractor, normalizer)`` described by a ``bags_config.json`` (or the folder holding it).

    Rebuilds histolight's own configs exactly (same weights file or the same seeded random init, preprocessing,
    precision), and Slideflow's for the registry's models. ``overrides`` replace build keyword arguments (e.g.
    ``weights=`` when the file moved)."""
    from histolight.norm import build_normalizer

    p = Path(path)
    p = p / CONFIG_NAME if p.is_dir() else p
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise HistolightError(f"cannot read the bags config '{p}' ({e})") from None
    ex = doc.get("extractor") or {}
    cls, kwargs = str(ex.get("class", "")), dict(ex.get("kwargs") or {})
    if not cls.startswith("histolight."):
        short = cls.rpartition(".")[2]
        if short not in SLIDEFLOW_CLASSES:
            raise HistolightError(
                f"'{p}': extractor class {cls!r} is not one histolight can rebuild ({sorted(SLIDEFLOW_CLASSES)})"
            )
        kwargs = {
            "name": SLIDEFLOW_CLASSES[short],
            **{
                k: v
                for k, v in kwargs.items()
                if k in ("weights", "resize", "center_crop", "interpolation", "antialias", "norm_mean", "norm_std")
            },
        }
    if kwargs.get("weights") == "<in-memory state dict>" and "weights" not in overrides:
        raise HistolightError(f"'{p}': the bags were made with in-memory weights; pass weights= to rebuild_extractor")
    kwargs.update(overrides)
    name = kwargs.pop("name")
    ext = build_feature_extractor(name, device=device, **kwargs)
    norm_cfg = doc.get("normalizer")
    normalizer = build_normalizer(norm_cfg) if norm_cfg else None
    if normalizer is not None:
        ext.normalizer = normalizer
    if doc.get("num_features") is not None and int(doc["num_features"]) != ext.num_features:
        raise HistolightError(f"'{p}' records {doc['num_features']} features, the rebuilt {name} gives {ext.num_features}")
    return ext, normalizer


# ---------------------------------------------------------------------------------------------- per slide

_CACHE: dict[str, Any] = {}


def _extractors(specs: Sequence[FeatureExtractor | dict], device: str) -> list[FeatureExtractor]:
    """The job's extractors, built once per process (specs are ``build_feature_extractor`` keyword dicts)."""
    specs = [{"name": s} if isinstance(s, (str, os.PathLike)) else s for s in specs]
    key = json.dumps([s if isinstance(s, dict) else id(s) for s in specs] + [device], sort_keys=True, default=str)
    if _CACHE.get("key") != key:
        built = []
        for s in specs:
            if isinstance(s, FeatureExtractor):
                built.append(s.to(device))
            else:
                kw = dict(s)
                built.append(build_feature_extractor(kw.pop("name"), device=device, **kw))
        _CACHE.clear()
        _CACHE.update(key=key, value=built)
    return _CACHE["value"]


@dataclass
class BagJob:
    """What the per-slide function needs, in any worker process (picklable)."""

    extractors: list
    outdirs: list[str]
    source: str
    files: dict[str, list[str]] = field(default_factory=dict)
    slides: dict[str, tuple[str, float | None, str | None]] = field(default_factory=dict)
    extract: dict = field(default_factory=dict)
    normalizer: Any = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"
    overwrite: bool = False
    order: list[str] = field(default_factory=list)
    dataset_options: dict = field(default_factory=dict)
    include_detections: bool = False  # the dataset's option: read QuPath cells/detections as ROIs too

    def todo(self, name: str) -> list[int]:
        """Indices of the extractors whose bag of ``name`` is still to be made."""
        return [i for i, d in enumerate(self.outdirs) if self.overwrite or not (Path(d) / f"{name}.pt").exists()]

    def batches(self, name: str, ext: FeatureExtractor):
        from histolight.features.sources import tfrecord_batches

        norm = self.normalizer if self.normalizer is not None else ext.normalizer
        if self.source == "tfrecords":
            return tfrecord_batches(self.files[name], self.batch_size, self.num_workers, norm, **self.dataset_options)
        return _slide_iter(self, name, ext, norm)


def _slide_iter(job: BagJob, name: str, ext: FeatureExtractor, norm: Any):
    from histolight.features.sources import slide_batches
    from histolight.roi import read_rois
    from histolight.wsi import Slide

    cfg = slide_extract_config(
        ext,
        job.extract.get("tile_px"),
        job.extract.get("tile_um"),
        {k: v for k, v in job.extract.items() if k not in ("tile_px", "tile_um")},
    )
    path, mpp, roi_path = job.slides[name]
    with Slide(path, mpp=mpp) as slide:
        use = cfg.roi_method != "ignore" and roi_path
        rois = read_rois(roi_path, slide_dims=slide.dimensions, include_detections=job.include_detections) if use else None
        yield from slide_batches(slide, cfg, rois, roi_file=roi_path, normalizer=norm, batch_size=job.batch_size)


_PREFETCH: dict[str, Any] = {}


def _prefetcher(job: BagJob, ext: FeatureExtractor):
    from histolight.features.sources import Prefetcher

    key = str(id(job))
    if _PREFETCH.get("key") != key:
        if _PREFETCH.get("value") is not None:
            _PREFETCH["value"].close()
        _PREFETCH.update(key=key, value=Prefetcher(lambda n: job.batches(n, ext), job.order, wanted=lambda n: bool(job.todo(n))))
    return _PREFETCH["value"]


def _save_tensor(path: Path, t: torch.Tensor) -> None:
    with atomic_write(path, "wb") as fh:
        torch.save(t.contiguous(), fh)


def write_bag(
    outdir: str | os.PathLike, name: str, feats: torch.Tensor, locs: np.ndarray, grid: np.ndarray | None = None
) -> None:
    """One slide's bag: the index first, then the ``.pt`` (its presence marks the slide done)."""
    outdir = Path(outdir)
    arrays = {"arr_0": np.asarray(locs, np.int64)}
    if grid is not None:
        arrays["grid"] = np.asarray(grid, np.int64)
    atomic_save_npz(outdir / f"{name}.index.npz", **arrays)
    _save_tensor(outdir / f"{name}.pt", feats.float())


def bag_slide(job: BagJob, name: str) -> dict:
    """Per-slide function of :func:`extract_features`: read the slide's tiles once, run every extractor whose bag is
    missing, write the bags. ``skipped`` (reason ``exists``) when every bag exists, ``empty`` without tiles."""
    todo = job.todo(name)
    if not todo:
        return {"status": "skipped", "reason": "exists"}
    exts = _extractors(job.extractors, job.device)
    it = _prefetcher(job, exts[0]).batches(name) if job.order else job.batches(name, exts[0])
    feats: list[list[torch.Tensor]] = [[] for _ in todo]
    locs, grid, bad = [], [], []
    for b in it:
        bad += b.corrupt
        if not len(b):
            continue
        for k, i in enumerate(todo):
            feats[k].append(exts[i].forward_batch(b.images))
        locs.append(b.locs)
        if b.grid is not None:
            grid.append(b.grid)
        report_progress(len(b))
    corrupt = {"n_corrupt": len(bad), "reason": describe_corrupt(bad)} if bad else {}
    if not locs:
        return {"status": "empty", "tiles": 0, "dim": exts[todo[0]].num_features, **corrupt}
    loc = np.concatenate(locs)
    g = np.concatenate(grid) if grid else None
    for k, i in enumerate(todo):
        bag = torch.cat(feats[k])
        if not torch.isfinite(bag).all():
            raise HistolightError(f"non-finite features for slide {name} ({exts[i].name})")
        write_bag(job.outdirs[i], name, bag, loc, g)
    return {"tiles": int(len(loc)), "dim": int(exts[todo[0]].num_features), **corrupt}


# ---------------------------------------------------------------------------------------------- cohort


def _dataset_slides(dataset: Any) -> dict[str, tuple[str, float | None, str | None]]:
    return {
        n: (str(dataset.path(n)), dataset.mpp_for(n), str(dataset.roi_path(n)) if dataset.roi_path(n) else None)
        for n in dataset.names
    }


def _check_outdir(outdir: Path, cfg: dict, overwrite: bool) -> None:
    p = outdir / CONFIG_NAME
    if p.exists() and not overwrite:
        old = json.loads(p.read_text())
        a = (old.get("extractor"), old.get("num_features"), old.get("source"))
        b = (cfg["extractor"], cfg["num_features"], cfg["source"])
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            raise HistolightError(
                f"'{outdir}' holds feature bags of another extractor ({(old.get('extractor') or {}).get('kwargs', {}).get('name')}, "
                f"{old.get('num_features')} features); choose another outdir or pass overwrite=true"
            )


def extract_features(
    extractor: FeatureExtractor | dict | Sequence[FeatureExtractor | dict],
    tfrecords: Any = None,
    outdir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    dataset: Any = None,
    source: str = "auto",
    tile_px: int | None = None,
    tile_um: Any = None,
    extract: dict | None = None,
    normalizer: Any = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = "auto",
    overwrite: bool = False,
    slides: Sequence[str] | None = None,
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    prefetch: bool = True,
    progress: bool = True,
    **dataset_options: Any,
) -> CohortResult:
    """Write one feature bag per slide (and per extractor) into ``outdir``, on the cohort runner.

    Args:
        extractor: a :class:`FeatureExtractor` or ``build_feature_extractor`` keyword dict (built once per slide
            worker), or a list of them: one pass over the tiles, one bag folder each (``outdir`` a list then).
        tfrecords: folder / glob / files of TFRecords (``source='tfrecords'``).
        dataset: a :class:`~histolight.dataset.Dataset` whose slides are read directly (``source='slides'``).
        source: ``tfrecords``, ``slides`` or ``auto`` (TFRecords when given, else the dataset's slides).
        tile_px, tile_um, extract: tile geometry and ``task=extract`` options (``qc``, ``roi_method``, ...) for
            reading slides.
        normalizer: a stain normalizer applied to every tile (default: the extractor's own, if any).
        device: ``auto`` (cuda when available), ``cpu``, ``cuda[:n]``.
        prefetch: read the next slide while computing the current one (one slide worker).
        dataset_options: passed to the TFRecord tile dataset (``verify``, ``on_corrupt``; corrupt tiles skipped under
            ``on_corrupt='skip'`` are counted in the summary's ``n_corrupt``).
    """
    from histolight.io.tilestore import find_tfrecords, tfrecord_slide_name
    from histolight.utils.device import resolve_device

    device = resolve_device(device)
    specs = list(extractor) if isinstance(extractor, (list, tuple)) else [extractor]
    outs = [outdir] if isinstance(outdir, (str, os.PathLike)) else list(outdir or [])
    if len(outs) != len(specs) or not specs:
        raise ConfigError(f"give one outdir per extractor ({len(specs)} extractor(s), {len(outs)} outdir(s))")
    if source == "auto":
        source = "tfrecords" if tfrecords is not None else "slides"
    if source not in ("tfrecords", "slides"):
        raise ConfigError(f"source={source!r} is invalid: use tfrecords, slides or auto")
    exts = _extractors(specs, device)
    job = BagJob(specs, [str(o) for o in outs], source, normalizer=normalizer, batch_size=batch_size, num_workers=num_workers)
    job.device, job.overwrite, job.dataset_options = device, overwrite, dataset_options
    geometry: dict[str, Any] = {}
    if source == "tfrecords":
        if tfrecords is None:
            raise ConfigError("source='tfrecords' needs tfrecords= (a folder, glob or files)")
        paths = find_tfrecords(tfrecords)
        if not paths:
            raise HistolightError(f"no TFRecords found in {tfrecords!r}; run task=extract first or set task.tfrecords")
        for e in exts:
            if e.tile_um is not None:
                from histolight.classify.predict import check_tile_geometry

                check_tile_geometry(paths, e.tile_px, e.tile_um)
        for p in paths:
            job.files.setdefault(tfrecord_slide_name(p), []).append(p)
        names = sorted(job.files)
        geometry = _folder_geometry(paths[0])
    else:
        if dataset is None:
            raise ConfigError("source='slides' needs dataset= (the slides to read tiles from)")
        job.slides = _dataset_slides(dataset)
        job.include_detections = getattr(dataset, "include_detections", False)
        names = list(job.slides)
        job.extract = {**(extract or {}), "tile_px": tile_px, "tile_um": tile_um}
        cfg0 = slide_extract_config(exts[0], tile_px, tile_um, {k: v for k, v in (extract or {}).items()})
        geometry = {"tile_px": cfg0.tile_px, "tile_um": cfg0.tile_um}
    if slides is not None:
        keep = set(slides)
        names = [n for n in names if n in keep]
    for e, o in zip(exts, outs):
        o = Path(o)
        o.mkdir(parents=True, exist_ok=True)
        cfg = bags_config(e, source=source, batch_size=batch_size, **geometry)
        _check_outdir(o, cfg, overwrite)
        atomic_write_json(o / CONFIG_NAME, cfg)
    from histolight.cohort import shard

    mine = shard(names, shard_index, num_shards) if num_shards > 1 else names
    job.order = list(mine) if (prefetch and workers <= 1) else []
    fn = functools.partial(bag_slide, job)
    try:
        return run_per_slide(
            names,
            fn,
            out_dir=outs[0],
            workers=workers,
            shard_index=shard_index,
            num_shards=num_shards,
            summary_name="summary.csv",
            desc="feature bags",
            unit="tiles",
            progress=progress,
        )
    finally:
        if _PREFETCH.get("value") is not None:
            _PREFETCH.pop("value").close()
            _PREFETCH.clear()


def _folder_geometry(path: str) -> dict:
    """``tile_px`` / ``tile_um`` from a tile folder named ``<px>px_<um>um`` (empty if it is named otherwise)."""
    import re

    m = re.match(r"^(\d+)px_(.+?)(um)?$", Path(path).parent.name)
    if not m:
        return {}
    um = m.group(2)
    return {"tile_px": int(m.group(1)), "tile_um": int(um) if um.isdigit() else um}


def load_bag(outdir: str | os.PathLike, slide: str) -> tuple[torch.Tensor, np.ndarray]:
    """``(features (N, D), locations (N, 2))`` of one slide's bag."""
    outdir = Path(outdir)
    feats = torch.load(outdir / f"{slide}.pt", map_location="cpu", weights_only=True)
    locs = np.load(outdir / f"{slide}.index.npz")["arr_0"]
    return feats, locs


class DatasetFeatures:
    """Features of a whole dataset in memory (Slideflow's ``DatasetFeatures``): ``bags[slide]`` ``(N, D)``,
    ``locations[slide]`` ``(N, 2)``; :meth:`to_torch` writes them as feature bags.

    Prefer :func:`extract_features` (``Dataset.generate_feature_bags``) for large cohorts: this holds every bag.
    """

    def __init__(
        self,
        extractor: FeatureExtractor | dict | str,
        dataset: Any = None,
        tfrecords: Any = None,
        *,
        normalizer: Any = None,
        batch_size: int = 64,
        **options: Any,
    ):
        if isinstance(extractor, str):
            extractor = build_feature_extractor(extractor)
        self.extractor = _extractors([extractor], str(getattr(extractor, "device", "cpu")))[0]
        self.bags: dict[str, torch.Tensor] = {}
        self.locations: dict[str, np.ndarray] = {}
        self._grid: dict[str, np.ndarray] = {}
        source = "tfrecords" if tfrecords is not None else "slides"
        job = BagJob([self.extractor], [], source, normalizer=normalizer, batch_size=batch_size)
        if source == "tfrecords":
            from histolight.io.tilestore import find_tfrecords, tfrecord_slide_name

            for p in find_tfrecords(tfrecords):
                job.files.setdefault(tfrecord_slide_name(p), []).append(p)
            names = sorted(job.files)
            self.geometry = _folder_geometry(job.files[names[0]][0]) if names else {}
        else:
            if dataset is None:
                raise ConfigError("DatasetFeatures needs a dataset (slides) or tfrecords=")
            job.slides = _dataset_slides(dataset)
            job.include_detections = getattr(dataset, "include_detections", False)
            job.extract = {"tile_px": options.pop("tile_px", None), "tile_um": options.pop("tile_um", None), **options}
            names = list(job.slides)
            self.geometry = {"tile_px": job.extract["tile_px"] or self.extractor.tile_px, "tile_um": job.extract["tile_um"]}
        self.source, self.batch_size = source, batch_size
        for n in names:
            feats, locs, grid = [], [], []
            for b in job.batches(n, self.extractor):
                feats.append(self.extractor.forward_batch(b.images))
                locs.append(b.locs)
                if b.grid is not None:
                    grid.append(b.grid)
            if feats:
                self.bags[n] = torch.cat(feats)
                self.locations[n] = np.concatenate(locs)
                if grid:
                    self._grid[n] = np.concatenate(grid)

    def to_torch(self, outdir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write every bag (``<slide>.pt`` + ``<slide>.index.npz``) and ``bags_config.json`` into ``outdir``."""
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = bags_config(self.extractor, source=self.source, batch_size=self.batch_size, **self.geometry)
        _check_outdir(out, cfg, overwrite)
        atomic_write_json(out / CONFIG_NAME, cfg)
        for n, bag in self.bags.items():
            if overwrite or not (out / f"{n}.pt").exists():
                write_bag(out, n, bag, self.locations[n], self._grid.get(n))
        return out


__all__ = [
    "extract_features",
    "bag_slide",
    "BagJob",
    "bags_config",
    "rebuild_extractor",
    "DatasetFeatures",
    "load_bag",
    "write_bag",
]
