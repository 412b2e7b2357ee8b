"""``task=features``: per-slide feature bags with a registered extractor (config group ``extractor``).

    python run.py task=features extractor=retccl extractor.weights=/models/retccl.pth      # TFRecords of task=extract
    python run.py task=features extractor=uni extractor.weights=/models/UNI task.source=slides task.tile_um=128
    python run.py task=features extractor=classifier extractor.name=outputs/<run>/model    # a trained classifier

Tiles: ``task.source=tfrecords`` (default; ``task.tfrecords``, or the tile folder
``<tiles_root>/<dataset.name>/<px>px_<um>um``) or ``task.source=slides`` (the dataset's slides read directly, with
``task.qc`` and ``task.extract`` options). Bags, ``bags_config.json`` and ``summary.csv`` go to ``task.outdir``
(layout: :mod:`histolight.features.bags`). ``task.model`` (a registry name or a classifier folder) is used when no
``extractor`` group is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from histolight.classify.data import check_on_corrupt
from histolight.cohort import PerSlideOptions
from histolight.config.schema import check, from_config, is_pos_int
from histolight.errors import ConfigError
from histolight.tasks.common import resolve_model, tile_source
from histolight.units import parse_tile_um


@dataclass
class FeaturesTaskConfig(PerSlideOptions):
    """``conf/task/features.yaml``."""

    outdir: str | None = None
    source: str = "tfrecords"
    tfrecords: Any = None
    tiles_root: str | None = None
    model: str | None = None
    tile_px: int | None = None
    tile_um: Any = None
    qc: Any = field(default_factory=lambda: ["otsu"])
    extract: Any = None
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    overwrite: bool = False
    prefetch: bool = True
    verify: bool = True
    on_corrupt: str = "skip"
    shard_index: int = 0
    num_shards: int = 1
    name: str = "features"

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.outdir, str) and self.outdir != "", "outdir", self.outdir, "must be the folder of the bags")
        check(self.source in ("tfrecords", "slides"), "source", self.source, "tfrecords or slides")
        check(self.tfrecords not in ("", []), "tfrecords", self.tfrecords, "null, a folder, a glob or a list of files")
        check(
            self.source == "slides" or self.tfrecords is not None or bool(self.tiles_root),
            "tiles_root",
            self.tiles_root,
            "a folder when tfrecords=null",
        )
        check(self.tile_px is None or is_pos_int(self.tile_px), "tile_px", self.tile_px, "null or a positive integer (px)")
        if self.tile_um is not None:
            parse_tile_um(self.tile_um)
        check(self.extract is None or isinstance(self.extract, dict), "extract", self.extract, "null or task=extract options")
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "a positive integer")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check(is_pos_int(self.num_shards), "num_shards", self.num_shards, "an integer >= 1")
        check(isinstance(self.verify, bool), "verify", self.verify, "true (check TFRecord CRCs) or false")
        check_on_corrupt(self.on_corrupt, "on_corrupt")


def extractor_spec(cfg: DictConfig, t: FeaturesTaskConfig) -> dict:
    """``build_feature_extractor`` keyword arguments from the ``extractor`` group (or ``task.model``)."""
    node = cfg.get("extractor")
    if node is None:
        if not t.model:
            raise ConfigError("no extractor: choose one with extractor=<name> (conf/extractor/), or set task.model")
        spec: dict = {"name": resolve_model(t.model, "classifier", "features")}
    else:
        spec = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}  # type: ignore[union-attr]
        if not spec.get("name"):
            raise ConfigError("extractor.name is missing: a registry name or a trained classifier's model folder")
    return spec


def run(cfg: DictConfig) -> dict:
    from histolight.features import build_feature_extractor, extract_features
    from histolight.tasks.common import load_dataset
    from histolight.utils.device import resolve_device

    t = from_config(FeaturesTaskConfig, cfg.task, "task")
    spec = extractor_spec(cfg, t)
    device = resolve_device(t.device)
    ext = build_feature_extractor(**spec, device=device)  # validates name, options and weights before any work
    norm = OmegaConf.to_container(cfg.normalizer, resolve=True) if cfg.get("normalizer") is not None else None
    if norm and ext.normalizer is None:
        from histolight.norm import build_normalizer

        ext.normalizer = build_normalizer(norm)
    px, um = (ext.tile_px, ext.tile_um) if ext.tile_um is not None else (t.tile_px, t.tile_um)
    kw: dict[str, Any] = {
        "batch_size": t.batch_size,
        "num_workers": t.num_workers,
        "overwrite": t.overwrite,
        "workers": t.workers,
    }
    kw.update(shard_index=t.shard_index, num_shards=t.num_shards, prefetch=t.prefetch, device=device)
    target = ext if t.workers <= 1 else spec
    if t.source == "slides":
        extract = {"qc": t.qc, **(t.extract or {})}
        res = extract_features(target, None, t.outdir, dataset=load_dataset(cfg), tile_px=px, tile_um=um, extract=extract, **kw)
        src: Any = "slides"
    else:
        src = t.tfrecords
        if src is None:
            if px is None or um is None:
                raise ConfigError(f"task.tfrecords=null needs task.tile_px and task.tile_um for {ext.name} (the tile folder)")
            src = tile_source(cfg, t.tiles_root, px, um, f"the extractor {ext.name}")
        res = extract_features(target, src, t.outdir, **kw, verify=t.verify, on_corrupt=t.on_corrupt)
    print(f"features ({ext.name}, D={ext.num_features}) from {src}: {res.summary_line()} -> {t.outdir}")
    tiles = int(res.table["tiles"].fillna(0).sum()) if "tiles" in res.table else 0
    return {**res.metrics(), "n_tiles": tiles, "dim": ext.num_features, "random_init": ext.random_init}
