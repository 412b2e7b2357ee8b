"""The Python API as users run it: plain scripts with and without the ``__main__`` guard, a script from stdin, a
notebook (executed headless with nbclient), one output root for everything ``run.py`` writes, and the API
walkthrough notebook ``docs/api_walkthrough.ipynb``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from histolight.utils.procs import under_guard
from tests.conftest import ROOT, TINY_DEMO

FALLBACK = "in this process, not in worker processes"
GUARD = 'if __name__ == "__main__":'


def _extract_code(demo: Path, outdir: Path) -> tuple[str, str]:
    """(set-up lines, the extraction call) of a user script extracting the tiny demo with ``workers=2``. The call
    prints the kept tiles per slide, and how many slides ran in the calling process (counted by the test)."""
    setup = f"""
        import json, logging
        logging.basicConfig(level=logging.WARNING)
        import histolight.cohort
        from histolight.dataset import Dataset
        from histolight.extract import extract_tiles
        here, serial = [], histolight.cohort._run_serial
        histolight.cohort._run_serial = lambda names, *a: (here.extend(names), serial(names, *a))
        ds = Dataset({str(demo / "slides")!r}, rois={str(demo / "rois")!r}, name="tiny")
        """
    call = f"""
        res = extract_tiles(ds, tile_px=64, tile_um=64, outdir={str(outdir)!r}, workers=2, progress=False)
        kept = {{s: int(k) for s, k in zip(res.summary["slide"], res.summary["kept"])}}
        print("RESULT " + json.dumps({{"kept": kept, "in_process": len(here)}}))
        """
    return textwrap.dedent(setup), textwrap.dedent(call)


def _result(stdout: str) -> tuple[dict, int]:
    """(kept tiles per slide, slides run in the calling process) printed by the extraction call."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[7:])
    return r["kept"], r["in_process"]


@pytest.fixture(scope="module")
def one_process_counts(tiny_demo, tmp_path_factory) -> dict:
    """Kept tiles per slide of a ``workers=1`` extraction of the tiny demo (the reference)."""
    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", name="tiny")
    res = extract_tiles(ds, tile_px=64, tile_um=64, outdir=tmp_path_factory.mktemp("ref"), workers=1, progress=False)
    counts = {s: int(k) for s, k in zip(res.summary["slide"], res.summary["kept"])}
    assert len(counts) == TINY_DEMO["n_slides"] and sum(counts.values()) > 0
    return counts


def _run(args: list[str], tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=240, **kw)


# ---------------------------------------------------------------------------------------------- scripts, notebook


