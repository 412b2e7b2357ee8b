"""``task=compare``: rank finished runs (e.g. the jobs of one multirun) by a metric of their ``metrics.json``.

    python run.py task=compare task.runs=multirun/<date>/<time>                 # by the runs' optimized_metric
    python run.py task=compare 'task.runs=[outputs/a,outputs/b]' task.metric=val/auroc_mean

Writes ``comparison.csv`` (every run, best first, with its overrides and metrics) and ``comparison.md`` (a Markdown
table of the main columns) to the run folder (:mod:`histolight.training.compare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histolight.config.schema import check, from_config
from histolight.tasks.common import opt_list


@dataclass
class CompareTask:
    """``conf/task/compare.yaml``."""

    name: str = "compare"
    runs: Any = None
    metric: str | None = None
    mode: str = "auto"
    columns: Any = None

    def __post_init__(self):
        from histolight.training.compare import MODES

        self.runs = opt_list("runs", self.runs)
        check(bool(self.runs), "runs", self.runs, "a run or sweep folder (or a list / glob of them)")
        check(self.metric is None or (isinstance(self.metric, str) and self.metric != ""), "metric", self.metric, "null or a key")
        check(self.mode in MODES, "mode", self.mode, f"must be one of {list(MODES)}")
        self.columns = opt_list("columns", self.columns)


def run(cfg: DictConfig) -> dict:
    from histolight.io.atomic import atomic_write_text
    from histolight.tasks.common import output_dir
    from histolight.training.compare import compare_runs, find_runs, markdown

    t = from_config(CompareTask, cfg.task, "task")
    table = compare_runs(find_runs(t.runs), t.metric, t.mode)
    metric = table.columns[1]
    columns = ["rank", "model", "overrides", *table.columns[1:3], *(t.columns or [])]
    out = output_dir(cfg)
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    text = markdown(table, list(dict.fromkeys(columns)))
    atomic_write_text(out / "comparison.md", text + "\n")
    print(f"compare: {len(table)} run(s) ranked by {metric}\n{text}")
    best = table.iloc[0]
    return {"n_runs": len(table), "metric": metric, "best_run": best["run"], "best_value": best[metric]}
