"""Validated options of tile extraction (``conf/task/extract.yaml``; Slideflow's argument names).

Every mistake fails at startup with the key, the value and what is allowed, e.g.
``invalid config 'task': roi_method='insde' is invalid: must be one of auto, inside, outside, ignore``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from histolight.cohort import PerSlideOptions
from histolight.config.schema import check, is_pos_int, is_pos_num
from histolight.errors import ConfigError, HistolightError
from histolight.units import mag_to_mpp, parse_tile_um, tile_dir_name

ROI_METHODS = ("auto", "inside", "outside", "ignore")
IMG_FORMATS = ("jpg", "png")


def parse_roi_filter_method(v: Any) -> str | float:
    """``'center'`` or a float in (0, 1)."""
    if isinstance(v, str) and v.strip().lower() == "center":
        return "center"
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    check(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) < 1,
        "roi_filter_method",
        v,
        "must be 'center' (keep tiles whose centre lies in an ROI) or a number in (0, 1) "
        "(keep tiles whose fraction inside ROIs exceeds it)",
    )
    return float(v)


def _frac(key: str, v: Any, lo_open: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (0 < v <= 1 if lo_open else 0 <= v <= 1)
    check(ok, key, v, "must be a number in " + ("(0, 1]" if lo_open else "[0, 1]"))
    return float(v)


def _bool(key: str, v: Any) -> bool:
    check(isinstance(v, bool), key, v, "must be true or false")
    return v


@dataclass
class ExtractConfig(PerSlideOptions):
    """Options of ``task=extract`` / :func:`histolight.extract.extract_tiles`.

    Tile geometry: ``tile_px`` output pixels covering ``tile_um`` microns (or a magnification such
    as ``"10x"``), a stride of ``tile_px / stride_div``. Filters in order: ROI (``roi_method``,
    ``roi_filter_method``), slide-level QC masks (``qc``; a tile is dropped when more than
    ``filter_threshold`` of its footprint is masked), then per-tile grayspace and whitespace.
    Tiles enlarged from the slide more than ``max_upsample`` times (output px per base px) are refused unless
    ``allow_upsample`` (above 2x a warning is logged). ``enable_downsample=false`` reads every tile and QC picture
    from the slide's level 0; ``buffer`` copies each slide to that (fast, local) folder while it is extracted.
    ``quality`` is the JPEG quality of encoded tiles; tiles copied from the slide's stored JPEG tiles (magnification
    mode on the stored tile grid, see :mod:`histolight.extract.slide`) keep the slide's own encoding.
    Run options shared by every per-slide task (``workers``, ``allow_failures``, ``max_failed``) come from
    :class:`histolight.cohort.PerSlideOptions`.
    """

    name: str = "extract"
    tile_px: int = 256
    tile_um: Any = 128
    stride_div: Any = 1
    edge_tiles: bool = False
    roi_method: str = "auto"
    roi_filter_method: Any = "center"
    qc: Any = field(default_factory=lambda: ["otsu"])
    filter_threshold: float = 0.6
    grayspace_threshold: float = 0.05
    grayspace_fraction: float = 0.6
    whitespace_threshold: float = 230
    whitespace_fraction: float = 1.0
    blur_flag: float = 0.05
    img_format: str = "jpg"
    quality: int = 95
    normalizer: Any = None
    normalizer_source: Any = None
    outdir: str = "tiles"
    workers: int = 2
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    dry_run: bool = False
    save_tiles: bool = False
    report: bool = True
    report_samples: int = 12
    max_upsample: float = 4.0
    allow_upsample: bool = False
    enable_downsample: bool = True
    buffer: Any = None

    def __post_init__(self):
        super().__post_init__()
        check(
            is_pos_int(self.tile_px) and self.tile_px >= 8,
            "tile_px",
            self.tile_px,
            "must be an integer >= 8 (tile width/height in output pixels, e.g. 256)",
        )
        self.um, self.mag = parse_tile_um(self.tile_um)
        check(
            is_pos_num(self.stride_div) and self.stride_div >= 1,
            "stride_div",
            self.stride_div,
            "must be a number >= 1 (1 = no overlap, 2 = 50% overlap)",
        )
        _bool("edge_tiles", self.edge_tiles)
        check(self.roi_method in ROI_METHODS, "roi_method", self.roi_method, f"must be one of {', '.join(ROI_METHODS)}")
        self.roi_filter_method = parse_roi_filter_method(self.roi_filter_method)
        from histolight.qc.registry import capture_qc

        try:
            #: registry entries the QC spec uses, carried to spawned worker processes (not a field: not a setting)
            self.qc_plugins = capture_qc(self.qc, "qc")
        except ValueError as e:
            raise ValueError(str(e)) from None
        self.filter_threshold = _frac("filter_threshold", self.filter_threshold)
        self.grayspace_threshold = _frac("grayspace_threshold", self.grayspace_threshold)
        self.grayspace_fraction = _frac("grayspace_fraction", self.grayspace_fraction)
        wt = self.whitespace_threshold
        check(
            isinstance(wt, (int, float)) and not isinstance(wt, bool) and 0 <= wt <= 255,
            "whitespace_threshold",
            wt,
            "must be a brightness in [0, 255] (mean RGB above it counts as white)",
        )
        self.whitespace_fraction = _frac("whitespace_fraction", self.whitespace_fraction)
        self.blur_flag = _frac("blur_flag", self.blur_flag)
        check(self.img_format in IMG_FORMATS, "img_format", self.img_format, "must be 'jpg' or 'png'")
        check(
            is_pos_int(self.quality) and self.quality <= 100,
            "quality",
            self.quality,
            "must be an integer in 1..100 (JPEG quality)",
        )
        check(
            self.normalizer is None or isinstance(self.normalizer, (str, dict)),
            "normalizer",
            self.normalizer,
            "must be null, a method name (e.g. macenko, reinhard) or a dict of normalizer options",
        )
        check(
            self.normalizer_source is None or isinstance(self.normalizer_source, str),
            "normalizer_source",
            self.normalizer_source,
            "must be null, a preset name (e.g. v1), 'context' (fit per slide on its thumbnail) or a path",
        )
        check(isinstance(self.outdir, str) and self.outdir.strip() != "", "outdir", self.outdir, "must be a folder path")
        check(is_pos_int(self.num_shards), "num_shards", self.num_shards, "must be an integer >= 1")
        check(
            isinstance(self.shard_index, int)
            and not isinstance(self.shard_index, bool)
            and 0 <= self.shard_index < self.num_shards,
            "shard_index",
            self.shard_index,
            f"must be an integer in 0..{self.num_shards - 1} (num_shards={self.num_shards})",
        )
        for k in ("overwrite", "dry_run", "save_tiles", "report", "allow_upsample", "enable_downsample"):
            _bool(k, getattr(self, k))
        check(
            is_pos_num(self.max_upsample) and self.max_upsample >= 1,
            "max_upsample",
            self.max_upsample,
            "must be a number >= 1 (largest enlargement of the slide's pixels into tiles; allow_upsample=true lifts it)",
        )
        check(
            self.buffer is None or (isinstance(self.buffer, (str, os.PathLike)) and str(self.buffer).strip() != ""),
            "buffer",
            self.buffer,
            "must be null or a folder path (a fast local disk or ramdisk each slide is copied to while it is read)",
        )
        if self.buffer is not None:
            self.buffer = str(self.buffer)
        check(
            isinstance(self.report_samples, int) and not isinstance(self.report_samples, bool) and self.report_samples >= 0,
            "report_samples",
            self.report_samples,
            "must be an integer >= 0 (sample tiles shown per slide)",
        )

    # ----------------------------------------------------------------- derived
    @property
    def tile_dir(self) -> str:
        """``<tile_px>px_<tile_um>um`` or ``<tile_px>px_<mag>x``."""
        return tile_dir_name(self.tile_px, self.tile_um)

    @property
    def tile_mpp(self) -> float:
        """Nominal um/px of the output tiles (``tile_um / tile_px``, or ``10 / magnification``)."""
        return self.um / self.tile_px if self.mag is None else mag_to_mpp(self.mag)

    def settings(self) -> dict:
        """The options that change what is extracted, as plain JSON values (stored with each slide to detect changed
        settings): every field but :data:`RUN_OPTIONS`; a QC plug-in object is stored as its ``repr``."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in RUN_OPTIONS}


