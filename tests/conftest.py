"""Shared fixtures and helpers: repo paths, real slides, a tiny demo cohort, offline W&B in a temp dir, composing and
running the Hydra config as ``run.py`` does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"
os.environ.setdefault("HISTOLIGHT_ROOT", str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` on 2 cores: one thread per worker, not two workers x all cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

TINY_DEMO = dict(n_slides=3, seed=0, width=1024, height=768, mpp=0.5)


def shared_slide(name: str) -> Path:
    """Path of a real slide in ../shared/data/slides, skipping the test if it is absent."""
    p = SHARED_SLIDES / name
    if not p.exists():
        pytest.skip(f"real test slide {p} not found (expected ../shared/data/slides beside the repo)")
    return p


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp() / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HISTOLIGHT_ROOT", str(ROOT))


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A 3-slide 1024x768 demo cohort (generated once per test session)."""
    from histolight.demo import generate_demo

    root = tmp_path_factory.mktemp("demo_tiny")
    return generate_demo(root, workers=1, **TINY_DEMO)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    """The default demo cohort (10 slides, 4096x3072), generated once per test session."""
    from histolight.demo import generate_demo

    root = tmp_path_factory.mktemp("demo_full")
    return generate_demo(root)


def tiny_demo_overrides(root: Path) -> list[str]:
    """Hydra overrides pointing dataset=demo at the tiny cohort in ``root``."""
    return [f"paths.demo_dir={root}"] + [f"dataset.demo.{k}={v}" for k, v in TINY_DEMO.items()]


def compose_config(overrides, output_dir: Path | None = None, *, hydra_config: bool = False):
    """``run.py``'s config with ``overrides`` (Hydra's global state reset first); ``output_dir`` sets
    ``paths.output_dir``; ``hydra_config`` keeps the ``hydra`` node (``hydra.run.dir``, ...)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=hydra_config)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def run_task(overrides, output_dir: Path) -> int:
    """Run a task as ``run.py`` does (``logger=none``): its exit status."""
    from histolight.tasks import execute

    try:
        execute(compose_config(["logger=none", *overrides], output_dir))
    except SystemExit as e:
        return int(e.code)
    return 0
