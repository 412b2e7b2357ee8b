"""``task=info``: a table of the cohort's slides (vendor, size, levels, mpp, ROIs) with errors listed."""

from __future__ import annotations

import logging

import pandas as pd
from omegaconf import DictConfig

from histolight.io.atomic import atomic_write_text
from histolight.tasks.common import load_dataset, output_dir

log = logging.getLogger(__name__)


def format_info(df: pd.DataFrame) -> str:
    """Human-readable table: readable slides first, then errors."""
    ok = df[df["error"].isna()].drop(columns=["error", "warning", "path"], errors="ignore")
    bad = df[df["error"].notna()]
    warn = df[df["error"].isna() & df["warning"].notna()]
    lines = [f"{len(df)} slide(s): {len(ok)} readable, {len(bad)} with errors", ""]
    if len(ok):
        lines.append(ok.astype(object).where(ok.notna(), "-").to_string(index=False))
    if len(warn):
        lines += ["", "Warnings:"]
        lines += [f"  {r.slide}: {r.warning}" for r in warn.itertuples()]
    if len(bad):
        lines += ["", "Errors:"]
        lines += [f"  {r.slide}: {r.error}" for r in bad.itertuples()]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    ds = load_dataset(cfg)
    df = ds.info(check_read=bool(cfg.task.get("check_read", True)))
    text = format_info(df)
    print(text)
    out = output_dir(cfg)
    atomic_write_text(out / "slides.csv", df.to_csv(index=False))
    return {"n_slides": len(df), "n_errors": int(df["error"].notna().sum())}