@pytest.mark.slow
def test_unguarded_script_runs_in_one_process_with_one_warning(tiny_demo, tmp_path, one_process_counts):
    """No guard: workers would re-run the script, so the slides run in this process after one warning with the fix."""
    setup, call = _extract_code(tiny_demo, tmp_path / "tiles")
    script = tmp_path / "unguarded.py"
    script.write_text(setup + call)
    p = _run([str(script)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert _result(p.stdout) == (one_process_counts, 3)  # all 3 slides in the calling process
    warnings = [ln for ln in p.stderr.splitlines() if FALLBACK in ln]
    assert len(warnings) == 1, p.stderr
    line = next(i for i, ln in enumerate(script.read_text().splitlines(), 1) if ln.startswith("res = extract_tiles"))
    assert f"{script} starts this run at its top level (line {line})" in warnings[0] and GUARD in warnings[0]
    assert "died" not in p.stderr and "bootstrapping" not in p.stderr


@pytest.mark.slow
def test_guarded_script_uses_workers(tiny_demo, tmp_path, one_process_counts):
    setup, call = _extract_code(tiny_demo, tmp_path / "tiles")
    script = tmp_path / "guarded.py"
    script.write_text(setup + GUARD + textwrap.indent(call, "    "))
    p = _run([str(script)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert _result(p.stdout) == (one_process_counts, 0)  # none in the calling process: in workers
    assert FALLBACK not in p.stderr and "WARNING" not in p.stderr, p.stderr


@pytest.mark.slow
def test_script_from_stdin_runs_in_one_process(tiny_demo, tmp_path, one_process_counts):
    setup, call = _extract_code(tiny_demo, tmp_path / "tiles")
    p = _run(["-"], tmp_path, input=setup + GUARD + textwrap.indent(call, "    "))
    assert p.returncode == 0, p.stderr
    assert _result(p.stdout) == (one_process_counts, 3)
    assert "(read from stdin?)" in p.stderr and p.stderr.count(FALLBACK) == 1, p.stderr


def _execute_notebook(cells: list[str] | Path, cwd: Path, timeout: int = 240):
    """Execute a notebook (a file, or code cells) headless in ``cwd`` with a kernel on this interpreter and environment;
    returns it (raises on any cell error)."""
    import nbclient
    import nbformat

    if isinstance(cells, Path):
        nb = nbformat.read(cells, as_version=4)
    else:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_notebook_uses_workers(tiny_demo, tmp_path, one_process_counts):
    """A notebook needs no guard: spawned workers import nothing of it."""
    setup, call = _extract_code(tiny_demo, tmp_path / "tiles")
    nb = _execute_notebook([setup, call], tmp_path)
    out = _text(nb)
    assert _result(out) == (one_process_counts, 0)
    assert FALLBACK not in out, out


# ---------------------------------------------------------------------------------------------- the guard check


def test_guard_check_reads_the_script(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        textwrap.dedent(
            """\
            run()
            if __name__ == '__main__':
                run()
            else:
                run()
            if "__main__" == __name__:
                run(
                    1,
                )
            def f():
                run()
            """
        )
    )
    assert [under_guard(str(script), n) for n in range(1, 12)] == [
        *(False, False, True, False, False),  # the test line and `else:` branch are not guarded
        *(False, True, True, True),
        *(False, False),
    ]
    assert not under_guard(str(tmp_path / "missing.py"), 1)


# ---------------------------------------------------------------------------------------------- one output root


WATCHED = ["outputs", "data", "wandb", "lightning_logs", "multirun"]


def _repo_outputs() -> set[str]:
    """What a run could leave in the repository: top-level folders (not tool caches) + untracked or ignored files
    under WATCHED. (Top-level files are left out: people create those in a shared working tree.)"""
    git = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all", "--", *WATCHED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if git.returncode != 0:
        pytest.skip(f"not a git checkout: {git.stderr.strip()}")
    caches = ("__pycache__", ".pytest_cache", ".ruff_cache")
    folders = {f"folder: {p.name}" for p in ROOT.iterdir() if p.is_dir() and p.name not in caches}
    return {ln for ln in git.stdout.splitlines() if ln[:2] in ("??", "!!")} | folders


@pytest.mark.slow
def test_output_root_moves_everything_out_of_the_repository(tmp_path):
    """``task=info`` (env HISTOLIGHT_HOME) and ``task=extract`` (paths.output_root), run from the repository root on a
    fresh tiny demo cohort: the run dirs, logs, demo cohort and tiles land in the output root, nothing in the repo."""
    demo = [f"dataset.demo.{k}={v}" for k, v in TINY_DEMO.items() if k != "n_slides"] + ["dataset.demo.n_slides=2"]
    env = {k: v for k, v in os.environ.items() if k != "HISTOLIGHT_HOME"}
    before = _repo_outputs()
    info_home, extract_home = tmp_path / "info_home", tmp_path / "extract_home"
    runs = [
        (["task=info", *demo], {**env, "HISTOLIGHT_HOME": str(info_home)}),
        (["task=extract", "task.tile_px=64", "task.tile_um=64", f"paths.output_root={extract_home}", *demo], env),
    ]
    for args, run_env in runs:
        p = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
    for home in (info_home, extract_home):
        assert (home / "data" / "demo" / "manifest.json").is_file()
        assert len(list((home / "outputs").glob("*/*/.hydra/config.yaml"))) == 1, sorted(home.rglob("*"))
    assert list(info_home.glob("outputs/*/*/slides.csv"))
    assert len(list((extract_home / "outputs" / "work" / "tiles" / "demo" / "64px_64um").glob("*.tfrecords"))) == 2
    new = _repo_outputs() - before
    assert not new, f"the runs wrote into the repository: {sorted(new)}"


# ---------------------------------------------------------------------------------------------- the walkthrough


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_api_walkthrough_notebook_runs(tmp_path, monkeypatch):
    """docs/api_walkthrough.ipynb runs top to bottom (committed without outputs) in under 3 minutes."""
    src = ROOT / "docs" / "api_walkthrough.ipynb"
    raw = json.loads(src.read_text())
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in raw["cells"] if c["cell_type"] == "code")
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(src, work / src.name)
    monkeypatch.setenv("HISTOLIGHT_HOME", str(tmp_path / "home"))  # the notebook's output root
    nb = _execute_notebook(work / src.name, work, timeout=300)  # timing is measured in CI's log, not asserted
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # thumbnail, region, segmentation overlay
    assert FALLBACK not in _text(nb)
    assert list((tmp_path / "home" / "bags").glob("*.pt")) and (tmp_path / "home" / "seg" / "segment_config.json").is_file()
