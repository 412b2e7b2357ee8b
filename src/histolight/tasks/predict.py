"""``task=predict``: per-tile predictions of a saved tile classifier for a set of TFRecords.

    python run.py task=predict task.model=outputs/<run>/model                       # the model's demo tiles
    python run.py task=predict task.model=<run>/model task.tfrecords=/data/tiles/128px_64um
    python run.py task=predict task.model=<run>/model task.label_source=roi           # + metrics vs ROI labels

Writes ``predictions.parquet`` (tile_id, slide, loc_x, loc_y, prob_<class>..., pred), ``slides.parquet``
and ``slides.csv`` (per-slide mean probabilities, tile count, predicted class), ``heatmaps/<slide>.png``
(one cell per tile, colours in ``heatmaps/legend.json``) and, with a label source, ``metrics.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from histolight.errors import HistolightError

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    from histolight.classify.config import PredictTaskConfig
    from histolight.config import from_config

    t = from_config(PredictTaskConfig, cfg.task, "task")  # validated before any work

    from histolight.classify import (
        aggregate_slides,
        evaluate_predictions,
        label_tiles,
        load_model,
        predict_tfrecords,
        write_heatmaps,
    )
    from histolight.extract import tile_dir_name
    from histolight.io.atomic import atomic_write_json, atomic_write_text
    from histolight.tasks.common import load_dataset, output_dir
    from histolight.tasks.train_tiles import write_parquet

    out = output_dir(cfg)
    model = load_model(t.model, device="cpu")
    src = t.tfrecords if t.tfrecords is not None else str(Path(t.tiles_dir) / tile_dir_name(model.tile_px, model.tile_um))
    log.info("predicting %s with %s (%s, classes %s)", src, t.model, model.config["timm_name"], model.classes)
    pred = predict_tfrecords(model, src, batch_size=t.batch_size, num_workers=t.num_workers, device=t.device, slides=t.slides)
    if pred.empty:
        raise HistolightError(f"no tiles to predict in {src}")
    write_parquet(pred.reset_index(), out / "predictions.parquet")
    slides = aggregate_slides(pred, model.classes)
    write_parquet(slides.reset_index(), out / "slides.parquet")
    atomic_write_text(out / "slides.csv", slides.to_csv())
    metrics: dict = {"n_tiles": float(len(pred)), "n_slides": float(len(slides))}
    if t.heatmaps:
        paths = write_heatmaps(pred, model.classes, out / "heatmaps", scale=t.heatmap_scale)
        log.info("wrote %d heatmap(s) to %s", len(paths), out / "heatmaps")
    if t.label_source is not None:
        ds = load_dataset(cfg)
        if t.label_source == "roi":
            from histolight.extract import get_tile_dataframe

            grid = get_tile_dataframe(
                ds,
                model.tile_px,
                model.tile_um,
                roi_filter_method=t.roi_filter_method,
                slides=[s for s in slides.index if s in set(ds.names)],
            )
            lab = label_tiles(grid, "roi", dataset=ds)
        else:
            lab = label_tiles(pred, t.label_source, dataset=ds, column=t.label_column, table=t.label_table)
        m = evaluate_predictions(pred, lab["label"], model.label_map, slide_level=t.label_source == "slide")
        metrics.update({f"eval/{k}": v for k, v in m.items()})
        atomic_write_json(out / "metrics.json", metrics)
    print(f"predict: {len(pred)} tiles of {len(slides)} slide(s) -> {out / 'predictions.parquet'}")
    print(slides.to_string())
    return metrics
