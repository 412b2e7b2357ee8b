"""Helpers shared by tasks: the cohort from config, the run's output dir, the demo on first use, slide selection
and the options of the segmentation tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from histolight.cohort import PerSlideOptions
from histolight.config import DatasetConfig, from_config
from histolight.config.schema import check
from histolight.dataset import Dataset
from histolight.errors import ConfigError

log = logging.getLogger(__name__)


def dataset_config(cfg: DictConfig) -> DatasetConfig:
    """Validated ``cfg.dataset``."""
    return from_config(DatasetConfig, cfg.dataset, "dataset")


def ensure_demo_from_config(dcfg: DatasetConfig) -> Path | None:
    """Generate the demo cohort if the dataset config asks for it (``dataset.demo``)."""
    if not dcfg.demo:
        return None
    from histolight.demo import DemoConfig, ensure_demo

    opts = dict(dcfg.demo)
    root = opts.pop("root")
    try:
        demo_cfg = DemoConfig(**opts)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config 'dataset.demo': {e}") from None
    return ensure_demo(root, demo_cfg)


def load_dataset(cfg: DictConfig) -> Dataset:
    """The cohort described by ``cfg.dataset`` (generating the demo cohort on first use)."""
    d = dataset_config(cfg)
    ensure_demo_from_config(d)
    return Dataset(
        d.slides,
        rois=d.rois,
        annotations=d.annotations,
        mpp_override=d.mpp_override,
        recursive=d.recursive,
        name=d.name,
        include_detections=d.include_detections,
    )


def output_dir(cfg: DictConfig) -> Path:
    """This run's output folder (``paths.output_dir``), created."""
    p = Path(OmegaConf.select(cfg, "paths.output_dir", default="outputs/manual"))
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------------------------------------- shared task options


def opt_list(key: str, v: Any) -> list[str] | None:
    """``None``, or ``v`` as a list of strings (a single string becomes a one-item list)."""
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    check(isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), key, v, "must be null, a name or a list of names")
    return list(v)


def check_model_path(v: Any, hint: str) -> None:
    """``v`` names an existing file or folder; ``hint`` says what kind (for the error message)."""
    check(isinstance(v, str) and v.strip() != "", "model", v, f"must be {hint}")
    check(Path(v).exists(), "model", v, f"does not exist (expected {hint})")


#: per model kind (``<kind>_config.json``): what it is, which tasks take it, and what writes one
MODEL_KINDS = {
    "segment": ("a segmentation model", "task=segment / task=generate_rois", "experiment=seg_multiclass writes <run>"),
    "classifier": ("a tile classifier", "task=predict / task=features", "experiment=tile_classifier writes <run>/model"),
    "mil": ("a MIL model", "task=predict_mil", "task=train_mil writes one"),
}


def _kind_in(folder: Path) -> str | None:
    from histolight.errors import HistolightError
    from histolight.training.artifacts import read_model_folder

    try:
        return read_model_folder(folder).kind if folder.is_dir() else None
    except HistolightError:
        return None


def resolve_model(path: str, kind: str, task: str) -> str:
    """``task.model`` for a task that takes a ``kind`` model (``segment``, ``classifier``, ``mil``).

    A training run folder whose ``model/`` holds that kind resolves to ``<run>/model``; a folder holding another
    kind of model is a :class:`ConfigError` saying what it is and which task takes it. Files (a ``.ckpt``, a config
    JSON) and anything else are returned as given, for the loader to check.
    """
    p = Path(path).expanduser()
    here, sub = _kind_in(p), _kind_in(p / "model")
    if here == kind or (here is None and sub is None):
        return path
    if here is None and sub == kind:
        log.info("task.model=%s is a training run: using its model folder %s", path, p / "model")
        return str(p / "model")
    found = here or sub
    what, takes, _ = MODEL_KINDS[found]
    want, _, how = MODEL_KINDS[kind]
    where = "" if here else f" (in {p / 'model'})"
    raise ConfigError(
        f"task.model='{path}' is {what}{where}: {takes} takes it. task={task} needs {want} ({how}): set task.model to one"
    )


def tile_source(cfg: DictConfig, tiles_root: str, tile_px: int, tile_um: Any, user: str) -> Path:
    """The tile folder ``task=extract`` writes for the dataset at this geometry
    (:func:`histolight.io.tilestore.tile_folder`); a :class:`ConfigError` naming the folder and the command that fills
    it when it holds no TFRecords. ``user`` (e.g. ``the model``) says whose geometry it is."""
    from histolight.io.tilestore import find_tfrecords, tile_folder

    name = dataset_config(cfg).name
    d = tile_folder(tiles_root, name, tile_px, tile_um)
    if not (d.is_dir() and find_tfrecords(d)):
        um = tile_um if isinstance(tile_um, str) else f"{tile_um:g}"
        raise ConfigError(
            f"no tiles in {d}: {user} reads {tile_px} px / {um if isinstance(tile_um, str) else um + ' um'} tiles of "
            f"dataset '{name}'. Extract them first: histolight task=extract task.tile_px={tile_px} task.tile_um={um} "
            "(with the same dataset and paths options), or give task.tfrecords=<folder of .tfrecords>"
        )
    return d


def _check_area(key: str, v: Any) -> None:
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, key, v, "must be an area >= 0 in mm^2")


@dataclass
class RoiOptions(PerSlideOptions):
    """ROI generation options (``task=segment``, ``task=generate_rois``), see :func:`histolight.segment.rois.masks_to_rois`.

    Attributes:
        min_area_mm2: drop ROIs smaller than this (mm^2; null = 25 prediction pixels, scaled with the model's mpp).
        min_hole_mm2: fill holes smaller than this (mm^2; null = ``min_area_mm2``).
        simplify_tolerance: outline simplification in base px (null = half a prediction pixel).
    """

    min_area_mm2: float | None = None
    min_hole_mm2: float | None = None
    simplify_tolerance: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.min_area_mm2 is not None:
            _check_area("min_area_mm2", self.min_area_mm2)
        if self.min_hole_mm2 is not None:
            _check_area("min_hole_mm2", self.min_hole_mm2)
        tol = self.simplify_tolerance
        check(
            tol is None or (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0),
            "simplify_tolerance",
            self.simplify_tolerance,
            "must be null (half a prediction pixel) or a tolerance >= 0 in base px",
        )

    def roi_kwargs(self) -> dict:
        return {
            "min_area_mm2": self.min_area_mm2,
            "min_hole_mm2": self.min_hole_mm2,
            "simplify_tolerance": self.simplify_tolerance,
        }


def select_slides(ds: Dataset, slides: list[str] | None, split: list[str] | None = None) -> list[str]:
    """Slide names of ``ds`` restricted to ``slides`` (``task.slides``) and/or annotation ``split`` values."""
    names = ds.names
    if slides:
        unknown = [s for s in slides if s not in names]
        if unknown:
            raise ConfigError(f"task.slides={unknown} is invalid: not in the cohort ({len(names)} slides: {names[:5]} ...)")
        names = [n for n in names if n in slides]
    if split:
        names = [n for n in ds.filter(split=split).names if n in names]
    return names
