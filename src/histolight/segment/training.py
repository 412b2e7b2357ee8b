"""``histolight.segment.train`` (module ``training``): thumbnails + masks -> a trained model folder (Slideflow's
``sf.segment.train``), with the shared training kit (:mod:`histolight.training`: splits, augmentation, optimizers,
model folder).

>>> from histolight.dataset import Dataset
>>> from histolight import segment
>>> ds = Dataset("data/demo/slides", rois="data/demo/rois", annotations="data/demo/annotations.csv")
>>> cfg = segment.SegmentConfig(mode="multiclass", labels=["tumor", "stroma", "necrosis"], mpp=4, size=256, epochs=10)
>>> metrics = segment.train(cfg, ds, dest="outputs/seg_model")
>>> model, cfg = segment.load_model_and_config("outputs/seg_model")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from histolight.errors import ConfigError, HistolightError
from histolight.segment.config import SegmentConfig
from histolight.segment.data import ThumbMask, check_labels_present, export_key, export_thumbs_and_masks, load_thumb_mask
from histolight.training.normalize import pixel_stats
from histolight.training.splits import annotation_split, names_in, random_split

log = logging.getLogger(__name__)


def split_slides(dataset, cfg: SegmentConfig, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) slide names, decided per patient (:mod:`histolight.training.splits`).

    With a ``split`` column in the annotations: slides whose value is in ``cfg.train_split`` / ``cfg.val_split``
    (compared case-insensitively; other values, e.g. ``test``, are left out); a patient with slides in two
    splits is a :class:`ConfigError` unless ``cfg.allow_patient_leakage``. When no slide is in the val split,
    ``val_fraction`` of the training patients are drawn for validation; without a split column (or training
    slides), ``val_fraction`` of all patients.
    """
    names = dataset.names
    slide_patient = {n: dataset.patient(n) for n in names}
    ann = dataset.annotations
    if ann is not None and "split" in ann.columns:
        values = {n: dataset.column(n, "split") for n in names}
        roles = {"train": cfg.train_split, "val": cfg.val_split, "test": "test"}
        split = annotation_split(slide_patient, values, roles=roles, allow_leakage=cfg.allow_patient_leakage)
        train, val = names_in(split, "train", names), names_in(split, "val", names)
        if train and val:
            return train, val
        if train:
            log.warning(
                "no slide has split=%r; drawing %.0f%% of the training patients for validation",
                cfg.val_split,
                100 * cfg.val_fraction,
            )
            slide_patient = {n: slide_patient[n] for n in train}
        else:
            log.warning("no slide has split=%r; splitting every slide by patient instead", cfg.train_split)
    split = random_split(slide_patient, val_fraction=cfg.val_fraction, seed=seed)
    return names_in(split, "train", names), names_in(split, "val", names)


def prepare_items(
    dataset, cfg: SegmentConfig, cache_dir: str | os.PathLike, slides: Sequence[str], overwrite: bool = False
) -> list[ThumbMask]:
    """Export (or reuse cached) thumbnails + masks of ``slides`` and load them, stain-normalised if configured."""
    folder = Path(cache_dir) / export_key(cfg.mpp, cfg.mode, cfg.labels)
    paths = export_thumbs_and_masks(
        dataset, cfg.mpp, folder, labels=cfg.labels, mode=cfg.mode, overwrite=overwrite, slides=slides
    )
    return _normalize_items([load_thumb_mask(paths[n]) for n in slides if n in paths], cfg)


