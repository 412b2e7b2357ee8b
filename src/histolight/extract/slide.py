"""Extraction of one slide: grid -> ROI filter -> QC masks -> per-tile pixel filters -> TFRecord.

Output of :func:`extract_slide` in its tile folder ``d`` (e.g. ``<outdir>/256px_128um``)::

    d/<slide>.tfrecords, d/<slide>.index.npz   records: image_raw, slide, loc_x, loc_y (Slideflow layout)
    d/meta/<slide>.parquet                     the slide's tile table (one row per record, same order)
    d/meta/<slide>.json                        summary: counts per rejection reason, blur burden, settings
    d/meta/<slide>.overlay.jpg, .tilemap.jpg, .samples.jpg   report images
    d/tiles/<slide>/<slide>-<loc_x>-<loc_y>.jpg   loose tiles (save_tiles=true)

The TFRecord is written under a temp name and renamed last, after the table and summary, so a
slide is complete exactly when ``<slide>.tfrecords`` exists with its ``meta/<slide>.json``; an
interrupted slide leaves only hidden temp files (removed on the next run).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from histolight.errors import HistolightError
from histolight.extract.config import ExtractConfig
from histolight.extract.filters import tile_reject_reason
from histolight.extract.grid import TileGrid, make_grid
from histolight.extract.rois import ROIAssignment, assign_rois
from histolight.io.atomic import atomic_write, atomic_write_json
from histolight.qc.base import QCMask
from histolight.roi import ROI

log = logging.getLogger(__name__)

#: Tile status codes, in the order filters are applied.
REASONS = ("kept", "roi", "qc", "grayspace", "whitespace")
KEPT, ROI_R, QC_R, GRAY_R, WHITE_R = range(5)

#: Columns of a tile table (``get_tile_dataframe`` returns the first 8, indexed by ``tile_id``).
TABLE_COLUMNS = ["loc_x", "loc_y", "grid_x", "grid_y", "roi_name", "roi_desc", "label", "slide"]
EXTRA_COLUMNS = ["tile_id", "record", "x", "y", "size_base", "qc_fraction", "roi_fraction"]

META_VERSION = 1


class SlideSkipped(HistolightError):
    """The slide cannot be extracted under the chosen settings (e.g. ``roi_method=inside`` without ROIs)."""


# ---------------------------------------------------------------------------------------------- paths


def tfrecord_path(tile_dir: str | os.PathLike, name: str) -> Path:
    return Path(tile_dir) / f"{name}.tfrecords"


def meta_dir(tile_dir: str | os.PathLike) -> Path:
    return Path(tile_dir) / "meta"


def is_complete(tile_dir: str | os.PathLike, name: str) -> bool:
    """True when slide ``name`` was fully extracted into ``tile_dir`` (TFRecord + summary + table)."""
    m = meta_dir(tile_dir)
    return tfrecord_path(tile_dir, name).is_file() and (m / f"{name}.json").is_file() and (m / f"{name}.parquet").is_file()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(tile_dir: str | os.PathLike, name: str) -> int:
    """Remove temp files/folders of slide ``name`` left by dead processes (interrupted runs). Returns the count."""
    d = Path(tile_dir)
    pats = [
        d / f".{glob.escape(name)}.*tmp-*",
        d / "meta" / f".{glob.escape(name)}.*tmp-*",
        d / "tiles" / f".{glob.escape(name)}.tmp-*",
    ]
    n = 0
    for pat in pats:
        for p in glob.glob(str(pat)):
            tail = p.rsplit("tmp-", 1)[-1]
            try:
                pid = int(tail.split("-")[0])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            n += 1
    if n:
        log.info("%s: removed %d temp file(s) of an interrupted run", name, n)
    return n


def remove_outputs(tile_dir: str | os.PathLike, name: str) -> None:
    """Delete a slide's TFRecord first (so it stops looking complete), then its index, meta and loose tiles."""
    d = Path(tile_dir)
    for p in (tfrecord_path(d, name), d / f"{name}.index.npz", d / f"{name}.index", d / f"{name}.index.npy"):
        p.unlink(missing_ok=True)
    for suffix in (".json", ".parquet", ".overlay.jpg", ".tilemap.jpg", ".samples.jpg"):
        (meta_dir(d) / f"{name}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(d / "tiles" / name, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class SlidePlan:
    """Everything decided before reading tile pixels.

    ``status`` per tile uses :data:`REASONS` codes (0 = still a candidate / kept); ``qc_fraction`` is the
    QC-masked fraction of each tile's footprint.
    """

    grid: TileGrid
    roi_mode: str
    rois: list[ROI]
    assign: ROIAssignment | None
    status: np.ndarray
    qc_fraction: np.ndarray
    qc: QCResult
    notes: list[str] = field(default_factory=list)

    @property
    def qc_names(self) -> list[str]:
        return self.qc.names

    @property
    def tissue_fraction(self) -> float | None:
        return self.qc.tissue_fraction

    @property
    def blur_burden(self) -> float | None:
        return self.qc.blur_burden

    @property
    def candidates(self) -> np.ndarray:
        return np.flatnonzero(self.status == KEPT)


def resolve_roi_mode(roi_method: str, has_roi_file: bool, n_rois: int, name: str, roi_file: str | None = None) -> str:
    """``'inside'``, ``'outside'``, ``'whole'`` or ``'ignore'``; raises :class:`SlideSkipped` with the reason."""
    where = f" ({roi_file})" if roi_file else ""
    if roi_method == "ignore":
        return "ignore"
    if roi_method == "auto":
        if not has_roi_file:
            return "whole"
        if n_rois == 0:
            raise SlideSkipped(
                f"slide '{name}': its ROI file{where} has no ROI inside the slide (all outside or invalid); "
                "fix the ROI coordinates (level-0 px), remove the file to extract the whole slide, or use roi_method=ignore"
            )
        return "inside"
    if not has_roi_file:
        raise SlideSkipped(
            f"slide '{name}': roi_method={roi_method} but the slide has no ROI file; "
            "add <slide>.csv/.geojson to dataset.rois or use roi_method=auto"
        )
    if roi_method == "inside" and n_rois == 0:
        raise SlideSkipped(f"slide '{name}': roi_method=inside but its ROI file{where} has no ROI inside the slide")
    if roi_method == "outside" and n_rois == 0:
        log.warning(
            "slide '%s': roi_method=outside but its ROI file%s has no ROI inside the slide: every tile is outside", name, where
        )
    return roi_method


def qc_tile_fraction(mask: np.ndarray, slide_dims: tuple[int, int], grid: TileGrid) -> np.ndarray:
    """Masked fraction of each tile's footprint (area outside the slide counts as masked).

    ``mask`` is ``h x w`` bool covering the whole slide (True = drop). Works one grid row at a time
    (column sums of the row's mask strip), so extra memory is one mask row of int32, not a full
    integral image.
    """
    n = len(grid)
    out = np.zeros(n)
    if n == 0:
        return out
    h, w = mask.shape
    sx, sy = w / slide_dims[0], h / slide_dims[1]  # mask px per base px
    e = grid.extract_px
    x0 = np.round(grid.x * sx).astype(np.int64)
    y0 = np.round(grid.y * sy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((grid.x + e) * sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((grid.y + e) * sy).astype(np.int64))
    total = ((x1 - x0) * (y1 - y0)).astype(np.float64)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    order = np.lexsort((grid.x, grid.y))
    rows = np.split(order, np.flatnonzero(np.diff(grid.y[order])) + 1)
    for idx in rows:
        a, b = int(cy0[idx[0]]), int(cy1[idx[0]])
        if b <= a:
            continue  # the row lies outside the mask: fully masked
        prefix = np.zeros(w + 1, np.int64)
        np.cumsum(np.count_nonzero(~mask[a:b], axis=0), out=prefix[1:])
        out[idx] = prefix[cx1[idx]] - prefix[cx0[idx]]
    return 1.0 - out / total


#: Long side (px) of the QC part masks kept for the report.
REPORT_MASK_PX = 1024


@dataclass
class QCResult:
    """Outcome of the slide's QC methods.

    Attributes:
        mask: the OR of all masks on the finest grid among them (None without QC methods).
        tissue_fraction: tissue share of the slide (needs a tissue method such as Otsu).
        blur_burden: ``|blur & tissue| / |tissue|`` (needs a tissue and a blur method).
        names: the methods' mask names.
        preview: ``tissue_background`` / ``blur`` masks shrunk to at most :data:`REPORT_MASK_PX` px (for reports).
    """

    mask: QCMask | None = None
    tissue_fraction: float | None = None
    blur_burden: float | None = None
    names: list[str] = field(default_factory=list)
    preview: dict = field(default_factory=dict)


def run_qc(slide, methods: Sequence[Callable]) -> QCResult:
    """Apply QC ``methods`` to ``slide`` and combine them (see :class:`QCResult`)."""
    from histolight.qc.registry import qc_role

    if not methods:
        return QCResult()
    masks: list[tuple[str | None, QCMask]] = []
    for m in methods:
        r = m(slide)
        if not isinstance(r, QCMask):
            raise HistolightError(f"QC method {m!r} returned {type(r).__name__}, expected histolight.qc.QCMask")
        masks.append((qc_role(m, r.name), r))
    finest = min((m for _, m in masks), key=lambda m: m.mpp)
    shape = finest.mask.shape
    combined = np.zeros(shape, bool)
    for _, m in masks:
        combined |= m.resized(shape)

    def union(role):
        sel = [m for r, m in masks if r == role]
        if not sel:
            return None
        if len(sel) == 1:
            return sel[0].resized(shape)
        u = np.zeros(shape, bool)
        for m in sel:
            u |= m.resized(shape)
        return u

    tissue_bg, blur = union("tissue"), union("blur")
    tissue_fraction = burden = None
    if tissue_bg is not None:
        n_t = int(tissue_bg.size - np.count_nonzero(tissue_bg))
        tissue_fraction = n_t / tissue_bg.size
        if blur is not None:
            burden = float(np.count_nonzero(blur & ~tissue_bg)) / n_t if n_t else 0.0
    f = min(1.0, REPORT_MASK_PX / max(shape))
    small = (max(1, round(shape[1] * f)), max(1, round(shape[0] * f)))
    parts = {}
    for key, v in (("tissue_background", tissue_bg), ("blur", blur)):
        if v is not None:
            parts[key] = cv2.resize(v.astype(np.uint8), small, interpolation=cv2.INTER_NEAREST) > 0
    names = [m.name for _, m in masks]
    return QCResult(QCMask(combined, finest.mpp, "+".join(names)), tissue_fraction, burden, names, parts)


def plan_slide(
    slide,
    cfg: ExtractConfig,
    rois: Sequence[ROI] | None,
    *,
    roi_file: str | None = None,
    qc_methods: Sequence[Callable] | None = None,
    apply_qc: bool = True,
) -> SlidePlan:
    """Grid, ROI decision and QC for ``slide`` (no tile pixels read).

    Args:
        rois: the slide's ROIs in base px (already clipped), or None when it has no ROI file.
        qc_methods: prebuilt QC callables (default: built from ``cfg.qc`` with the tile mpp).
        apply_qc: False to skip QC (geometry-only tile tables).
    """
    name = slide.name
    grid = make_grid(slide, cfg.tile_px, cfg.um, cfg.mag, cfg.stride_div, cfg.edge_tiles)
    has_file = rois is not None
    rois = list(rois or [])
    mode = resolve_roi_mode(cfg.roi_method, has_file, len(rois), name, roi_file)
    n = len(grid)
    status = np.zeros(n, np.int8)
    assign = None
    if mode in ("inside", "outside"):
        assign = assign_rois(grid, rois, cfg.roi_filter_method)
        status[~assign.inside if mode == "inside" else assign.inside] = ROI_R
        if mode == "outside":
            assign.roi[:] = -1
    notes = []
    if n == 0:
        W, H = slide.dimensions
        notes.append(
            f"the tile footprint ({grid.extract_px}x{grid.extract_px} base px = {cfg.tile_um} "
            f"{'um' if cfg.mag is None else ''}) does not fit in the slide ({W}x{H} px); "
            "use a smaller tile_um or edge_tiles=true"
        )
    qc = QCResult()
    qc_fraction = np.zeros(n)
    if apply_qc:
        if qc_methods is None:
            from histolight.qc.registry import build_qc

            qc_methods = build_qc(cfg.qc, tile_mpp=grid.tile_mpp, key="qc")
        qc = run_qc(slide, qc_methods)
        if qc.mask is not None and n:
            qc_fraction = qc_tile_fraction(qc.mask.mask, slide.dimensions, grid)
            status[(status == KEPT) & (qc_fraction > cfg.filter_threshold)] = QC_R
    return SlidePlan(grid, mode, rois, assign, status, qc_fraction, qc, notes)


# ---------------------------------------------------------------------------------------------- encoding


def encode_tile(img: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """JPEG (``quality``) or PNG bytes of an ``H x W x 3`` uint8 RGB tile."""
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if fmt == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise HistolightError(f"could not encode a {img.shape} tile as {fmt}")
    return buf.tobytes()


def build_normalizer_for(cfg: ExtractConfig):
    """The stain normalizer of ``cfg`` (``normalizer``, ``normalizer_source``), or None.

    ``normalizer_source``: a shipped preset name, ``'context'`` (fit per slide on its thumbnail),
    a fit JSON file, or an image file to fit on.
    """
    if cfg.normalizer is None or cfg.normalizer == "none":
        return None
    from histolight.norm import available_presets, build_normalizer

    spec = {"method": cfg.normalizer} if isinstance(cfg.normalizer, str) else dict(cfg.normalizer)
    src = cfg.normalizer_source
    fit_image = None
    if src is not None:
        if src == "context":
            spec["context"] = True
        elif src in available_presets():
            spec["preset"] = src
        elif os.path.isfile(src) and src.lower().endswith(".json"):
            spec["fit_path"] = src
        elif os.path.isfile(src):
            fit_image = src
        else:
            from histolight.errors import ConfigError

            raise ConfigError(
                f"normalizer_source={src!r} is invalid: allowed a preset {available_presets()}, "
                "'context', a fit .json file or an image file"
            )
    norm = build_normalizer(spec)
    if fit_image is not None:
        img = cv2.imread(fit_image, cv2.IMREAD_COLOR)
        if img is None:
            raise HistolightError(f"normalizer_source: cannot read image '{fit_image}'")
        norm.fit(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return norm


# ---------------------------------------------------------------------------------------------- result


@dataclass
class SlideResult:
    """Summary of one slide's extraction (JSON-able via :meth:`to_dict`)."""

    slide: str
    status: str  # done | empty | skipped | failed | reused
    reason: str | None = None
    grid_tiles: int = 0
    kept: int = 0
    rejected_roi: int = 0
    rejected_qc: int = 0
    rejected_grayspace: int = 0
    rejected_whitespace: int = 0
    tissue_fraction: float | None = None
    blur_burden: float | None = None
    blur_flagged: bool = False
    roi_mode: str | None = None
    n_rois: int | None = None
    width: int | None = None
    height: int | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    level: int | None = None
    extract_px: int | None = None
    tile_mpp: float | None = None
    qc: str | None = None
    seconds: float = 0.0
    tfrecord: str | None = None
    normalizer: str | None = None
    settings: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SlideResult:
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _Reservoir:
    """Deterministic reservoir sample of up to ``k`` small tile previews."""

    def __init__(self, k: int, seed: int, size: int = 96):
        self.k, self.size = k, size
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[int, np.ndarray, str]] = []
        self.seen = 0

    def offer(self, order: int, img: np.ndarray, tag: str = "") -> None:
        if self.k <= 0:
            return
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append((order, cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA), tag))
        else:
            j = int(self.rng.integers(0, self.seen))
            if j < self.k:
                self.items[j] = (order, cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA), tag)

    def sorted(self) -> list[tuple[np.ndarray, str]]:
        return [(im, tag) for _, im, tag in sorted(self.items, key=lambda t: t[0])]


def _table(name: str, grid: TileGrid, plan: SlidePlan, idx: np.ndarray) -> pd.DataFrame:
    """Tile table rows for tiles ``idx`` (in record order)."""
    lx, ly = grid.loc_x[idx], grid.loc_y[idx]
    roi_name = [None] * len(idx)
    roi_desc = [None] * len(idx)
    label = [None] * len(idx)
    if plan.assign is not None and len(idx):
        ri = plan.assign.roi[idx]
        for k, r in enumerate(ri.tolist()):
            if r >= 0:
                roi = plan.rois[r]
                roi_name[k], roi_desc[k], label[k] = roi.name, roi.description, roi.label
    roi_frac = plan.assign.fraction[idx] if plan.assign is not None else np.zeros(len(idx))
    df = pd.DataFrame(
        {
            "tile_id": [f"{name}-{x}-{y}" for x, y in zip(lx.tolist(), ly.tolist())],
            "slide": pd.Series([name] * len(idx), dtype=object),
            "loc_x": lx.astype(np.int64),
            "loc_y": ly.astype(np.int64),
            "grid_x": grid.grid_x[idx].astype(np.int64),
            "grid_y": grid.grid_y[idx].astype(np.int64),
            "roi_name": pd.Series(roi_name, dtype=object),
            "roi_desc": pd.Series(roi_desc, dtype=object),
            "label": pd.Series(label, dtype=object),
            "record": np.arange(len(idx), dtype=np.int64),
            "x": grid.x[idx].astype(np.int64),
            "y": grid.y[idx].astype(np.int64),
            "size_base": np.full(len(idx), grid.extract_px, np.int64),
            "qc_fraction": plan.qc_fraction[idx].astype(np.float32) if len(plan.qc_fraction) else np.zeros(len(idx), np.float32),
            "roi_fraction": roi_frac.astype(np.float32),
        }
    )
    return df[["tile_id", *TABLE_COLUMNS, *[c for c in EXTRA_COLUMNS if c != "tile_id"]]]


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a tile table as Parquet atomically (string columns stay strings when all null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = []
    for c in df.columns:
        if df[c].dtype == object or pd.api.types.is_string_dtype(df[c].dtype):
            fields.append(pa.field(c, pa.string()))
        else:
            fields.append(pa.field(c, pa.from_numpy_dtype(df[c].dtype)))
    table = pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)


# ---------------------------------------------------------------------------------------------- extraction


def extract_slide(
    slide,
    cfg: ExtractConfig,
    tile_dir: str | os.PathLike | None,
    rois: Sequence[ROI] | None = None,
    *,
    roi_file: str | None = None,
    qc_methods: Sequence[Callable] | None = None,
    normalizer: Any = None,
    progress: Callable[[int, int], None] | None = None,
    dry_run: bool | None = None,
) -> SlideResult:
    """Extract one open slide (:class:`~histolight.wsi.Slide` or ``VirtualSlide``) into ``tile_dir``.

    Args:
        slide: the slide (its ``mpp`` must be known: file value or override).
        cfg: validated options.
        tile_dir: folder receiving ``<slide>.tfrecords`` (and ``meta/``); None with ``dry_run``.
        rois: ROIs in base px (clipped to the slide), or None when the slide has no ROI file.
        roi_file: the ROI file's path (messages only).
        qc_methods: prebuilt QC callables (default: from ``cfg.qc``).
        normalizer: a stain normalizer (default: built from ``cfg``; ``False`` = none).
        progress: ``progress(new_tiles_done, candidates)`` called as tiles are processed.
        dry_run: compute everything but write no tiles (default ``cfg.dry_run``).

    Returns a :class:`SlideResult`; raises :class:`SlideSkipped` / :class:`HistolightError` on bad input.
    Writes are atomic and the TFRecord is renamed last (see module docstring).
    """
    t0 = time.time()
    dry = cfg.dry_run if dry_run is None else dry_run
    name = slide.name
    if tile_dir is None and not dry:
        raise ValueError("extract_slide needs tile_dir unless dry_run")
    mpp = slide.mpp  # raises MissingMPPError with the fix
    plan = plan_slide(slide, cfg, rois, roi_file=roi_file, qc_methods=qc_methods)
    grid = plan.grid
    cand = plan.candidates
    if progress:
        progress(0, len(cand))
    if normalizer is None:
        normalizer = build_normalizer_for(cfg)
    normalizer = normalizer or None
    if normalizer is not None and getattr(normalizer, "use_context", False):
        try:
            normalizer.set_context(slide.thumbnail(max_size=2048))
        except ValueError as e:
            raise HistolightError(
                f"slide '{name}': cannot fit the stain normalizer on its thumbnail ({e}); "
                "use a preset normalizer_source instead of 'context'"
            ) from None
    if normalizer is not None and hasattr(normalizer, "reset_stats"):
        normalizer.reset_stats()

    seed = zlib.crc32(name.encode())
    kept_s = _Reservoir(cfg.report_samples if cfg.report else 0, seed)
    rej_s = _Reservoir(min(4, cfg.report_samples) if cfg.report else 0, seed + 1)

    writer = None
    tmp_tiles = None
    d = Path(tile_dir) if tile_dir is not None else None
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(d, name)
    if not dry:
        from histolight.io.tfrecord import TFRecordWriter

        writer = TFRecordWriter(tfrecord_path(d, name), slide=name)
        if cfg.save_tiles:
            (d / "tiles").mkdir(exist_ok=True)
            tmp_tiles = d / "tiles" / f".{name}.tmp-{os.getpid()}-{seed:08x}"
            shutil.rmtree(tmp_tiles, ignore_errors=True)
            tmp_tiles.mkdir()
    kept_idx: list[int] = []
    ext = "png" if cfg.img_format == "png" else "jpg"
    try:
        for run in grid.runs(cand):
            imgs = grid.read_run(slide, run)
            for i, img in zip(run, imgs):
                why = tile_reject_reason(
                    img, cfg.grayspace_threshold, cfg.grayspace_fraction, cfg.whitespace_threshold, cfg.whitespace_fraction
                )
                if why is not None:
                    plan.status[i] = GRAY_R if why == "grayspace" else WHITE_R
                    rej_s.offer(i, img, why)
                    continue
                if normalizer is not None:
                    img = normalizer.transform(img)
                kept_idx.append(i)
                kept_s.offer(i, img)
                if writer is not None:
                    data = encode_tile(img, cfg.img_format, cfg.quality)
                    lx, ly = int(grid.loc_x[i]), int(grid.loc_y[i])
                    writer.write_tile(data, lx, ly, slide=name)
                    if tmp_tiles is not None:
                        with open(tmp_tiles / f"{name}-{lx}-{ly}.{ext}", "wb") as fh:
                            fh.write(data)
            if progress:
                progress(len(run), len(cand))
        idx = np.asarray(kept_idx, np.int64)
        table = _table(name, grid, plan, idx)
        counts = np.bincount(plan.status.astype(np.int64), minlength=len(REASONS))
        W, H = slide.dimensions
        res = SlideResult(
            slide=name,
            status="done" if len(idx) else "empty",
            grid_tiles=len(grid),
            kept=int(len(idx)),
            rejected_roi=int(counts[ROI_R]),
            rejected_qc=int(counts[QC_R]),
            rejected_grayspace=int(counts[GRAY_R]),
            rejected_whitespace=int(counts[WHITE_R]),
            tissue_fraction=plan.tissue_fraction,
            blur_burden=plan.blur_burden,
            blur_flagged=bool(plan.blur_burden is not None and plan.blur_burden > cfg.blur_flag),
            roi_mode=plan.roi_mode,
            n_rois=len(plan.rois),
            width=W,
            height=H,
            mpp=mpp,
            mpp_source=getattr(slide, "mpp_source", None),
            level=grid.level,
            extract_px=grid.extract_px,
            tile_mpp=grid.tile_mpp,
            qc="+".join(plan.qc_names) or None,
            tfrecord=str(tfrecord_path(d, name)) if (d is not None and not dry) else None,
            normalizer=None if normalizer is None else repr(normalizer),
            settings=cfg.settings(),
        )
        if not len(idx):
            res.reason = zero_tiles_message(res, plan.notes)
            log.warning("%s", res.reason)
        res.seconds = round(time.time() - t0, 3)
        if d is not None:
            md = meta_dir(d) if not dry else d / "meta"
            md.mkdir(parents=True, exist_ok=True)
            if cfg.report:
                from histolight.extract.report import save_slide_images

                save_slide_images(slide, plan, kept_s.sorted(), rej_s.sorted(), md)
            write_table(table, md / f"{name}.parquet")
            atomic_write_json(md / f"{name}.json", {"version": META_VERSION, **res.to_dict()}, default=_json_default)
        if tmp_tiles is not None:
            final = d / "tiles" / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp_tiles, final)
            tmp_tiles = None
        if writer is not None:
            writer.close()  # the rename that makes the slide complete
            writer = None
        res.seconds = round(time.time() - t0, 3)
        res._table = table  # type: ignore[attr-defined]
        return res
    finally:
        if writer is not None:
            writer.abort()
        if tmp_tiles is not None:
            shutil.rmtree(tmp_tiles, ignore_errors=True)


def zero_tiles_message(res: SlideResult, notes: Sequence[str] = ()) -> str:
    """A clear explanation of why a slide yielded no tiles."""
    parts = [
        f"{k} {v}"
        for k, v in (
            ("roi", res.rejected_roi),
            ("qc", res.rejected_qc),
            ("grayspace", res.rejected_grayspace),
            ("whitespace", res.rejected_whitespace),
        )
        if v
    ]
    why = (
        "; ".join(notes)
        if notes
        else (f"all {res.grid_tiles} grid tiles were rejected ({', '.join(parts)})" if parts else "the grid is empty")
    )
    return f"slide '{res.slide}': 0 tiles kept: {why}. Its TFRecord is empty but valid."


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def read_meta(tile_dir: str | os.PathLike, name: str) -> dict | None:
    """The summary JSON of a complete slide (None if absent/unreadable)."""
    p = meta_dir(tile_dir) / f"{name}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
