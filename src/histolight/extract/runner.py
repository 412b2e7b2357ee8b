"""Cohort extraction: shards, parallel slide workers, resume, the cohort tile table and the report.

>>> from histolight.dataset import Dataset
>>> from histolight.extract import extract_tiles
>>> ds = Dataset("data/demo/slides", rois="data/demo/rois")
>>> res = extract_tiles(ds, tile_px=256, tile_um=128, outdir="outputs/tiles", qc=["otsu", "blur"])
>>> res.summary[["slide", "status", "kept"]]; res.tiles.head()

Layout of ``<outdir>/<tile_px>px_<tile_um>um/`` (``dry_run`` writes the same under ``.../dry_run/``
without TFRecords): ``<slide>.tfrecords`` + ``<slide>.index.npz`` per slide, ``meta/`` (per-slide
tables, summaries, report images), ``tiles.parquet`` (cohort tile table), ``summary.csv`` and
``report.html``. With ``num_shards > 1`` the cohort files carry a ``.shard-<i>-of-<n>`` suffix; a
final run with ``num_shards=1`` skips the finished slides and writes the merged cohort files.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histolight.errors import ConfigError, HistolightError
from histolight.extract.config import ExtractConfig
from histolight.extract.slide import (
    KEPT,
    TABLE_COLUMNS,
    SlideResult,
    SlideSkipped,
    _table,
    extract_slide,
    is_complete,
    meta_dir,
    plan_slide,
    read_meta,
    remove_outputs,
    tfrecord_path,
    write_table,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- config


def make_config(config: ExtractConfig | dict | None = None, **options) -> ExtractConfig:
    """An :class:`ExtractConfig` from a config object/dict and/or keyword options (which win).

    Unknown or invalid options raise :class:`ConfigError` naming the option, the value and what is allowed.
    """
    from histolight.config import to_dict
    from histolight.extract.config import load_extract_config

    if isinstance(config, ExtractConfig):
        if not options:
            return config
        from dataclasses import asdict

        base = asdict(config)
    else:
        base = to_dict(config)
    base.update({k: (str(v) if k == "outdir" and isinstance(v, os.PathLike) else v) for k, v in options.items()})
    return load_extract_config(base, "extract")


def shard_slides(names: Sequence[str], shard_index: int, num_shards: int) -> list[str]:
    """Deterministic split by slide: shard ``i`` of ``n`` takes every ``n``-th slide of the sorted names from ``i``."""
    return sorted(names)[shard_index::num_shards]


# ---------------------------------------------------------------------------------------------- worker

_PROGRESS_Q = None


def _worker_init(q, single_thread: bool) -> None:
    global _PROGRESS_Q
    _PROGRESS_Q = q
    if single_thread:
        try:
            import cv2

            cv2.setNumThreads(1)
        except Exception:  # noqa: BLE001
            pass


@dataclass
class SlideJob:
    """What a worker needs to extract one slide (picklable)."""

    name: str
    path: str
    mpp: float | None
    roi_path: str | None
    tile_dir: str
    overwrite: bool
    dry_run: bool


def run_job(job: SlideJob, cfg: ExtractConfig, progress=None) -> dict:
    """Open, extract and close one slide; never raises for a bad slide (returns status ``failed``/``skipped``)."""
    from histolight.roi import read_rois
    from histolight.wsi import Slide

    t0 = time.time()
    q = _PROGRESS_Q
    if progress is None and q is not None:

        def progress(n, total, _name=job.name):
            q.put((_name, n, total))

    try:
        if not job.dry_run:
            remove_outputs(job.tile_dir, job.name)  # an overwrite, or leftovers of an incomplete slide
        with Slide(job.path, mpp=job.mpp) as slide:
            rois = None
            if cfg.roi_method != "ignore" and job.roi_path:
                rois = read_rois(job.roi_path, slide_dims=slide.dimensions)
            res = extract_slide(slide, cfg, job.tile_dir, rois, roi_file=job.roi_path, progress=progress, dry_run=job.dry_run)
        out = res.to_dict()
    except SlideSkipped as e:
        out = SlideResult(job.name, "skipped", str(e)).to_dict()
    except HistolightError as e:
        out = SlideResult(job.name, "failed", str(e)).to_dict()
    except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
        log.debug("slide %s crashed:\n%s", job.name, traceback.format_exc())
        out = SlideResult(job.name, "failed", f"{type(e).__name__}: {e}").to_dict()
    out["seconds"] = round(time.time() - t0, 3)
    return out


# ---------------------------------------------------------------------------------------------- result


@dataclass
class ExtractionResult:
    """What :func:`extract_tiles` did.

    Attributes:
        tile_dir: ``<outdir>/<tile_px>px_<tile_um>um`` (``.../dry_run`` for dry runs).
        summary: one row per slide of this run (status, counts per rejection reason, blur burden, ...).
        table_path, summary_path, report_path: cohort outputs (None when not written).
    """

    tile_dir: Path
    summary: pd.DataFrame
    config: ExtractConfig
    table_path: Path | None = None
    summary_path: Path | None = None
    report_path: Path | None = None
    seconds: float = 0.0
    _tiles: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def tiles(self) -> pd.DataFrame:
        """The tile table of this run's slides, indexed by tile id."""
        if self._tiles is None:
            self._tiles = _as_tile_frame(pd.read_parquet(self.table_path) if self.table_path else _empty_table(), "all")
        return self._tiles

    @property
    def n_tiles(self) -> int:
        return int(self.summary["kept"].sum()) if len(self.summary) else 0

    @property
    def failed(self) -> dict[str, str]:
        s = self.summary
        return {} if not len(s) else dict(zip(s.loc[s.status == "failed", "slide"], s.loc[s.status == "failed", "reason"]))

    def metrics(self) -> dict:
        s = self.summary
        count = lambda st: int((s["status"] == st).sum()) if len(s) else 0  # noqa: E731
        done = s[s["status"] == "done"] if len(s) else s
        fresh_tiles = int(done["kept"].sum()) if len(done) else 0
        busy = float(done["seconds"].sum()) if len(done) else 0.0
        return {
            "n_slides": int(len(s)),
            "n_done": count("done"),
            "n_reused": count("reused"),
            "n_empty": count("empty"),
            "n_failed": count("failed"),
            "n_skipped": count("skipped"),
            "n_tiles": self.n_tiles,
            "n_blur_flagged": int(s["blur_flagged"].fillna(False).astype(bool).sum()) if len(s) else 0,
            "seconds": round(self.seconds, 2),
            "tiles_per_s": round(fresh_tiles / self.seconds, 1) if self.seconds > 0 else 0.0,
            "slide_seconds": round(busy, 2),
        }


