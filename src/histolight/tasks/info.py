"""``task=info``: a table of the cohort's slides (vendor, size, levels, mpp, ROIs), unreadable ones as failures.

    python run.py task=info [dataset=shared] [task.workers=4]

One row per slide in ``<run>/slides.csv`` (``slide, status, reason, seconds`` + :data:`histolight.dataset.INFO_COLUMNS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from omegaconf import DictConfig

from histolight.cohort import PerSlideOptions
from histolight.config import from_config
from histolight.config.schema import check
from histolight.tasks.common import load_dataset, output_dir


@dataclass
class InfoTask(PerSlideOptions):
    """``conf/task/info.yaml``."""

    name: str = "info"
    check_read: bool = True

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.check_read, bool), "check_read", self.check_read, "must be true or false")


def format_info(df: pd.DataFrame) -> str:
    """Human-readable table of :meth:`~histolight.dataset.Dataset.info`: every slide that could be described (size,
    mpp, ...; a slide that failed only on its ROI file too, with its ``status``), then warnings and failures."""
    failed = df["status"] == "failed"
    described = df["width"].notna()
    drop = ["reason", "seconds", "warning", "path", "roi_file"] + ([] if (failed & described).any() else ["status"])
    ok = df[described].drop(columns=drop, errors="ignore")
    warn = df[~failed & df["warning"].notna()]
    lines = [f"{len(df)} slide(s): {int((described & ~failed).sum())} readable, {int(failed.sum())} failed", ""]
    if len(ok):
        lines.append(ok.astype(object).where(ok.notna(), "-").to_string(index=False))
    if len(warn):
        lines += ["", "Warnings:", *(f"  {r.slide}: {r.warning}" for r in warn.itertuples())]
    if failed.any():
        lines += ["", "Failed:", *(f"  {r.slide}: {r.reason}" for r in df[failed].itertuples())]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    t = from_config(InfoTask, cfg.task, "task")
    res = load_dataset(cfg).info(check_read=t.check_read, workers=t.workers, report_dir=output_dir(cfg))
    print(format_info(res.table))
    return {**res.metrics(), "n_warnings": int(res.table["warning"].notna().sum())}
