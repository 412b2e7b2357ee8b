"""Prediction with a saved tile classifier: per-tile probabilities, per-slide aggregates, heatmaps.

>>> m = load_model("outputs/.../model")
>>> df = predict_tfrecords(m, "outputs/work/tiles/demo/128px_64um")   # one row per tile
>>> slides = aggregate_slides(df, m.classes)                          # one row per slide
>>> write_heatmaps(df, m.classes, "heatmaps/")                        # <slide>.png + .json, one cell per tile
>>> res, pred = predict_slides("outputs/.../model", tiles, "out/")   # the same per slide, on the cohort runner

Integrity: every tile's record CRCs are checked (``verify=True``) and its image decoded strictly; a corrupt tile is
left out and counted (``on_corrupt='skip'``, the default here: ``n_corrupt`` and the first one in the slide's summary
``reason``, each one in the log) or stops the slide (``'fail'``). See :mod:`histolight.classify.data`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from histolight.classify.artifacts import LoadedModel, load_model
from histolight.classify.data import CorruptTile, TileDataset, check_on_corrupt, collate_tiles, describe_corrupt
from histolight.classify.heatmaps import heatmap_image, slide_geometry, write_heatmap, write_heatmaps, write_legend
from histolight.classify.labels import LabelMap
from histolight.cohort import CohortResult, report_progress, run_per_slide
from histolight.errors import ConfigError, HistolightError
from histolight.io.tables import write_parquet
from histolight.io.tilestore import find_tfrecords, index_tfrecords, tfrecord_slide_name
from histolight.units import tile_dir_name
from histolight.utils.device import resolve_device

log = logging.getLogger(__name__)

_TILE_DIR = re.compile(r"^(\d+)px_(.+)$")


def prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def check_tile_geometry(tfrecords: Sequence[str], tile_px: int, tile_um: Any) -> None:
    """ConfigError when the TFRecords' folder (``<px>px_<um>um``) says another tile size than the model's."""
    want = tile_dir_name(tile_px, tile_um)
    for d in sorted({os.path.basename(os.path.dirname(os.path.abspath(p))) for p in tfrecords}):
        if _TILE_DIR.match(d) and d != want:
            raise ConfigError(
                f"TFRecords in '{d}' do not match the model's tiles ({want}); "
                f"extract tiles with tile_px={tile_px}, tile_um={tile_um}"
            )


_MODELS: dict[tuple, LoadedModel] = {}


def load_classifier(model: LoadedModel | str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """``model`` itself, or the classifier at path ``model`` on ``device``, loaded once per process (the last one is
    cached, keyed by resolved path, device and modification time): slide workers load it once, not per slide."""
    if isinstance(model, LoadedModel):
        return model
    p = Path(model).expanduser().resolve()
    key = (str(p), str(device), p.stat().st_mtime_ns if p.exists() else None)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(p, device=device)
    return _MODELS[key]


@torch.no_grad()
def predict_tiles(
    model: LoadedModel | str | os.PathLike,
    tfrecords: Any,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    slides: Sequence[str] | None = None,
    check_geometry: bool = True,
    amp: bool | None = None,
    progress: bool = True,
    verify: bool = True,
    on_corrupt: str = "skip",
) -> tuple[pd.DataFrame, list[CorruptTile]]:
    """:func:`predict_tfrecords`, also returning the corrupt tiles it left out (``on_corrupt='skip'``)."""
    check_on_corrupt(on_corrupt)
    dev = torch.device(resolve_device(device))
    m = load_classifier(model, str(dev))
    files = find_tfrecords(tfrecords)
    if not files:
        raise HistolightError(f"no TFRecords found in {tfrecords!r}")
    if check_geometry:
        check_tile_geometry(files, m.tile_px, m.tile_um)
    table = index_tfrecords(files, slides=slides)
    cols = prob_columns(m.classes)
    if table.empty:
        return pd.DataFrame(columns=["slide", "loc_x", "loc_y", *cols, "pred"]).rename_axis("tile_id"), []
    table = table.sort_values(["slide", "record"], kind="stable")
    ds = TileDataset(table, transform=m.transform(), tile_px=m.tile_px, verify=verify, on_corrupt=on_corrupt)
    net = m.net.to(dev).eval()
    amp = (dev.type == "cuda") if amp is None else amp
    loader = DataLoader(
        ds, batch_size=batch_size, num_workers=num_workers, shuffle=False, pin_memory=dev.type == "cuda", collate_fn=collate_tiles
    )
    probs = np.zeros((len(ds), len(m.classes)), np.float32)
    done = np.zeros(len(ds), bool)
    bad: list[CorruptTile] = []
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="predict", unit="batch", leave=False)
    for batch in it:
        bad.extend(batch["corrupt"])
        if "image" in batch:
            x = m.preprocess(batch["image"].to(dev, non_blocking=True))
            with torch.autocast(dev.type, enabled=amp):
                logits = net(x)
            idx = batch["index"].numpy()
            probs[idx] = logits.float().softmax(1).cpu().numpy()
            done[idx] = True
        report_progress(len(batch["corrupt"]) + (len(batch["index"]) if "image" in batch else 0), len(ds))
    out = table[["slide", "loc_x", "loc_y"]].copy()
    for j, c in enumerate(cols):
        out[c] = probs[:, j]
    out["pred"] = np.asarray(m.classes, dtype=object)[probs.argmax(1)]
    return out[done], bad


def predict_tfrecords(
    model: LoadedModel | str | os.PathLike,
    tfrecords: Any,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = None,
    slides: Sequence[str] | None = None,
    check_geometry: bool = True,
    amp: bool | None = None,
    progress: bool = True,
    verify: bool = True,
    on_corrupt: str = "skip",
) -> pd.DataFrame:
    """Per-tile class probabilities for every record of ``tfrecords`` (folder / glob / files).

    Returns a DataFrame indexed by tile id with ``slide, loc_x, loc_y, prob_<class>...`` and ``pred``
    (the most probable class). Inside a cohort run, each batch advances the slide's progress (``report_progress``).
    ``verify``: check every record's CRCs; ``on_corrupt``: ``skip`` (corrupt tiles are left out and logged;
    :func:`predict_tiles` also returns them) or ``fail`` (the first one raises
    :class:`~histolight.classify.data.CorruptTileError`).
    """
    pred, bad = predict_tiles(
        model,
        tfrecords,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        slides=slides,
        check_geometry=check_geometry,
        amp=amp,
        progress=progress,
        verify=verify,
        on_corrupt=on_corrupt,
    )
    if bad:
        log.warning("%s", describe_corrupt(bad))
    return pred


def aggregate_slides(pred: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per slide: ``n_tiles``, mean ``prob_<class>`` over its tiles, and ``pred`` (argmax of the means)."""
    cols = prob_columns(classes)
    g = pred.groupby("slide")
    out = g[cols].mean()
    out.insert(0, "n_tiles", g.size())
    out["pred"] = np.asarray(list(classes), dtype=object)[out[cols].to_numpy().argmax(1)] if len(out) else []
    return out


