"""Safe loading: no user-supplied weights file is ever unpickled with code execution (there is no opt-in).

A malicious checkpoint here is a real torch checkpoint (tensors under ``state_dict``) that also holds an object
whose ``__reduce__`` calls ``exec``, which would create a marker file when unpickled. Every entry point that reads
a weights file is given one and must refuse it, name the file, say how to convert a trusted file, and never create
the marker.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest
import torch

from histolight.errors import ConfigError, HistolightError
from tests.conftest import ROOT, run_task

LABELS = ["tumor", "stroma", "necrosis"]
REFUSED = r"cannot be loaded safely \(it holds a [\w.]*exec object\).*give histolight the new file"
#: unpickling in src/ that is not of user files: the cohort runner's per-slide function, sent by its own parent process
INTERNAL_PICKLES = {"cohort.py"}


class _Evil:
    """Unpickling this runs ``exec``: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _evil_file(path: Path, marker: Path, tensors: dict | None = None) -> Path:
    """A checkpoint-looking torch file (``state_dict`` of ``tensors`` + a payload that creates ``marker``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": tensors or {"w": torch.zeros(2)}, "hyper_parameters": {}, "payload": _Evil(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a refused checkpoint ran its code"


def _classifier_folder(folder: Path, marker: Path | None = None) -> Path:
    """A random-init resnet10t classifier folder (32 px / 16 um); with ``marker``, its config points at a malicious
    ``weights.pt``."""
    from histolight.classify.artifacts import make_model_config, save_model
    from histolight.classify.labels import LabelMap
    from histolight.classify.module import create_timm_model

    cfg = make_model_config("resnet10t", LabelMap(["a", "b"]), 32, 16, mean=[0.5] * 3, std=[0.25] * 3)
    save_model(folder, create_timm_model("resnet10t", 2), cfg)
    if marker is not None:
        _point_at_evil(folder / "classifier_config.json", marker)
    return folder


def _point_at_evil(config: Path, marker: Path) -> None:
    _evil_file(config.parent / "weights.pt", marker)
    config.write_text(json.dumps({**json.loads(config.read_text()), "weights": "weights.pt"}))


def _seg_folder(folder: Path, marker: Path | None = None) -> Path:
    from histolight.segment import SegmentConfig
    from histolight.segment.io import save_model
    from histolight.segment.model import SegmentModel

    cfg = SegmentConfig(mode="multiclass", labels=LABELS, mpp=8, size=64, encoder_name="tu-mobilenetv3_small_100")
    save_model(SegmentModel(cfg), folder)
    if marker is not None:
        _point_at_evil(folder / "segment_config.json", marker)
    return folder


def _execute(overrides: list[str], out: Path, caplog) -> tuple[int, str]:
    """Run a task as ``run.py`` does: (exit status, the error lines it logged)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="histolight"):
        code = run_task(overrides, out)
    return code, "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


# ---------------------------------------------------------------------------------------------- the library API


def test_weights_readers_refuse_with_no_way_around(tmp_path, marker):
    from histolight.io.weights import read_checkpoint, read_state_dict

    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    for read in (read_state_dict, read_checkpoint):
        with pytest.raises(HistolightError, match=REFUSED) as ei:
            read(evil)
        assert str(evil) in str(ei.value) and "nothing in it was run" in str(ei.value)
        with pytest.raises(TypeError):  # no opt-in argument exists
            read(evil, trust_checkpoint=True)
    assert not marker.exists()


def test_a_legacy_whole_model_pickle_is_refused_and_its_conversion_loads(tmp_path):
    from safetensors.torch import save_file

    from histolight.classify.module import create_timm_model
    from histolight.io.weights import read_state_dict

    net = create_timm_model("resnet10t", 2)
    torch.save(net, tmp_path / "whole.pt")  # an old habit: the pickled module, not its state dict
    with pytest.raises(HistolightError, match=r"cannot be loaded safely \(it holds a timm.*object\)"):
        read_state_dict(tmp_path / "whole.pt")
    # the conversion SECURITY.md shows, done by the user outside histolight for a file they trust
    obj = torch.load(tmp_path / "whole.pt", map_location="cpu", weights_only=False)
    save_file(obj.state_dict(), tmp_path / "weights.safetensors")
    assert torch.equal(read_state_dict(tmp_path / "weights.safetensors")["fc.weight"], net.fc.weight)


def test_classifier_entry_points_refuse(tmp_path, marker):
    from histolight.classify import TileClassifier, create_timm_model, load_model
    from histolight.classify.config import TimmModelConfig

    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    with pytest.raises(HistolightError, match=REFUSED):
        load_model(evil)
    folder = _classifier_folder(tmp_path / "model", marker)
    with pytest.raises(HistolightError, match=REFUSED):
        load_model(folder)
    # model.checkpoint_path (pretrained weights of a classifier or a timm backbone), and its config key
    with pytest.raises(ConfigError, match=rf"model.checkpoint_path=.* is invalid: .*{REFUSED}"):
        create_timm_model("resnet10t", 2, checkpoint_path=str(evil))
    with pytest.raises(ConfigError, match=rf"model.checkpoint_path=.* is invalid: .*{REFUSED}"):
        TileClassifier("resnet10t", LABELS, checkpoint_path=str(evil))
    opt = {"_target_": "torch.optim.AdamW", "_partial_": True}
    with pytest.raises(TypeError):  # the removed opt-in is not a model option
        TimmModelConfig(name="resnet10t", optimizer=opt, trust_checkpoint=True)
    assert not marker.exists()


