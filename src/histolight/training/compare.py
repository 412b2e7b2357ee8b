"""Rank finished training runs by a metric of their ``metrics.json`` (e.g. the runs of one multirun).

A *run* is a folder holding ``metrics.json``; its ``.hydra/overrides.yaml`` (what differed) and
``.hydra/config.yaml`` (``optimized_metric``, ``task.name``, ``model.name``) are read when present.

>>> runs = find_runs(["multirun/2026-11-29/09-00-00"])      # a sweep folder: its numbered job folders
>>> table = compare_runs(runs)                              # ranked by the runs' optimized_metric
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from histolight.errors import ConfigError

METRICS = "metrics.json"
MODES = ("auto", "max", "min")


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Run folders under ``paths`` (folders or globs): a folder with ``metrics.json`` is a run, else every folder
    below it (any depth) that has one. Sorted, without duplicates; none found is a :class:`ConfigError`."""
    found: set[Path] = set()
    for p in paths:
        matches = sorted(glob.glob(str(p))) or [str(p)]
        for m in map(Path, matches):
            if (m / METRICS).is_file():
                found.add(m)
            elif m.is_dir():
                found.update(f.parent for f in m.rglob(METRICS) if ".hydra" not in f.parts)
    if not found:
        raise ConfigError(f"task.runs={[str(p) for p in paths]} holds no run folder (no {METRICS} found under them)")
    return sorted(found)


def _yaml(path: Path):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def run_record(run: Path) -> dict:
    """One row: ``run``, ``task``, ``model``, ``overrides`` and every scalar of the run's ``metrics.json``."""
    from omegaconf import OmegaConf

    metrics = json.loads((run / METRICS).read_text())
    cfg, over = _yaml(run / ".hydra" / "config.yaml"), _yaml(run / ".hydra" / "overrides.yaml")
    row = {
        "run": str(run),
        "task": OmegaConf.select(cfg, "task.name") if cfg is not None else None,
        "model": OmegaConf.select(cfg, "model.name") if cfg is not None else None,
        "optimized_metric": OmegaConf.select(cfg, "optimized_metric") if cfg is not None else None,
        "overrides": " ".join(str(o) for o in over) if over is not None else "",
    }
    row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None})
    return row


def compare_runs(runs: Sequence[str | os.PathLike], metric: str | None = None, mode: str = "auto") -> pd.DataFrame:
    """The runs ranked by ``metric`` (None: the runs' ``optimized_metric``, which must agree), best first.

    ``mode``: max, min, or auto (min for a metric whose name contains ``loss``, else max). Runs without the metric
    come last (rank empty). Columns: ``rank``, the metric, its ``_sd`` companion for a ``_mean`` metric, ``run``,
    ``task``, ``model``, ``overrides`` and the other metrics."""
    if mode not in MODES:
        raise ConfigError(f"task.mode={mode!r} is invalid: must be one of {list(MODES)}")
    df = pd.DataFrame([run_record(Path(r)) for r in runs])
    if metric is None:
        named = sorted({m for m in df["optimized_metric"].dropna()})
        if len(named) != 1:
            raise ConfigError(
                f"task.metric=null needs the runs to share one optimized_metric; they have {named or 'none'}: "
                "set task.metric (a key of their metrics.json)"
            )
        metric = named[0]
    if metric not in df.columns:
        keys = sorted(c for c in df.columns if "/" in c)
        raise ConfigError(f"task.metric='{metric}' is in no run's {METRICS} (keys: {keys})")
    desc = mode == "max" or (mode == "auto" and "loss" not in metric)
    df = df.sort_values(metric, ascending=not desc, na_position="last", kind="stable").reset_index(drop=True)
    ranks = [i + 1 if not math.isnan(v) else None for i, v in enumerate(df[metric].astype(float))]
    df.insert(0, "rank", pd.array(ranks, dtype="Int64"))
    sd = metric[: -len("_mean")] + "_sd" if metric.endswith("_mean") else None
    first = ["rank", metric] + ([sd] if sd in df.columns else []) + ["run", "task", "model", "overrides"]
    return df[first + [c for c in df.columns if c not in first and c != "optimized_metric"]]


def markdown(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` of ``df`` (floats to 3 decimals, missing values as ``-``)."""
    cols = [c for c in columns if c in df.columns]

    def cell(v) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


__all__ = ["METRICS", "MODES", "find_runs", "run_record", "compare_runs", "markdown"]
