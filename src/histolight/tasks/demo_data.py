"""``task=demo_data``: generate (or check) the demo cohort configured in ``dataset.demo``."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from histolight.config.schema import check, from_config
from histolight.errors import ConfigError
from histolight.tasks.common import dataset_config, ensure_demo_from_config

log = logging.getLogger(__name__)


@dataclass
class DemoDataTask:
    """``conf/task/demo_data.yaml``."""

    name: str = "demo_data"
    overwrite: bool = False

    def __post_init__(self):
        check(isinstance(self.overwrite, bool), "overwrite", self.overwrite, "must be true or false")


def run(cfg: DictConfig) -> dict:
    t = from_config(DemoDataTask, cfg.task, "task")
    d = dataset_config(cfg)
    if not d.demo:
        raise ConfigError("task=demo_data needs a dataset with a `demo` section (use dataset=demo)")
    root = Path(d.demo["root"])
    if t.overwrite and (root / "manifest.json").exists():
        log.info("overwrite=true: regenerating %s", root)
        for sub in ("slides", "rois", "rois_qupath", "masks", "qc"):
            shutil.rmtree(root / sub, ignore_errors=True)
        (root / "manifest.json").unlink()
    ensure_demo_from_config(d)
    manifest = json.loads((root / "manifest.json").read_text())
    print(f"Demo cohort: {len(manifest['slides'])} slides in {root}")
    for s in manifest["slides"]:
        print(f"  {s['slide']}: {s['n_rois']} ROIs, slide label {s['label']}")
    return {"n_slides": len(manifest["slides"])}
