"""Where the Hydra configs live: a checkout's ``conf/`` folder (``conf/config.yaml`` + one folder per group)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from histolight.errors import ConfigError


def repo_root() -> Path:
    """The checkout whose ``conf/`` is composed: ``$HISTOLIGHT_ROOT`` if set (run.py sets it to its folder), else the
    folder above ``src/histolight`` (a checkout, or an editable install of one). A :class:`ConfigError` says what to
    set when neither holds ``conf/config.yaml``."""
    env = os.environ.get("HISTOLIGHT_ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "conf" / "config.yaml").is_file():
            raise ConfigError(f"HISTOLIGHT_ROOT={env!r} is invalid: it has no conf/config.yaml (set it to a histolight checkout)")
        return root
    root = Path(__file__).resolve().parents[3]
    if not (root / "conf" / "config.yaml").is_file():
        raise ConfigError(
            f"no histolight configs (conf/config.yaml) in {root}: install from a checkout with `pip install -e <checkout>`, "
            "or set HISTOLIGHT_ROOT=<checkout>"
        )
    return root


def group_option(group: str, option: str) -> Any:
    """The (unresolved) DictConfig of ``conf/<group>/<option>.yaml``, e.g. ``group_option("data", "seg")``: the
    defaults a task falls back to when the user chose no option of a group it needs."""
    from omegaconf import OmegaConf

    p = repo_root() / "conf" / group / f"{option}.yaml"
    if not p.is_file():
        raise ConfigError(f"{group}={option} is invalid: {p} does not exist")
    return OmegaConf.load(p)