def evaluate_predictions(
    pred: pd.DataFrame, labels: pd.Series, label_map: LabelMap, slide_level: bool = False
) -> dict[str, float]:
    """Metrics of per-tile predictions against ``labels`` (tile id -> class name), on the tiles both have.

    A label outside ``label_map`` raises :class:`~histolight.classify.labels.UnknownLabelError` naming the tile.
    """
    from histolight.classify.module import classification_metrics

    common = pred.index.intersection(labels.index)
    if len(common) == 0:
        raise HistolightError("no predicted tile has a label (tile ids do not match)")
    y = label_map.encode(labels.loc[common], list(common))
    p = pred.loc[common, prob_columns(label_map.names)].to_numpy()
    return classification_metrics(p, y, pred.loc[common, "slide"].to_numpy(), slide_level)


# ---------------------------------------------------------------------------------------------- per slide, on the cohort runner


def predict_slide(
    name: str,
    model: LoadedModel | str,
    files: dict[str, list[str]],
    out: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "cpu",
    heatmaps: bool = True,
    heatmap_scale: int = 4,
    verify: bool = True,
    on_corrupt: str = "skip",
) -> dict:
    """Per-slide function of :func:`predict_slides`: predict the tiles of slide ``name`` (TFRecords ``files[name]``),
    write ``<out>/parts/<name>.parquet`` and ``<out>/heatmaps/<name>.png`` + ``.json`` (:mod:`~.heatmaps`). Returns
    its summary row: the per-slide aggregate (``n_tiles``, ``n_corrupt``, mean ``prob_<class>``, ``pred``; the first corrupt tile as ``reason``);
    status ``empty`` for a slide without readable tiles."""
    m = load_classifier(model, device)
    pred, bad = predict_tiles(
        m,
        files[name],
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        check_geometry=False,
        progress=False,
        verify=verify,
        on_corrupt=on_corrupt,
    )
    corrupt = {"n_corrupt": len(bad), "reason": describe_corrupt(bad)}
    if pred.empty:
        return {"status": "empty", "n_tiles": 0, **corrupt}
    for sub in ("parts", "heatmaps") if heatmaps else ("parts",):
        Path(out, sub).mkdir(parents=True, exist_ok=True)
    write_parquet(pred.reset_index(), Path(out, "parts", f"{name}.parquet"))
    if heatmaps:
        geom = slide_geometry(Path(files[name][0]).parent, name, pred)
        write_heatmap(pred, m.classes, Path(out, "heatmaps"), name, geom, heatmap_scale)
    agg = aggregate_slides(pred, m.classes).iloc[0]
    probs = {c: float(agg[c]) for c in prob_columns(m.classes)}
    return {"n_tiles": int(agg["n_tiles"]), "n_corrupt": len(bad), **probs, "pred": agg["pred"], "reason": corrupt["reason"]}


