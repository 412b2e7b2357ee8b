"""The README as a newcomer uses it: every command of its command table runs as written (with tiny settings appended,
in a fresh output root) and writes something, and the Python API section's code runs as written.

The commands are parsed from README.md, so the table and this test cannot drift apart. Placeholders: ``<run dir>``
is the segmentation run of the table's ``experiment=seg_multiclass`` row, ``<run>/model`` the model of its
``experiment=tile_classifier`` row, ``<folder>`` a fresh folder, ``/my/slides`` and ``/my/rois`` the tiny demo cohort.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_demo_overrides

README = ROOT / "README.md"
HISTOLIGHT = Path(sys.executable).parent / "histolight"

#: tiny settings appended to commands, by what they run
SEG = ["data.size=64", "data.crops_per_epoch=4", "data.batch_size=2", "model.infer_batch_size=4", "task.n_overlays=1"]
TILES = ["data.tile_px=32", "data.tile_um=32", "data.num_workers=0", "data.batch_size=16", "data.samples_per_epoch=32"]
TRAIN = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=csv"]
OPTUNA = ["hydra.sweeper.n_trials=1", "hydra.sweeper.sampler.n_startup_trials=1"]
SLURM = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=15"]


def command_table(text: str) -> list[str]:
    """The commands (first column, in backticks) of the README's table whose header is ``| command | what it does |``."""
    lines = text.splitlines()
    start = lines.index("| command | what it does |")
    commands = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        m = re.match(r"\| `([^`]+)` \|", line)
        assert m, f"README command table: a row without a command in backticks: {line}"
        commands.append(m.group(1))
    return commands


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of the README's ``## Python API`` section (up to the next ``## `` heading)."""
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


COMMANDS = command_table(README.read_text())


def test_the_command_table_is_histolight_commands():
    assert len(COMMANDS) >= 10 and all(c.startswith("histolight ") for c in COMMANDS), COMMANDS
    for needed in ("experiment=seg_multiclass", "experiment=tile_classifier", "task=extract", "task=info"):
        assert any(c.split()[1:] == [needed] for c in COMMANDS), needed


def _tiny(args: list[str], tmp: Path, demo: Path, n: int) -> list[str]:
    """``args`` + tiny settings + a fresh output root and run (or sweep) folder for command number ``n``."""
    joined = " ".join(args)
    extra = [f"paths.output_root={tmp / 'root'}"]
    if not any(a.startswith("dataset=") for a in args):
        extra += tiny_demo_overrides(demo)
    if "task=demo_data" in args:
        extra = [f"paths.output_root={tmp / 'root'}", *tiny_demo_overrides(tmp / "fresh_demo")]
    if "experiment=seg_" in joined:
        extra += SEG + TRAIN
    if "experiment=tile_classifier" in args:
        extra += TILES + TRAIN
    if "hparams_search=seg_optuna" in args:
        extra += OPTUNA
    if "launcher=slurm" in args:
        extra += SLURM
    if "task=extract" in args or "experiment=extract_demo" in args:
        extra += ["task.workers=1"]
    multirun = "-m" in args
    extra.append(f"hydra.{'sweep' if multirun else 'run'}.dir={tmp / 'runs' / str(n)}")
    return args + extra


def _products(root: Path) -> set[Path]:
    """Files under ``root`` a run wrote besides Hydra's own (``.hydra/``, logs)."""
    if not root.exists():
        return set()
    return {p for p in root.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


class Runner:
    """Runs README commands in order, in one fresh output root, keeping the runs later rows refer to."""

    def __init__(self, tmp: Path, demo: Path):
        self.tmp, self.demo, self.done = tmp, demo, {}

    def arguments(self, command: str) -> list[str]:
        """``command``'s arguments with the placeholders filled in (running the rows they refer to first)."""
        for key, row, sub in (
            ("<run dir>", "experiment=seg_multiclass", ""),
            ("<run>/model", "experiment=tile_classifier", "model"),
        ):
            if key in command:
                command = command.replace(key, str(self.run_of(row) / sub))
        places = {"<folder>": self.tmp / "rois_pred", "/my/slides": self.demo / "slides", "/my/rois": self.demo / "rois"}
        for key, value in places.items():
            command = command.replace(key, str(value))
        return shlex.split(command)[1:]

    def run_of(self, row: str) -> Path:
        """The run folder of the table's ``histolight <row>`` command (run now if it has not run yet)."""
        command = next(c for c in COMMANDS if c.split()[1:] == [row])
        self.run(command)
        return self.tmp / "runs" / str(COMMANDS.index(command))

    def run(self, command: str) -> tuple[int, str, int]:
        """(exit status, output tail, files written) of ``command``, run once."""
        if command in self.done:
            return self.done[command]
        args = _tiny(self.arguments(command), self.tmp, self.demo, COMMANDS.index(command))
        before = {p: p.stat().st_mtime_ns for p in _products(self.tmp)}
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
        env.pop("HISTOLIGHT_ROOT", None)  # the command finds its configs itself
        env.pop("HISTOLIGHT_HOME", None)
        p = subprocess.run([str(HISTOLIGHT), *args], cwd=self.tmp, env=env, capture_output=True, text=True, timeout=900)
        written = len([q for q in _products(self.tmp) if before.get(q) != q.stat().st_mtime_ns])
        self.done[command] = (p.returncode, (p.stdout + p.stderr)[-3000:], written)
        return self.done[command]


@pytest.fixture(scope="module")
def runner(tmp_path_factory, tiny_demo) -> Runner:
    if not HISTOLIGHT.exists():
        pytest.fail(f"{HISTOLIGHT} is missing: reinstall with `pip install -e .` (pyproject.toml [project.scripts])")
    return Runner(tmp_path_factory.mktemp("readme"), tiny_demo)


@pytest.mark.slow  # every row is a histolight process; training rows train a tiny model for one epoch
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_every_readme_command_runs_as_written(runner, command):
    if "launcher=slurm" in command and (
        shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode
    ):
        pytest.skip("no SLURM scheduler answers here (tests/test_slurm.py runs it where one does)")
    code, tail, written = runner.run(command)
    assert code == 0, f"`{command}` exited with {code}:\n{tail}"
    assert written > 0, f"`{command}` wrote nothing besides Hydra's files:\n{tail}"


@pytest.mark.slow  # builds feature bags of the tiny cohort with a random ResNet-18
def test_the_python_api_section_runs_as_written(tiny_demo, tmp_path):
    code = "\n".join(python_blocks(README.read_text()))
    assert "ds = Dataset(" in code and "build_feature_extractor(" in code
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(tiny_demo)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "demo_000.geojson").stat().st_size > 0 and (tmp_path / "bags" / "bags_config.json").is_file()
    assert sorted(q.name for q in (tmp_path / "bags").glob("*.pt")) == ["demo_000.pt", "demo_001.pt", "demo_002.pt"]