def _empty_table() -> pd.DataFrame:
    cols = {"tile_id": pd.Series(dtype=object)}
    for c in TABLE_COLUMNS:
        cols[c] = pd.Series(dtype=np.int64 if c in ("loc_x", "loc_y", "grid_x", "grid_y") else object)
    return pd.DataFrame(cols)


def _as_tile_frame(df: pd.DataFrame, columns: Any = None) -> pd.DataFrame:
    df = df.set_index("tile_id")
    df.index.name = "tile_id"
    if columns == "all":
        return df
    cols = list(TABLE_COLUMNS) if columns is None else list(columns)
    return df[cols]


# ---------------------------------------------------------------------------------------------- cohort


def extract_tiles(
    dataset,
    tile_px: int | None = None,
    tile_um: Any = None,
    outdir: str | os.PathLike | None = None,
    *,
    config: ExtractConfig | dict | None = None,
    slides: Sequence[str] | None = None,
    progress: bool = True,
    **options,
) -> ExtractionResult:
    """Extract tiles of every slide of ``dataset`` (this shard's part) into ``<outdir>/<tile_px>px_<tile_um>um``.

    Args:
        dataset: a :class:`histolight.dataset.Dataset`.
        tile_px: output tile side (px); default 256 (or ``config``'s).
        tile_um: tile side in microns, or a magnification string such as ``"10x"`` (1.0 um/px); default 128.
        outdir: root output folder; default ``tiles``.
        config: an :class:`ExtractConfig` (or dict) holding the options; keyword arguments win.
        slides: restrict to these slide names.
        progress: show progress bars (slides, tiles).
        **options: any :class:`ExtractConfig` field with Slideflow's names: ``stride_div``, ``roi_method``,
            ``roi_filter_method``, ``qc``, ``filter_threshold``, ``grayspace_threshold``, ``grayspace_fraction``,
            ``whitespace_threshold``, ``whitespace_fraction``, ``img_format``, ``quality``, ``normalizer``,
            ``normalizer_source``, ``save_tiles``, ``dry_run``, ``overwrite``, ``workers``, ``shard_index``,
            ``num_shards``, ``report``, ``edge_tiles``.

    Returns an :class:`ExtractionResult`. Bad slides are recorded (status ``failed``/``skipped``) and logged; they
    never stop the run. Finished slides are skipped unless ``overwrite=True``.
    """
    t0 = time.time()
    given = {k: v for k, v in (("tile_px", tile_px), ("tile_um", tile_um), ("outdir", outdir)) if v is not None}
    cfg = make_config(config, **given, **options)
    _check_buildable(cfg)
    root = Path(cfg.outdir) / cfg.tile_dir
    tile_dir = root / "dry_run" if cfg.dry_run else root
    tile_dir.mkdir(parents=True, exist_ok=True)
    names = list(dataset.names if slides is None else slides)
    missing = [s for s in names if s not in set(dataset.names)]
    if missing:
        raise HistolightError(f"slides not in the dataset: {missing[:10]}")
    mine = shard_slides(names, cfg.shard_index, cfg.num_shards)
    if cfg.num_shards > 1:
        log.info("shard %d of %d: %d of %d slides", cfg.shard_index, cfg.num_shards, len(mine), len(names))
    results: dict[str, dict] = {}
    jobs: list[SlideJob] = []
    for name in mine:
        if not cfg.dry_run and not cfg.overwrite and tfrecord_path(tile_dir, name).is_file():
            results[name] = _reused(tile_dir, name, cfg)
            continue
        roi_path = dataset.roi_path(name)
        jobs.append(
            SlideJob(
                name,
                str(dataset.path(name)),
                dataset.mpp_for(name),
                str(roi_path) if roi_path else None,
                str(tile_dir),
                cfg.overwrite,
                cfg.dry_run,
            )
        )
    if results:
        log.info("%d slide(s) already extracted in %s: skipped (overwrite=true redoes them)", len(results), tile_dir)
    _run_jobs(jobs, cfg, results, progress)
    rows = [results[n] for n in mine]
    summary = pd.DataFrame(rows, columns=list(SlideResult.__dataclass_fields__))
    if "settings" in summary.columns:
        summary = summary.drop(columns=["settings"])
    for c in (
        "grid_tiles",
        "kept",
        "rejected_roi",
        "rejected_qc",
        "rejected_grayspace",
        "rejected_whitespace",
        "n_rois",
        "width",
        "height",
        "level",
        "extract_px",
    ):
        summary[c] = pd.to_numeric(summary[c]).astype("Int64")
    summary["blur_flagged"] = summary["blur_flagged"].fillna(False).astype(bool)
    res = ExtractionResult(tile_dir, summary, cfg, seconds=time.time() - t0)
    _write_cohort(res, mine)
    res.seconds = time.time() - t0
    _log_outcome(res)
    return res


