"""Prediction with a saved tile classifier: per-tile probabilities, per-slide aggregates, heatmaps.

>>> m = load_model("outputs/.../model")
>>> df = predict_tfrecords(m, "outputs/work/tiles/demo/128px_64um")   # one row per tile
>>> slides = aggregate_slides(df, m.classes)                          # one row per slide
>>> write_heatmaps(df, m.classes, "heatmaps/")                          # <slide>.png, one px per tile
"""

from __future__ import annotations

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
from histolight.classify.data import TileDataset, find_tfrecords, index_tfrecords
from histolight.classify.labels import LabelMap
from histolight.errors import ConfigError, HistolightError

log = logging.getLogger(__name__)

_TILE_DIR = re.compile(r"^(\d+)px_(.+)$")

#: heatmap colours per class (RGB), cycled; a tile's colour is the probability-weighted mix
PALETTE = [
    (220, 40, 60),
    (40, 160, 80),
    (60, 90, 220),
    (240, 180, 20),
    (150, 60, 200),
    (20, 190, 200),
    (120, 120, 120),
    (250, 120, 180),
]


def prob_columns(classes: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def check_tile_geometry(tfrecords: Sequence[str], tile_px: int, tile_um: Any) -> None:
    """ConfigError when the TFRecords' folder (``<px>px_<um>um``) says another tile size than the model's."""
    from histolight.extract.config import tile_dir_name

    want = tile_dir_name(tile_px, tile_um)
    for d in sorted({os.path.basename(os.path.dirname(os.path.abspath(p))) for p in tfrecords}):
        if _TILE_DIR.match(d) and d != want:
            raise ConfigError(
                f"TFRecords in '{d}' do not match the model's tiles ({want}); "
                f"extract tiles with tile_px={tile_px}, tile_um={tile_um}"
            )


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
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
) -> pd.DataFrame:
    """Per-tile class probabilities for every record of ``tfrecords`` (folder / glob / files).

    Returns a DataFrame indexed by tile id with ``slide, loc_x, loc_y, prob_<class>...`` and ``pred``
    (the most probable class).
    """
    m = model if isinstance(model, LoadedModel) else load_model(model)
    files = find_tfrecords(tfrecords)
    if not files:
        raise HistolightError(f"no TFRecords found in {tfrecords!r}")
    if check_geometry:
        check_tile_geometry(files, m.tile_px, m.tile_um)
    table = index_tfrecords(files, slides=slides)
    cols = prob_columns(m.classes)
    if table.empty:
        return pd.DataFrame(columns=["slide", "loc_x", "loc_y", *cols, "pred"]).rename_axis("tile_id")
    table = table.sort_values(["slide", "record"], kind="stable")
    ds = TileDataset(table, transform=m.transform(), tile_px=m.tile_px)
    dev = _device(device)
    net = m.net.to(dev).eval()
    amp = (dev.type == "cuda") if amp is None else amp
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, shuffle=False, pin_memory=dev.type == "cuda")
    probs = np.zeros((len(ds), len(m.classes)), np.float32)
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc="predict", unit="batch", leave=False)
    for batch in it:
        x = m.preprocess(batch["image"].to(dev, non_blocking=True))
        with torch.autocast(dev.type, enabled=amp):
            logits = net(x)
        probs[batch["index"].numpy()] = logits.float().softmax(1).cpu().numpy()
    out = table[["slide", "loc_x", "loc_y"]].copy()
    for j, c in enumerate(cols):
        out[c] = probs[:, j]
    out["pred"] = np.asarray(m.classes, dtype=object)[probs.argmax(1)]
    return out


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


def _grid_step(v: np.ndarray) -> int:
    u = np.unique(v)
    if len(u) < 2:
        return 1
    d = np.diff(u)
    return int(np.min(d[d > 0]))


def heatmap_image(pred: pd.DataFrame, classes: Sequence[str], scale: int = 4) -> np.ndarray:
    """H x W x 3 uint8 map of one slide's tiles, aligned with the slide: cell ``(i, j)`` covers base px
    ``[j * step, (j + 1) * step) x [i * step, (i + 1) * step)`` (step = smallest spacing of tile centres),
    drawn ``scale`` px wide; colour = probability-weighted class colour (:data:`PALETTE`), white where
    there is no tile. Overlay it on a slide thumbnail of ``step / scale`` base px per pixel."""
    xs, ys = pred["loc_x"].to_numpy(), pred["loc_y"].to_numpy()
    steps = [st for st, v in ((_grid_step(xs), xs), (_grid_step(ys), ys)) if len(np.unique(v)) > 1]
    step = max(1, min(steps) if steps else 1)
    gx, gy = xs // step, ys // step
    img = np.full((int(gy.max()) + 1, int(gx.max()) + 1, 3), 255, np.float32)
    pal = np.asarray([PALETTE[i % len(PALETTE)] for i in range(len(classes))], np.float32)
    p = pred[prob_columns(classes)].to_numpy(np.float32)
    img[gy, gx] = p @ pal
    img = np.clip(img, 0, 255).astype(np.uint8)
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, 0), scale, 1)
    return img


def write_heatmaps(pred: pd.DataFrame, classes: Sequence[str], outdir: str | os.PathLike, scale: int = 4) -> list[Path]:
    """One ``<slide>.png`` per slide (see :func:`heatmap_image`) and ``legend.json`` (class -> RGB)."""
    import cv2

    from histolight.io.atomic import atomic_write, atomic_write_json

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for slide, df in pred.groupby("slide"):
        img = heatmap_image(df, classes, scale)
        ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        if not ok:
            raise HistolightError(f"cannot encode heatmap of {slide}")
        p = outdir / f"{slide}.png"
        with atomic_write(p, "wb") as fh:
            fh.write(png.tobytes())
        paths.append(p)
    atomic_write_json(outdir / "legend.json", {c: list(PALETTE[i % len(PALETTE)]) for i, c in enumerate(classes)})
    return paths


__all__ = [
    "predict_tfrecords",
    "aggregate_slides",
    "evaluate_predictions",
    "write_heatmaps",
    "heatmap_image",
    "prob_columns",
    "check_tile_geometry",
    "PALETTE",
]
