"""Cohort extraction on the shared cohort runner (:func:`histolight.cohort.run_per_slide`): resume, shards,
workers, the cohort tile table, summary and report.

>>> from histolight.dataset import Dataset
>>> from histolight.extract import extract_tiles
>>> ds = Dataset("data/demo/slides", rois="data/demo/rois", name="demo")
>>> res = extract_tiles(ds, tile_px=256, tile_um=128, outdir="outputs/tiles", qc=["otsu", "blur"])
>>> res.summary[["slide", "status", "kept"]]; res.tiles.head()

Outputs go to ``<outdir>/<dataset.name>/<tile_px>px_<tile_um>um/`` (:func:`histolight.io.tilestore.tile_folder`;
``dry_run`` writes the same under ``.../dry_run/`` without TFRecords), so cohorts sharing a tiles root never touch
each other's files: per-slide files (:mod:`histolight.extract.layout`), ``tiles.parquet`` (cohort tile table),
``summary.csv``, ``report.html`` (the three replaced together: a failed write keeps the previous set whole) and,
while slides are being extracted, their claims in ``.claims/``. With
``num_shards > 1`` the cohort files carry a ``.shard-<i>-of-<n>`` suffix, and the last shard to finish (every slide
of the cohort complete) also writes the merged cohort files; a later run with ``num_shards=1`` skips the finished
slides and writes them too (e.g. after a shard failed and its slides were retried).

Statuses (the runner's): ``done``, ``empty`` (0 tiles kept; its TFRecord is empty but valid), ``skipped`` (ROI
settings rule the slide out, another run holds it, or ``already extracted``: its row keeps the tile counts of the
earlier extraction), ``failed`` (with the reason). A finished slide is never deleted by another run: leftovers are
removed only under the slide's claim, after the completeness check, and only when the slide is incomplete (or
``overwrite=true`` asked for it and no concurrent run finished it during this one).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histolight.cohort import CohortResult, report_progress, run_per_slide
from histolight.errors import ConfigError, HistolightError
from histolight.extract.config import ExtractConfig, build_normalizer_for, load_extract_config
from histolight.extract.layout import (
    ALREADY_EXTRACTED,
    is_complete,
    meta_dir,
    read_meta,
    remove_outputs,
    summary_columns,
    table_path,
    tfrecord_path,
)
from histolight.extract.plan import TABLE_COLUMNS, plan_slide, tile_table
from histolight.extract.slide import extract_slide
from histolight.io.tables import write_parquet
from histolight.io.tilestore import tile_folder

log = logging.getLogger(__name__)

#: Summary columns that hold counts / sizes (nullable integers in :attr:`ExtractionResult.summary`).
_INT_COLUMNS = (
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
)


# ---------------------------------------------------------------------------------------------- config


def make_config(config: ExtractConfig | dict | None = None, **options) -> ExtractConfig:
    """An :class:`ExtractConfig` from a config object/dict and/or keyword options (which win).

    Unknown or invalid options raise :class:`ConfigError` naming the option, the value and what is allowed.
    """
    from histolight.config import to_dict

    if isinstance(config, ExtractConfig):
        if not options:
            return config
        base = asdict(config)
    else:
        base = to_dict(config)
    base.update({k: (str(v) if k == "outdir" and isinstance(v, os.PathLike) else v) for k, v in options.items()})
    return load_extract_config(base, "extract")


def _check_buildable(cfg: ExtractConfig) -> None:
    """Build the QC methods and the normalizer once here, so bad options fail before any slide is touched."""
    from histolight.qc.registry import build_qc

    build_qc(cfg.qc, tile_mpp=cfg.tile_mpp, key="qc")
    try:
        build_normalizer_for(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"normalizer={cfg.normalizer!r}, normalizer_source={cfg.normalizer_source!r}: {e}") from None


# ---------------------------------------------------------------------------------------------- one slide


@dataclass
class ExtractJob:
    """What the per-slide function needs, in any worker process (picklable).

    Attributes:
        cfg: the validated options.
        tile_dir: the tile folder (``.../dry_run`` for dry runs).
        slides: ``name -> (slide path, base mpp override in um/px or None, ROI file or None)``.
        started: when the run started (epoch seconds). With ``overwrite``, a complete slide whose TFRecord is newer
            was finished by a concurrent run during this one: it is kept, not redone.
        include_detections: read QuPath cell/detection objects as ROIs too (the dataset's option).
    """

    cfg: ExtractConfig
    tile_dir: str
    slides: dict[str, tuple[str, float | None, str | None]]
    started: float
    include_detections: bool = False


def extract_one(job: ExtractJob, name: str) -> dict:
    """Extract slide ``name`` (the per-slide function of :func:`run_per_slide`, called under the slide's claim).

    Returns the slide's summary columns. A slide already complete in ``job.tile_dir`` is kept (status ``skipped``,
    reason ``already extracted``, counts from its meta); only an incomplete slide's leftovers are removed first
    (or, with ``overwrite``, the earlier outputs). Bad slides raise (the runner records them).
    """
    from histolight.roi import read_rois
    from histolight.wsi import Slide
    from histolight.wsi.buffer import buffered

    cfg, d = job.cfg, Path(job.tile_dir)
    if not cfg.dry_run:
        rec = tfrecord_path(d, name)
        if rec.is_file() and not cfg.overwrite:
            return _already_extracted(d, name, cfg)
        if rec.is_file() and is_complete(d, name) and rec.stat().st_mtime >= job.started:
            return _already_extracted(d, name, cfg, "by a concurrent run")
        remove_outputs(d, name)  # overwrite=true, or the leftovers of an incomplete slide
    path, mpp, roi_path = job.slides[name]
    with buffered(path, cfg.buffer) as local, Slide(local, mpp=mpp, enable_downsample=cfg.enable_downsample) as slide:
        rois = None
        if cfg.roi_method != "ignore" and roi_path:
            rois = read_rois(roi_path, slide_dims=slide.dimensions, include_detections=job.include_detections)
        res = extract_slide(slide, cfg, d, rois, roi_file=roi_path, progress=report_progress)
    return _row(res.to_dict())


def _row(d: dict) -> dict:
    """Summary columns of a slide for the runner (which adds ``slide`` and ``seconds``)."""
    return {k: v for k, v in d.items() if k in summary_columns() and k not in ("slide", "seconds", "settings")}


def _already_extracted(tile_dir: Path, name: str, cfg: ExtractConfig, by: str | None = None) -> dict:
    meta = read_meta(tile_dir, name)
    if meta is None or not is_complete(tile_dir, name):
        log.warning(
            "%s: %s exists without histolight metadata (written by another tool?): kept as is, not in the tile table. "
            "overwrite=true re-extracts it.",
            name,
            tfrecord_path(tile_dir, name),
        )
        return {
            "status": "skipped",
            "reason": "TFRecord present without histolight metadata (not re-extracted; overwrite=true redoes it)",
            "tfrecord": str(tfrecord_path(tile_dir, name)),
        }
    row = _row(meta)
    reason = ALREADY_EXTRACTED + (f" ({by})" if by else "")
    prev = meta.get("settings") or {}
    diff = {k: (prev.get(k), v) for k, v in cfg.settings().items() if prev.get(k) != v}
    if diff:
        msg = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        log.warning("%s was extracted with different settings (%s); kept as is (overwrite=true redoes it)", name, msg)
        reason += f" with different settings ({msg}); overwrite=true redoes it"
    row.update(status="skipped", reason=reason)
    return row


# ---------------------------------------------------------------------------------------------- result


@dataclass
class ExtractionResult:
    """What :func:`extract_tiles` did.

    Attributes:
        tile_dir: ``<outdir>/<cohort>/<tile_px>px_<tile_um>um`` (``.../dry_run`` for dry runs).
        summary: one row per slide of this run (status, reason, counts per rejection reason, blur burden, ...).
        run: the cohort runner's result (statuses, failures).
        table_path, summary_path, report_path: cohort outputs (None when not written).
        seconds: wall time of the run.
    """

    tile_dir: Path
    summary: pd.DataFrame
    config: ExtractConfig
    run: CohortResult
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
        """Tiles kept in the slides of this run (extracted now or earlier)."""
        return int(self.summary["kept"].sum()) if len(self.summary) else 0

    @property
    def failed(self) -> dict[str, str]:
        """``{slide: reason}`` of the failed slides."""
        return self.run.failed

    def summary_line(self) -> str:
        """``N slide(s): N done, N skipped, N failed, N empty`` (+ where failures are listed), and the tile count."""
        return f"{self.run.summary_line()}; {self.n_tiles} tiles in {self.tile_dir}"

    def metrics(self) -> dict:
        """``n_slides, n_done, n_skipped, n_failed, n_empty`` (the runner's), ``summary`` (its CSV), ``n_tiles``,
        ``n_blur_flagged``, ``seconds``, ``tiles_per_s`` (tiles extracted now per wall second), ``slide_seconds``."""
        s = self.summary
        done = s[s["status"] == "done"] if len(s) else s
        fresh_tiles = int(done["kept"].sum()) if len(done) else 0
        return {
            **self.run.metrics(),
            "n_tiles": self.n_tiles,
            "n_blur_flagged": int(s["blur_flagged"].sum()) if len(s) else 0,
            "seconds": round(self.seconds, 2),
            "tiles_per_s": round(fresh_tiles / self.seconds, 1) if self.seconds > 0 else 0.0,
            "slide_seconds": round(float(done["seconds"].sum()) if len(done) else 0.0, 2),
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


def _summary_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The runner's table in summary-column order, with typed count columns."""
    cols = [c for c in summary_columns() if c != "settings"]
    summary = table.reindex(columns=cols)
    for c in _INT_COLUMNS:
        summary[c] = pd.to_numeric(summary[c]).astype("Int64")
    summary["blur_flagged"] = summary["blur_flagged"].astype("boolean").fillna(False).astype(bool)
    return summary


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
    """Extract tiles of every slide of ``dataset`` (this shard's part) into
    ``<outdir>/<dataset.name>/<tile_px>px_<tile_um>um``.

    Args:
        dataset: a :class:`histolight.dataset.Dataset` (its ``name`` is the cohort folder).
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
    never stop the run. Finished slides are skipped (``already extracted``) unless ``overwrite=True``.

    ``workers`` (default 2) extracts that many slides at a time in spawned worker processes, and a spawned process
    first re-runs the top level of your main script: **in a script, call extract_tiles under**
    ``if __name__ == "__main__":``. Without the guard (or from a script read from stdin) every slide is extracted
    in this process instead, after one warning that says why and how to fix it. Notebooks and the REPL need no
    guard. The rule and what happens when workers cannot start: :func:`histolight.cohort.run_per_slide`.
    """
    t0 = time.time()
    given = {k: v for k, v in (("tile_px", tile_px), ("tile_um", tile_um), ("outdir", outdir)) if v is not None}
    cfg = make_config(config, **given, **options)
    _check_buildable(cfg)
    root = tile_folder(cfg.outdir, dataset.name, cfg.tile_px, cfg.tile_um)
    tile_dir = root / "dry_run" if cfg.dry_run else root
    tile_dir.mkdir(parents=True, exist_ok=True)
    names = list(dataset.names if slides is None else slides)
    missing = [s for s in names if s not in set(dataset.names)]
    if missing:
        raise HistolightError(f"slides not in the dataset: {missing[:10]}")
    info = {}
    for n in names:
        roi = dataset.roi_path(n)
        info[n] = (str(dataset.path(n)), dataset.mpp_for(n), str(roi) if roi else None)
    job = ExtractJob(cfg, str(tile_dir), info, t0, getattr(dataset, "include_detections", False))
    run = run_per_slide(
        names,
        functools.partial(extract_one, job),
        out_dir=tile_dir,
        workers=cfg.workers,
        shard_index=cfg.shard_index,
        num_shards=cfg.num_shards,
        summary_name=None,
        desc="slides",
        unit="tiles",
        progress=progress,
    )
    res = ExtractionResult(tile_dir, _summary_frame(run.table), cfg, run)
    _write_cohort(res)
    run.summary_path = res.summary_path
    res.seconds = time.time() - t0
    _log_outcome(res)
    if cfg.num_shards > 1 and not cfg.dry_run:
        _merge_shards(job, names, progress)
    return res


def _merge_shards(job: ExtractJob, names: Sequence[str], progress: bool) -> ExtractionResult | None:
    """After a shard: when every slide of the cohort is complete in the tile folder (this was the last shard to
    finish), write the merged cohort files (``tiles.parquet``, ``summary.csv``, ``report.html``, no shard suffix)
    exactly as a run with ``num_shards=1`` would: each slide's row is read back from its meta (``skipped``,
    ``already extracted``). Shards finishing together may both merge; the files are replaced as one set, with the
    same content. Returns the merged result, or None while slides are missing (failed, or other shards running)."""
    d = Path(job.tile_dir)
    missing = [n for n in names if not is_complete(d, n)]
    if missing:
        log.info(
            "shard %d of %d finished; %d of the cohort's %d slides are not extracted yet (other shards, or failed): "
            "the last shard to finish, or a run with num_shards=1, writes the merged tiles.parquet",
            job.cfg.shard_index + 1,
            job.cfg.num_shards,
            len(missing),
            len(names),
        )
        return None
    cfg = make_config(job.cfg, shard_index=0, num_shards=1, overwrite=False, workers=1)
    merge = ExtractJob(cfg, job.tile_dir, job.slides, time.time())
    run = run_per_slide(
        names, functools.partial(extract_one, merge), out_dir=d, summary_name=None, desc="merge", progress=progress
    )
    res = ExtractionResult(d, _summary_frame(run.table), cfg, run)
    _write_cohort(res)
    log.info("all %d slides of the cohort are extracted: merged %s and %s", len(names), res.table_path, res.summary_path)
    return res


@contextlib.contextmanager
def written_together(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temp paths (beside ``paths``) to write one run's products to; once the block succeeds all are renamed onto
    ``paths`` together, so a failure while writing (disk full, a crash) leaves the previous set whole and never
    pairs an old file with a new one. The temps are removed in any case."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps = [p.with_name(f".{p.name}.set-{token}") for p in paths]
    try:
        yield temps
        for tmp, p in zip(temps, paths):
            os.replace(tmp, p)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _write_cohort(res: ExtractionResult) -> None:
    """``tiles.parquet`` (tables of this run's finished slides), ``summary.csv`` and ``report.html`` in the tile
    folder, replaced as one set (:func:`written_together`; without a report, an earlier run's is removed)."""
    cfg = res.config
    d = res.tile_dir
    suffix = f".shard-{cfg.shard_index}-of-{cfg.num_shards}" if cfg.num_shards > 1 else ""
    frames = []
    for name, status in zip(res.summary["slide"], res.summary["status"]):
        p = table_path(d, name)
        if (status in ("done", "empty") or is_complete(d, name)) and p.is_file():
            frames.append(pd.read_parquet(p))
    table = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    res.table_path, res.summary_path = d / f"tiles{suffix}.parquet", d / f"summary{suffix}.csv"
    report = d / f"report{suffix}.html"
    products = [res.table_path, res.summary_path] + ([report] if cfg.report else [])
    with written_together(products) as (table_tmp, summary_tmp, *report_tmp):
        write_parquet(table, table_tmp)
        if cfg.report:
            from histolight.extract.report import write_report

            title = (
                f"Tile extraction {cfg.tile_dir}"
                + (" (dry run)" if cfg.dry_run else "")
                + (f", shard {cfg.shard_index + 1} of {cfg.num_shards}" if cfg.num_shards > 1 else "")
            )
            write_report(
                res.summary,
                meta_dir(d),
                report_tmp[0],
                summary_tmp,
                title=title,
                settings=cfg.settings(),
                blur_limit=cfg.blur_flag,
            )
        else:
            from histolight.io.atomic import atomic_write_text

            atomic_write_text(summary_tmp, res.summary.to_csv(index=False))
    if cfg.report:
        res.report_path = report
    else:
        report.unlink(missing_ok=True)  # it described an earlier set


def _log_outcome(res: ExtractionResult) -> None:
    log.info("extraction %s: %s (%.1f s)", res.config.tile_dir, res.summary_line(), res.seconds)
    if res.n_tiles == 0 and len(res.summary):
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

    With ``outdir`` (the tiles root given to :func:`extract_tiles`): the tiles actually extracted into
    ``<outdir>/<dataset.name>/<tile_px>px_<tile_um>um`` (one row per TFRecord record, in record order). Without: the tile grid after ROI filtering only (no QC, no pixel filters; nothing is
    written), like Slideflow's ``Dataset.get_tile_dataframe`` -- but with ROI labels for every
    ``roi_filter_method`` (fractional filtering labels a tile with the ROI covering most of it).
    """
    names = list(dataset.names if slides is None else slides)
    if outdir is not None:
        cfg = make_config(tile_px=tile_px, tile_um=tile_um, outdir=str(outdir))
        d = tile_folder(cfg.outdir, dataset.name, cfg.tile_px, cfg.tile_um)
        frames = [pd.read_parquet(table_path(d, n)) for n in names if is_complete(d, n)]
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
    for n in names:
        try:
            with dataset.open(n) as slide:
                rois = None
                if cfg.roi_method != "ignore" and dataset.roi_path(n):
                    rois = dataset.rois(n, slide_dims=slide.dimensions)
                plan = plan_slide(slide, cfg, rois, roi_file=str(dataset.roi_path(n) or ""), apply_qc=False)
                frames.append(tile_table(plan, plan.candidates, n))
        except HistolightError as e:
            log.warning("get_tile_dataframe: slide %s left out: %s", n, e)
    df = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    return _as_tile_frame(df, columns)
