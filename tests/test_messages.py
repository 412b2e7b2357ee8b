"""Messages a newcomer meets: each names what to set or which task to use instead (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from histolight.dataset import Dataset
from histolight.errors import ConfigError
from tests.conftest import ROOT, compose_config, tiny_demo_overrides


def _compose(overrides: list[str]):
    from histolight.cli import install_override_hints

    install_override_hints()
    return compose_config(overrides)


# ---------------------------------------------------------------------------------------------- required values


def test_a_required_value_left_out_says_what_to_set_not_question_marks():
    from histolight.config import from_config
    from histolight.tasks.common import dataset_config
    from histolight.tasks.segment import SegmentTask

    with pytest.raises(ConfigError) as e:
        from_config(SegmentTask, _compose(["task=segment"]).task, "task")
    msg = str(e.value)
    assert "???" not in msg and "task.model is not set: add task.model=<value> to the command line" in msg
    assert "trained model folder" in msg  # what the value must be, from the schema
    with pytest.raises(ConfigError) as e:
        dataset_config(_compose(["task=info", "dataset=folder"]))
    msg = str(e.value)
    assert "???" not in msg and "dataset.slides is not set: add dataset.slides=<value>" in msg and "folder" in msg


# ---------------------------------------------------------------------------------------------- misspelled keys


def test_a_misspelled_key_gets_our_did_you_mean_not_hydras_append_advice():
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["task=extract", "task.tile_pxx=512"])
    msg = str(e.value)
    assert msg.startswith("unknown key 'task.tile_pxx': did you mean 'task.tile_px'?")
    assert "append" not in msg and "+task" not in msg and e.value.__cause__ is None
    with pytest.raises(ConfigCompositionException, match=r"did you mean 'task\.tile_px'\? \(the config has no 'taks'\)"):
        _compose(["task=extract", "taks.tile_px=512"])  # a misspelled group
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["task=info", "task.bogus=1"])  # no close match: the keys it has; '+' would only be refused later
    assert "'task' has no 'bogus'; its keys: name, check_read" in str(e.value) and "+" not in str(e.value)
    with pytest.raises(ConfigCompositionException) as e:
        _compose(["experiment=seg_multiclass", "model.model_kwargs.attention=scse"])  # a free-form dict takes new keys
    assert "'model.model_kwargs' has no 'attention'" in str(e.value) and "+model.model_kwargs.attention=scse" in str(e.value)
    assert _compose(["task=extract", "task.tile_px=512"]).task.tile_px == 512  # valid overrides are untouched


def test_run_py_outside_the_venv_names_the_command_to_use():
    """``python -S`` hides the venv's packages, as a system Python would (about a second, no imports)."""
    p = subprocess.run([sys.executable, "-S", str(ROOT / "run.py"), "task=info"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "'hydra' is not installed" in p.stderr
    assert (".venv/bin/histolight" in p.stderr and "source .venv/bin/activate" in p.stderr) or "make install" in p.stderr


def test_the_histolight_command_finds_its_configs_from_any_folder(tmp_path):
    exe = Path(sys.executable).parent / "histolight"
    if not exe.exists():
        pytest.fail(f"{exe} is missing: reinstall with `pip install -e .` (pyproject.toml [project.scripts])")
    env = {k: v for k, v in os.environ.items() if k != "HISTOLIGHT_ROOT"}
    p = subprocess.run(
        [str(exe), "task=info", "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "name: info" in p.stdout and "check_read: true" in p.stdout  # the repository's conf/task/info.yaml
    from histolight.config.files import repo_root

    os.environ.pop("HISTOLIGHT_ROOT", None)
    try:
        assert repo_root() == ROOT
        os.environ["HISTOLIGHT_ROOT"] = str(tmp_path)
        with pytest.raises(ConfigError, match="has no conf/config.yaml"):
            repo_root()
    finally:
        os.environ["HISTOLIGHT_ROOT"] = str(ROOT)


# ---------------------------------------------------------------------------------------------- models of the wrong kind


def _model(folder: Path, kind: str) -> Path:
    from histolight.training.artifacts import REQUIRED_KEYS, save_model_folder

    return save_model_folder(folder, kind, {"w": torch.zeros(1)}, {k: {} for k in REQUIRED_KEYS})


def test_a_model_of_the_wrong_kind_says_what_it_is_and_which_task_takes_it(tmp_path):
    from histolight.tasks.common import resolve_model

    seg = _model(tmp_path / "seg_run", "segment")
    clf_run = tmp_path / "tiles_run"
    clf = _model(clf_run / "model", "classifier")
    with pytest.raises(ConfigError) as e:
        resolve_model(str(seg), "classifier", "predict")
    msg = str(e.value)
    assert "is a segmentation model" in msg and "task=segment" in msg and "task=predict needs a tile classifier" in msg
    for given in (clf_run, clf):
        with pytest.raises(ConfigError) as e:
            resolve_model(str(given), "segment", "segment")
        assert "is a tile classifier" in str(e.value) and "task=predict" in str(e.value)
    assert resolve_model(str(clf_run), "classifier", "predict") == str(clf)  # a run folder: its model/
    assert resolve_model(str(seg), "segment", "segment") == str(seg)
    assert resolve_model(str(tmp_path / "nothing"), "segment", "segment") == str(tmp_path / "nothing")  # the loader says


def test_missing_tiles_name_the_folder_and_the_extract_command(tmp_path):
    from histolight.tasks.common import tile_source

    cfg = _compose(["task=predict"])
    with pytest.raises(ConfigError) as e:
        tile_source(cfg, str(tmp_path), 128, 64, "the model m")
    msg = str(e.value)
    assert str(tmp_path / "demo" / "128px_64um") in msg and "histolight task=extract task.tile_px=128 task.tile_um=64" in msg
    assert "task.tfrecords=" in msg


# ---------------------------------------------------------------------------------------------- extraction settings


def test_a_tile_folder_extracted_with_other_settings_is_refused_naming_keys_and_fix(tiny_demo, tmp_path):
    from histolight.extract import extract_tiles, load_extract_config
    from histolight.io.tilestore import tile_folder
    from histolight.tasks.extract import check_same_settings

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", name="demo")
    opts = {"tile_px": 64, "tile_um": 128, "workers": 1, "report": False, "progress": False, "slides": ["demo_000"]}
    extract_tiles(ds, outdir=tmp_path, qc=["otsu"], **opts)
    folder = tile_folder(tmp_path, "demo", 64, 128)
    same = load_extract_config({"tile_px": 64, "tile_um": 128, "qc": ["otsu"], "outdir": str(tmp_path)}, "task")
    check_same_settings(folder, same)  # the same settings: resumes
    other = load_extract_config({"tile_px": 64, "tile_um": 128, "qc": ["otsu", "blur"], "outdir": str(tmp_path)}, "task")
    with pytest.raises(ConfigError) as e:
        check_same_settings(folder, other)
    msg = str(e.value)
    assert "qc: ['otsu'] there, ['otsu', 'blur'] now" in msg and "1 slide(s)" in msg
    assert "task.overwrite=true" in msg and "dataset.name=" in msg and "task.outdir=" in msg
    redo = load_extract_config({"tile_px": 64, "tile_um": 128, "qc": ["otsu", "blur"], "overwrite": True}, "task")
    check_same_settings(folder, redo)  # overwrite=true re-extracts: allowed


# ---------------------------------------------------------------------------------------------- export_masks defaults


def test_export_masks_needs_no_model_group_and_takes_labels_from_the_dataset(tiny_demo):
    from histolight.segment.config import config_from_hydra
    from histolight.tasks.export_masks import with_data_defaults

    cfg = _compose(["task=export_masks", *tiny_demo_overrides(tiny_demo)])
    with_data_defaults(cfg)
    scfg = config_from_hydra(cfg, need_model=False)
    assert (scfg.mode, scfg.mpp) == ("binary", 20) and str(cfg.data.cache_dir).endswith("seg_thumbs/demo")
    cfg = _compose(["task=export_masks", "data=seg", "data.mode=multiclass", "data.mpp=4"])  # the yaml's example
    with_data_defaults(cfg)
    assert config_from_hydra(cfg, need_model=False).labels == ["tumor", "stroma", "necrosis"]


# ---------------------------------------------------------------------------------------------- task=info


def test_info_shows_size_and_mpp_of_a_slide_whose_roi_file_is_broken(tiny_demo, tmp_path):
    from histolight.tasks.info import format_info

    slides, rois = tmp_path / "slides", tmp_path / "rois"
    slides.mkdir()
    rois.mkdir()
    for n in ("demo_000", "demo_001"):
        (slides / f"{n}.svs").symlink_to(tiny_demo / "slides" / f"{n}.svs")
    (rois / "demo_000.geojson").write_text('{"type": "FeatureCollection", "features": [')  # truncated JSON
    res = Dataset(slides, rois=rois).info(progress=False)
    text = format_info(res.table)
    row = next(line for line in text.splitlines() if line.strip().startswith("demo_000"))
    assert "failed" in row and "1024" in row and "768" in row and "0.5" in row  # described, marked failed
    assert "Failed:" in text and "demo_000:" in text.split("Failed:")[1]
