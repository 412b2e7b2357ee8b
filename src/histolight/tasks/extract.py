"""``task=extract``: the cohort's slides -> one Slideflow-compatible TFRecord of tiles per slide.

    python run.py task=extract                                   # demo cohort, 256 px / 128 um, Otsu QC
    python run.py task=extract task.tile_um=10x task.qc='[otsu,blur]' task.workers=4
    python run.py -m launcher=slurm task=extract task.num_shards=8 task.shard_index='range(8)'

Options: ``conf/task/extract.yaml`` (validated by :class:`histolight.extract.ExtractConfig`). Outputs go
to ``task.outdir/<dataset.name>/<tile_px>px_<tile_um>um`` (shared between runs, so re-runs resume); the run folder
gets a copy of the summary CSV. Failed slides give exit status 2 unless ``task.allow_failures`` / ``task.max_failed``.
A folder whose slides were extracted with other settings is refused before any work (:func:`check_same_settings`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from histolight.errors import ConfigError
from histolight.extract import extract_tiles, load_extract_config
from histolight.extract.config import ExtractConfig
from histolight.extract.layout import settings_conflicts
from histolight.io.tilestore import tile_folder
from histolight.tasks.common import load_dataset, output_dir

log = logging.getLogger(__name__)


def check_same_settings(tile_dir: Path, ecfg: ExtractConfig) -> None:
    """Refuse (:class:`ConfigError`, before any work) to add tiles to a folder whose slides were extracted with other
    settings (e.g. ``task.qc=[otsu,blur]`` after ``task=extract``): one folder, one set of settings."""
    if ecfg.overwrite or ecfg.dry_run:
        return
    diff, slides = settings_conflicts(tile_dir, ecfg.settings())
    if not diff:
        return
    what = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(diff.items()))
    raise ConfigError(
        f"{tile_dir} holds {len(slides)} slide(s) extracted with other settings ({what}). One tile folder holds one "
        "set of settings: re-extract them with task.overwrite=true, or extract into another folder with "
        "dataset.name=<another name> or task.outdir=<another tiles root>"
    )


def run(cfg: DictConfig) -> dict:
    ecfg = load_extract_config(cfg.task, "task")  # fails before any work
    ds = load_dataset(cfg)
    check_same_settings(tile_folder(ecfg.outdir, ds.name, ecfg.tile_px, ecfg.tile_um), ecfg)
    log.info(
        "extracting %d slide(s) of %s: %s px covering %s -> %s",
        len(ds),
        ds,
        ecfg.tile_px,
        ecfg.tile_um if ecfg.mag is not None else f"{ecfg.tile_um} um",
        ecfg.outdir,
    )
    res = extract_tiles(ds, config=ecfg)
    out = output_dir(cfg)
    if res.summary_path and res.summary_path.is_file():
        shutil.copyfile(res.summary_path, out / res.summary_path.name)
    print(res.summary_line())  # the failed slides and their reasons: the wrapper lists them after its closing line
    if res.report_path:
        print(f"Report: {res.report_path}")
    return res.metrics()
