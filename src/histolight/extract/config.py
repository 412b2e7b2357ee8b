"""Validated options of tile extraction (``conf/task/extract.yaml``; Slideflow's argument names).

Every mistake fails at startup with the key, the value and what is allowed, e.g.
``invalid config 'task': roi_method='insde' is invalid: must be one of auto, inside, outside, ignore``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from histolight.config.schema import check, is_pos_int, is_pos_num

ROI_METHODS = ("auto", "inside", "outside", "ignore")
IMG_FORMATS = ("jpg", "png")
_MAG = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[xX]\s*$")


def parse_tile_um(tile_um: Any) -> tuple[float | None, float | None]:
    """``(microns, None)`` for a number, ``(None, magnification)`` for a string like ``"10x"``.

    Raises ``ValueError`` naming ``tile_um`` otherwise.
    """
    allowed = "must be a positive number of microns (e.g. 128) or a magnification string like '10x' (10x = 1.0 um/px)"
    if isinstance(tile_um, bool):
        check(False, "tile_um", tile_um, allowed)
    if isinstance(tile_um, (int, float)):
        check(is_pos_num(tile_um), "tile_um", tile_um, allowed)
        return float(tile_um), None
    if isinstance(tile_um, str):
        m = _MAG.match(tile_um)
        if m and float(m.group(1)) > 0:
            return None, float(m.group(1))
        try:  # "128" from a CLI string
            v = float(tile_um)
        except ValueError:
            v = None
        check(v is not None and math.isfinite(v) and v > 0, "tile_um", tile_um, allowed)
        return float(v), None
    check(False, "tile_um", tile_um, allowed)
    raise AssertionError  # unreachable


def tile_um_label(tile_um: Any) -> str:
    """Folder suffix, Slideflow style: ``128`` -> ``128um``, ``112.5`` -> ``112.5um``, ``"10x"`` -> ``10x``."""
    um, mag = parse_tile_um(tile_um)
    if mag is not None:
        return f"{mag:g}x"
    return f"{um:g}um"


def tile_dir_name(tile_px: int, tile_um: Any) -> str:
    """``<tile_px>px_<tile_um>um`` (or ``<tile_px>px_10x``)."""
    return f"{int(tile_px)}px_{tile_um_label(tile_um)}"


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
class ExtractConfig:
    """Options of ``task=extract`` / :func:`histolight.extract.extract_tiles`.

    Tile geometry: ``tile_px`` output pixels covering ``tile_um`` microns (or a magnification such
    as ``"10x"``), a stride of ``tile_px / stride_div``. Filters in order: ROI (``roi_method``,
    ``roi_filter_method``), slide-level QC masks (``qc``; a tile is dropped when more than
    ``filter_threshold`` of its footprint is masked), then per-tile grayspace and whitespace.
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

    def __post_init__(self):
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
        from histolight.qc.registry import validate_qc_spec

        try:
            validate_qc_spec(self.qc, "qc")
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
        check(is_pos_int(self.workers), "workers", self.workers, "must be an integer >= 1 (parallel slide processes)")
        check(is_pos_int(self.num_shards), "num_shards", self.num_shards, "must be an integer >= 1")
        check(
            isinstance(self.shard_index, int)
            and not isinstance(self.shard_index, bool)
            and 0 <= self.shard_index < self.num_shards,
            "shard_index",
            self.shard_index,
            f"must be an integer in 0..{self.num_shards - 1} (num_shards={self.num_shards})",
        )
        for k in ("overwrite", "dry_run", "save_tiles", "report"):
            _bool(k, getattr(self, k))
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
        return self.um / self.tile_px if self.mag is None else 10.0 / self.mag

    def settings(self) -> dict:
        """The options that change what is extracted (stored with each slide to detect changed settings)."""
        d = asdict(self)
        for k in (
            "name",
            "outdir",
            "workers",
            "shard_index",
            "num_shards",
            "overwrite",
            "dry_run",
            "report",
            "report_samples",
            "save_tiles",
            "blur_flag",
        ):
            d.pop(k, None)
        return d


#: Option names of :class:`ExtractConfig` accepted as keyword arguments by ``extract_tiles``.
def option_names() -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(ExtractConfig)]


def load_extract_config(node: Any, prefix: str = "task") -> ExtractConfig:
    """:class:`ExtractConfig` from a config section via ``histolight.config.from_config``; errors name ``<prefix>.<key>``."""
    from histolight.config import from_config
    from histolight.errors import ConfigError

    try:
        return from_config(ExtractConfig, node, prefix)
    except ConfigError as e:
        msg = str(e)
        m = re.match(rf"^invalid config '{re.escape(prefix)}': (\w+)=", msg)
        if m:
            raise ConfigError(f"invalid config '{prefix}.{m.group(1)}': {msg.split(': ', 1)[1]}") from None
        raise
