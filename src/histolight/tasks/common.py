"""Helpers shared by tasks: the cohort from config, the run's output dir, the demo on first use."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from histolight.config import DatasetConfig, from_config
from histolight.dataset import Dataset

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
        from histolight.errors import ConfigError

        raise ConfigError(f"invalid config 'dataset.demo': {e}") from None
    return ensure_demo(root, demo_cfg)


def load_dataset(cfg: DictConfig) -> Dataset:
    """The cohort described by ``cfg.dataset`` (generating the demo cohort on first use)."""
    d = dataset_config(cfg)
    ensure_demo_from_config(d)
    return Dataset(
        d.slides, rois=d.rois, annotations=d.annotations, mpp_override=d.mpp_override, recursive=d.recursive, name=d.name
    )


def output_dir(cfg: DictConfig) -> Path:
    """This run's output folder (``paths.output_dir``), created."""
    p = Path(OmegaConf.select(cfg, "paths.output_dir", default="outputs/manual"))
    p.mkdir(parents=True, exist_ok=True)
    return p
