"""The cohort runner: statuses, exception policy, workers that die, orphans, claims between concurrent runs."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from histolight.claims import Claims
from histolight.cohort import (
    EXIT_SLIDES_FAILED,
    PerSlideOptions,
    SkipSlide,
    failure_exit_code,
    report_progress,
    run_per_slide,
    shard,
)
from histolight.errors import ConfigError, HistolightError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ per-slide functions (module level: picklable)


def _mixed(name: str) -> dict | None:
    """done / empty / skipped / a user error / a bug, depending on the name."""
    report_progress(1, 1)
    if name.startswith("bad"):
        raise HistolightError(f"{name} is unreadable")
    if name.startswith("bug"):
        raise KeyError("a programming error")
    if name.startswith("skip"):
        raise SkipSlide("already done")
    if name.startswith("empty"):
        return {"status": "empty", "n": 0}
    return {"n": len(name)}


def _record_pid(name: str, log_dir: str, sleep: float) -> dict:
    """Write '<name>.pid' (this worker's pid) into log_dir, then work for ``sleep`` seconds ('slow*' slides)."""
    Path(log_dir, f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(sleep if name.startswith("slow") else 0.05)
    return {"pid": os.getpid()}


def _once(name: str, out: str, sleep: float) -> dict:
    """Simulate an idempotent product: skip when the output exists, else write it after some work (counted)."""
    final = Path(out, f"{name}.done")
    if final.exists():
        raise SkipSlide("already done")
    with open(Path(out, "calls.log"), "a") as fh:
        fh.write(f"{name} {os.getpid()}\n")
    time.sleep(sleep)
    final.write_text("ok")
    return {}


def _cannot_load(why: str):
    raise RuntimeError(why)


class _LoadsOnlyHere:
    """A per-slide function that pickles, but cannot be loaded in a worker process (as a notebook's own would)."""

    def __call__(self, name: str) -> dict:
        return {"pid": os.getpid()}

    def __reduce__(self):
        return _cannot_load, ("not loadable in a worker",)


def _refuse_if(marker: str):
    if Path(marker).exists():
        raise RuntimeError("no more workers")
    return _KillsItsWorker(marker)


class _KillsItsWorker:
    """Kills the worker it runs in; once it has, it cannot be loaded in a new worker (a machine out of resources)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, name: str) -> dict:
        Path(self.marker).touch()
        os._exit(1)

    def __reduce__(self):
        return _refuse_if, (self.marker,)


def _status(res) -> dict:
    return dict(zip(res.table["slide"], res.table["status"]))


# ------------------------------------------------------------------ statuses and policy


@pytest.mark.parametrize("workers", [1, 2])
def test_statuses_reasons_and_summary(tmp_path, workers, caplog):
    names = ["a1", "bad1", "bug1", "skip1", "empty1", "b2"]
    res = run_per_slide(names, _mixed, out_dir=tmp_path, workers=workers, progress=False)
    assert _status(res) == {"a1": "done", "bad1": "failed", "bug1": "failed", "skip1": "skipped", "empty1": "empty", "b2": "done"}
    assert res.failed["bad1"] == "bad1 is unreadable"
    assert res.failed["bug1"].startswith("KeyError")
    assert "Traceback" in caplog.text and "a programming error" in caplog.text  # bugs are logged with their traceback
    assert res.counts == {"done": 2, "skipped": 1, "failed": 2, "empty": 1}
    m = res.metrics()
    assert (m["n_slides"], m["n_failed"], m["n_done"]) == (6, 2, 2)
    table = pd.read_csv(tmp_path / "slides.csv")
    assert list(table.columns[:4]) == ["slide", "status", "reason", "seconds"]
    assert list(table["slide"]) == names and table.loc[table.slide == "a1", "n"].item() == 2
    assert "6 slide(s): 2 done, 1 skipped, 2 failed, 1 empty; failures listed in" in res.summary_line()
    assert not (tmp_path / ".claims").exists()  # every claim released, the folder removed


def test_failure_policy_and_options():
    assert failure_exit_code(0, 10) == 0
    assert failure_exit_code(1, 10) == EXIT_SLIDES_FAILED
    assert failure_exit_code(1, 10, allow_failures=True) == 0
    assert failure_exit_code(1, 10, max_failed=0.1) == 0
    assert failure_exit_code(2, 10, max_failed=0.1) == EXIT_SLIDES_FAILED
    with pytest.raises(ValueError, match="max_failed=1.5 is invalid"):
        PerSlideOptions(max_failed=1.5)
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        PerSlideOptions(workers=0)


def test_shards_partition_the_cohort():
    names = [f"s{i}" for i in range(7)]
    parts = [shard(names, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(names) and all(parts)
    with pytest.raises(HistolightError, match="shard_index=3"):
        shard(names, 3, 3)


def test_unpicklable_function_runs_serially(tmp_path):
    res = run_per_slide(["a", "b"], lambda n: {"x": 1}, out_dir=tmp_path, workers=2, progress=False)
    assert set(res.table["status"]) == {"done"}


# ------------------------------------------------------------------ workers that cannot start


def test_workers_that_cannot_start_fall_back_to_this_process(tmp_path, caplog):
    """Every worker fails at start-up: one warning saying why, and the slides run here (not 'worker died')."""
    res = run_per_slide(["a", "b", "c"], _LoadsOnlyHere(), out_dir=tmp_path, workers=2, progress=False)
    assert set(res.table["status"]) == {"done"} and set(res.table["pid"]) == {os.getpid()}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "running 3 slide(s) in this process" in warnings[0] and "not loadable in a worker" in warnings[0]
    assert "died" not in caplog.text


@pytest.mark.slow
def test_slides_fail_when_no_new_worker_can_start(tmp_path):
    """Workers ran, then died, and their replacements cannot start: the slides left fail with that reason."""
    res = run_per_slide(list("abcd"), _KillsItsWorker(str(tmp_path / "marker")), workers=2, progress=False, claims=False)
    assert set(res.table["status"]) == {"failed"} and failure_exit_code(res.counts["failed"], 4) == EXIT_SLIDES_FAILED
    reasons = res.failed
    assert "exit code 1) while processing this slide" in reasons["a"]
    left = [r for r in reasons.values() if r.startswith("not processed: no new worker process could start")]
    assert left and all("no more workers" in r for r in left), reasons


# ------------------------------------------------------------------ workers that die


def test_killed_worker_fails_only_its_slide(tmp_path):
    """SIGKILL one worker in the middle of a slide (as the OOM killer would): that slide fails, the rest finish."""
    names = ["a", "b", "slow", "c", "d", "e", "f"]
    logs = tmp_path / "pids"
    logs.mkdir()

    def killer():
        deadline = time.time() + 60
        while time.time() < deadline:
            p = logs / "slow.pid"
            if p.exists() and p.read_text():
                os.kill(int(p.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    import threading

    t = threading.Thread(target=killer)
    t.start()
    fn = functools.partial(_record_pid, log_dir=str(logs), sleep=30.0)
    res = run_per_slide(names, fn, out_dir=tmp_path / "out", workers=2, progress=False)
    t.join()
    st = _status(res)
    assert st.pop("slow") == "failed"
    assert set(st.values()) == {"done"}, st
    assert "SIGKILL" in res.failed["slow"]
    assert res.seconds < 30  # the dead slide was not waited for


@pytest.mark.slow
def test_killed_parent_leaves_no_worker(tmp_path):
    """SIGKILL the parent of a 2-worker run: its workers exit within seconds (no orphans)."""
    logs = tmp_path / "pids"
    logs.mkdir()
    script = textwrap.dedent(
        f"""
        import functools, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_cohort import _record_pid
        from histolight.cohort import run_per_slide
        if __name__ == "__main__":
            run_per_slide(["slow1", "slow2", "slow3"], functools.partial(_record_pid, log_dir={str(logs)!r}, sleep=60.0),
                          out_dir={str(tmp_path / "out")!r}, workers=2, progress=False)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)])
    deadline = time.time() + 60
    while len(list(logs.glob("*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in logs.glob("*.pid")]
    assert len(pids) == 2, "workers did not start"
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.2)
    assert not alive, f"orphaned workers still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ claims


def test_claim_is_exclusive_and_dead_claims_are_taken_over(tmp_path):
    a, b = Claims(tmp_path), Claims(tmp_path)
    assert a.acquire("slide (1)") is None
    why = b.acquire("slide (1)")
    assert why is not None and f"pid {os.getpid()}" in why
    a.release("slide (1)")
    assert b.acquire("slide (1)") is None
    b.close()
    # a claim left by a dead process (no lock held) is taken over
    c = Claims(tmp_path)
    c.path("x").write_text(json.dumps({"host": c.host, "pid": 999999, "started": "then"}))
    assert c.acquire("x") is None
    # a fresh claim from another machine is honoured (its lock may not be visible here), a stale one is not
    c.path("y").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "now"}))
    assert "elsewhere" in c.acquire("y")
    old = time.time() - 10_000
    os.utime(c.path("y"), (old, old))
    assert c.acquire("y") is None
    c.close()
    assert Path(c.path("x")).name.endswith(".claim") and "/" not in c.path("../../etc").name
    # a run that finishes removes the empty claims folder; a concurrent run still claiming slides recreates it
    done, busy = Claims(tmp_path / "shared"), Claims(tmp_path / "shared")
    done.close()
    assert busy.acquire("z") is None
    busy.close()


