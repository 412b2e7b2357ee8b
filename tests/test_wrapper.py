"""The task wrapper: returns the swept metric, always closes the W&B run, reports user errors cleanly."""

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
