"""Task options every training task shares: which logged metric picks the checkpoint, which checkpoint is
exported, and whether an existing model folder may be replaced. Mistakes fail at startup naming the key."""

from __future__ import annotations

from dataclasses import dataclass

from histolight.config.schema import check


@dataclass
class CheckpointOptions:
    """``task.monitor`` (a logged metric, e.g. ``val/loss``), ``task.monitor_mode`` (``min``/``max``), ``task.ckpt``
    (``best``/``last``: the checkpoint evaluated and exported), ``task.overwrite`` (replace existing model folders
    and checkpoints). Subclasses set their own defaults."""

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    ckpt: str = "best"
    overwrite: bool = False

    def __post_init__(self):
        ok = isinstance(self.monitor, str) and "/" in self.monitor
        check(ok, "monitor", self.monitor, "must be a logged metric such as val/loss or val/bal_acc")
        check(self.monitor_mode in ("min", "max"), "monitor_mode", self.monitor_mode, "must be 'min' or 'max'")
        check(
            self.ckpt in ("best", "last"), "ckpt", self.ckpt, "must be 'best' or 'last' (the checkpoint evaluated and exported)"
        )
        check(isinstance(self.overwrite, bool), "overwrite", self.overwrite, "must be true or false")


__all__ = ["CheckpointOptions"]
