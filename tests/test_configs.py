"""Every config option of every group composes; objects with a `_target_` instantiate; run.py works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from tests.conftest import ROOT, compose_config

CONF = ROOT / "conf"
# groups selected in config.yaml (package-global groups and hydra's own are composed too)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    if group == "launcher" and option == "slurm":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="install the [sweep] extra")
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="install the [sweep] extra")
    cfg = compose_config([f"{group}={option}", f"hydra.run.dir={tmp_path}"], hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    OmegaConf.resolve(cfg.hydra)  # interpolations in hydra's own config resolve
    node = cfg.get(group)
    if group in ("logger", "callbacks") and node:
        from histolight.utils.instantiate import instantiate_callbacks, instantiate_loggers

        objs = (instantiate_loggers if group == "logger" else instantiate_callbacks)(node)
        assert len(objs) == len([v for v in node.values() if v and "_target_" in v])
        from histolight.utils.instantiate import finish_wandb

        finish_wandb()
    elif group == "trainer":
        from histolight.utils.instantiate import instantiate

        if node.get("accelerator") == "gpu":
            node.accelerator = "cpu"
            node.precision = "32-true"
        if node.get("strategy") == "ddp":
            node.devices = 1
            node.strategy = "auto"
            node.sync_batchnorm = False
        trainer = instantiate(node, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == node.max_epochs
    elif group == "task":
        assert cfg.task.name == option or cfg.task.name in option
        from histolight.tasks import get_task

        assert callable(get_task(cfg.task.name))
    elif group == "model" and option.startswith("seg_"):
        import torch

        from histolight.segment.config import config_from_hydra
        from histolight.segment.net import SegmentNet
        from histolight.training.optim import configure_optimizers

        with open_dict(cfg):
            cfg.data = compose_config(["data=seg"], hydra_config=True).data
            cfg.data.mode, cfg.data.labels, cfg.data.size = "multiclass", ["a", "b"], 64
            cfg.model.encoder_name = "resnet18"
        scfg = config_from_hydra(cfg)
        net = SegmentNet(scfg).eval()
        with torch.no_grad():
            assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)
        # segmentation optimizers are Hydra partials, like the classifiers'
        opt = configure_optimizers(net.parameters(), scfg.optimizer, scfg.scheduler, max_epochs=3)
        assert isinstance(opt["optimizer"], torch.optim.AdamW) and opt["lr_scheduler"]["scheduler"].T_max == 3
    elif group == "model" and option.startswith("timm_"):
        import torch

        from histolight.classify.module import create_timm_model
        from histolight.utils.instantiate import instantiate

        net = create_timm_model(cfg.model.name, 3, drop_rate=cfg.model.drop_rate, **cfg.model.model_kwargs).eval()
        with torch.no_grad():
            assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
        opt = instantiate(cfg.model.optimizer)(net.parameters())
        assert isinstance(opt, torch.optim.Optimizer)
        sched = instantiate(cfg.model.scheduler)(opt, T_max=2)
        assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    elif group == "data":
        if option in ("seg", "seg_patches"):
            from histolight.segment.config import config_from_hydra

            with open_dict(cfg):
                cfg.model = compose_config(["model=seg_unet"], hydra_config=True).model
            assert config_from_hydra(cfg).size == cfg.data.size
        elif option == "bags":
            from histolight.config import from_config
            from histolight.mil.config import BagDataConfig

            with open_dict(cfg):
                cfg.data.bags = str(tmp_path)
            assert from_config(BagDataConfig, cfg.data, "data").bags == str(tmp_path)
        else:
            from histolight.classify.config import TileDataConfig
            from histolight.config import from_config

            d = from_config(TileDataConfig, cfg.data, "data")
            assert d.tile_px == cfg.data.tile_px
    elif group == "normalizer":
        norm = pytest.importorskip("histolight.norm")
        n = norm.build_normalizer(cfg.normalizer)
        assert (n is None) == (option == "none")
    # resolve everything except fields that need a live Hydra run
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if group != "dataset" or option != "folder" else None
    from histolight.tasks.wrapper import check_top_level

    check_top_level(cfg)  # every option composes into known top-level keys only


def test_known_top_level_keys_are_the_config_groups_and_config_yaml_keys():
    from histolight.tasks.wrapper import known_top_level_keys

    known = known_top_level_keys()
    doc = OmegaConf.load(CONF / "config.yaml")
    groups = {str(next(iter(d))).removeprefix("optional ") for d in doc.defaults if not isinstance(d, str)}
    assert groups - {"local"} <= set(known) and set(doc) - {"defaults"} <= set(known)
    assert {"ckpt_path", "resume", "seed", "trainer", "task"} <= set(known) and "bogus" not in known


def test_unknown_task_is_a_clear_error():
    from histolight.errors import ConfigError
    from histolight.tasks import get_task

    with pytest.raises(ConfigError, match="unknown task 'infoo'. Did you mean 'info'"):
        get_task("infoo")


def test_dataset_schema_rejects_bad_values(tmp_path):
    from histolight.config import DatasetConfig, from_config
    from histolight.errors import ConfigError

    base = {"slides": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"dataset.*mpp_override=-1 is invalid"):
        from_config(DatasetConfig, {**base, "mpp_override": -1}, "dataset")
    with pytest.raises(ConfigError, match=r"labels.*must be unique \(repeated: \['a'\]\)"):
        from_config(DatasetConfig, {**base, "labels": ["a", "a"]}, "dataset")
    with pytest.raises(ConfigError, match=r"unknown key 'dataset.slide'. Did you mean 'dataset.slides'"):
        from_config(DatasetConfig, {**base, "slide": "x"}, "dataset")


def _run(args, tmp_path, timeout=300):
    env = {**os.environ, "HISTOLIGHT_ROOT": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, f"paths.log_dir={tmp_path}/outputs"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )


def test_run_info_on_shared_slides(tmp_path):
    from tests.conftest import SHARED_SLIDES

    if not SHARED_SLIDES.exists():
        pytest.skip("../shared/data/slides not found")
    r = _run(["task=info", "dataset=shared"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]  # finished, but slides failed (exit status 2, tasks/wrapper.py)
    out = r.stdout
    assert "6 slide(s): 4 readable, 2 failed" in out
    for name in ("cmu_small_region", "test3-DAPI-2-(387)", "small", "boxes"):
        assert name in out
    assert "OpenSlide error: Unsupported TIFF compression" in out
    assert "reading pixels failed" in out
    runs = list((tmp_path / "outputs").glob("*/*/slides.csv"))
    assert len(runs) == 1


@pytest.mark.slow
def test_run_info_on_tiny_demo_and_config_errors(tmp_path, tiny_demo):
    from tests.conftest import tiny_demo_overrides

    r = _run(["task=info", *tiny_demo_overrides(tiny_demo)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 slide(s): 3 readable, 0 failed" in r.stdout
    assert "necrosis,stroma,tumor" in r.stdout
    # a typo in a key: Hydra names it; a bad value: our schema names key, value and what is allowed
    r = _run(["task=info", "dataset.mpp_overide=0.5"], tmp_path)
    assert r.returncode != 0 and "mpp_overide" in r.stderr
    r = _run(["task=info", "dataset.mpp_override=-2", *tiny_demo_overrides(tiny_demo)], tmp_path)
    assert r.returncode == 1
    assert "mpp_override=-2 is invalid" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    r = _run(["task=nope"], tmp_path)
    assert r.returncode != 0 and "nope" in r.stderr
    r = _run(["task=info", "+sed=1", *tiny_demo_overrides(tiny_demo)], tmp_path)  # an unknown top-level key
    assert r.returncode == 1 and "unknown top-level key 'sed'. Did you mean 'seed'?" in r.stderr + r.stdout


@pytest.mark.slow
def test_multirun_dirs_are_unique(tmp_path, tiny_demo):
    from tests.conftest import tiny_demo_overrides

    r = _run(["-m", "task=info", "task.check_read=true,false", *tiny_demo_overrides(tiny_demo)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dirs = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").glob("*/*/*/slides.csv"))
    assert len(dirs) == 2 and len(set(dirs)) == 2
