"""Quiet third-party console output during training: each Lightning line once, no adverts, no warnings about the
libraries' own internals.

- Lightning puts its own console handlers on the ``lightning`` / ``lightning.pytorch`` / ``lightning.fabric``
  loggers (``INFO: GPU available ...``) and lets the records propagate too, so under Hydra (whose root logger writes
  the console and ``run.log``) every line appears twice. Where the root logger has handlers, Lightning's are
  removed and its records go through the root logger once (console and log file).
- Lightning's "💡 Tip: ... try installing litlogger / litmodels" adverts are dropped.
- Warnings that a user cannot act on are ignored: deprecations raised inside Lightning by newer torch versions
  (``isinstance(treespec, LeafSpec)``) and "the ``srun`` command is available but not used" outside SLURM jobs.
"""

from __future__ import annotations

import logging
import warnings

#: loggers that Lightning gives console handlers of their own
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
#: loggers through which Lightning's rank-zero messages (and its adverts) are emitted
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: regular expressions of warning messages to ignore (matched from the start of the message)
IGNORED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"The `srun` command is available on your system but is not used",
)


class _DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip:" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\N{ELECTRIC LIGHT BULB} Tip:" not in str(record.msg)


def quiet_lightning() -> None:
    """Apply the rules above (idempotent); call before building a ``Trainer``."""
    import lightning.pytorch  # noqa: F401 - its import adds the handlers removed here

    root_has_handlers = logging.getLogger().hasHandlers()
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        if root_has_handlers:
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:  # Lightning's own console handlers, not file or user handlers
                    lg.removeHandler(h)
            lg.propagate = True
    for name in RANK_ZERO_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in lg.filters):
            lg.addFilter(_DropAdverts())
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def drop_wandb_anonymous(loggers: list) -> None:
    """Lightning's ``WandbLogger`` always passes ``anonymous=None`` to ``wandb.init``, which recent wandb versions
    answer with "The anonymous setting has no effect" on every run: leave the unset value out."""
    for lg in loggers:
        init = getattr(lg, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
