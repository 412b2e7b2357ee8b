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

from typing import Any

from omegaconf import DictConfig, OmegaConf

from histolight.config.schema import from_config
from histolight.errors import ConfigError
from histolight.features.config import FeaturesTaskConfig
from histolight.tasks.common import resolve_model, tile_source


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
