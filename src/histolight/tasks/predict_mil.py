"""``task=predict_mil``: slide predictions, per-tile attention and attention heatmaps of a MIL model folder.

    python run.py task=predict_mil task.model=outputs/<run>/fold_0/model             # the bags it was trained on
    python run.py task=predict_mil task.model=<run>/fold_0/model task.bags=<other bags> dataset=folder ...

Writes ``predictions.parquet`` (per slide: tiles, class probabilities, prediction, label when known),
``attention/<slide>.parquet`` (attention and each tile's evidence per class), ``heatmaps/<slide>.png``,
``montages/<slide>.png`` (the top-attended tiles) (formats: :mod:`histolight.mil.predict`), ``slides.csv``. With
``task.roi_label`` (e.g. necrosis), each slide's share of its top-10% attention tiles, and of its top-10% tiles by
evidence for ``task.evidence_class`` (default: the predicted class), lying in that class's ROIs (``top_roi_share``,
``top_evidence_share``; their means in the result).
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
    montage_tiles: int = 16
    roi_label: str | None = None
    evidence_class: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_model_path(self.model, "a MIL model folder (task=train_mil writes <run>/fold_<i>/model)")
        self.slides = opt_list("slides", self.slides)
        check(isinstance(self.heatmaps, bool), "heatmaps", self.heatmaps, "must be true or false")
        ok = isinstance(self.montage_tiles, int) and not isinstance(self.montage_tiles, bool) and self.montage_tiles >= 0
        check(ok, "montage_tiles", self.montage_tiles, "an integer >= 0 (0 = no montage)")
        ok = self.roi_label is None or (isinstance(self.roi_label, str) and self.roi_label != "")
        check(ok, "roi_label", self.roi_label, "null or a ROI label (e.g. necrosis)")


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
    rois = {n: str(ds.roi_path(n)) for n in names if t.roi_label and n in ds.names and ds.roi_path(n) is not None}
    opts = {"montage_tiles": t.montage_tiles if t.heatmaps else 0, "roi_paths": rois, "roi_label": t.roi_label}
    opts["evidence_class"] = t.evidence_class
    res, pred = predict(
        t.model, names, output_dir(cfg), bags=bags, slide_paths=paths, mpp=mpp, labels=labels, workers=t.workers, **opts
    )
    out = res.metrics()
    if "top_roi_share" in pred:
        out["top_roi_share_mean"] = float(pred["top_roi_share"].mean())
        print(f"predict_mil: {out['top_roi_share_mean']:.1%} of the top-10% attention tiles lie in {t.roi_label} ROIs")
    if "top_evidence_share" in pred:
        out["top_evidence_share_mean"] = float(pred["top_evidence_share"].mean())
        whose = t.evidence_class or "the predicted class"
        share = f"{out['top_evidence_share_mean']:.1%}"
        print(f"predict_mil: {share} of the top-10% tiles by evidence for {whose} lie in {t.roi_label} ROIs")
    print(f"predict_mil: {res.summary_line()}; predictions in {output_dir(cfg) / 'predictions.parquet'}")
    return out
