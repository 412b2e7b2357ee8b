"""Tasks: ``python run.py task=<name>`` looks the name up in :data:`TASKS` and calls ``run(cfg) -> dict``.

Each entry is ``"module:function"``, imported only when that task runs (so ``task=info`` does not
import torch). Every task is a thin layer over the importable Python API.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from histolight.errors import ConfigError

TASKS: dict[str, str] = {
    "info": "histolight.tasks.info:run",
    "demo_data": "histolight.tasks.demo_data:run",
    "extract": "histolight.tasks.extract:run",
    "features": "histolight.tasks.features:run",
    "train_tiles": "histolight.tasks.train_tiles:run",
    "predict": "histolight.tasks.predict:run",
    "export_masks": "histolight.tasks.export_masks:run",
    "train_seg": "histolight.tasks.train_seg:run",
    "segment": "histolight.tasks.segment:run",
    "generate_rois": "histolight.tasks.generate_rois:run",
    "train_mil": "histolight.tasks.train_mil:run",
    "predict_mil": "histolight.tasks.predict_mil:run",
    "compare": "histolight.tasks.compare:run",
    "report": "histolight.tasks.report:run",
}


def get_task(name: str) -> Callable:
    """The task function registered as ``name``; a clear error lists the known tasks."""
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown task '{name}'.{hint} Known tasks: {', '.join(sorted(TASKS))}")
    module, fn = TASKS[name].split(":")
    return getattr(importlib.import_module(module), fn)


from histolight.tasks.wrapper import execute  # noqa: E402

__all__ = ["TASKS", "get_task", "execute"]