def predict_slides(
    model: LoadedModel | str | os.PathLike,
    tfrecords: Any,
    out: str | os.PathLike,
    *,
    slides: Sequence[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | None = "auto",
    heatmaps: bool = True,
    heatmap_scale: int = 4,
    workers: int = 1,
    progress: bool = True,
    verify: bool = True,
    on_corrupt: str = "skip",
) -> tuple[CohortResult, pd.DataFrame]:
    """Predict every slide of ``tfrecords`` (folder / glob / files) on the cohort runner
    (:func:`histolight.cohort.run_per_slide`), one slide per call, so one corrupt TFRecord fails only its slide.

    Writes into ``out``: ``slides.csv`` (the run's summary: ``slide, status, reason, seconds, n_tiles, n_corrupt,
    prob_<class>..., pred``), ``predictions.parquet`` (every tile of the predicted slides: ``tile_id, slide, loc_x,
    loc_y, prob_<class>..., pred``), ``slides.parquet`` (the aggregates of the predicted slides) and, with
    ``heatmaps``, ``heatmaps/<slide>.png`` + ``<slide>.json`` (whole slide at a fixed scale, geometry sidecar) and
    ``legend.json`` + ``legend.png`` (:mod:`histolight.classify.heatmaps`).

    ``verify``: check every tile's record CRCs; ``on_corrupt``: ``skip`` (a corrupt tile is left out, counted in
    ``n_corrupt``, the first one in ``reason``) or ``fail`` (it fails its slide).

    Returns: ``(result, predictions)``, predictions indexed by tile id.
    """
    check_on_corrupt(on_corrupt)
    device = resolve_device(device)
    m = load_classifier(model, device)  # a bad model fails the run here, not every slide
    paths = find_tfrecords(tfrecords)
    if not paths:
        raise HistolightError(f"no TFRecords found in {tfrecords!r}; run task=extract first or set task.tfrecords")
    check_tile_geometry(paths, m.tile_px, m.tile_um)
    files: dict[str, list[str]] = {}
    for p in paths:
        files.setdefault(tfrecord_slide_name(p), []).append(p)
    names = sorted(files) if slides is None else [s for s in sorted(files) if s in set(slides)]
    out = Path(out)
    if heatmaps:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        write_legend(m.classes, out / "heatmaps")
    fn = functools.partial(
        predict_slide,
        model=model if isinstance(model, LoadedModel) else str(model),
        files=files,
        out=str(out),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        heatmaps=heatmaps,
        heatmap_scale=heatmap_scale,
        verify=verify,
        on_corrupt=on_corrupt,
    )
    res = run_per_slide(names, fn, out_dir=out, workers=workers, summary_name="slides.csv", desc="predict", progress=progress)
    parts = [out / "parts" / f"{n}.parquet" for n, st in zip(res.table["slide"], res.table["status"]) if st == "done"]
    cols = ["tile_id", "slide", "loc_x", "loc_y", *prob_columns(m.classes), "pred"]
    pred = pd.concat([pd.read_parquet(p) for p in parts]) if parts else pd.DataFrame(columns=cols)
    pred = pred.set_index("tile_id")
    write_parquet(pred.reset_index(), out / "predictions.parquet")
    write_parquet(aggregate_slides(pred, m.classes).reset_index(), out / "slides.parquet")
    for p in parts:
        p.unlink()
    with contextlib.suppress(OSError):  # only when empty
        (out / "parts").rmdir()
    return res, pred


def evaluate_slides(
    pred: pd.DataFrame,
    model: LoadedModel,
    dataset,
    label_source: str,
    *,
    label_column: str = "label",
    label_table: Any = None,
    roi_filter_method: Any = "center",
) -> dict[str, float]:
    """Metrics of ``pred`` (from :func:`predict_slides`) against the labels of ``label_source`` (``roi``: the
    dataset's ROIs, tile grid recomputed with the model's geometry; ``slide``: the annotations' ``label_column``
    (slide-level metrics too); ``table``: ``label_table``)."""
    from histolight.classify.labels import label_tiles

    if label_source == "roi":
        from histolight.extract import get_tile_dataframe

        names = sorted(set(pred["slide"]) & set(dataset.names))
        grid = get_tile_dataframe(dataset, model.tile_px, model.tile_um, roi_filter_method=roi_filter_method, slides=names)
        lab = label_tiles(grid, "roi", dataset=dataset)
    else:
        lab = label_tiles(pred, label_source, dataset=dataset, column=label_column, table=label_table)
    return evaluate_predictions(pred, lab["label"], model.label_map, slide_level=label_source == "slide")


__all__ = [
    "predict_tfrecords",
    "predict_tiles",
    "aggregate_slides",
    "evaluate_predictions",
    "evaluate_slides",
    "write_heatmaps",
    "write_legend",
    "heatmap_image",
    "load_classifier",
    "predict_slide",
    "predict_slides",
    "prob_columns",
    "check_tile_geometry",
]
