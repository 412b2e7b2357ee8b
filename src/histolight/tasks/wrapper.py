"""The task wrapper: run the task, log failures, always close W&B, set the exit status, return the swept metric.

Before the task: unknown top-level keys are refused (:func:`check_top_level`). Exit status of ``python run.py``:
0 = success; 1 = bad input or config, too little memory or disk (one clear line) or a crash (traceback);
2 (:data:`histolight.cohort.EXIT_SLIDES_FAILED`) = a per-slide task finished but slides failed beyond
``task.allow_failures`` / ``task.max_failed`` (the failed slides and their reasons are in the task's summary CSV).
"""

from __future__ import annotations

import difflib
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from histolight.cohort import failure_exit_code
from histolight.config.files import repo_root
from histolight.errors import ConfigError, HistolightError
from histolight.utils.diagnose import environment_error
from histolight.utils.instantiate import finish_wandb
from histolight.utils.run_guard import RESUMABLE_TASKS
from histolight.utils.wandb import is_multirun

log = logging.getLogger("histolight")


class SlidesFailedError(HistolightError):
    """A per-slide task finished with more failed slides than its policy allows."""


def metric_value(metrics: dict | None, name: str | None) -> float | None:
    """``metrics[name]`` as a float (for sweepers); a clear error when the task did not report it."""
    if not name:
        return None
    if not metrics or name not in metrics:
        raise HistolightError(f"optimized_metric '{name}' was not reported by the task; it reported {sorted(metrics or {})}")
    v = metrics[name]
    return float(v.item() if hasattr(v, "item") else v)


def known_top_level_keys() -> list[str] | None:
    """The config groups (the folders of ``conf/``, :func:`histolight.config.files.repo_root`) and the keys of its
    ``config.yaml``; None when that folder is not found (a config composed elsewhere is not checked)."""
    try:
        conf = repo_root() / "conf"
    except ConfigError:
        return None
    keys = [str(k) for k in OmegaConf.load(conf / "config.yaml") if k != "defaults"]
    return sorted(p.name for p in conf.iterdir() if p.is_dir()) + keys


def check_top_level(cfg: DictConfig) -> None:
    """Refuse unknown top-level keys (``+bogus=1``) with a did-you-mean, and ``ckpt_path`` / ``resume`` for tasks
    that do not resume."""
    known = known_top_level_keys()
    for key in cfg if known else ():
        if key in known:
            continue
        hints = [f"'{k}'" for k in difflib.get_close_matches(str(key), known, n=2)]
        hints += [f"'{g}.{key}'" for g in known if isinstance(cfg.get(g), DictConfig) and key in cfg[g]]
        hint = f" Did you mean {' or '.join(hints)}?" if hints else ""
        raise ConfigError(f"unknown top-level key '{key}'.{hint} Known keys: {', '.join(known)}")
    name = OmegaConf.select(cfg, "task.name")
    for key in ("ckpt_path", "resume"):
        if cfg.get(key) is not None and name not in RESUMABLE_TASKS:
            raise ConfigError(f"{key}={cfg.get(key)!r} is invalid for task={name}: it applies to {' and '.join(RESUMABLE_TASKS)}")


def slide_outcome(name: str, cfg: DictConfig, metrics: dict) -> tuple[str, int]:
    """The closing line of a per-slide task (``N done, N skipped, N failed``) and its exit status."""
    n = {k: int(metrics.get(f"n_{k}", 0) or 0) for k in ("slides", "done", "skipped", "failed", "empty")}
    allow = bool(OmegaConf.select(cfg, "task.allow_failures", default=False))
    max_failed = OmegaConf.select(cfg, "task.max_failed", default=None)
    code = failure_exit_code(n["failed"], n["slides"], allow, max_failed)
    line = (
        f"task {name}: {n['slides']} slide(s): {n['done']} done, {n['skipped']} skipped, {n['failed']} failed, {n['empty']} empty"
    )
    if n["failed"]:
        line += f"; failures listed in {metrics.get('summary', 'the log above')}"
        line += (
            f"; exit status {code} (task.allow_failures=true or task.max_failed=<fraction> accepts failures)"
            if code
            else " (accepted by task.allow_failures / task.max_failed)"
        )
    return line, code


def failure_lines(summary: str | None, limit: int = 10) -> list[str]:
    """``  <slide>: <reason>`` for the failed slides of a per-slide task's summary CSV (the first ``limit``, then
    where the rest are); [] when the CSV cannot be read. Reasons are cut to their first line (tracebacks are in the
    log)."""
    import pandas as pd

    try:
        df = pd.read_csv(summary) if summary else None
    except (OSError, ValueError):
        return []
    if df is None or not {"slide", "status", "reason"} <= set(df.columns):
        return []
    bad = df[df["status"] == "failed"]
    lines = [
        f"  {r.slide}: {str(r.reason).strip().splitlines()[0] if str(r.reason).strip() else '?'}"
        for r in bad.head(limit).itertuples()
    ]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more: see {summary}")
    return lines


def execute(cfg: DictConfig) -> float | None:
    """Run ``cfg.task.name``; return ``cfg.optimized_metric`` from its result dict (None if unset).

    User errors (:class:`HistolightError`) and memory / disk-space failures (:mod:`histolight.utils.diagnose`) are
    logged as one clear line; in a single run the process exits with status 1 (2 when slides failed), in a multirun
    the exception propagates so the sweeper records it.
    """
    from histolight.tasks import get_task

    name = cfg.task.name
    t0 = time.time()
    code = 0
    try:
        check_top_level(cfg)
        fn = get_task(name)
        metrics = fn(cfg) or {}
        out = Path(OmegaConf.select(cfg, "paths.output_dir", default=".") or ".")
        finish_wandb(exit_code=0)  # W&B's run summary before our closing lines, not after them
        result = f": {metrics['result']}" if isinstance(metrics.get("result"), str) else ""
        log.info("task %s finished in %.1f s%s; outputs in %s", name, time.time() - t0, result, out)
        if "n_failed" in metrics:
            line, code = slide_outcome(name, cfg, metrics)
            (log.error if code else log.info)(line)
            for bad in failure_lines(metrics.get("summary")):
                log.error(bad)
            if code:
                if is_multirun():
                    raise SlidesFailedError(line)
                finish_wandb(exit_code=code)
                sys.exit(code)
        return metric_value(metrics, cfg.get("optimized_metric"))
    except SystemExit:
        raise
    except BaseException as e:
        code = code or 1
        why = str(e) if isinstance(e, HistolightError) else environment_error(e)
        if why is None:
            log.exception("task %s crashed", name)
            raise
        if not isinstance(e, SlidesFailedError):
            log.error("task %s failed: %s", name, why)
        if is_multirun():
            raise
        finish_wandb(exit_code=code)
        sys.exit(code)
    finally:
        finish_wandb(exit_code=code)
