"""The task wrapper: returns the swept metric, always closes the W&B run, reports user errors cleanly."""

import re
import sys
import types

import pytest
from omegaconf import OmegaConf

from histolight.errors import HistolightError
from histolight.tasks import TASKS, execute


@pytest.fixture
def fake_tasks(monkeypatch, tmp_path):
    mod = types.ModuleType("histolight_fake_tasks")

    def ok(cfg):
        import wandb

        wandb.init(project="histolight-test", dir=str(tmp_path), mode="offline")
        wandb.log({"val/miou": 0.5})
        return {"val/miou": 0.75}

    def boom(cfg):
        import wandb

        wandb.init(project="histolight-test", dir=str(tmp_path), mode="offline")
        raise RuntimeError("kaboom")

    def user_error(cfg):
        raise HistolightError("slide x has no mpp")

    def slides(cfg):
        return {"n_slides": 10, "n_done": 7, "n_skipped": 1, "n_failed": 2, "n_empty": 0, "summary": "x/slides.csv", "m": 1.0}

    mod.ok, mod.boom, mod.user_error, mod.slides = ok, boom, user_error, slides
    monkeypatch.setitem(sys.modules, "histolight_fake_tasks", mod)
    for name in ("ok", "boom", "user_error", "slides"):
        monkeypatch.setitem(TASKS, f"fake_{name}", f"histolight_fake_tasks:{name}")
    return tmp_path


def _cfg(task, metric=None, out="."):
    return OmegaConf.create({"task": {"name": task}, "optimized_metric": metric, "paths": {"output_dir": str(out)}})


def test_returns_optimized_metric_and_closes_wandb(fake_tasks):
    import wandb

    assert execute(_cfg("fake_ok", "val/miou", fake_tasks)) == 0.75
    assert wandb.run is None
    runs = list((fake_tasks / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_missing_metric_is_an_error(fake_tasks):
    with pytest.raises(SystemExit):
        execute(_cfg("fake_ok", "val/nope", fake_tasks))


def test_crash_still_finishes_wandb(fake_tasks):
    import wandb

    with pytest.raises(RuntimeError, match="kaboom"):
        execute(_cfg("fake_boom", None, fake_tasks))
    assert wandb.run is None


def test_user_error_exits_with_one_clear_line(fake_tasks, caplog):
    with pytest.raises(SystemExit) as e:
        execute(_cfg("fake_user_error", None, fake_tasks))
    assert e.value.code == 1
    assert "task fake_user_error failed: slide x has no mpp" in caplog.text


def test_failed_slides_set_exit_status_two_unless_allowed(fake_tasks, caplog):
    with pytest.raises(SystemExit) as e:
        execute(_cfg("fake_slides", None, fake_tasks))
    assert e.value.code == 2
    last = [r.getMessage() for r in caplog.records][-1]
    assert "10 slide(s): 7 done, 1 skipped, 2 failed, 0 empty; failures listed in x/slides.csv; exit status 2" in last
    for task in ({"allow_failures": True}, {"max_failed": 0.2}):
        cfg = _cfg("fake_slides", "m", fake_tasks)
        cfg.task.update(task)
        assert execute(cfg) == 1.0
    cfg = _cfg("fake_slides", "m", fake_tasks)
    cfg.task.max_failed = 0.1
    with pytest.raises(SystemExit):
        execute(cfg)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("bogus", 1, r"unknown top-level key 'bogus'\. Known keys: callbacks, data, .*, trainer, .*ckpt_path, resume"),
        ("ckpt_pth", "x", r"unknown top-level key 'ckpt_pth'\. Did you mean 'ckpt_path'\?"),
        ("max_epochs", 3, r"unknown top-level key 'max_epochs'\. Did you mean 'trainer\.max_epochs'\?"),
        ("resume", "auto", r"resume='auto' is invalid for task=fake_ok: it applies to train_seg and train_tiles"),
    ],
)
def test_unknown_top_level_keys_are_errors_with_a_did_you_mean(fake_tasks, caplog, key, value, message):
    cfg = _cfg("fake_ok", None, fake_tasks)
    cfg.trainer = {"max_epochs": 5}
    cfg[key] = value
    with pytest.raises(SystemExit) as e:
        execute(cfg)
    assert e.value.code == 1 and re.search(message, caplog.text), caplog.text


def _raiser(exc):
    def task(cfg):
        raise exc

    return task


@pytest.mark.parametrize(
    "exc,message",
    [
        (ImportError("libtorch_cpu.so: failed to map segment from shared object"), "the likely cause is memory"),
        (OSError(12, "Cannot allocate memory"), "the likely cause is memory"),
        (OSError(28, "No space left on device", "/x/report.html"), "no space left on the disk writing '/x/report.html'"),
    ],
)
def test_memory_and_disk_failures_are_one_clear_line(fake_tasks, monkeypatch, caplog, exc, message):
    monkeypatch.setattr(sys.modules["histolight_fake_tasks"], "env", _raiser(exc), raising=False)
    monkeypatch.setitem(TASKS, "fake_env", "histolight_fake_tasks:env")
    with pytest.raises(SystemExit) as e:
        execute(_cfg("fake_env", None, fake_tasks))
    assert e.value.code == 1 and message in caplog.text and "crashed" not in caplog.text


