"""A Hydra callback that keeps a run from landing on an earlier run's folder (``hydra.run.dir=<old run>``).

Hydra writes ``<run>/.hydra/*.yaml`` before the task starts, so the check runs in ``on_run_start`` /
``on_multirun_start``, before anything is written. A folder that holds outputs (anything but ``.hydra/`` and
``*.log`` files) is refused with one line on stderr and exit status 1, unless:

- the earlier run was the same task and this one resumes it (``resume=auto``, or ``ckpt_path`` inside that
  folder: the training tasks of :data:`RESUMABLE_TASKS`);
- the earlier run was the same per-slide task (its config has ``allow_failures``): a per-slide task continues its
  own folder, skipping finished slides;
- ``task.overwrite=true``: replace it.

When a run is let into an earlier run's folder, that run's ``.hydra/*.yaml`` move to
``.hydra/previous-<time>/`` first, so no run's config is lost.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

#: training tasks that continue from a checkpoint (``ckpt_path`` / ``resume=auto``)
RESUMABLE_TASKS = ("train_seg", "train_tiles", "train_mil")
#: environment variables that carry a process's rank in a distributed run (Lightning, torchrun, SLURM)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
#: what a run folder may hold and still count as empty (a run that stopped at startup leaves these)
HARMLESS = (".hydra",)


def outputs_in(folder: Path) -> list[str]:
    """Names of the entries of ``folder`` that are a run's outputs (not ``.hydra/`` or ``*.log``)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in HARMLESS and p.suffix != ".log")


def previous_task(folder: Path) -> str | None:
    """``task.name`` of the run (``.hydra/config.yaml``) or sweep (``multirun.yaml``) recorded in ``folder``
    (None: no readable record)."""
    for record in (folder / ".hydra" / "config.yaml", folder / "multirun.yaml"):
        try:
            name = OmegaConf.select(OmegaConf.load(record), "task.name")
        except (OSError, ValueError):
            continue
        return None if name is None else str(name)
    return None


def refusal(cfg: DictConfig, folder: Path, key: str) -> str | None:
    """Why a run of ``cfg`` must not start in ``folder`` (the value of ``key``), or None when it may."""
    found = outputs_in(folder)
    if not found:
        return None
    if OmegaConf.select(cfg, "task.overwrite", default=False) is True:
        return None
    task, before = OmegaConf.select(cfg, "task.name"), previous_task(folder)
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None)
    resuming = OmegaConf.select(cfg, "resume", default=None) == "auto" or (
        ckpt and Path(str(ckpt)).resolve().is_relative_to(folder.resolve())
    )
    per_slide = OmegaConf.select(cfg, "task.allow_failures", default=None) is not None
    if before == task and (resuming or per_slide):
        return None
    what = f"a task={before} run" if before else "files that are not a histolight run"
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    cont = "continue it with resume=auto, " if before == task and task in RESUMABLE_TASKS else ""
    return (
        f"{key}='{folder}' is invalid: it already holds {what} ({shown}); choose a new folder (leave {key} unset "
        f"for a fresh timestamped one), {cont}or replace it with task.overwrite=true"
    )


def keep_previous_config(folder: Path) -> None:
    """Move ``folder/.hydra/*.yaml`` of an earlier run to ``folder/.hydra/previous-<time>/``."""
    files = sorted((folder / ".hydra").glob("*.yaml"))
    if not files:
        return
    dest = folder / ".hydra" / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        p.replace(dest / p.name)


def guard(cfg: DictConfig, key: str) -> None:
    """Refuse (stderr line, exit status 1) or admit a run whose output folder is ``cfg.<key>``.

    Only the first process checks: the other ranks of a distributed run (started by Lightning or SLURM into the
    folder rank 0 already uses) pass."""
    if any(os.environ.get(v, "0") not in ("", "0") for v in RANK_VARIABLES):
        return
    folder = Path(str(OmegaConf.select(cfg, key)))
    why = refusal(cfg, folder, key)
    if why:
        print(f"Error: {why}", file=sys.stderr)
        sys.exit(1)  # SystemExit: Hydra turns callback exceptions into warnings
    if outputs_in(folder):
        keep_previous_config(folder)


class RunDirGuard(Callback):
    """Hydra callback (``conf/hydra/default.yaml``: ``hydra.callbacks.run_dir_guard``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        guard(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        guard(config, "hydra.sweep.dir")


__all__ = ["RESUMABLE_TASKS", "RunDirGuard", "outputs_in", "previous_task", "refusal", "keep_previous_config", "guard"]
