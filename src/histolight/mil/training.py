"""``histolight.mil.train``: feature bags + slide labels -> MIL models in model folders (one per fold).

>>> from histolight.mil.config import BagDataConfig, MILModelConfig
>>> data = BagDataConfig(bags="outputs/work/bags/demo", annotations="data/demo/annotations.csv")
>>> res = train(data, MILModelConfig(name="attention_mil"), "outputs/mil_run", epochs=10)
>>> res["val/auroc_mean"], res["val/auroc_sd"]

Outputs in ``dest``: per fold ``fold_<i>/model`` (kind ``mil``, :mod:`histolight.training.artifacts`),
``fold_<i>/checkpoints`` (best epoch + ``last.ckpt``) and ``fold_<i>/predictions.parquet``; ``folds.csv`` (one row
per fold: items per split, val/test metrics, model folder), ``predictions.parquet`` (every evaluated item per fold and split with its class probabilities), ``skipped.csv``
(slides left out and why) and ``metrics.json`` (mean and sd over folds, and the pooled out-of-fold AUROC).
Without k-fold (``data.split.method=annotations|random``) there is one model, ``dest/model``.

Resuming (``resume='auto'``): a fold whose model folder exists is kept (its metrics and predictions are read back),
an unfinished fold continues from its ``checkpoints/last.ckpt`` (optimizer, scheduler, epoch, callbacks), a fold
not started trains from the start. ``ckpt_path`` continues one model (one fold, or no k-fold) from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from histolight.errors import ConfigError
from histolight.mil.config import BagDataConfig, MILModelConfig
from histolight.mil.data import BagDataModule, Items, bag_width, bags_config, build_items, item_splits, read_table
from histolight.mil.module import MILModule, mil_metrics

log = logging.getLogger(__name__)

KIND = "mil"
#: per-fold predictions (written before the fold's model folder: a model folder means a finished fold)
FOLD_PREDICTIONS = "predictions.parquet"
#: metrics summarised over folds (mean, sd) and written to folds.csv
FOLD_METRICS = ("auroc", "bal_acc", "acc", "loss", "n")


def model_meta(data: BagDataConfig, model: MILModelConfig, in_dim: int, classes: Sequence[str], fold: int | None) -> dict:
    """The ``mil_config.json`` description of a model (the keys :func:`load_mil_model` rebuilds it from)."""
    bcfg = bags_config(data.bags)
    return {
        "model": {"name": model.name, "model_kwargs": dict(model.model_kwargs), "in_dim": int(in_dim)},
        "data": {
            "bags": str(data.bags),
            "label_column": data.label_column,
            "level": data.level,
            "max_tiles": data.max_tiles,
            "split": {**asdict(data.split), "fold": fold},
            "extractor": bcfg.get("extractor"),
        },
        "labels": list(classes),
        "geometry": {"tile_px": bcfg.get("tile_px"), "tile_um": bcfg.get("tile_um")},
        "normalizer": bcfg.get("normalizer"),
        "input_norm": None,
    }


def load_mil_model(path: str | os.PathLike) -> tuple[MILModule, dict]:
    """``(module in eval mode, meta)`` of the MIL model folder at ``path`` (weights read without unpickling)."""
    from histolight.training.artifacts import read_model_folder

    mf = read_model_folder(path, KIND)
    m = mf.meta["model"]
    module = MILModule(m["name"], int(m["in_dim"]), mf.meta["labels"], m.get("model_kwargs") or {})
    module.net.load_state_dict(mf.state_dict())
    return module.eval(), mf.meta


def _summary(rows: list[dict]) -> dict[str, float | None]:
    """``<split>/<metric>_mean`` and ``_sd`` (sample sd; None with one fold) over the fold rows."""
    from histolight.io.tables import nan_to_none

    out: dict[str, float | None] = {}
    df = pd.DataFrame(rows)
    for col in df.columns:
        if "/" in col and col.split("/")[1] in FOLD_METRICS:
            v = pd.to_numeric(df[col], errors="coerce").dropna()
            out[f"{col}_mean"] = nan_to_none(float(v.mean())) if len(v) else None
            out[f"{col}_sd"] = nan_to_none(float(v.std(ddof=1))) if len(v) > 1 else None
    return out


def _fold_predictions(dm: BagDataModule, module: MILModule, split: str, fold: int | None) -> pd.DataFrame:
    items = dm.of_split(split)
    out = module.last_outputs.get(split)
    if out is None:
        return pd.DataFrame()
    df = pd.DataFrame(
        {
            "fold": fold if fold is not None else -1,
            "split": split,
            "id": [items[i].id for i in out["index"]],
            "patient": [items[i].patient for i in out["index"]],
            "label": [items[i].label for i in out["index"]],
        }
    )
    for c, p in zip(module.classes, out["probs"].T):
        df[f"prob_{c}"] = p
    df["pred"] = [module.classes[i] for i in out["probs"].argmax(1)]
    return df


def _finished_fold(folder: Path) -> tuple[dict, pd.DataFrame]:
    """``(folds.csv row, predictions)`` of a fold finished by an earlier run (its model folder's metrics)."""
    from histolight.training.artifacts import read_model_folder

    row = dict(read_model_folder(folder / "model", KIND).meta.get("metrics") or {})
    p = folder / FOLD_PREDICTIONS
    return row, (pd.read_parquet(p) if p.is_file() else pd.DataFrame())


def train(
    data: BagDataConfig,
    model: MILModelConfig,
    dest: str | os.PathLike,
    *,
    trainer_factory: Callable[[Path], Any] | None = None,
    epochs: int = 20,
    seed: int = 0,
    ckpt: str = "best",
    monitor: str = "val/loss",
    monitor_mode: str = "min",
    eval_splits: Sequence[str] = ("val", "test"),
    overwrite: bool = False,
    resume: str | None = None,
    ckpt_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train one MIL model per fold (or one model) and save each as a model folder.

    Args:
        data, model: validated ``data`` / ``model`` options.
        dest: output folder (see the module docstring).
        trainer_factory: ``fold folder -> Lightning Trainer`` (the Hydra task builds the run's trainer there);
            default: one device, ``epochs`` epochs, checkpoints of the best ``monitor`` in ``<fold>/checkpoints``.
        seed: global seed (initialisation, tile subsampling, balanced sampling).
        ckpt: ``best`` or ``last``: the checkpoint evaluated and exported.
        eval_splits: the splits evaluated with the chosen weights (those present).
        overwrite: replace existing model folders and checkpoints (else refused before any work).
        resume, ckpt_path: continue an interrupted run (see the module docstring); ``ckpt_path`` only when one
            model is trained (no k-fold, or ``data.split.folds`` names one fold).

    Returns: ``<split>/<metric>_mean`` / ``_sd`` over folds, ``oof/auroc`` (k-fold: the pooled out-of-fold
    validation predictions), ``n_items``, ``n_skipped``, ``n_folds``, ``seconds``, ``folds`` (the rows of
    ``folds.csv``) and ``model_dirs``.
    """
    import lightning as L

    from histolight.io.atomic import atomic_write_json
    from histolight.io.tables import nan_to_none, write_parquet
    from histolight.training.artifacts import check_overwrite, save_model_folder
    from histolight.training.preemption import resume_when_requeued
    from histolight.training.trainer import (
        check_checkpoint_folder,
        check_resume_options,
        chosen_checkpoint,
        default_trainer,
        fit,
        restore_weights,
        resume_checkpoint,
    )

    if ckpt not in ("best", "last"):
        raise ConfigError(f"ckpt={ckpt!r} is invalid: must be best or last")
    t0 = time.time()
    out = Path(dest)
    folds = data.split.fold_list()
    fold_dir = {f: (out if f is None else out / f"fold_{f}") for f in folds}
    check_resume_options(ckpt_path, resume)
    resume = resume_when_requeued(resume, ckpt_path)  # a requeued SLURM job continues its folds
    if ckpt_path is not None and len(folds) > 1:
        raise ConfigError(
            f"ckpt_path='{ckpt_path}' continues one model, but {len(folds)} folds are trained: continue the run with "
            "resume=auto (every fold from its own checkpoints/last.ckpt), or train one fold (data.split.folds=[<i>])"
        )
    finished = {f for f in folds if resume == "auto" and (fold_dir[f] / "model" / f"{KIND}_config.json").is_file()}
    for f in folds:
        if f not in finished:
            check_overwrite(fold_dir[f] / "model", KIND, overwrite)
    table = read_table(data.annotations)
    found: Items = build_items(table, data.bags, label_column=data.label_column, labels=data.labels, level=data.level)
    in_dim = bag_width(data.bags, [s for it in found.items for s in it.slides])
    log.info(
        "%d %ss with bags of width %d; classes %s; %d slides skipped",
        len(found.items),
        data.level,
        in_dim,
        found.classes,
        len(found.skipped),
    )
    out.mkdir(parents=True, exist_ok=True)
    found.skipped.to_csv(out / "skipped.csv", index=False)

    rows, preds, model_dirs = [], [], []
    for f in folds:
        if f in finished:  # resume=auto: a fold of the interrupted run that had finished
            row, fold_pred = _finished_fold(fold_dir[f])
            rows.append(row)
            preds.append(fold_pred)
            model_dirs.append(str(fold_dir[f] / "model"))
            log.info("fold %s: finished by the interrupted run; kept (%s)", f, fold_dir[f] / "model")
            continue
        tf = time.time()
        L.seed_everything(int(seed), workers=True, verbose=False)
        sp = data.split
        splits = item_splits(
            found.items,
            table,
            method=sp.method,
            fold=f,
            k=sp.k,
            column=sp.column,
            val_fraction=sp.val_fraction,
            test_fraction=sp.test_fraction,
            seed=sp.seed,
            allow_leakage=data.allow_patient_leakage,
        )
        dm = BagDataModule(
            found.items,
            splits,
            data.bags,
            found.classes,
            max_tiles=data.max_tiles,
            batch_size=data.batch_size,
            eval_batch_size=data.eval_batch_size,
            num_workers=data.num_workers,
            balance=data.balance,
        )
        log.info("fold %s: items per split and class:\n%s", f, dm.summary().to_string())
        module = MILModule(
            model.name,
            in_dim,
            found.classes,
            model.model_kwargs,
            label_smoothing=model.label_smoothing,
            optimizer=model.optimizer,
            scheduler=model.scheduler,
            scheduler_interval=model.scheduler_interval,
            warmup_epochs=model.warmup_epochs,
        )
        module.net.in_mean[:], module.net.in_std[:] = dm.feature_stats()  # standardise with the training bags' stats
        trainer = trainer_factory(fold_dir[f]) if trainer_factory else default_trainer(fold_dir[f], epochs, monitor, monitor_mode)
        resume_from = resume_checkpoint(trainer, ckpt_path, resume)
        check_checkpoint_folder(trainer, resume_from, overwrite)
        fit(trainer, module, dm, resume_from)
        chosen = chosen_checkpoint(trainer, ckpt)
        restore_weights(module, chosen)
        row: dict[str, Any] = {"fold": f if f is not None else -1}
        fold_preds: list[pd.DataFrame] = []
        row.update({f"n_{s}": len(dm.of_split(s)) for s in ("train", "val", "test")})
        for split in eval_splits:
            if not dm.has_split(split):
                continue
            (trainer.validate if split == "val" else trainer.test)(module, dataloaders=dm.eval_dataloader(split), verbose=False)
            m = module.last_metrics.get(split, {})
            row.update({f"{split}/{k}": v for k, v in m.items() if k != "confusion"})
            row[f"{split}/confusion"] = str(m.get("confusion"))
            fold_preds.append(_fold_predictions(dm, module, split, f))
        row.update(
            {"epochs": trainer.current_epoch, "seconds": round(time.time() - tf, 1), "model_dir": str(fold_dir[f] / "model")}
        )
        fold_pred = pd.concat(fold_preds, ignore_index=True) if fold_preds else pd.DataFrame()
        preds.append(fold_pred)
        if trainer.is_global_zero:
            if len(fold_pred):
                write_parquet(fold_pred, fold_dir[f] / FOLD_PREDICTIONS)
            meta = {**model_meta(data, model, in_dim, found.classes, f), "metrics": {k: nan_to_none(v) for k, v in row.items()}}
            meta["training"] = {
                "checkpoint": chosen,
                "seed": seed,
                "epochs": trainer.current_epoch,
                "resumed_from": str(resume_from) if resume_from else None,
            }
            save_model_folder(fold_dir[f] / "model", KIND, module.net.state_dict(), meta, overwrite=overwrite)
        model_dirs.append(str(fold_dir[f] / "model"))
        rows.append(row)
        log.info("fold %s: %s", f, {k: v for k, v in row.items() if k.endswith(("auroc", "bal_acc"))})

    result: dict[str, Any] = {
        **_summary(rows),
        "n_items": len(found.items),
        "n_skipped": len(found.skipped),
        "n_folds": len(rows),
    }
    pred = pd.concat(preds, ignore_index=True) if preds else pd.DataFrame()
    if len(folds) > 1 and len(pred):
        oof = pred[pred["split"] == "val"]
        y = oof["label"].map({c: i for i, c in enumerate(found.classes)}).to_numpy()
        result["oof/auroc"] = nan_to_none(
            mil_metrics(oof[[f"prob_{c}" for c in found.classes]].to_numpy(), y, found.classes)["auroc"]
        )
    result["seconds"] = round(time.time() - t0, 1)
    pd.DataFrame(rows).to_csv(out / "folds.csv", index=False)
    if len(pred):
        write_parquet(pred, out / "predictions.parquet")
    atomic_write_json(out / "metrics.json", {k: nan_to_none(v) for k, v in result.items()})
    return {**result, "folds": rows, "model_dirs": model_dirs}


def format_summary(result: dict, metrics: Sequence[str] = ("val/auroc", "val/bal_acc", "test/auroc")) -> str:
    """``val/auroc 0.812 ± 0.104, ...`` of a :func:`train` result (metrics that were measured)."""
    parts = []
    for m in metrics:
        mean, sd = result.get(f"{m}_mean"), result.get(f"{m}_sd")
        if mean is not None:
            parts.append(f"{m} {mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else ""))
    if result.get("oof/auroc") is not None:
        parts.append(f"out-of-fold auroc {result['oof/auroc']:.3f}")
    if result.get("oof/top_roi_share") is not None:
        ev = result.get("oof/top_evidence_share")
        parts.append(
            f"top-10% tiles in the ROIs: by tile score (attention) {result['oof/top_roi_share']:.1%}"
            + (f", by evidence {ev:.1%}" if ev is not None else "")
            + f" (all tiles {result['oof/roi_share_all']:.1%})"
        )
    return ", ".join(parts) or "no metrics"


__all__ = ["KIND", "FOLD_PREDICTIONS", "FOLD_METRICS", "model_meta", "load_mil_model", "train", "format_summary"]
