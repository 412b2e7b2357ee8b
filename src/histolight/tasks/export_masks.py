"""``task=export_masks``: thumbnails + ROI masks for segmentation (``histolight.segment.export_thumbs_and_masks``).

    python run.py task=export_masks data=seg data.mode=multiclass data.mpp=4

Writes ``<slide>.npz`` + ``<slide>.json`` per slide (format: :mod:`histolight.segment.data`) into
``task.dest`` or, by default, ``<data.cache_dir>/mpp<mpp>_<mode>_<hash of labels>``: the folder
``task=train_seg`` reads, so training reuses the export. Up-to-date exports are kept unless
``task.overwrite=true``; failing slides are logged and listed in ``export_report.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from histolight.config import from_config
from histolight.errors import ConfigError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    from histolight.segment.config import config_from_hydra
    from histolight.segment.tasks import ExportMasksTask

    task = from_config(ExportMasksTask, cfg.task, "task")
    scfg = config_from_hydra(cfg, need_model=False)
    import pandas as pd

    from histolight.io.atomic import atomic_write_text
    from histolight.segment.data import export_key, export_thumbs_and_masks
    from histolight.segment.tasks import select_slides
    from histolight.tasks.common import load_dataset, output_dir

    ds = load_dataset(cfg)
    names = select_slides(ds, task.slides, None)
    if task.dest:
        dest = Path(task.dest)
    else:
        cache = cfg.data.get("cache_dir")
        if not cache:
            raise ConfigError("task.dest is null and data.cache_dir is unset: give one of them")
        dest = Path(cache) / export_key(scfg.mpp, scfg.mode, scfg.labels)
    paths = export_thumbs_and_masks(
        ds, scfg.mpp, dest, labels=scfg.labels, mode=scfg.mode, overwrite=task.overwrite, slides=names
    )
    rows = [{"slide": n, "status": "ok" if n in paths else "failed", "file": str(paths.get(n, ""))} for n in names]
    atomic_write_text(output_dir(cfg) / "export_report.csv", pd.DataFrame(rows).to_csv(index=False))
    print(f"Exported {len(paths)}/{len(names)} slides ({scfg.mode}, labels {scfg.labels}, {scfg.mpp:g} um/px) to {dest}")
    return {"n_slides": len(names), "n_exported": len(paths), "n_failed": len(names) - len(paths), "dest": str(dest)}
