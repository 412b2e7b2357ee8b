"""Shared fixtures: repo paths, real slides, a tiny demo cohort, offline W&B in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"
os.environ.setdefault("HISTOLIGHT_ROOT", str(ROOT))

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
