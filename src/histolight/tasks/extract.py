"""``task=extract``: the cohort's slides -> one Slideflow-compatible TFRecord of tiles per slide.

    python run.py task=extract                                   # demo cohort, 256 px / 128 um, Otsu QC
    python run.py task=extract task.tile_um=10x task.qc='[otsu,blur]' task.workers=4
    python run.py -m launcher=slurm task=extract task.num_shards=8 task.shard_index='range(8)'

Options: ``conf/task/extract.yaml`` (validated by :class:`histolight.extract.ExtractConfig`). Outputs go
to ``task.outdir/<dataset.name>/<tile_px>px_<tile_um>um`` (shared between runs, so re-runs resume); the run folder
gets a copy of the summary CSV. Failed slides give exit status 2 unless ``task.allow_failures`` / ``task.max_failed``.
"""

from __future__ import annotations

import logging
import shutil

from omegaconf import DictConfig

from histolight.extract import extract_tiles, load_extract_config
from histolight.tasks.common import load_dataset, output_dir

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    ecfg = load_extract_config(cfg.task, "task")  # fails before any work
    ds = load_dataset(cfg)
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
    print(res.summary_line())
    for name, reason in res.failed.items():
        print(f"  FAILED {name}: {reason}")
    if res.report_path:
        print(f"Report: {res.report_path}")
    return res.metrics()
