"""Optimizers and LR schedulers from Hydra ``_partial_`` configs, the same way for every model.

``model`` configs (conf/model/*.yaml) hold::

    optimizer: {_target_: torch.optim.AdamW, _partial_: true, lr: 1e-3, weight_decay: 1e-4}
    scheduler: {_target_: torch.optim.lr_scheduler.CosineAnnealingLR, _partial_: true}   # or null
    scheduler_interval: epoch        # epoch | step: when the scheduler steps
    warmup_epochs: 0                 # linear warmup from 0.1 x lr over this many epochs, then the scheduler

Arguments that depend on the run are filled in when the config leaves them out: ``T_max`` of
``CosineAnnealingLR`` (the epochs, or optimizer steps with interval=step, left after the warmup),
``total_steps`` and ``max_lr`` of ``OneCycleLR``. ``ReduceLROnPlateau`` monitors ``val/loss``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from histolight.config.schema import check

INTERVALS = ("epoch", "step")
#: optimizer/scheduler packages whose targets are imported (and type-checked) at validation time
CHECKED_PACKAGES = ("torch.optim.", "timm.optim.", "timm.scheduler.")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
PLATEAU_MONITOR = "val/loss"
WARMUP_START = 0.1


def check_partial(key: str, v: Any, optional: bool = False, base: type | None = None) -> dict | None:
    """A validated ``_partial_`` node (plain dict) or None; ``ValueError`` naming ``key``, the value and the form.

    A ``_target_`` under :data:`CHECKED_PACKAGES` must import (and subclass ``base`` when given); any other target
    is only checked for its form here and imported when the optimizer is built, so validating a config read
    from someone's model folder never imports a module it names. An ``lr`` must be a positive number.
    """
    if v is None and optional:
        return None
    form = (
        "must be a Hydra node with _target_ and _partial_: true (e.g. {_target_: torch.optim.AdamW, _partial_: true, lr: 1e-3})"
    )
    check(isinstance(v, Mapping) and "_target_" in v and v.get("_partial_") is True, key, v, form)
    target = str(v["_target_"])
    check(_DOTTED.match(target) is not None, f"{key}._target_", target, "must be a dotted class path such as torch.optim.AdamW")
    if target.startswith(CHECKED_PACKAGES):
        from hydra.utils import get_class

        try:
            cls = get_class(target)
        except Exception:  # noqa: BLE001 - hydra raises ImportError / ValueError / InstantiationException by version
            check(False, f"{key}._target_", target, "cannot be imported (e.g. torch.optim.AdamW, torch.optim.SGD)")
        if base is not None:
            check(isinstance(cls, type) and issubclass(cls, base), f"{key}._target_", target, f"must be a {base.__name__} class")
    if "lr" in v:
        lr = v["lr"]
        check(
            isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < 10,
            f"{key}.lr",
            lr,
            "must be a positive learning rate (e.g. 1e-3)",
        )
    return dict(v)


def check_optim(optimizer: Any, scheduler: Any, interval: Any, warmup: Any, prefix: str = "") -> tuple[dict, dict | None]:
    """Validate the four optimisation keys of a model config (``prefix`` e.g. ``''`` or ``'model.'``)."""
    opt = check_partial(f"{prefix}optimizer", optimizer, base=torch.optim.Optimizer)
    sched = check_partial(f"{prefix}scheduler", scheduler, optional=True)
    check(interval in INTERVALS, f"{prefix}scheduler_interval", interval, f"must be one of {list(INTERVALS)}")
    check(
        isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0,
        f"{prefix}warmup_epochs",
        warmup,
        "must be an integer >= 0",
    )
    plateau = sched is not None and str(sched["_target_"]).endswith("ReduceLROnPlateau")
    check(
        not (plateau and warmup > 0),
        f"{prefix}warmup_epochs",
        warmup,
        "must be 0 with ReduceLROnPlateau (it cannot follow a warmup)",
    )
    return opt, sched


def as_factory(node: Any) -> Callable | None:
    """A callable from a ``_partial_`` node (dict / DictConfig), a ``functools.partial``/callable, or None."""
    if node is None or callable(node):
        return node
    from histolight.utils.instantiate import instantiate

    return instantiate(node)


def _fill(
    factory: Callable,
    optimizer: torch.optim.Optimizer,
    max_epochs: int,
    total_steps: Callable[[], int],
    warmup: int,
    interval: str,
) -> Callable:
    """``factory`` with run-dependent arguments it does not set (see the module docstring)."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    given = set(factory.keywords) if isinstance(factory, functools.partial) else set()
    kw: dict = {}
    if target is torch.optim.lr_scheduler.CosineAnnealingLR and "T_max" not in given:
        span = total_steps() if interval == "step" else max_epochs
        kw["T_max"] = max(1, span - warmup)
    if target is torch.optim.lr_scheduler.OneCycleLR:
        if "total_steps" not in given and "epochs" not in given:
            kw["total_steps"] = max(1, total_steps())
        if "max_lr" not in given:
            kw["max_lr"] = [g["lr"] for g in optimizer.param_groups]
    return functools.partial(factory, **kw) if kw else factory


