"""``task=demo_data``: generate (or check) the demo cohort configured in ``dataset.demo``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from histolight.errors import ConfigError
from histolight.tasks.common import dataset_config, ensure_demo_from_config

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    d = dataset_config(cfg)
    if not d.demo:
        raise ConfigError("task=demo_data needs a dataset with a `demo` section (use dataset=demo)")
    root = Path(d.demo["root"])
    if cfg.task.get("overwrite") and (root / "manifest.json").exists():
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
