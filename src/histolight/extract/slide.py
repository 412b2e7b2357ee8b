"""Extraction of one slide: its plan (grid, ROIs, QC) -> per-tile pixel filters -> TFRecord + tile table + summary.

The on-disk layout of the tile folder is :mod:`histolight.extract.layout`; what is decided before reading pixels is
:mod:`histolight.extract.plan`.

A tile that is exactly one stored JPEG tile of the slide (magnification mode on the stored tile grid, JPEG output, no
normalizer: :meth:`~histolight.extract.grid.TileGrid.stored_jpegs`) is written as the slide's own JPEG bytes (tables
merged in; they decode to exactly the pixels a read gives): no decode/re-encode loss and no encode cost. Filters still
see the decoded pixels; where no filter needs them the tile is not decoded at all. When the grid cannot be aligned to
the stored tiles, the reason is logged once per process. The TFRecord is written under a temp name and renamed last, after the table and
summary, so a slide is complete exactly when :func:`~histolight.extract.layout.is_complete`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from histolight.errors import HistolightError
from histolight.extract.config import ExtractConfig, build_normalizer_for
from histolight.extract.filters import tile_reject_reason
from histolight.extract.layout import (
    GRAY_R,
    QC_R,
    REASONS,
    ROI_R,
    WHITE_R,
    SlideResult,
    clean_stale_temps,
    loose_tiles_dir,
    loose_tiles_temp,
    meta_dir,
    table_path,
    tfrecord_path,
    write_meta,
)
from histolight.extract.plan import plan_slide, tile_table
from histolight.io.images import decode_image, encode_image
from histolight.io.tables import write_parquet
from histolight.roi import ROI
from histolight.wsi.slide import resize_picture

log = logging.getLogger(__name__)


class _Reservoir:
    """Deterministic reservoir sample of up to ``k`` tile previews of ``size`` x ``size`` px (for the report).

    Offers are images or callables returning one (decoded only if still in the sample at the end); previews are
    resized once, when :meth:`sorted` is called."""

    def __init__(self, k: int, seed: int, size: int = 96):
        self.k, self.size = k, size
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[int, Any, str]] = []
        self.seen = 0

    def offer(self, order: int, img: np.ndarray | Callable[[], np.ndarray], tag: str = "") -> None:
        if self.k <= 0:
            return
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append((order, _own(img), tag))
        else:
            j = int(self.rng.integers(0, self.seen))
            if j < self.k:
                self.items[j] = (order, _own(img), tag)

    def sorted(self) -> list[tuple[np.ndarray, str]]:
        out = []
        for _, im, tag in sorted(self.items, key=lambda t: t[0]):
            im = im() if callable(im) else im
            out.append((resize_picture(im, (self.size, self.size)), tag))
        return out


def _own(img: np.ndarray | Callable[[], np.ndarray]) -> np.ndarray | Callable[[], np.ndarray]:
    """``img`` itself when it owns its pixels (or is a callable), else a copy (a view would keep its strip alive)."""
    return img if callable(img) or img.base is None else np.array(img)


#: reasons already logged for not copying stored JPEG tiles (said once per process)
_NOTED: set[str] = set()


def _use_stored_jpegs(slide, cfg: ExtractConfig, grid, normalizer) -> bool:
    """Whether tiles may be copied from the slide's stored JPEG tiles (jpg output, no normalizer, magnification mode,
    grid aligned to the stored tiles); in magnification mode, say once per process why they cannot."""
    if cfg.img_format != "jpg" or normalizer is not None or not len(grid):
        return False
    why, some = grid.stored_jpeg_problem(slide)
    if why is not None and grid.mag is not None and grid.as_stored:
        key = why.split(" (")[0]
        if key not in _NOTED:
            _NOTED.add(key)
            log.info(
                "%s: tiles are decoded and re-encoded, not copied from the slide's JPEG tiles: %s (said once)", slide.name, why
            )
    return some


def _read_ahead(slide, grid, runs: list[list[int]], copy_jpegs: bool, need_pixels: bool):
    """Yield ``(run, pixels, stored JPEG bytes)`` per run of tiles, reading the next run in a background thread while
    the caller filters, encodes and writes the current one (decoding and resizing release the GIL), so one slide
    keeps two cores busy; at most two runs are in memory. Pixels (None each) are read only when something needs them:
    a filter or the normalizer (``need_pixels``), or a tile that is not copied from a stored JPEG tile."""

    def load(run: list[int]) -> tuple[list, list]:
        stored = grid.stored_jpegs(slide, run) if copy_jpegs else [None] * len(run)
        if need_pixels or any(b is None for b in stored):
            return grid.read_run(slide, run), stored
        return [None] * len(run), stored

    if not runs:
        return
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load, runs[0])
        for k, run in enumerate(runs):
            imgs, stored = nxt.result()
            if k + 1 < len(runs):
                nxt = pool.submit(load, runs[k + 1])
            yield run, imgs, stored


def _prepare_normalizer(normalizer: Any, cfg: ExtractConfig, slide):
    """The normalizer to apply (None for none), fitted to the slide's thumbnail when it uses context."""
    if normalizer is None:
        normalizer = build_normalizer_for(cfg)
    normalizer = normalizer or None
    if normalizer is not None and getattr(normalizer, "use_context", False):
        try:
            normalizer.set_context(slide.thumbnail(max_size=2048))
        except ValueError as e:
            raise HistolightError(
                f"slide '{slide.name}': cannot fit the stain normalizer on its thumbnail ({e}); "
                "use a preset normalizer_source instead of 'context'"
            ) from None
    if normalizer is not None and hasattr(normalizer, "reset_stats"):
        normalizer.reset_stats()
    return normalizer


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

    Returns a :class:`~histolight.extract.layout.SlideResult` (with its tile table in ``table``); raises
    :class:`~histolight.extract.plan.SlideSkipped` / :class:`HistolightError` on bad input. Writes are atomic and
    the TFRecord is renamed last.
    """
    t0 = time.time()
    dry = cfg.dry_run if dry_run is None else dry_run
    name = slide.name
    if tile_dir is None and not dry:
        raise ValueError("extract_slide needs tile_dir unless dry_run")
    mpp = slide.mpp  # raises MissingMPPError with the fix
    if not cfg.enable_downsample:
        slide.enable_downsample = False  # every read from level 0, QC pictures included
    plan = plan_slide(slide, cfg, rois, roi_file=roi_file, qc_methods=qc_methods)
    grid = plan.grid
    cand = plan.candidates
    if progress:
        progress(0, len(cand))
    normalizer = _prepare_normalizer(normalizer, cfg, slide)

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
            tmp_tiles = loose_tiles_temp(d, name, f"{seed:08x}")
            tmp_tiles.parent.mkdir(exist_ok=True)
            shutil.rmtree(tmp_tiles, ignore_errors=True)
            tmp_tiles.mkdir()
    kept_idx: list[int] = []
    ext = "png" if cfg.img_format == "png" else "jpg"
    filters = cfg.grayspace_fraction < 1.0 or cfg.whitespace_fraction < 1.0
    copy_jpegs = writer is not None and _use_stored_jpegs(slide, cfg, grid, normalizer)
    n_copied = 0
    loc_x, loc_y = grid.loc_x, grid.loc_y
    try:
        for run, imgs, stored in _read_ahead(slide, grid, grid.runs(cand), copy_jpegs, filters or normalizer is not None):
            for i, img, data in zip(run, imgs, stored):
                pixels = img if img is not None else partial(decode_image, data)
                if filters:
                    why = tile_reject_reason(
                        img, cfg.grayspace_threshold, cfg.grayspace_fraction, cfg.whitespace_threshold, cfg.whitespace_fraction
                    )
                    if why is not None:
                        plan.status[i] = GRAY_R if why == "grayspace" else WHITE_R
                        rej_s.offer(i, pixels, why)
                        continue
                if normalizer is not None:
                    pixels = img = normalizer.transform(img)
                kept_idx.append(i)
                kept_s.offer(i, pixels)
                if writer is not None:
                    if data is None:
                        data = encode_image(img, cfg.img_format, cfg.quality)
                    else:
                        n_copied += 1
                    lx, ly = int(loc_x[i]), int(loc_y[i])
                    writer.write_tile(data, lx, ly, slide=name)
                    if tmp_tiles is not None:
                        with open(tmp_tiles / f"{name}-{lx}-{ly}.{ext}", "wb") as fh:
                            fh.write(data)
            if progress:
                progress(len(run), len(cand))
        if n_copied:
            log.debug("%s: %d of %d tiles copied from the slide's stored JPEG tiles", name, n_copied, len(kept_idx))
        idx = np.asarray(kept_idx, np.int64)
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
            tissue_detector=plan.qc.tissue_detector,
            tfrecord=str(tfrecord_path(d, name)) if (d is not None and not dry) else None,
            normalizer=None if normalizer is None else repr(normalizer),
            settings=cfg.settings(),
            table=tile_table(plan, idx, name),
        )
        if not len(idx):
            res.reason = zero_tiles_message(res, plan.notes)
            log.warning("%s", res.reason)
        res.seconds = round(time.time() - t0, 3)
        if d is not None:
            meta_dir(d).mkdir(parents=True, exist_ok=True)
            # the table and summary are written (and synced to disk) while the report images are drawn
            with ThreadPoolExecutor(1) as pool:
                written = pool.submit(_write_table_and_meta, d, res)
                if cfg.report:
                    from histolight.extract.report import save_slide_images

                    save_slide_images(slide, plan, kept_s.sorted(), rej_s.sorted(), meta_dir(d))
                written.result()
        if tmp_tiles is not None:
            final = loose_tiles_dir(d, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp_tiles, final)
            tmp_tiles = None
        if writer is not None:
            writer.close()  # the rename that makes the slide complete
            writer = None
        res.seconds = round(time.time() - t0, 3)
        return res
    finally:
        if writer is not None:
            writer.abort()
        if tmp_tiles is not None:
            shutil.rmtree(tmp_tiles, ignore_errors=True)


def _write_table_and_meta(d: Path, res: SlideResult) -> None:
    write_parquet(res.table, table_path(d, res.slide))
    write_meta(d, res)


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