def configure_optimizers(
    params: Any,
    optimizer: Any,
    scheduler: Any = None,
    *,
    interval: str = "epoch",
    warmup_epochs: int = 0,
    trainer: Any = None,
    max_epochs: int = 1,
) -> Any:
    """What ``LightningModule.configure_optimizers`` returns, for any model.

    Args:
        params: the parameters to optimise (frozen ones already filtered out).
        optimizer, scheduler: ``_partial_`` nodes or callables (``optimizer(params)``, ``scheduler(optimizer)``);
            no optimizer = ``AdamW(lr=1e-3)``.
        interval: ``epoch`` or ``step`` (scheduler and warmup unit).
        warmup_epochs: linear warmup from ``0.1 x lr`` over this many epochs (0 = none), before the scheduler
            (stepped per optimizer step with ``interval='step'``).
        trainer: the Lightning trainer (for ``max_epochs`` and the number of optimizer steps), or None.
        max_epochs: used when there is no trainer (or it has no epoch limit).
    """
    opt_f = as_factory(optimizer) or functools.partial(torch.optim.AdamW, lr=1e-3)
    opt = opt_f(params)
    sched_f = as_factory(scheduler)
    if sched_f is None and warmup_epochs <= 0:
        return opt
    epochs = int(trainer.max_epochs) if trainer is not None and (trainer.max_epochs or -1) > 0 else int(max_epochs)

    def steps() -> int:  # asked only when needed: it makes Lightning set up the training data early
        return int(trainer.estimated_stepping_batches) if trainer is not None else epochs

    warm_n = warmup_epochs if interval == "epoch" or not warmup_epochs else warmup_epochs * max(1, steps() // max(1, epochs))
    conf: dict = {"interval": interval}
    main = None
    if sched_f is not None:
        main = _fill(sched_f, opt, epochs, steps, warm_n, interval)(opt)
        if isinstance(main, torch.optim.lr_scheduler.ReduceLROnPlateau):
            conf["monitor"] = PLATEAU_MONITOR
    if warm_n > 0:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=WARMUP_START, total_iters=warm_n)
        main = warm if main is None else torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[warm_n])
    conf["scheduler"] = main
    return {"optimizer": opt, "lr_scheduler": conf}


def legacy_optim(
    optimizer: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    scheduler: str = "cosine",
    scheduler_kwargs: Mapping | None = None,
) -> tuple[dict, dict | None, str]:
    """``(optimizer, scheduler, interval)`` ``_partial_`` nodes equivalent to the old string options of
    segmentation configs (``optimizer: adamw``, ``lr``, ``weight_decay``, ``scheduler: cosine``, ``scheduler_kwargs``),
    so model folders and configs written before the switch keep loading."""
    names = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
    check(optimizer in names, "optimizer", optimizer, f"must be one of {list(names)} (old string form)")
    opt: dict = {"_target_": f"torch.optim.{names[optimizer]}", "_partial_": True, "lr": lr, "weight_decay": weight_decay}
    if optimizer == "sgd":
        opt.update(momentum=0.9, nesterov=True)
    kw = dict(scheduler_kwargs or {})
    kw.pop("monitor", None)  # ReduceLROnPlateau always monitors val/loss
    if scheduler == "step":
        kw = {"step_size": int(kw.get("step_size", 10)), "gamma": float(kw.get("gamma", 0.1))}
    elif scheduler == "cosine":
        kw = {k: v for k, v in kw.items() if k == "eta_min"}
    classes = {"cosine": "CosineAnnealingLR", "step": "StepLR", "onecycle": "OneCycleLR", "plateau": "ReduceLROnPlateau"}
    check(scheduler in (None, "none", *classes), "scheduler", scheduler, f"must be one of {['none', *classes]} (old string form)")
    if scheduler in (None, "none"):
        return opt, None, "epoch"
    node = {"_target_": f"torch.optim.lr_scheduler.{classes[scheduler]}", "_partial_": True, **kw}
    return opt, node, "step" if scheduler == "onecycle" else "epoch"


__all__ = ["INTERVALS", "check_partial", "check_optim", "as_factory", "configure_optimizers", "legacy_optim"]
