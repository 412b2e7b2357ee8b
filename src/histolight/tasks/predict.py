"""``task=predict``: per-tile predictions of a saved tile classifier, one slide at a time.

    python run.py task=predict task.model=outputs/<run>/model                      # the tiles task=extract wrote
    python run.py task=predict task.model=<run>/model task.tfrecords=/data/tiles/128px_64um
    python run.py task=predict task.model=<run>/model task.label_source=roi          # + metrics vs ROI labels

Tiles: ``task.tfrecords``, or the tile folder ``<tiles_root>/<dataset.name>/<px>px_<um>um`` of the model's geometry.
Every tile's record CRCs are checked (``task.verify``) and a corrupt tile is left out and counted (``task.on_corrupt=
skip``) or fails its slide (``fail``). A model pickle that needs code execution is refused.
Writes ``slides.csv`` (per slide: status, reason, tile count, corrupt tiles, mean probabilities, predicted class),
``predictions.parquet``, ``slides.parquet``, ``heatmaps/<slide>.png`` and, with a label source, ``metrics.json``
(formats: :func:`histolight.classify.predict.predict_slides`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from histolight.cohort import PerSlideOptions
from histolight.config.schema import check, from_config, is_pos_int
from histolight.tasks.common import load_dataset, opt_list, output_dir, resolve_model, tile_source


@dataclass
class PredictTask(PerSlideOptions):
    """``conf/task/predict.yaml``."""

    name: str = "predict"
    model: str | None = None
    tfrecords: Any = None
    tiles_root: str | None = None
    slides: Any = None
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    heatmaps: bool = True
    heatmap_scale: int = 4
    label_source: str | None = None
    label_column: str = "label"
    label_table: str | None = None
    roi_filter_method: Any = "center"
    verify: bool = True
    on_corrupt: str = "skip"

    def __post_init__(self):
        from histolight.classify.data import check_on_corrupt
        from histolight.classify.labels import LABEL_SOURCES
        from histolight.extract.config import parse_roi_filter_method

        super().__post_init__()
        hint = "a trained model: a model folder (task=train_tiles writes <run>/model), its config JSON, or a .ckpt"
        check(isinstance(self.model, str) and self.model.strip() != "", "model", self.model, f"must be {hint}")
        check(self.tfrecords is not None or bool(self.tiles_root), "tiles_root", self.tiles_root, "a folder when tfrecords=null")
        self.slides = opt_list("slides", self.slides)
        check(is_pos_int(self.batch_size), "batch_size", self.batch_size, "must be an integer >= 1")
        check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        check(is_pos_int(self.heatmap_scale), "heatmap_scale", self.heatmap_scale, "must be an integer >= 1 (px per tile)")
        ok = self.label_source is None or self.label_source in LABEL_SOURCES
        check(ok, "label_source", self.label_source, f"must be null (no evaluation) or one of {', '.join(LABEL_SOURCES)}")
        self.roi_filter_method = parse_roi_filter_method(self.roi_filter_method)
        check(isinstance(self.verify, bool), "verify", self.verify, "must be true or false")
        check_on_corrupt(self.on_corrupt)


def run(cfg: DictConfig) -> dict:
    from histolight.classify.predict import evaluate_slides, load_classifier, predict_slides
    from histolight.io.atomic import atomic_write_json
    from histolight.utils.device import resolve_device

    t = from_config(PredictTask, cfg.task, "task")
    t.model = resolve_model(t.model, "classifier", "predict")
    out, device = output_dir(cfg), resolve_device(t.device)
    model = load_classifier(t.model, device)
    src = t.tfrecords or tile_source(cfg, t.tiles_root, model.tile_px, model.tile_um, f"the model {t.model}")
    kw = {"batch_size": t.batch_size, "num_workers": t.num_workers, "heatmaps": t.heatmaps, "heatmap_scale": t.heatmap_scale}
    kw.update(verify=t.verify, on_corrupt=t.on_corrupt)
    res, pred = predict_slides(t.model, src, out, slides=t.slides, device=device, workers=t.workers, **kw)
    n_corrupt = int(res.table["n_corrupt"].fillna(0).sum()) if "n_corrupt" in res.table else 0
    metrics = {**res.metrics(), "n_tiles": len(pred), "n_corrupt": n_corrupt}
    if t.label_source is not None and len(pred):
        lab = {"label_column": t.label_column, "label_table": t.label_table, "roi_filter_method": t.roi_filter_method}
        m = evaluate_slides(pred, model, load_dataset(cfg), t.label_source, **lab)
        metrics.update({f"eval/{k}": v for k, v in m.items()})
        atomic_write_json(out / "metrics.json", metrics)
    skipped = f" ({n_corrupt} corrupt tiles skipped: see the reason column of {out / 'slides.csv'})" if n_corrupt else ""
    print(f"predict: {res.summary_line()}; {len(pred)} tiles{skipped} -> {out / 'predictions.parquet'}")
    return metrics
