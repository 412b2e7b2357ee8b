"""W&B naming for Hydra multiruns, shared by every training task: the runs of one sweep share a W&B ``group``
(``<task>-<date>-<time>`` of the sweep folder) and are named ``<job number>:<overrides>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_multirun() -> bool:
    """True inside a Hydra multirun (``-m`` or a sweeper)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra or an older Hydra: not a multirun
        return False


def wandb_sweep_settings(cfg: Any) -> dict:
    """W&B ``group``/``name`` for the runs of a Hydra multirun, so a sweep's runs sit together.

    Returns ``{}`` outside a multirun.
    """
    if not is_multirun():
        return {}
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        sweep_dir = Path(str(hc.sweep.dir))
        out = {"group": f"{cfg.task.name}-{sweep_dir.parent.name}-{sweep_dir.name}"}
        name = hc.job.override_dirname
        if name:
            out["name"] = f"{hc.job.num}:{name}"
        return out
    except Exception:  # noqa: BLE001 - never fail a run over naming
        return {}


def with_sweep_settings(logger_cfg: Any, cfg: Any) -> Any:
    """``logger_cfg`` (the ``logger`` group) with the W&B logger's ``group``/``name`` set from
    :func:`wandb_sweep_settings` where the user left them null; unchanged without a W&B logger or a multirun."""
    if logger_cfg is None or logger_cfg.get("wandb") is None:
        return logger_cfg
    sweep = wandb_sweep_settings(cfg)
    if not sweep:
        return logger_cfg
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(logger_cfg, resolve=True))
    for k, v in sweep.items():
        if out.wandb.get(k) is None:
            out.wandb[k] = v
    return out


__all__ = ["is_multirun", "wandb_sweep_settings", "with_sweep_settings"]
