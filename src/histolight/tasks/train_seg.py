"""``task=train_seg``: train a whole-slide segmentation model (:func:`histolight.segment.train`) from a Hydra config.

    python run.py experiment=seg_multiclass                 # demo cohort, W&B (offline without a key)
    python run.py -m experiment=seg_multiclass model.arch=Unet,FPN model.optimizer.lr=1e-4,3e-4
    python run.py experiment=seg_multiclass hparams_search=seg_optuna
    python run.py experiment=seg_multiclass resume=auto hydra.run.dir=outputs/<date>/<run>   # continue a run

Outputs in the run folder: the model (``segment_config.json`` + ``weights.safetensors``; load with
``histolight.segment.load_model_and_config(<run dir>)``), ``checkpoints/``, ``overlays/`` (validation image |
truth | prediction), ``metrics.json``; with ``task.evaluate`` (default in patch mode, ``data=seg_patches``)
``evaluation/`` (per slide / class TP FP TN FN, Dice, IoU on the validation and test slides, confusion matrix,
panels); with ``task.save_inputs`` (``debug=inputs``) ``inputs/`` (augmented training batches). Returns the best checkpoint's validation metrics (``val/miou``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from histolight.config.schema import check, from_config
from histolight.errors import ConfigError


@dataclass
class TrainSegTask:
    """``task`` of ``task=train_seg`` (conf/task/train_seg.yaml)."""

    name: str = "train_seg"
    monitor: str = "val/miou"
    monitor_mode: str = "max"
    overwrite: bool = False
    n_overlays: int = 3
    overlay_every: int = 5
    evaluate: bool | None = None
    save_inputs: int = 0

    def __post_init__(self):
        check(self.evaluate in (None, True, False), "evaluate", self.evaluate, "must be null (patch mode only), true or false")
        check(self.monitor_mode in ("min", "max"), "monitor_mode", self.monitor_mode, "must be min or max")
        check(isinstance(self.overwrite, bool), "overwrite", self.overwrite, "must be true or false")
        for k in ("n_overlays", "overlay_every", "save_inputs"):
            v = getattr(self, k)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, k, v, "must be an integer >= 0 (0 = none)")


def run(cfg: DictConfig) -> dict:
    from histolight.segment.config import config_from_hydra

    task = from_config(TrainSegTask, cfg.task, "task")
    scfg = config_from_hydra(cfg)  # every option validated before any work
    ds_labels = OmegaConf.select(cfg, "dataset.labels")
    unknown = [lab for lab in scfg.labels or [] if ds_labels and lab not in ds_labels]
    if unknown:
        raise ConfigError(
            f"data.labels={scfg.labels} is invalid: {unknown} not among the cohort's labels {list(ds_labels)} (dataset.labels)"
        )
    if cfg.get("trainer") is None:
        raise ConfigError("task=train_seg needs a trainer config (trainer=cpu|gpu)")

    from histolight.segment import train
    from histolight.segment.io import KIND
    from histolight.tasks.common import load_dataset, output_dir
    from histolight.training.artifacts import check_overwrite
    from histolight.training.trainer import build_trainer, resume_checkpoint

    trainer = build_trainer(cfg)
    resume_from = resume_checkpoint(trainer, cfg.get("ckpt_path"), cfg.get("resume"))  # checked before any work
    out = output_dir(cfg)
    check_overwrite(out, KIND, task.overwrite)
    ds = load_dataset(cfg)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    opts = {k: getattr(task, k) for k in ("overwrite", "n_overlays", "overlay_every", "evaluate", "save_inputs")}
    metrics = train(
        scfg,
        ds,
        out,
        cache_dir=cfg.data.get("cache_dir"),
        trainer=trainer,
        seed=cfg.get("seed"),
        run_config=run_config,
        ckpt_path=resume_from,
        **opts,
    )
    m = {k: float("nan") if metrics.get(k) is None else metrics[k] for k in ("val/miou", "val/mdice")}
    print(
        f"Segmentation model: {out}  (val/miou {m['val/miou']:.4f}, val/mdice {m['val/mdice']:.4f}, {metrics['train_time_s']} s)"
    )
    held = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval/") and "/dice_" in k}
    if held:
        print(f"Held-out evaluation ({out}/evaluation): {held}")
    return metrics
