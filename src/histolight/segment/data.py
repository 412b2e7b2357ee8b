"""Thumbnails and ROI masks for segmentation training (Slideflow's ``export_thumbs_and_masks``).

On-disk format (one pair of files per slide in the export folder)::

    <dest>/<slide>.npz    numpy ``savez_compressed`` archive:
                            image  uint8 (H, W, 3)  RGB thumbnail at ``mpp`` um/px
                            mask   uint8            binary:     (H, W), 1 = inside an ROI (of ``labels`` if given)
                                                    multiclass: (H, W), 0 = background, i + 1 = labels[i]
                                                    multilabel: (N, H, W), channel i = labels[i] (0/1)
                                                    multiclass with ``mask_layout="channels"``: (N, H, W) like
                                                    multilabel (Slideflow's documented "(N, W, H)" masks, rows
                                                    first as in the thumbnail); the class-index map is the
                                                    compact default (``mask_layout="index"``)
    <dest>/<slide>.json   sidecar: format, slide, mpp, base_mpp, mode, labels, slide_dims (w, h base px),
                          thumb_size (w, h px), mask_shape, mask_encoding, label_pixels, roi_file,
                          roi_sha1 and slide_stat (used to tell when a cached export is stale)

Pixel ``(i, j)`` of the thumbnail covers base px ``[j * d, (j + 1) * d) x [i * d, (i + 1) * d)``
with ``d = mpp / base_mpp`` (the slide's ``size_at_mpp`` grid). ROIs are rasterized with
:func:`histolight.roi.rasterize_rois` (holes respected). Files are written atomically; an
export whose sidecar matches the slide, ROI file and settings is reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolight.cohort import CohortResult, run_per_slide
from histolight.errors import ConfigError, HistolightError
from histolight.io.atomic import atomic_save_npz, atomic_write_json
from histolight.roi import rasterize_rois

log = logging.getLogger(__name__)

FORMAT = "histolight.segment.thumbs_masks/1"


@dataclass
class ThumbMask:
    """One exported slide: thumbnail ``image`` (H, W, 3) uint8 and ``mask`` (see module docstring)."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]


def export_key(mpp: float, mode: str, labels: Sequence[str] | None) -> str:
    """Sub-folder name of an export: ``mpp4_multiclass_<hash of labels>``."""
    lab = ",".join(labels) if labels else "*"
    h = hashlib.sha1(lab.encode()).hexdigest()[:8]
    return f"mpp{mpp:g}_{mode}_{h}"


