"""``task=train_mil``: slide-level MIL models from feature bags (:func:`histolight.mil.train`), k-fold by patient.

    python run.py task=train_mil data=bags model=mil_attention data.bags=<bags> data.label_column=<column>
    python run.py experiment=mil_demo                      # demo: slides -> bags -> 5-fold CV (experiments/mil_demo.md)
    python run.py experiment=mil_demo resume=auto hydra.run.dir=outputs/<date>/<run>   # continue a killed run

Outputs in the run folder: ``fold_<i>/model`` (``mil_config.json`` + ``weights.safetensors``), ``folds.csv``
(one row per fold), ``predictions.parquet``, ``skipped.csv``, ``metrics.json`` (mean and sd over folds), ``roc.csv``,
``attention_examples/`` (heatmaps of a few out-of-fold slides) and with ``task.roi_label`` ``roi_focus.csv`` (per
out-of-fold slide: share of its top-10% tiles by attention / by evidence in those ROIs), also logged to the run's
loggers (W&B: metrics, ROC curve, images; the runs of a multirun share one W&B group). With ``task.build_bags``
(``task=features`` options) the bags are built into ``data.bags`` first; slides whose bag exists are skipped.
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, open_dict

from histolight.config.schema import from_config
from histolight.errors import ConfigError, HistolightError


def build_bags(cfg: DictConfig, bags: str) -> None:
    """Run ``task=features`` with the options ``cfg.task.build_bags`` into ``bags`` (existing bags are kept)."""
    from histolight.tasks import features

    fcfg = copy.deepcopy(cfg)
    with open_dict(fcfg):
        fcfg.task = fcfg.task.build_bags
        fcfg.task.outdir = str(bags)
    m = features.run(fcfg)
    if m.get("n_failed"):
        raise HistolightError(f"building the bags in '{bags}' failed for {m['n_failed']} slide(s); see {m.get('summary')}")


def run(cfg: DictConfig) -> dict:
    from histolight.mil.config import BagDataConfig, MILModelConfig, TrainMILTask
    from histolight.mil.report import attention_examples, check_evidence_class, log_run, roi_focus
    from histolight.training.trainer import check_resume_options

    for group, example in (("data", "data=bags"), ("model", "model=mil_attention"), ("trainer", "trainer=cpu")):
        if cfg.get(group) is None:
            raise ConfigError(f"task=train_mil needs a {group} config: add {example} (or experiment=mil_demo)")
    task = from_config(TrainMILTask, cfg.task, "task")
    check_resume_options(cfg.get("ckpt_path"), cfg.get("resume"))
    from histolight.tasks.common import load_dataset, output_dir

    if task.demo_labels is not None:  # the demo's label table, from its ground-truth masks
        from histolight.mil.demo import write_demo_labels

        load_dataset(cfg)  # generates the demo cohort on first use
        path = write_demo_labels(cfg.paths.demo_dir, output_dir(cfg) / "labels.csv", task.demo_labels, cfg.data.label_column)
        with open_dict(cfg):
            cfg.data.annotations = str(path)
    data = from_config(BagDataConfig, cfg.data, "data")
    model = from_config(MILModelConfig, cfg.model, "model")
    check_evidence_class(task.evidence_class, data)
    if task.build_bags is not None:
        build_bags(cfg, data.bags)

    from histolight.mil.training import format_summary, train
    from histolight.training.trainer import build_trainer

    trainers: list = []

    def fold_trainer(folder):  # the run's trainer, callbacks and loggers, writing into the fold's folder
        fcfg = copy.deepcopy(cfg)
        with open_dict(fcfg):
            fcfg.paths.output_dir = str(folder)
        trainers.append(build_trainer(fcfg))
        return trainers[-1]

    out = output_dir(cfg)
    res = train(
        data,
        model,
        out,
        trainer_factory=fold_trainer,
        seed=cfg.get("seed") or 0,
        ckpt=task.ckpt,
        monitor=task.monitor,
        monitor_mode=task.monitor_mode,
        overwrite=task.overwrite,
        resume=cfg.get("resume"),
        ckpt_path=cfg.get("ckpt_path"),
    )
    images = []
    if task.attention_examples:
        images = attention_examples(out, load_dataset(cfg), data.bags, task.attention_examples, task.evidence_class)
    if task.roi_label:  # is the attention on the tissue that decides the label? (every out-of-fold slide)
        res.update(roi_focus(out, load_dataset(cfg), data.bags, task.roi_label, task.evidence_class))
    if trainers:
        log_run(trainers[-1].loggers, out, res, images)
    print(f"train_mil ({model.name}, {res['n_folds']} fold(s), {res['n_items']} {data.level}s): {format_summary(res)}")
    return {k: v for k, v in res.items() if k not in ("folds", "model_dirs")}
