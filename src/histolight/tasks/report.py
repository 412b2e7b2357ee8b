"""``task=report``: a report on any folder of TFRecords (histolight's or Slideflow's), as HTML and optionally PDF.

    python run.py task=report task.tfrecords=/data/tfrecords/256px_128um [task.pdf=true]
    python run.py task=report                                       # the tiles of task=extract (256px_128um)
    python run.py task=report task.tile_px=128 task.tile_um=64      # those of task=extract task.tile_px=128 ...

Writes ``tfrecord_report.html`` / ``.csv`` / ``.pdf`` into ``task.outdir`` (:mod:`histolight.extract.tfreport`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histolight.cohort import PerSlideOptions
from histolight.config import from_config
from histolight.config.schema import check, is_pos_int
from histolight.errors import ConfigError
from histolight.tasks.common import dataset_config, output_dir


@dataclass
class ReportTask(PerSlideOptions):
    """``conf/task/report.yaml``."""

    name: str = "report"
    tfrecords: Any = None
    tiles_root: str | None = None
    tile_px: int | None = None
    tile_um: Any = None
    outdir: str | None = None
    samples: int = 12
    verify: bool = True
    pdf: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(self.tfrecords not in ("", []), "tfrecords", self.tfrecords, "null, a folder, a glob or a list of files")
        check(is_pos_int(self.samples), "samples", self.samples, "must be an integer >= 1 (tiles shown per slide)")
        for key in ("verify", "pdf"):
            check(isinstance(getattr(self, key), bool), key, getattr(self, key), "must be true or false")


def run(cfg: DictConfig) -> dict:
    from histolight.extract.tfreport import tfrecord_report
    from histolight.io.tilestore import tile_folder

    t = from_config(ReportTask, cfg.task, "task")
    src = t.tfrecords
    if src is None:
        if t.tile_px is None or t.tile_um is None or not t.tiles_root:
            raise ConfigError("task.tfrecords=null needs task.tile_px and task.tile_um (the tile folder of task=extract)")
        src = tile_folder(t.tiles_root, dataset_config(cfg).name, t.tile_px, t.tile_um)
    dest = t.outdir or output_dir(cfg)
    rep = tfrecord_report(src, dest, samples=t.samples, verify=t.verify, pdf=t.pdf, workers=t.workers)
    print(f"report: {rep.html}" + (f"\nPDF: {rep.pdf}" if rep.pdf else ""))
    n_tiles = int(rep.result.table["n_tiles"].fillna(0).sum()) if "n_tiles" in rep.result.table else 0
    return {**rep.result.metrics(), "n_tiles": n_tiles, "report": str(rep.html), "pdf": str(rep.pdf) if rep.pdf else None}