def load_export(folder: str | os.PathLike, cfg: SegmentConfig, slides: Sequence[str]) -> list[ThumbMask]:
    """Thumbnails + masks of ``slides`` from a folder written by :func:`~.data.export_thumbs_and_masks` (Slideflow's
    ``data_source``), stain-normalised if configured. Raises :class:`ConfigError` when a slide is missing or the
    export was made at another mpp, mode or label set than ``cfg``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"data_source={str(folder)!r} is invalid: not a folder (write one with export_thumbs_and_masks)")
    missing = [n for n in slides if not (folder / f"{n}.npz").is_file()]
    if missing:
        raise ConfigError(f"data_source={str(folder)!r} is invalid: no export of slide(s) {missing} (<slide>.npz)")
    items = [load_thumb_mask(folder / f"{n}.npz") for n in slides]
    want = {"mpp": cfg.mpp, "mode": cfg.mode, "labels": cfg.labels}
    for it in items:
        got = {k: it.meta.get(k) for k in want}
        if got != want:
            raise ConfigError(
                f"data_source={str(folder)!r} is invalid: {it.name} was exported with {got}, the config asks for {want} "
                "(export again with these settings, or change the config)"
            )
    return _normalize_items(items, cfg)


def _normalize_items(items: list[ThumbMask], cfg: SegmentConfig) -> list[ThumbMask]:
    if cfg.normalizer:
        from histolight.norm import build_normalizer

        norm = build_normalizer(cfg.normalizer)
        for it in items:
            if getattr(norm, "use_context", False):
                norm.set_context(it.image)  # the whole thumbnail is the slide's context
            it.image = norm.transform(it.image)
    return items


def test_slides(dataset, exclude: Sequence[str]) -> list[str]:
    """Slides whose annotations' ``split`` is ``test`` (held-out patients), minus ``exclude``."""
    out = []
    for n in dataset.names:
        v = dataset.column(n, "split")
        if v is not None and str(v).lower() == "test" and n not in exclude:
            out.append(n)
    return out


def _thumb_data(dataset, config, cache_dir, train_names, val_names, data_source):
    if data_source is not None:
        train_items = load_export(data_source, config, train_names)
        val_items = load_export(data_source, config, val_names) if val_names else []
    else:
        train_items = prepare_items(dataset, config, cache_dir, train_names)
        val_items = prepare_items(dataset, config, cache_dir, val_names) if val_names else []
    if not train_items:
        raise HistolightError("no training slide could be exported (see the errors above)")
    if not val_items:
        log.warning("no validation slides: validating on the training slides (metrics are not held-out)")
        val_items = train_items
    check_labels_present(train_items + val_items, config.labels, config.mode)
    if config.input_mean is None or config.input_std is None:
        mean, std = pixel_stats(it.image for it in train_items)
        config = replace(config, input_mean=mean, input_std=std)
    from histolight.segment.datamodule import SegmentDataModule

    slides = {"train_slides": [i.name for i in train_items], "val_slides": [i.name for i in val_items]}
    return SegmentDataModule(config, train_items, val_items), config, slides


def _patch_data(dataset, config, cache_dir, train_names, val_names, seed):
    from histolight.segment.datamodule import DatasetsDataModule
    from histolight.segment.patches import PatchDataset, WindowDataset, crop_stats, describe_slide

    train_sp = [describe_slide(dataset, n, config, seed) for n in train_names]
    val_sp = [describe_slide(dataset, n, config, seed, val_windows=config.val_windows) for n in val_names]
    if not val_sp:
        log.warning("no validation slides: validating on windows of the training slides (metrics are not held-out)")
        val_sp = [describe_slide(dataset, n, config, seed, val_windows=config.val_windows) for n in train_names]
    if config.labels:
        found = {r.label for sp in train_sp + val_sp for r in sp.rois}
        missing = [lab for lab in config.labels if lab not in found]
        if missing and config.mode != "binary" or len(missing) == len(config.labels):
            raise ConfigError(
                f"data.labels={list(config.labels)} is invalid: no ROI of label(s) {missing} in any training/validation "
                "slide. Check the spelling against the ROI files (python run.py task=info lists their labels)."
            )
    if config.input_mean is None or config.input_std is None:
        mean, std = crop_stats(train_sp, config, config.stats_crops, seed)
        config = replace(config, input_mean=mean, input_std=std)
    if config.cache_patches:
        from histolight.segment.patch_cache import CachedPatches, build_patch_cache

        cache = build_patch_cache(cache_dir, train_sp, val_sp, config, config.cache_patches, seed)
        train_ds, val_ds = CachedPatches(cache, "train", config, config.crops_per_epoch), CachedPatches(cache, "val", config)
    else:
        train_ds, val_ds = PatchDataset(train_sp, config, config.crops_per_epoch), WindowDataset(val_sp, config)
    slides = {"train_slides": [s.name for s in train_sp], "val_slides": [s.name for s in val_sp]}
    return DatasetsDataModule(config, train_ds, val_ds), config, slides


