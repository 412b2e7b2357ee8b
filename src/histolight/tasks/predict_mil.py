"""``task=predict_mil``: slide predictions, per-tile attention and attention heatmaps of a MIL model folder.

    python run.py task=predict_mil task.model=outputs/<run>/fold_0/model             # the bags it was trained on
    python run.py task=predict_mil task.model=<run>/fold_0/model task.bags=<other bags> dataset=folder ...

Writes ``predictions.parquet`` (per slide: tiles, class probabilities, prediction, label when known),
``attention/<slide>.parquet`` and ``heatmaps/<slide>.png`` (formats: :mod:`histolight.mil.predict`), ``slides.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histolight.cohort import PerSlideOptions
from histolight.config.schema import check, from_config
from histolight.tasks.common import check_model_path, opt_list


@dataclass
class PredictMILTask(PerSlideOptions):
    """``conf/task/predict_mil.yaml``."""

    name: str = "predict_mil"
    model: str | None = None
    bags: str | None = None
    slides: Any = None
    label_table: str | None = None
    label_column: str | None = None
    heatmaps: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_model_path(self.model, "a MIL model folder (task=train_mil writes <run>/fold_<i>/model)")
        self.slides = opt_list("slides", self.slides)
        check(isinstance(self.heatmaps, bool), "heatmaps", self.heatmaps, "must be true or false")


def run(cfg: DictConfig) -> dict:
    from histolight.mil.data import read_table
    from histolight.mil.predict import predict
    from histolight.mil.training import load_mil_model
    from histolight.tasks.common import load_dataset, output_dir

    t = from_config(PredictMILTask, cfg.task, "task")
    _, meta = load_mil_model(t.model)  # a wrong folder fails here, before any slide
    bags = t.bags or meta["data"]["bags"]
    ds = load_dataset(cfg)
    names = t.slides or ds.names
    paths = {n: str(ds.path(n)) for n in names if n in ds.names} if t.heatmaps else {}
    labels = None
    source = t.label_table or (ds.annotations.reset_index(drop=True) if ds.annotations is not None else None)
    if t.label_column and source is not None:
        table = read_table(source)
        labels = dict(zip(table["slide"], table[t.label_column].astype(str))) if t.label_column in table else None
    mpp = {n: ds.mpp_for(n) for n in paths}
    res, pred = predict(t.model, names, output_dir(cfg), bags=bags, slide_paths=paths, mpp=mpp, labels=labels, workers=t.workers)
    print(f"predict_mil: {res.summary_line()}; predictions in {output_dir(cfg) / 'predictions.parquet'}")
    return res.metrics()