def test_memory_error_while_importing_names_memory(fake_tasks, monkeypatch, caplog):
    (fake_tasks / "histolight_big_module.py").write_text("raise MemoryError()\n")
    monkeypatch.syspath_prepend(str(fake_tasks))

    def task(cfg):
        import histolight_big_module  # noqa: F401

    monkeypatch.setattr(sys.modules["histolight_fake_tasks"], "imp", task, raising=False)
    monkeypatch.setitem(TASKS, "fake_imp", "histolight_fake_tasks:imp")
    with pytest.raises(SystemExit):
        execute(_cfg("fake_imp", None, fake_tasks))
    assert "out of memory while loading libraries (MemoryError" in caplog.text
    # a MemoryError outside imports is a crash with its traceback, not a guess
    monkeypatch.setattr(sys.modules["histolight_fake_tasks"], "oom", _raiser(MemoryError()), raising=False)
    monkeypatch.setitem(TASKS, "fake_oom", "histolight_fake_tasks:oom")
    with pytest.raises(MemoryError):
        execute(_cfg("fake_oom", None, fake_tasks))


@pytest.mark.slow  # a run.py subprocess under a 4 GiB address-space limit (~5 s)
def test_segment_under_a_memory_limit_says_memory(tiny_demo, tmp_path):
    import resource
    import subprocess

    from tests.conftest import ROOT, tiny_demo_overrides

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    cmd = [sys.executable, str(ROOT / "run.py"), "task=segment", f"task.model={tmp_path}", "logger=none"]
    cmd += [f"hydra.run.dir={tmp_path / 'run'}", *tiny_demo_overrides(tiny_demo)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    out = p.stdout + p.stderr
    if p.returncode == 0:
        pytest.skip("torch loads under 4 GiB of address space here")
    assert p.returncode == 1 and "the likely cause is memory: the address-space limit is 4.0 GiB (ulimit -v)" in out, out
    assert "Traceback" not in out


def _add_task(monkeypatch, name, fn):
    mod = sys.modules["histolight_fake_tasks"]
    monkeypatch.setattr(mod, name, fn, raising=False)
    monkeypatch.setitem(TASKS, f"fake_{name}", f"histolight_fake_tasks:{name}")


def test_every_failed_slide_is_listed_after_the_closing_line(fake_tasks, caplog, monkeypatch):
    """All failures on the console (segment dataset=shared used to show 1 of 3): the first 10, then where the rest are."""
    csv = fake_tasks / "slides.csv"
    rows = [
        {"slide": f"s{i:02d}", "status": "failed", "reason": f"cannot read slide: reason {i}\nTraceback (...)"} for i in range(12)
    ]
    import pandas as pd

    pd.DataFrame([*rows, {"slide": "ok", "status": "done", "reason": None}]).to_csv(csv, index=False)
    _add_task(monkeypatch, "many", lambda cfg: {"n_slides": 13, "n_done": 1, "n_failed": 12, "summary": str(csv)})
    with pytest.raises(SystemExit) as e:
        execute(_cfg("fake_many", None, fake_tasks))
    assert e.value.code == 2
    msgs = [r.getMessage() for r in caplog.records]
    i = next(k for k, m in enumerate(msgs) if m.startswith("task fake_many: 13 slide(s)"))
    assert msgs[i + 1 : i + 11] == [f"  s{k:02d}: cannot read slide: reason {k}" for k in range(10)]
    assert msgs[i + 11] == f"  ... and 2 more: see {csv}"


def test_a_task_result_is_the_last_line_after_wandbs_summary(fake_tasks, caplog, monkeypatch):
    import wandb

    def trained(cfg):
        wandb.init(project="histolight-test", dir=str(fake_tasks), mode="offline")
        return {"val/bal_acc": 0.5, "result": "tile classifier m (val/bal_acc 0.5000)"}

    _add_task(monkeypatch, "trained", trained)
    caplog.set_level("INFO", logger="histolight")
    assert execute(_cfg("fake_trained", "val/bal_acc", fake_tasks)) == 0.5
    last = [r for r in caplog.records if r.name == "histolight"][-1].getMessage()
    assert last.startswith("task fake_trained finished in") and ": tile classifier m (val/bal_acc 0.5000); outputs in" in last
    assert wandb.run is None


def test_lightning_lines_appear_once_without_adverts_or_internal_warnings():
    import io
    import logging
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from histolight.utils.logs import LIGHTNING_LOGGERS, quiet_lightning

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)  # as under Hydra: the root logger writes the console and run.log
    try:
        quiet_lightning()
        for name in LIGHTNING_LOGGERS:
            lg = logging.getLogger(name)
            assert lg.propagate and not [h for h in lg.handlers if type(h) is logging.StreamHandler]
        rank_zero_info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
        assert stream.getvalue().count("GPU available") == 1 and "litlogger" not in stream.getvalue()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
            warnings.warn("something else", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["something else"]
    finally:
        logging.getLogger().removeHandler(handler)


def test_the_wandb_logger_leaves_out_the_deprecated_anonymous_setting(tmp_path):
    from omegaconf import OmegaConf

    from histolight.utils.instantiate import instantiate_loggers

    node = {"_target_": "lightning.pytorch.loggers.wandb.WandbLogger", "project": "t", "save_dir": str(tmp_path)}
    (lg,) = instantiate_loggers(OmegaConf.create({"wandb": {**node, "offline": True, "anonymous": None}}))
    assert "anonymous" not in lg._wandb_init and lg._wandb_init["project"] == "t"