def _sha1(path: Path | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _slide_stat(path: Path) -> list:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


#: multiclass mask layouts: the class-index map (H, W) or one channel per label (N, H, W)
MASK_LAYOUTS = ("index", "channels")


def mask_encoding(mode: str) -> str:
    return {
        "binary": "uint8 (H, W): 1 = foreground",
        "multiclass": "uint8 (H, W): 0 = background, i + 1 = labels[i]",
        "multilabel": "uint8 (N, H, W): channel i = labels[i]",
    }[mode]


def rasterize_slide_mask(rois, thumb_hw: tuple[int, int], scale: float, mode: str, labels: Sequence[str] | None) -> np.ndarray:
    """The training mask for ``rois`` (base px) on a ``thumb_hw`` grid, ``scale`` = thumbnail px per base px."""
    if mode == "binary":
        return rasterize_rois(rois, thumb_hw, scale, labels=list(labels) if labels else None, mode="binary")
    return rasterize_rois(rois, thumb_hw, scale, labels=list(labels), mode=mode)


def export_slide(
    name: str,
    dataset,
    mpp: float,
    dest: str | os.PathLike,
    labels: Sequence[str] | None = None,
    mode: str = "binary",
    overwrite: bool = False,
    mask_layout: str = "index",
) -> dict:
    """Export slide ``name`` of ``dataset`` (thumbnail at ``mpp`` um/px + ROI mask) into ``dest``.

    The per-slide function of :func:`export_cohort`. Returns its summary row: ``file`` (the ``.npz``),
    ``n_rois`` and ``warning``; status ``skipped`` (reason ``exists``) when an up-to-date export is there and not
    ``overwrite``. Raises :class:`HistolightError` subclasses for unreadable slides or ROI files.
    """
    dest = Path(dest)
    npz, side = dest / f"{name}.npz", dest / f"{name}.json"
    roi_path = dataset.roi_path(name)
    slide_path = dataset.path(name)
    want = {
        "format": FORMAT,
        "slide": name,
        "mpp": float(mpp),
        "mode": mode,
        "labels": list(labels) if labels else None,
        "mask_layout": mask_layout,
        "roi_file": str(roi_path) if roi_path else None,
        "roi_sha1": _sha1(roi_path),
        "slide_stat": _slide_stat(slide_path),
    }
    if not overwrite and npz.exists() and side.exists():
        try:
            meta = json.loads(side.read_text())
            if all(meta.get(k) == v for k, v in want.items()):
                return {"status": "skipped", "reason": "exists", "file": str(npz), "n_rois": meta.get("n_rois")}
        except (OSError, ValueError):
            pass
    with dataset.open(name) as slide:
        w, h = slide.size_at_mpp(mpp)
        image = slide.thumbnail(mpp=mpp)
        rois = dataset.rois(name, slide_dims=slide.dimensions)
        scale = slide.mpp / mpp
        mask = rasterize_slide_mask(rois, (h, w), scale, mode, labels)
        meta = {
            **want,
            "base_mpp": slide.mpp,
            "slide_dims": list(slide.dimensions),
            "thumb_size": [w, h],
            "mask_shape": list(mask.shape),
            "mask_encoding": mask_encoding(mode),
            "n_rois": len(rois),
            "label_pixels": _label_pixels(mask, mode, labels),
        }
        if mask_layout == "channels" and mode == "multiclass":
            mask = np.stack([mask == i + 1 for i in range(len(labels))]).astype(np.uint8)
            meta.update(mask_shape=list(mask.shape), mask_encoding=mask_encoding("multilabel"))
    warning = None
    if roi_path is None:
        warning = "no ROI file: the whole slide is background in its mask"
        log.warning("%s: %s", name, warning)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(npz, compressed=True, image=image, mask=mask)
    atomic_write_json(side, meta)
    return {"file": str(npz), "n_rois": len(rois), "warning": warning}


def _label_pixels(mask: np.ndarray, mode: str, labels) -> dict:
    if mode == "binary":
        return {"foreground": int(mask.sum())}
    if mode == "multiclass":
        counts = np.bincount(mask.ravel(), minlength=len(labels) + 1)
        return {lab: int(counts[i + 1]) for i, lab in enumerate(labels)}
    return {lab: int(mask[i].sum()) for i, lab in enumerate(labels)}


def export_cohort(
    dataset,
    mpp: float,
    dest: str | os.PathLike,
    labels: Sequence[str] | None = None,
    mode: str = "binary",
    overwrite: bool = False,
    slides: Sequence[str] | None = None,
    workers: int = 1,
    report_dir: str | os.PathLike | None = None,
    summary_name: str = "export_report.csv",
    progress: bool = True,
    mask_layout: str = "index",
) -> CohortResult:
    """Export thumbnails and ROI masks of every slide on the cohort runner (:func:`histolight.cohort.run_per_slide`).

    Args:
        dataset: a :class:`histolight.dataset.Dataset`.
        mpp: thumbnail resolution in um/px (20 is typical for real slides).
        dest: output folder (see the module docstring for the format).
        labels: ROI labels to rasterize (required for multiclass/multilabel; binary: null = any ROI).
        mode: ``binary``, ``multiclass`` or ``multilabel``.
        overwrite: re-export even when an up-to-date export exists (otherwise: status ``skipped``, reason ``exists``).
        slides: restrict to these slide names.
        workers: slide worker processes.
        report_dir: folder of the summary CSV (``summary_name``) and of the slide claims; None = neither.
        mask_layout: multiclass masks as the class-index map ``(H, W)`` (``index``, compact, the default) or one 0/1
            channel per label ``(N, H, W)`` (``channels``: Slideflow's documented layout); training reads both.

    Returns: the run's :class:`~histolight.cohort.CohortResult` (table columns ``file``, ``n_rois``, ``warning``).
    """
    from histolight.segment.config import MODES

    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is invalid: must be one of {list(MODES)}")
    if mode != "binary" and not labels:
        raise ConfigError(f"mode '{mode}' needs a list of labels")
    if mask_layout not in MASK_LAYOUTS:
        raise ConfigError(f"mask_layout={mask_layout!r} is invalid: must be one of {list(MASK_LAYOUTS)}")
    fn = functools.partial(
        export_slide,
        dataset=dataset,
        mpp=mpp,
        dest=str(dest),
        labels=labels,
        mode=mode,
        overwrite=overwrite,
        mask_layout=mask_layout,
    )
    names = list(slides) if slides is not None else dataset.names
    return run_per_slide(
        names,
        fn,
        out_dir=report_dir,
        claims=dest,
        workers=workers,
        summary_name=summary_name,
        desc=f"thumbs+masks @ {mpp:g} um/px",
        progress=progress,
    )


def export_thumbs_and_masks(
    dataset,
    mpp: float,
    dest: str | os.PathLike,
    labels: Sequence[str] | None = None,
    mode: str = "binary",
    overwrite: bool = False,
    slides: Sequence[str] | None = None,
    strict: bool = False,
    mask_layout: str = "index",
) -> dict[str, Path]:
    """Export thumbnails and ROI masks (Slideflow's ``sf.segment.export_thumbs_and_masks``): :func:`export_cohort`
    in this process, without a summary file (``mask_layout``: see :func:`export_cohort`).

    Returns: ``{slide: npz path}`` of the slides exported or reused; failing slides are logged and left out, or,
    with ``strict``, raise a :class:`HistolightError` listing them.
    """
    res = export_cohort(dataset, mpp, dest, labels, mode, overwrite, slides, mask_layout=mask_layout)
    if strict and res.failed:
        raise HistolightError(f"export failed for {len(res.failed)} slide(s): {res.failed}")
    t = res.table
    if "file" not in t.columns:
        return {}
    ok = t[t["file"].notna()]
    return {s: Path(f) for s, f in zip(ok["slide"], ok["file"])}


def load_thumb_mask(path: str | os.PathLike) -> ThumbMask:
    """Read one exported ``<slide>.npz`` (and its sidecar)."""
    path = Path(path)
    with np.load(path) as z:
        image, mask = z["image"], z["mask"]
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.exists() else {}
    if meta.get("mask_layout") == "channels" and meta.get("mode") == "multiclass":  # back to the class-index map
        mask = np.where(mask.any(0), mask.argmax(0) + 1, 0).astype(np.uint8)
    return ThumbMask(path.stem, image, mask, meta)


def check_labels_present(items: Sequence[ThumbMask], labels: Sequence[str] | None, mode: str) -> None:
    """Raise :class:`ConfigError` when a configured label has no pixel in any exported mask (usually a typo)."""
    if not labels or not items:
        return
    totals = {lab: 0 for lab in labels}
    for it in items:
        for lab, n in (it.meta.get("label_pixels") or {}).items():
            if lab in totals:
                totals[lab] += n
    if mode == "binary":
        return
    missing = [lab for lab, n in totals.items() if n == 0]
    if missing:
        raise ConfigError(
            f"data.labels={list(labels)} is invalid: no ROI of label(s) {missing} in any training/validation "
            "slide. Check the spelling against the ROI files (python run.py task=info lists their labels)."
        )