#: Options of how a run goes (where, how parallel, what is reported), not of what is extracted.
RUN_OPTIONS = (
    "name",
    "outdir",
    "workers",
    "allow_failures",
    "max_failed",
    "shard_index",
    "num_shards",
    "overwrite",
    "dry_run",
    "report",
    "report_samples",
    "save_tiles",
    "blur_flag",
    "buffer",
    "max_upsample",
    "allow_upsample",
)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)  # a QC plug-in object (e.g. Segment): its repr names it


def build_normalizer_for(cfg: ExtractConfig):
    """The stain normalizer of ``cfg`` (``normalizer``, ``normalizer_source``), or None.

    ``normalizer_source``: a shipped preset name, ``'context'`` (fit per slide on its thumbnail),
    a fit JSON file, or an image file to fit on. Raises :class:`ConfigError` for an unusable source.
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
            raise ConfigError(
                f"normalizer_source={src!r} is invalid: allowed a preset {available_presets()}, "
                "'context', a fit .json file or an image file"
            )
    norm = build_normalizer(spec)
    if fit_image is not None:
        import cv2

        img = cv2.imread(fit_image, cv2.IMREAD_COLOR)
        if img is None:
            raise HistolightError(f"normalizer_source: cannot read image '{fit_image}'")
        norm.fit(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return norm


def load_extract_config(node: Any, prefix: str = "task") -> ExtractConfig:
    """:class:`ExtractConfig` from a config section via ``histolight.config.from_config``; errors name ``<prefix>.<key>``."""
    from histolight.config import from_config

    try:
        return from_config(ExtractConfig, node, prefix)
    except ConfigError as e:
        msg = str(e)
        m = re.match(rf"^invalid config '{re.escape(prefix)}': (\w+)=", msg)
        if m:
            raise ConfigError(f"invalid config '{prefix}.{m.group(1)}': {msg.split(': ', 1)[1]}") from None
        raise