@pytest.mark.slow
def test_two_concurrent_runs_do_each_slide_once(tmp_path):
    """Two runs (separate processes) into one folder: every slide is processed exactly once, none is redone."""
    out = tmp_path / "out"
    out.mkdir()
    names = [f"s{i}" for i in range(8)]
    script = textwrap.dedent(
        f"""
        import functools, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_cohort import _once
        from histolight.cohort import run_per_slide
        if __name__ == "__main__":
            res = run_per_slide({names!r}, functools.partial(_once, out={str(out)!r}, sleep=0.3), out_dir={str(out)!r},
                                workers=int(sys.argv[1]), summary_name=None, progress=False)
            print(res.summary_line())
        """
    )
    path = tmp_path / "run.py"
    path.write_text(script)
    procs = [subprocess.Popen([sys.executable, str(path), w], stdout=subprocess.PIPE, text=True) for w in ("1", "2")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    calls = (out / "calls.log").read_text().split("\n")
    done = sorted(line.split()[0] for line in calls if line)
    assert done == sorted(names), f"slides processed more or less than once: {done}"
    assert all((out / f"{n}.done").exists() for n in names)


def test_config_error_is_a_histolight_error():
    assert issubclass(ConfigError, HistolightError) and issubclass(SkipSlide, HistolightError)