def _check_buildable(cfg: ExtractConfig) -> None:
    """Build the QC methods and the normalizer once here, so bad options fail before any slide is touched."""
    from histolight.extract.slide import build_normalizer_for
    from histolight.qc.registry import build_qc

    build_qc(cfg.qc, tile_mpp=cfg.tile_mpp, key="qc")
    try:
        build_normalizer_for(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"normalizer={cfg.normalizer!r}, normalizer_source={cfg.normalizer_source!r}: {e}") from None


def _reused(tile_dir: Path, name: str, cfg: ExtractConfig) -> dict:
    meta = read_meta(tile_dir, name)
    if meta is None or not is_complete(tile_dir, name):
        log.warning(
            "%s: %s exists without histolight metadata (written by another tool?): kept as is, not in the tile table. "
            "overwrite=true re-extracts it.",
            name,
            tfrecord_path(tile_dir, name),
        )
        return SlideResult(
            name,
            "reused",
            "TFRecord present without histolight metadata (not re-extracted)",
            tfrecord=str(tfrecord_path(tile_dir, name)),
        ).to_dict()
    meta = dict(meta)
    prev = meta.get("settings") or {}
    now = cfg.settings()
    diff = {k: (prev.get(k), v) for k, v in now.items() if prev.get(k) != v}
    meta["status"] = "reused"
    if diff:
        msg = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        log.warning("%s was extracted with different settings (%s); kept as is (overwrite=true redoes it)", name, msg)
        meta["reason"] = f"extracted earlier with different settings ({msg})"
    meta["seconds"] = 0.0
    return meta


