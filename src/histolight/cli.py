"""The ``histolight`` command: the same as ``python run.py``, installed by ``pip install -e .``.

    histolight task=<name> [experiment=<name>] [key=value ...]
    .venv/bin/histolight experiment=seg_multiclass          # works without activating the venv

The Hydra configs are a checkout's ``conf/`` folder: ``$HISTOLIGHT_ROOT/conf`` when that variable is set (run.py sets
it to its own folder), else the ``conf/`` beside the ``src/`` folder this package is installed from (an editable
install). Before Hydra composes the config, :func:`install_override_hints` makes a misspelled key
(``task.tile_pxx=3``) fail with our did-you-mean instead of Hydra's advice to append it with ``+``.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

from histolight.config.files import repo_root
from histolight.errors import ConfigError


def _keys(node: Any) -> list[str]:
    from omegaconf import DictConfig

    return [str(k) for k in node.keys() if k != "hydra"] if isinstance(node, DictConfig) else []


def unknown_key_message(key: str, input_line: str, cfg: Any) -> str:
    """The message for the plain override ``input_line`` of ``key``, a key that is not in ``cfg``: the deepest
    existing section, a did-you-mean from its keys (or the keys it has) and, in a nested free-form dict only
    (``model.model_kwargs.x``), ``+`` as the way to add a new key on purpose."""
    from omegaconf import DictConfig, OmegaConf

    parts = key.split(".")
    depth = 0
    while depth < len(parts) - 1 and isinstance(OmegaConf.select(cfg, ".".join(parts[: depth + 1]), default=None), DictConfig):
        depth += 1
    parent = ".".join(parts[:depth])
    known = _keys(OmegaConf.select(cfg, parent) if parent else cfg)
    close = difflib.get_close_matches(parts[depth], known, n=1)
    where = f"'{parent}'" if parent else "the config"
    if close:
        fixed = ".".join([*parts[:depth], close[0], *parts[depth + 1 :]])
        return f"unknown key '{key}': did you mean '{fixed}'? ({where} has no '{parts[depth]}')"
    listed = ", ".join(known[:40]) + (" ..." if len(known) > 40 else "")
    msg = f"unknown key '{key}': {where} has no '{parts[depth]}'; its keys: {listed}"
    # sections and groups are validated (unknown keys are errors); only a free-form nested dict takes new keys
    return msg + (f". To add a new key to it on purpose, prefix it with '+': +{input_line}" if depth >= 2 else "")


def install_override_hints() -> None:
    """Make Hydra report a command-line key that is not in the config with :func:`unknown_key_message`.

    Wraps Hydra's override step (``ConfigLoaderImpl._apply_overrides_to_config``, hydra-core 1.3) so that only the
    failure of a plain ``key=value`` override on an unknown key gets the new message; every other override and error
    is Hydra's own. Idempotent.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    original = ConfigLoaderImpl._apply_overrides_to_config
    if getattr(original, "histolight_hints", False):
        return

    def apply(overrides: list, cfg: Any) -> None:
        for override in overrides:
            try:
                original([override], cfg)
            except ConfigCompositionException as e:
                plain = not (override.is_add() or override.is_force_add() or override.is_delete())
                if not (plain and isinstance(e.__cause__, (ConfigAttributeError, ConfigKeyError))):
                    raise
                msg = unknown_key_message(override.key_or_group, override.input_line, cfg)
                raise ConfigCompositionException(msg) from None

    apply.histolight_hints = True  # type: ignore[attr-defined]
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply)  # type: ignore[method-assign]


def run(cfg: Any) -> float | None:
    """The Hydra task function: :func:`histolight.tasks.execute` (module level, so launchers can pickle it)."""
    from histolight.tasks import execute

    return execute(cfg)


def main() -> None:
    """Entry point of ``histolight`` and ``run.py``: compose ``<repo>/conf/config.yaml`` with the command line and run
    the task (exit status: see :mod:`histolight.tasks.wrapper`)."""
    try:
        root = repo_root()
    except ConfigError as e:
        sys.exit(f"histolight: {e}")
    os.environ["HISTOLIGHT_ROOT"] = str(root)
    import hydra

    install_override_hints()
    hydra.main(config_path=str(root / "conf"), config_name="config", version_base="1.3")(run)()
