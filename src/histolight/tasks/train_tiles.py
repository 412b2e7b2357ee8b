"""``task=train_tiles``: train a timm tile classifier (:func:`histolight.classify.train`) from a Hydra config.

    python run.py experiment=tile_classifier                            # demo cohort, ROI labels, mobilenetv3
    python run.py experiment=tile_classifier data.label_source=slide    # weak supervision
    python run.py experiment=tile_classifier trainer=gpu                # one GPU, AMP (trainer=ddp: several)
    python run.py experiment=tile_classifier resume=auto hydra.run.dir=outputs/<date>/<run>   # continue a run

Outputs in the run folder: ``model/`` (``classifier_config.json`` + ``weights.safetensors``, see
:mod:`histolight.training.artifacts`), ``checkpoints/``, ``tiles.parquet``, ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from histolight.config.schema import check, from_config
from histolight.errors import ConfigError
from histolight.training.options import CheckpointOptions


@dataclass
class TrainTilesTask(CheckpointOptions):
    """``task`` of ``task=train_tiles`` (conf/task/train_tiles.yaml)."""

    name: str = "train_tiles"
    monitor: str = "val/bal_acc"
    monitor_mode: str = "max"
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    model_dir: str | None = None
    slide_metrics: Any = "auto"

    def __post_init__(self):
        super().__post_init__()
        ok = isinstance(self.eval_splits, list) and set(self.eval_splits) <= {"val", "test"}
        check(ok, "eval_splits", self.eval_splits, "must be a list drawn from [val, test]")
        check(self.slide_metrics in ("auto", True, False), "slide_metrics", self.slide_metrics, "must be auto, true or false")


def run(cfg: DictConfig) -> dict:
    from histolight.classify.config import TileDataConfig, TimmModelConfig
    from histolight.training.normalize import check_training_normalizer

    for group, example in (("data", "data=tiles"), ("model", "model=timm_resnet18"), ("trainer", "trainer=cpu|gpu|ddp")):
        if cfg.get(group) is None:
            raise ConfigError(f"task=train_tiles needs a {group} config: add {example} (or experiment=tile_classifier)")
    task = from_config(TrainTilesTask, cfg.task, "task")  # every option validated before any work
    data = from_config(TileDataConfig, cfg.data, "data")
    model = from_config(TimmModelConfig, cfg.model, "model")
    norm_cfg = check_training_normalizer(cfg.get("normalizer"), per_tile=True)

    from histolight.classify import train
    from histolight.norm import build_normalizer
    from histolight.tasks.common import load_dataset, output_dir
    from histolight.training.artifacts import check_overwrite
    from histolight.training.trainer import build_trainer, resume_checkpoint

    trainer = build_trainer(cfg)
    resume_from = resume_checkpoint(trainer, cfg.get("ckpt_path"), cfg.get("resume"))  # checked before any work
    check_overwrite(task.model_dir or output_dir(cfg) / "model", "classifier", task.overwrite)
    ds = load_dataset(cfg)
    opts = {
        k: getattr(task, k) for k in ("ckpt", "eval_splits", "model_dir", "overwrite", "slide_metrics", "monitor", "monitor_mode")
    }
    norm = build_normalizer(norm_cfg) if norm_cfg and data.normalize else None
    run_config = OmegaConf.to_container(cfg, resolve=True)
    metrics = train(
        data,
        model,
        ds,
        output_dir(cfg),
        trainer=trainer,
        normalizer=norm,
        seed=cfg.get("seed") or 0,
        run_config=run_config,
        ckpt_path=resume_from,
        **opts,
    )
    summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("bal_acc", "auroc", "/acc")) and v is not None)
    # the wrapper's closing line: "task train_tiles finished in N s: tile classifier <model> (val/bal_acc 0.61, ...)"
    return {**metrics, "result": f"tile classifier {metrics['model_dir']} ({summary})"}