def _run_jobs(jobs: list[SlideJob], cfg: ExtractConfig, results: dict, progress: bool) -> None:
    from tqdm.auto import tqdm

    if not jobs:
        return
    workers = max(1, min(cfg.workers, len(jobs)))
    sbar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress, position=0)
    tbar = tqdm(total=0, desc="tiles", unit="tile", disable=not progress, position=1, leave=True)
    totals: dict[str, int] = {}

    def on_progress(name, n, total):
        if totals.get(name) != total:
            tbar.total = (tbar.total or 0) + total - totals.get(name, 0)
            totals[name] = total
            tbar.refresh()
        if n:
            tbar.update(n)

    def finish(name: str, out: dict) -> None:
        results[name] = out
        sbar.update(1)
        sbar.set_postfix_str(f"{name}: {out['status']}", refresh=True)
        if out["status"] == "failed":
            log.error("slide %s failed: %s", name, out.get("reason"))
        elif out["status"] == "skipped":
            log.warning("slide %s skipped: %s", name, out.get("reason"))

    try:
        method = _start_method() if workers > 1 else None
        if workers > 1 and method is None:
            log.warning(
                "cannot start worker processes from a script read from stdin; extracting the %d slides serially", len(jobs)
            )
        if workers == 1 or method is None:
            for job in jobs:
                finish(job.name, run_job(job, cfg, progress=lambda n, t, _n=job.name: on_progress(_n, n, t)))
            return
        ctx = mp.get_context(method)
        q = ctx.Queue()
        pending = list(jobs)
        while pending:
            broken = False
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(q, True)) as ex:
                futs = {ex.submit(run_job, job, cfg): job for job in pending}
                pending = []
                not_done = set(futs)
                while not_done:
                    done, not_done = cf.wait(not_done, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                    _drain(q, on_progress)
                    for f in done:
                        job = futs[f]
                        try:
                            finish(job.name, f.result())
                        except cf.process.BrokenProcessPool:
                            broken = True
                            finish(
                                job.name,
                                SlideResult(
                                    job.name,
                                    "failed",
                                    "the worker process died (crash or out of memory) "
                                    "while this slide was being processed; rerun to retry",
                                ).to_dict(),
                            )
                        except Exception as e:  # noqa: BLE001
                            finish(job.name, SlideResult(job.name, "failed", f"{type(e).__name__}: {e}").to_dict())
                    if broken:
                        pending = [futs[f] for f in not_done]
                        for f in not_done:
                            f.cancel()
                        break
            _drain(q, on_progress)
            if broken and pending:
                log.warning("a worker process died; restarting the pool for %d remaining slide(s)", len(pending))
    finally:
        sbar.close()
        tbar.close()


def _start_method() -> str | None:
    """How worker processes start: ``spawn`` (fresh interpreters: safe after OpenCV/OpenSlide started native
    threads here, which ``fork`` is not); ``HISTOLIGHT_MP_START`` overrides. None when spawning cannot work
    (a main script read from stdin), in which case slides run in this process."""
    import sys

    env = os.environ.get("HISTOLIGHT_MP_START")
    if env:
        return env
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return None
    return "spawn"


def _drain(q, cb) -> None:
    while True:
        try:
            name, n, total = q.get_nowait()
        except queue_mod.Empty:
            return
        except (EOFError, OSError):
            return
        cb(name, n, total)


def _write_cohort(res: ExtractionResult, names: Sequence[str]) -> None:
    cfg = res.config
    d = res.tile_dir
    suffix = f".shard-{cfg.shard_index}-of-{cfg.num_shards}" if cfg.num_shards > 1 else ""
    frames = []
    md = meta_dir(d)
    for name in names:
        st = res.summary.loc[res.summary.slide == name, "status"]
        if not len(st) or st.iloc[0] not in ("done", "empty", "reused"):
            continue
        p = md / f"{name}.parquet"
        if p.is_file():
            frames.append(pd.read_parquet(p))
    table = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    res.table_path = d / f"tiles{suffix}.parquet"
    write_table(table, res.table_path)
    res.summary_path = d / f"summary{suffix}.csv"
    if cfg.report:
        from histolight.extract.report import write_report

        title = (
            f"Tile extraction {cfg.tile_dir}"
            + (" (dry run)" if cfg.dry_run else "")
            + (f", shard {cfg.shard_index + 1} of {cfg.num_shards}" if cfg.num_shards > 1 else "")
        )
        shown = {k: v for k, v in cfg.settings().items() if k not in ("name",)}
        res.report_path = write_report(res.summary, md, d / f"report{suffix}.html", res.summary_path, title=title, settings=shown)
    else:
        from histolight.io.atomic import atomic_write_text

        atomic_write_text(res.summary_path, res.summary.to_csv(index=False))


def _log_outcome(res: ExtractionResult) -> None:
    m = res.metrics()
    log.info(
        "extraction %s: %d slide(s): %d extracted, %d reused, %d with 0 tiles, %d skipped, %d failed; %d tiles in %.1f s -> %s",
        res.config.tile_dir,
        m["n_slides"],
        m["n_done"],
        m["n_reused"],
        m["n_empty"],
        m["n_skipped"],
        m["n_failed"],
        m["n_tiles"],
        res.seconds,
        res.tile_dir,
    )
    if m["n_tiles"] == 0 and m["n_slides"]:
        log.warning("no tiles were kept in any slide; see %s for the reasons per slide", res.report_path or res.summary_path)
    if res.report_path:
        log.info("report: %s", res.report_path)


# ---------------------------------------------------------------------------------------------- tile table


def get_tile_dataframe(
    dataset,
    tile_px: int = 256,
    tile_um: Any = 128,
    outdir: str | os.PathLike | None = None,
    *,
    roi_method: str = "auto",
    roi_filter_method: Any = "center",
    stride_div: Any = 1,
    edge_tiles: bool = False,
    slides: Sequence[str] | None = None,
    columns: Any = None,
) -> pd.DataFrame:
    """Tiles of the cohort, indexed by tile id ``"{slide}-{loc_x}-{loc_y}"``, with columns
    ``loc_x, loc_y, grid_x, grid_y, roi_name, roi_desc, label, slide`` (``columns='all'`` adds
    ``record``, ``x``, ``y``, ``size_base``, ``qc_fraction``, ``roi_fraction``).

    With ``outdir``: the tiles actually extracted there (one row per TFRecord record, in record
    order). Without: the tile grid after ROI filtering only (no QC, no pixel filters; nothing is
    written), like Slideflow's ``Dataset.get_tile_dataframe`` -- but with ROI labels for every
    ``roi_filter_method`` (fractional filtering labels a tile with the ROI covering most of it).
    """
    names = list(dataset.names if slides is None else slides)
    if outdir is not None:
        cfg = make_config(tile_px=tile_px, tile_um=tile_um, outdir=str(outdir))
        d = Path(outdir) / cfg.tile_dir
        md = meta_dir(d)
        frames = [pd.read_parquet(md / f"{n}.parquet") for n in names if is_complete(d, n)]
        if not frames:
            raise HistolightError(
                f"no extracted slides of this dataset in {d}; run extract_tiles first "
                "(or call get_tile_dataframe without outdir for the ROI-filtered grid)"
            )
        return _as_tile_frame(pd.concat(frames, ignore_index=True), columns)
    cfg = make_config(
        tile_px=tile_px,
        tile_um=tile_um,
        roi_method=roi_method,
        roi_filter_method=roi_filter_method,
        stride_div=stride_div,
        edge_tiles=edge_tiles,
        qc=None,
    )
    frames = []
    from histolight.roi import read_rois

    for n in names:
        try:
            with dataset.open(n) as slide:
                rois = None
                if cfg.roi_method != "ignore" and dataset.roi_path(n):
                    rois = read_rois(dataset.roi_path(n), slide_dims=slide.dimensions)
                plan = plan_slide(slide, cfg, rois, roi_file=str(dataset.roi_path(n) or ""), apply_qc=False)
                idx = np.flatnonzero(plan.status == KEPT)
                frames.append(_table(n, plan.grid, plan, idx))
        except HistolightError as e:
            log.warning("get_tile_dataframe: slide %s left out: %s", n, e)
    df = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    return _as_tile_frame(df, columns)
