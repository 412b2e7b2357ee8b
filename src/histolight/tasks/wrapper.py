"""The task wrapper: run the task, log failures, always close W&B, return the swept metric."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from histolight.errors import HistolightError
from histolight.utils.instantiate import finish_wandb

log = logging.getLogger("histolight")


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def metric_value(metrics: dict | None, name: str | None) -> float | None:
    """``metrics[name]`` as a float (for sweepers); a clear error when the task did not report it."""
    if not name:
        return None
    if not metrics or name not in metrics:
        raise HistolightError(f"optimized_metric '{name}' was not reported by the task; it reported {sorted(metrics or {})}")
    v = metrics[name]
    v = float(v.item() if hasattr(v, "item") else v)
    return v


def execute(cfg: DictConfig) -> float | None:
    """Run ``cfg.task.name``; return ``cfg.optimized_metric`` from its result dict (None if unset).

    User errors (:class:`HistolightError`) are logged as one clear line; in a single run the process
    exits with status 1, in a multirun the exception propagates so the sweeper records the failure.
    """
    from histolight.tasks import get_task

    name = cfg.task.name
    t0 = time.time()
    code = 0
    try:
        fn = get_task(name)
        metrics = fn(cfg) or {}
        out = Path(OmegaConf.select(cfg, "paths.output_dir", default=".") or ".")
        log.info("task %s finished in %.1f s; outputs in %s", name, time.time() - t0, out)
        return metric_value(metrics, cfg.get("optimized_metric"))
    except HistolightError as e:
        code = 1
        log.error("task %s failed: %s", name, e)
        if _is_multirun():
            raise
        finish_wandb(exit_code=1)
        sys.exit(1)
    except BaseException:
        code = 1
        log.exception("task %s crashed", name)
        raise
    finally:
        finish_wandb(exit_code=code)


def nan_to_none(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v
