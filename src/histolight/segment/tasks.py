"""Schema of ``task=train_seg``'s ``task`` section and the W&B sweep naming it uses (the other segmentation
tasks' schemas live in their task modules)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from histolight.config.schema import check

log = logging.getLogger(__name__)


@dataclass
class TrainSegTask:
    name: str = "train_seg"
    monitor: str = "val/miou"
    monitor_mode: str = "max"
    overwrite: bool = False
    n_overlays: int = 3
    overlay_every: int = 5

    def __post_init__(self):
        check(self.monitor_mode in ("min", "max"), "monitor_mode", self.monitor_mode, "must be min or max")
        check(isinstance(self.n_overlays, int) and self.n_overlays >= 0, "n_overlays", self.n_overlays, "must be an integer >= 0")
        check(
            isinstance(self.overlay_every, int) and self.overlay_every >= 0,
            "overlay_every",
            self.overlay_every,
            "must be an integer >= 0 (0 = never)",
        )


def wandb_sweep_settings(cfg) -> dict:
    """W&B ``group``/``name`` for the runs of a Hydra multirun, so a sweep's runs sit together.

    Returns ``{}`` outside a multirun or when the user set them.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return {}
        sweep_dir = Path(str(hc.sweep.dir))
        out = {"group": f"{cfg.task.name}-{sweep_dir.parent.name}-{sweep_dir.name}"}
        name = hc.job.override_dirname
        if name:
            out["name"] = f"{hc.job.num}:{name}"
        return out
    except Exception:  # noqa: BLE001 - never fail over naming
        return {}