def train(
    config: SegmentConfig,
    dataset,
    dest: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    trainer=None,
    loggers: Sequence | None = None,
    callbacks: Sequence | None = None,
    epochs: int | None = None,
    seed: int | None = 42,
    overwrite: bool = False,
    run_config: dict | None = None,
    train_slides: Sequence[str] | None = None,
    val_slides: Sequence[str] | None = None,
    n_overlays: int = 3,
    overlay_every: int = 5,
    ckpt_path: str | os.PathLike | None = None,
    resume: str | None = None,
    data_source: str | os.PathLike | None = None,
    evaluate: bool | None = None,
    save_inputs: int = 0,
    **trainer_kwargs,
) -> dict[str, Any]:
    """Train a segmentation model and save it as the model folder ``dest`` (``segment_config.json`` +
    ``weights.safetensors``, see :mod:`histolight.segment.io`), with ``checkpoints/``, ``overlays/`` and
    ``metrics.json``.

    Args:
        config: the :class:`SegmentConfig`.
        dataset: a :class:`histolight.dataset.Dataset` with ROIs (and a ``split`` column, else a
            patient-level split of ``config.val_fraction`` is drawn: :func:`split_slides`).
        dest: output folder (the run dir under Hydra).
        cache_dir: where thumbnails/masks are exported and reused (default ``dest/thumbs``).
        trainer: a Lightning ``Trainer``; default: one built from ``epochs`` (``config.epochs``)
            with a checkpoint on the best ``val/miou``, ``loggers``, ``callbacks`` and ``trainer_kwargs``.
        seed: global seed (``None`` = leave as is).
        overwrite: replace a model already in ``dest`` (checked before any work).
        run_config: the full resolved run config, logged to the loggers and saved as ``training.run``.
        train_slides, val_slides: explicit slide lists (override the split).
        n_overlays, overlay_every: validation overlay images (``dest/overlays`` and image loggers).
        ckpt_path, resume: continue training from this Lightning checkpoint, or (``resume='auto'``) from the
            ``last.ckpt`` of the trainer's checkpoint folder when there is one (:mod:`histolight.training.trainer`).
            Without either, a checkpoint folder holding another run's checkpoints is refused (deleted with
            ``overwrite``) before any work.
        data_source: a folder written by :func:`~.data.export_thumbs_and_masks` at ``config.mpp`` / mode / labels
            (Slideflow's ``data_source``): train on it instead of exporting again (thumbnail mode).
        evaluate: after training, evaluate the best model on the validation and ``test``-split slides
            (:mod:`~.evaluate`, files in ``dest/evaluation``, metrics ``eval/<split>/dice_<class>``); None = in
            patch mode only.
        save_inputs: save this many augmented training batches as pictures in ``dest/inputs`` (``debug=inputs``).

    Returns: metrics of the best checkpoint on the validation slides (``val/miou``, ``val/mdice``,
    ``val/iou_<class>``, ...), plus ``epochs``, ``train_time_s`` and ``model_dir``.
    """
    import lightning.pytorch as L

    from histolight.io.atomic import atomic_write_json
    from histolight.io.tables import nan_to_none
    from histolight.segment.io import KIND, save_model
    from histolight.segment.model import SegmentModel
    from histolight.training.artifacts import check_overwrite
    from histolight.training.trainer import (
        check_checkpoint_folder,
        chosen_checkpoint,
        default_trainer,
        fit,
        log_hyperparams,
        restore_weights,
        resume_checkpoint,
        update_summary,
    )

    t0 = time.time()
    dest = Path(dest)
    check_overwrite(dest, KIND, overwrite)
    if epochs is not None:
        config = replace(config, epochs=int(epochs))
    if trainer is None:
        trainer = default_trainer(dest, config.epochs, "val/miou", "max", loggers, callbacks, **trainer_kwargs)
    elif (trainer.max_epochs or -1) > 0:
        config = replace(config, epochs=int(trainer.max_epochs))
    resume_from = resume_checkpoint(trainer, ckpt_path, resume)
    check_checkpoint_folder(trainer, resume_from, overwrite)
    dest.mkdir(parents=True, exist_ok=True)
    if seed is not None:
        L.seed_everything(int(seed), workers=True, verbose=False)
    cache_dir = Path(cache_dir) if cache_dir else dest / "thumbs"

    # ---- slides and data
    if train_slides is None:
        train_names, val_names = split_slides(dataset, config, seed=seed or 0)
    else:
        train_names, val_names = list(train_slides), list(val_slides or [])
    if val_slides is not None:
        val_names = list(val_slides)
    if not train_names:
        raise ConfigError(f"data.train_split={config.train_split!r} is invalid: no slide has it in the annotations' split column")
    if config.patches:
        if data_source is not None:
            raise ConfigError("data_source (exported thumbnails) is for thumbnail mode: set data.patches=false, or drop it")
        datamodule, config, slides = _patch_data(dataset, config, cache_dir, train_names, val_names, seed or 0)
    else:
        datamodule, config, slides = _thumb_data(dataset, config, cache_dir, train_names, val_names, data_source)
    log.info(
        "segmentation: %s; %d train slides (%s), %d val slides (%s); %d crops/epoch",
        config.describe(),
        len(slides["train_slides"]),
        ",".join(slides["train_slides"]),
        len(slides["val_slides"]),
        ",".join(slides["val_slides"]),
        config.crops_per_epoch,
    )
    if save_inputs:
        from histolight.segment.evaluate import SaveInputs

        trainer.callbacks.append(SaveInputs(dest / "inputs", save_inputs))

    # ---- model, trainer
    model = SegmentModel(config, load_pretrained=True, n_overlays=n_overlays, overlay_every=overlay_every)
    model.overlay_dir = dest / "overlays"
    hp = {"segment": config.to_dict(), "artifacts_dir": str(dest.resolve()), **slides}
    log_hyperparams(trainer, {**hp, "run": run_config} if run_config is not None else hp)
    fit(trainer, model, datamodule, resume_from)
    fit_time = time.time() - t0

    # ---- best weights, final metrics, artifacts
    best = chosen_checkpoint(trainer, "best")
    restore_weights(model, best)
    res = trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k: nan_to_none(float(v)) for k, v in (res[0] if res else {}).items()}
    metrics.update({"epochs": int(trainer.current_epoch), "train_time_s": round(fit_time, 1), "model_dir": str(dest)})
    if evaluate or (evaluate is None and config.patches):
        metrics.update(_evaluate(model, dataset, config, slides, dest, seed or 0, trainer.loggers))
    training = {"run": run_config, "checkpoint": best, **slides}
    save_model(model, dest, extra={"metrics": metrics, "training": training}, overwrite=True)
    atomic_write_json(dest / "metrics.json", metrics)
    summary = {f"best/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    update_summary(trainer, {"artifacts_dir": str(dest.resolve()), **summary})
    log.info("segmentation model saved to %s (val/miou %s)", dest, metrics.get("val/miou"))
    return metrics


def _evaluate(model, dataset, config, slides, dest, seed, loggers) -> dict:
    """:func:`~.evaluate.evaluate_slides` on the validation and test-split slides -> ``eval/<split>/...`` metrics."""
    from histolight.segment.evaluate import evaluate_slides
    from histolight.segment.patches import describe_slide

    val = [n for n in slides["val_slides"] if n not in slides["train_slides"]]
    splits = {**{n: "val" for n in val}, **{n: "test" for n in test_slides(dataset, slides["train_slides"] + val)}}
    if not splits:
        log.warning("no held-out slide to evaluate (no validation or test-split slide)")
        return {}
    n_win = max(config.val_windows, 2)
    sps = [describe_slide(dataset, n, config, seed, val_windows=n_win) for n in splits]
    res = evaluate_slides(model, sps, dest / "evaluation", splits, loggers=loggers)
    return {f"eval/{k}": v for k, v in res.items()}


__all__ = ["split_slides", "prepare_items", "load_export", "test_slides", "train"]
