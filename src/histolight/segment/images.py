"""Plain images (PNG, JPEG, TIFF) as the input of segmentation: files, wildcards or a CSV/TSV list, with an mpp.

:func:`list_images` resolves what a user names into ``(path, mpp or None)`` pairs; :class:`ImageSet` serves them to
the cohort runner as slides (``names``, ``open(name)``): a tiled TIFF that OpenSlide opens is read as a slide, any
other image is loaded whole (``H x W x 3`` uint8 RGB) into a :class:`~histolight.wsi.VirtualSlide`.
:func:`segment_images` segments them with :func:`histolight.segment.outputs.segment_slides`; by default the
full-resolution prediction (``<name>.full.tif``) has exactly the image's size.

An image's mpp comes from its table row (column ``mpp``), else the ``mpp`` argument, else the file (a slide-like
tiled TIFF with resolution tags that OpenSlide reads), else it is *assumed* to be the model's mpp (the image is segmented as it is), with a warning naming the images: a wrong mpp makes the model see
structures at the wrong scale.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histolight.errors import ConfigError, HistolightError, SlideError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TABLE_EXTENSIONS = (".csv", ".tsv")
PATH_COLUMNS = ("path", "file", "filename", "image")


def _table(path: Path) -> list[tuple[Path, float | None]]:
    """Rows of a CSV/TSV list: column ``path`` (or ``file``, ``filename``, ``image``; else the first column), optional
    ``mpp``; relative paths are relative to the table's folder."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    if df.empty:
        return []
    col = next((c for c in df.columns if str(c).lower() in PATH_COLUMNS), df.columns[0])
    mcol = next((c for c in df.columns if str(c).lower() == "mpp"), None)
    out = []
    for _, row in df.iterrows():
        p = Path(str(row[col])).expanduser()
        mpp = None if mcol is None or pd.isna(row[mcol]) else float(row[mcol])
        out.append((p if p.is_absolute() else path.parent / p, mpp))
    return out


def list_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[Path, float | None]]:
    """The images named by ``spec``: a file, a wildcard (``slides/*.png``, ``**`` recursive), a folder (its images)
    or a ``.csv``/``.tsv`` list, or a list of these. Returns ``(path, mpp or None)`` pairs in the order given
    (wildcards sorted), each path once. Raises :class:`ConfigError` for a name that matches nothing."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: dict[Path, float | None] = {}
    for item in items:
        s = os.path.expanduser(os.fspath(item))
        p = Path(s)
        if p.suffix.lower() in TABLE_EXTENSIONS and p.is_file():
            found = _table(p)
        elif glob.has_magic(s):
            found = [(Path(f), None) for f in sorted(glob.glob(s, recursive=True)) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        elif p.is_dir():
            found = [(f, None) for f in sorted(p.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            found = [(p, None)]
        if not found:
            raise ConfigError(f"images={s!r} matches no image file ({', '.join(IMAGE_EXTENSIONS)})")
        for path, mpp in found:
            if not path.is_file():
                raise ConfigError(f"image '{path}' (from images={s!r}) does not exist")
            out.setdefault(path, mpp)
    return list(out.items())


def file_mpp(path: str | os.PathLike) -> float | None:
    """The mpp recorded in an image file that OpenSlide opens (a tiled TIFF with resolution tags), else None."""
    from histolight.wsi import Slide

    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with Slide(path) as s:
            return s.mpp if s.has_mpp else None
    except SlideError:
        return None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB (grey is repeated, alpha dropped). Raises :class:`SlideError`."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = tifffile.imread(path)
        else:
            from histolight.io.images import decode_image

            img = decode_image(path.read_bytes())
    except (OSError, ValueError) as e:
        raise SlideError(path, f"cannot read the image: {e}") from None
    if img.dtype != np.uint8:
        raise SlideError(path, f"{img.dtype} pixels: only 8-bit RGB or grey images are supported")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise SlideError(path, f"image of shape {img.shape}: expected H x W (grey) or H x W x 3|4 (RGB/RGBA)")
    return np.ascontiguousarray(img[..., :3])


class ImageSet:
    """Image files served to the cohort runner as slides: ``names`` (file stems) and ``open(name)``.

    Args:
        items: ``(path, mpp or None)`` pairs (:func:`list_images`).
        default_mpp: um/px of images without their own mpp.
    """

    def __init__(self, items: Sequence[tuple[Path, float | None]], default_mpp: float):
        self.items: dict[str, tuple[Path, float]] = {}
        for path, mpp in items:
            name = Path(path).stem
            if name in self.items:
                raise ConfigError(f"images '{self.items[name][0]}' and '{path}' have the same name {name!r}: rename one")
            self.items[name] = (Path(path), float(mpp if mpp is not None else default_mpp))

    @property
    def names(self) -> list[str]:
        return list(self.items)

    def open(self, name: str):
        """Image ``name`` as a slide (a tiled TIFF through OpenSlide, anything else in memory)."""
        from histolight.wsi import Slide, VirtualSlide

        path, mpp = self.items[name]
        if path.suffix.lower() in (".tif", ".tiff"):
            try:
                return Slide(path, mpp=mpp)
            except SlideError:
                pass  # a plain (strip) TIFF: read it whole
        return VirtualSlide(read_image(path), mpp=mpp, downsamples=(1,), name=name)


def segment_images(
    images: Any, model: Any, out: str | os.PathLike, mpp: float | None = None, out_mpp: float | str | None = "base", **kwargs
):
    """Segment image files (see :func:`list_images`) with ``model`` into folder ``out``, as slides
    (:func:`histolight.segment.outputs.segment_slides`, which takes ``kwargs``: ``output``, ``overlay``, ``rois``,
    ``device``, ``workers``, ``report_dir``, ...).

    Args:
        mpp: um/px of images without an ``mpp`` column (None = the file's, else assume the model's, with a warning).
        out_mpp: the full-resolution prediction's um/px; ``base`` (default) = the image's own size.

    Returns the run's :class:`~histolight.cohort.CohortResult`.
    """
    from histolight.segment.outputs import segment_slides
    from histolight.segment.rois import load_segment_model

    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or mpp <= 0):
        raise ConfigError(f"images_mpp={mpp!r} is invalid: must be null (assume the model's mpp) or a positive um/px")
    items = [(p, v if v is not None else mpp if mpp is not None else file_mpp(p)) for p, v in list_images(images)]
    m = load_segment_model(model, kwargs.get("device", "auto"))
    assumed = [p.name for p, v in items if v is None]
    if assumed:
        shown = ", ".join(assumed[:5]) + (f" and {len(assumed) - 5} more" if len(assumed) > 5 else "")
        log.warning(
            "no mpp given for %d image(s) (%s): ASSUMED to be at the model's %g um/px. If they are not, the model sees "
            "structures at the wrong scale: give task.images_mpp or an 'mpp' column in the list",
            len(assumed),
            shown,
            m.config.mpp,
        )
    if not items:
        raise HistolightError(f"images={images!r}: no image to segment")
    return segment_slides(ImageSet(items, mpp or m.config.mpp), model, out, out_mpp=out_mpp, **kwargs)


__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "file_mpp", "list_images", "read_image", "segment_images"]