def test_segmentation_entry_points_refuse(tmp_path, marker):
    from histolight.qc import Segment
    from histolight.segment import SegmentConfig, load_model_and_config
    from histolight.segment.model import SegmentModel

    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    folder = _seg_folder(tmp_path / "model", marker)
    for path in (evil, folder, folder / "weights.pt"):
        with pytest.raises(HistolightError, match=REFUSED):
            load_model_and_config(path)
        with pytest.raises(HistolightError, match=REFUSED):
            Segment(path)
    # model.encoder_weights: pretrained encoder weights at the start of training
    cfg = SegmentConfig(labels=None, mpp=8, size=64, encoder_name="resnet18", encoder_weights=str(evil))
    with pytest.raises(ConfigError, match=rf"encoder_weights=.*{REFUSED}"):
        SegmentModel(cfg, load_pretrained=True)
    assert not marker.exists()


def test_model_folder_weights_must_be_a_file_of_the_folder(tmp_path):
    from histolight.training.artifacts import read_model_folder

    folder = _classifier_folder(tmp_path / "model")
    meta = json.loads((folder / "classifier_config.json").read_text())
    for bad in ("../elsewhere.pt", "/etc/passwd", ""):
        (folder / "classifier_config.json").write_text(json.dumps({**meta, "weights": bad}))
        with pytest.raises(HistolightError, match=r"weights=.* is invalid: must be the name of a file in the model folder"):
            read_model_folder(folder)


def test_safetensors_everywhere(tmp_path):
    from safetensors.torch import save_file

    from histolight.classify.module import create_timm_model
    from histolight.segment import SegmentConfig
    from histolight.segment.model import SegmentModel
    from histolight.training.artifacts import read_model_folder

    # model folders are written as safetensors
    folder = _classifier_folder(tmp_path / "model")
    assert read_model_folder(folder).weights.name == "weights.safetensors"
    # pretrained classifier / backbone weights
    src = create_timm_model("resnet10t", 2)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = create_timm_model("resnet10t", 2, checkpoint_path=str(tmp_path / "w.safetensors"))
    assert torch.equal(dst.conv1[0].weight, src.conv1[0].weight)
    # segmentation encoder weights
    cfg = SegmentConfig(labels=None, mpp=8, size=64, encoder_name="resnet18")
    enc = SegmentModel(cfg).net.model.encoder
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, tmp_path / "enc.safetensors")
    m = SegmentModel(
        SegmentConfig(**{**cfg.to_dict(), "encoder_weights": str(tmp_path / "enc.safetensors")}), load_pretrained=True
    )
    assert torch.equal(m.net.model.encoder.conv1.weight, enc.conv1.weight)


def test_torch_load_only_in_io_weights():
    """Every torch.load in src/ passes weights_only=True (there is no opt-in); nothing else unpickles (but the cohort
    runner's own inter-process messages)."""
    src = ROOT / "src" / "histolight"
    bad = []
    for p in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = getattr(node.func.value, "id", None)
            if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler") and p.name not in INTERNAL_PICKLES:
                bad.append(f"{p.relative_to(src)}:{node.lineno} pickle.{node.func.attr}")
            if owner == "torch" and node.func.attr == "load":
                kw = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if kw.get("weights_only") is not True:
                    bad.append(f"{p.relative_to(src)}:{node.lineno} torch.load without weights_only=True")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- the tasks


@pytest.fixture
def slides(tiny_demo) -> list[str]:
    return ["dataset=folder", f"dataset.slides={tiny_demo / 'slides'}", f"dataset.rois={tiny_demo / 'rois'}", "dataset.name=tiny"]


def test_predict_task_refuses(tmp_path, marker, caplog):
    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    folder = _classifier_folder(tmp_path / "model", marker)
    for model in (evil, folder):
        ov = ["task=predict", f"task.model={model}", f"task.tfrecords={tmp_path}", "dataset=folder", f"dataset.slides={tmp_path}"]
        code, err = _execute(ov, tmp_path / "out", caplog)
        assert code == 1 and str(model) in err and "cannot be loaded safely" in err and "give histolight the new file" in err


def test_features_task_refuses(tmp_path, marker, caplog):
    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    common = [f"task.tfrecords={tmp_path}", f"task.outdir={tmp_path / 'bags'}", "dataset=folder", f"dataset.slides={tmp_path}"]
    for ov in ([f"task.model={evil}"], ["extractor=retccl", f"extractor.weights={evil}"]):  # a classifier; backbone weights
        code, err = _execute(["task=features", *ov, *common], tmp_path / "out", caplog)
        assert code == 1 and str(evil) in err and "cannot be loaded safely" in err, err


@pytest.mark.parametrize("task", ["segment", "generate_rois"])
def test_segmentation_tasks_refuse(task, tmp_path, marker, slides, caplog):
    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    folder = _seg_folder(tmp_path / "model", marker)
    dest = [f"task.dest={tmp_path / 'rois'}"] if task == "generate_rois" else []
    for model in (evil, folder):
        code, err = _execute([f"task={task}", f"task.model={model}", *dest, *slides], tmp_path, caplog)
        assert code == 1 and "cannot be loaded safely" in err and "give histolight the new file" in err, err
    assert not (tmp_path / "rois").exists() and not (tmp_path / "segment").exists()
