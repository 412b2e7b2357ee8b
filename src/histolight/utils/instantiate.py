"""The one place where Hydra configs become objects (callbacks, loggers, trainers, models)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def instantiate(node: Any, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with histolight's conventions (None passes through)."""
    if node is None:
        return None
    from hydra.utils import instantiate as _inst

    return _inst(node, **kwargs)


def _items(group: Any):
    if not group:
        return []
    return [(k, v) for k, v in group.items() if v is not None and hasattr(v, "get") and v.get("_target_")]


def wandb_has_api_key() -> bool:
    """True when W&B can authenticate (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def instantiate_loggers(group: Any) -> list:
    """Lightning loggers from the ``logger`` group. W&B goes offline without an API key."""
    loggers = []
    for _name, node in _items(group):
        kw = {}
        if "wandb" in str(node.get("_target_", "")).lower():
            if os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_has_api_key():
                kw["offline"] = True
                os.environ.setdefault("WANDB_MODE", "offline")
                log.info("W&B: no API key found, logging offline; upload later with `wandb sync <run dir>/wandb/offline-run-*`")
            Path(node.get("save_dir") or ".").mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(node, **kw))
    from histolight.utils.logs import drop_wandb_anonymous

    drop_wandb_anonymous(loggers)
    return loggers


def instantiate_callbacks(group: Any) -> list:
    """Lightning callbacks from the ``callbacks`` group."""
    return [instantiate(node) for _, node in _items(group)]


def finish_wandb(exit_code: int = 0) -> None:
    """Close the active W&B run, if any (safe when wandb was never imported)."""
    import sys

    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
