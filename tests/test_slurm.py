"""On a real SLURM scheduler (scripts/slurm-local.sh: one node, this machine) through ``launcher=slurm`` (submitit):
extraction as a job array, a grid and an Optuna sweep, 2-process DDP under ``srun``, and preemption + requeue of
an extraction and of a training job. Skipped when no scheduler answers (``sinfo``); CI starts one (.ci/run)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, shared_slide, tiny_demo_overrides

#: every job: 1 CPU, 1 GB, 15 min (the node has nproc CPUs: jobs beyond that wait in the queue)
SLURM = ["launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=15"]
#: a tile classifier small enough for 2 CPU cores: a 2-block ViT on 32 px tiles (LayerNorm: no batch statistics,
#: so a 2-process run sees the same model as a single process), no dropout
TINY_CLASSIFIER = [
    "experiment=tile_classifier",
    "data.tile_px=32",
    "data.tile_um=32",
    "data.num_workers=0",
    "data.batch_size=16",
    "model=timm_resnet18",
    "model.name=vit_tiny_patch16_224",
    "+model.model_kwargs.img_size=32",
    "+model.model_kwargs.patch_size=8",
    "+model.model_kwargs.depth=2",
    "model.drop_rate=0",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def _scheduler_missing() -> str | None:
    """Why no SLURM scheduler can take jobs here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch) on PATH: start a local cluster with scripts/slurm-local.sh start"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM scheduler reachable: sinfo timed out"
    if r.returncode != 0:
        return f"no SLURM scheduler reachable (sinfo: {r.stderr.strip()[:200]}): scripts/slurm-local.sh start"
    if not {"idle", "mix", "alloc"} & set(r.stdout.split()):
        return f"no SLURM node can take jobs (node states: {r.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def _scheduler():
    why = _scheduler_missing()
    if why:
        pytest.skip(why)


def on_slurm(test):
    """Mark a test that submits jobs: ``slurm`` + ``slow``, a 10 min deadline, skipped without a scheduler."""
    return pytest.mark.slurm(pytest.mark.slow(pytest.mark.timeout(600)(pytest.mark.usefixtures("_scheduler")(test))))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A work dir shared by the training tests (the tiny cohort's 32 px tiles are extracted once)."""
    return tmp_path_factory.mktemp("slurm_work")


def run_py(*overrides: str, cwd: Path, timeout: float = 420, wait=None) -> subprocess.CompletedProcess:
    """``python run.py <overrides>`` with the venv's python (submitit's jobs run the same interpreter); ``wait``
    (``callable(Popen)``) runs while it does. On a failure or timeout the jobs it submitted are cancelled."""
    env = {**os.environ, "HISTOLIGHT_ROOT": str(ROOT), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, str(ROOT / "run.py"), *overrides]
    log = cwd / f"run_py-{time.time_ns()}.log"  # a file, not a pipe: nothing blocks while `wait` runs
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT) as p:
        try:
            if wait is not None:
                wait(p)
            p.wait(timeout=timeout)
        except BaseException:
            p.kill()
            ids = [d.name.split("_")[0] for d in cwd.rglob(".submitit/*") if re.fullmatch(r"\d+(_\d+)?", d.name)]
            subprocess.run(["scancel", *sorted(set(ids))], check=False, capture_output=True)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, log.read_text(errors="replace"), "")


def job_log(sweep: Path, num: int = 0) -> str:
    """Job ``num``'s run log plus submitit's stdout/stderr files of every job of the sweep."""
    text = (sweep / str(num) / "run.log").read_text() if (sweep / str(num) / "run.log").is_file() else ""
    return text + "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*")))


def wait_for(path_glob: tuple[Path, str], timeout: float, proc: subprocess.Popen) -> Path:
    """The first file matching ``path_glob`` (folder, pattern), polled every 0.2 s while ``proc`` runs."""
    folder, pattern = path_glob
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{folder}/{pattern} did not appear within {timeout} s (run exited: {proc.poll()})")


def job_id(sweep: Path) -> str:
    """The SLURM job id of the sweep's (single) job, from submitit's folder."""
    ids = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)]
    assert len(ids) == 1, ids
    return ids[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- extraction


@on_slurm
def test_extraction_array_matches_a_local_run(tiny_demo, tmp_path):
    """4 array jobs (3 slides: one shard is empty) share the tile folder; the last one merges the cohort files."""
    extract = ["task=extract", "task.workers=1", *tiny_demo_overrides(tiny_demo), f"paths.log_dir={tmp_path}/logs"]
    local = run_py(*extract, f"task.outdir={tmp_path}/local", f"hydra.run.dir={tmp_path}/local_run", cwd=tmp_path)
    assert local.returncode == 0, local.stdout[-3000:]
    sweep = tmp_path / "array"
    r = run_py(
        "-m",
        *SLURM,
        *extract,
        f"task.outdir={tmp_path}/slurm",
        "task.num_shards=4",
        "task.shard_index=range(4)",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    log = job_log(sweep)
    assert len(set(re.findall(r"job_id=(\d+_\d)", log))) == 4, "4 array tasks of one job"
    a, b = tmp_path / "local/demo/256px_128um", tmp_path / "slurm/demo/256px_128um"
    for i in range(4):
        assert (b / f"tiles.shard-{i}-of-4.parquet").is_file() and (b / f"summary.shard-{i}-of-4.csv").is_file()
    shard_rows = pd.concat(pd.read_csv(b / f"summary.shard-{i}-of-4.csv") for i in range(4))
    assert sorted(shard_rows["slide"]) == ["demo_000", "demo_001", "demo_002"]  # each slide in exactly one shard
    assert set(shard_rows["status"]) == {"done"}
    # the merged table: same records at the same locations as the local single-process run
    ta = pd.read_parquet(a / "tiles.parquet").sort_values("tile_id").reset_index(drop=True)
    tb = pd.read_parquet(b / "tiles.parquet").sort_values("tile_id").reset_index(drop=True)
    assert len(ta) > 0 and tb["tile_id"].is_unique
    pd.testing.assert_frame_equal(ta, tb)
    assert (b / "report.html").is_file() and len(pd.read_csv(b / "summary.csv")) == 3
    for rec in sorted(a.glob("*.tfrecords")):
        assert sha(rec) == sha(b / rec.name), f"{rec.name}: the array's TFRecord differs from the local run's"
    assert not (b / ".claims").exists()


@on_slurm
def test_extraction_job_killed_mid_slide_is_requeued_without_duplicates(tmp_path):
    """The job is killed while it holds a slide's claim and requeued; the requeued job takes the claim over,
    redoes that slide from scratch and finishes: every tile once, in the TFRecord and in the table."""
    from histolight.io.tfrecord import TFRecordReader

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "cmu.svs").symlink_to(shared_slide("cmu_small_region.svs"))
    sweep, out = tmp_path / "sweep", tmp_path / "tiles"
    tile_dir = out / "cohort" / "32px_4um"

    def requeue_mid_slide(p: subprocess.Popen) -> None:
        wait_for((tile_dir / ".claims", "*.claim"), 240, p)
        time.sleep(1.0)  # well inside the slide (~35 k tiles)
        assert not (tile_dir / "cmu.tfrecords").exists(), "the slide finished before the job could be killed"
        # the job's processes die mid-slide as on a node crash or the OOM killer (SIGKILL: nothing can clean up;
        # on this single-node test cluster neither `scontrol requeue`'s SIGTERM, which submitit ignores, nor
        # `scancel` stopped the step before the slide finished), then the scheduler requeues the job
        jid = job_id(sweep)
        subprocess.run(["pkill", "-KILL", "-f", str(sweep / ".submitit")], check=True)
        subprocess.run(["scontrol", "requeue", jid], check=True)

    r = run_py(
        "-m",
        *SLURM,
        "task=extract",
        "task.workers=1",
        "dataset=folder",
        f"dataset.slides={slides}",
        "dataset.name=cohort",
        "task.tile_px=32",
        "task.tile_um=4",
        "task.report=false",
        f"task.outdir={out}",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path}/logs",
        cwd=tmp_path,
        wait=requeue_mid_slide,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    log = job_log(sweep)
    assert "taking over the stale claim" in log, "the requeued job resumed the killed job's slide"
    table = pd.read_parquet(tile_dir / "tiles.parquet")
    assert len(table) > 1000 and table["tile_id"].is_unique
    with TFRecordReader(tile_dir / "cmu.tfrecords") as rec:
        locs = rec.locations
        assert len(rec) == len(table)
    assert len({(int(x), int(y)) for x, y in locs}) == len(locs)
    assert int(pd.read_csv(tile_dir / "summary.csv")["kept"].iloc[0]) == len(table)


# ---------------------------------------------------------------------------------------------- sweeps


@on_slurm
def test_optuna_search_through_slurm_groups_wandb_runs(tiny_demo, tmp_path):
    """2 Optuna trials as one 2-job array: results collected as in a local search, each trial one offline W&B run in
    the sweep's group. (A grid sweep through the same launcher: the extraction array above.)"""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="install the [sweep] extra")
    sweep = tmp_path / "optuna"
    r = run_py(
        "-m",
        *SLURM,
        "experiment=seg_binary",
        "hparams_search=seg_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",  # both trials in one job array
        "hydra.sweeper.sampler.n_startup_trials=2",
        "data.mpp=4",
        "data.size=64",
        "data.crops_per_epoch=16",
        "data.batch_size=8",
        "model.infer_batch_size=4",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=wandb",
        *tiny_demo_overrides(tiny_demo),
        f"paths.work_dir={tmp_path}/work",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    res = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= float(res["best_value"]) <= 1.0 and "model.optimizer.lr" in res["best_params"]
    assert len(set(re.findall(r"job_id=(\d+_\d)", job_log(sweep)))) == 2  # one array of 2 tasks
    group = f"train_seg-{sweep.parent.name}-{sweep.name}"
    for num in (0, 1):
        assert (sweep / str(num) / "weights.safetensors").is_file()
        runs = list((sweep / str(num) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and group.encode() in runs[0].read_bytes(), f"trial {num}: W&B run not in group {group}"


# ---------------------------------------------------------------------------------------------- training


@on_slurm
def test_ddp_two_processes_under_srun_match_a_single_process(tiny_demo, work, tmp_path):
    """2 tasks of one job (``srun``, Lightning's SLURM environment) vs one local process, same seed and init.
    SGD with a tiny step keeps the weights at their (seeded) initialisation, so the validation metrics must agree
    when the two ranks start from the same model and the distributed evaluation counts every tile once."""
    opts = [*TINY_CLASSIFIER, *tiny_demo_overrides(tiny_demo), f"paths.work_dir={work}", "trainer.max_epochs=1"]
    opts += ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1e-7", f"paths.log_dir={tmp_path}/logs"]
    single = run_py(*opts, f"hydra.run.dir={tmp_path}/single", cwd=tmp_path)
    assert single.returncode == 0, single.stdout[-3000:]
    sweep = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "hydra.launcher.tasks_per_node=2"]
    r = run_py("-m", *SLURM, *opts, *ddp, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    log = job_log(sweep)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "global_rank=1(2)" in log  # 2 srun tasks, 2 DDP ranks
    m1 = json.loads((tmp_path / "single" / "metrics.json").read_text())
    m2 = json.loads((sweep / "0" / "metrics.json").read_text())
    n_train = m1["train/n_tiles"]
    assert m1["train/steps"] == n_train // 16 and m2["train/steps"] == (-(-n_train // 2)) // 16  # half per rank
    assert m2["val/n_tiles"] == m1["val/n_tiles"] > 0
    for k in ("val/loss", "val/acc", "val/bal_acc", "val/auroc"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-4), k


@on_slurm
def test_preempted_training_job_saves_requeues_and_resumes(tiny_demo, work, tmp_path):
    """submitit's pre-timeout / preemption signal mid-training: ``last.ckpt`` is saved, the job requeues itself
    and continues from it (resume=auto implied), ending at max_epochs like an uninterrupted run."""
    sweep = tmp_path / "train"
    ckpt = sweep / "0" / "checkpoints"
    signalled: list[float] = []

    def preempt_mid_training(p: subprocess.Popen) -> None:
        first = wait_for((ckpt, "last.ckpt"), 300, p)  # epoch 1 is done: training is under way
        before = first.stat().st_mtime
        subprocess.run(["scancel", "--signal=USR2", job_id(sweep)], check=True)
        signalled.append(before)

    epochs = 3
    r = run_py(
        "-m",
        *SLURM,
        *TINY_CLASSIFIER,
        *tiny_demo_overrides(tiny_demo),
        f"paths.work_dir={work}",
        f"trainer.max_epochs={epochs}",
        "callbacks.early_stopping.patience=100",
        f"hydra.sweep.dir={sweep}",
        f"paths.log_dir={tmp_path}/logs",
        cwd=tmp_path,
        wait=preempt_mid_training,
    )
    assert r.returncode == 0, r.stdout[-3000:]
    assert signalled
    log = job_log(sweep)
    assert "saving" in log and "before the job is requeued" in log
    assert re.search(r"Requeued job \d+", log), "submitit requeued the job"
    assert "resume=auto" in log and "resuming training from" in log
    from histolight.io.weights import read_checkpoint

    assert read_checkpoint(ckpt / "last.ckpt")["epoch"] == epochs - 1  # the last epoch (0-based), as uninterrupted
    assert json.loads((sweep / "0" / "metrics.json").read_text())["epochs"] == epochs


# ---------------------------------------------------------------------------------------------- without a scheduler


def test_requeued_job_resumes_from_last_ckpt(tmp_path, monkeypatch):
    from lightning.pytorch import Trainer

    from histolight.training.trainer import last_checkpoint_callback, resume_checkpoint

    trainer = Trainer(callbacks=[last_checkpoint_callback(tmp_path)], logger=False, enable_progress_bar=False)
    (tmp_path / "last.ckpt").write_bytes(b"x")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_checkpoint(trainer) is None  # a first run starts from scratch
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_checkpoint(trainer) == tmp_path / "last.ckpt"  # requeued: resume=auto


def test_requeued_mil_training_continues_its_folds(monkeypatch):
    """train_mil (k folds, its own resume logic) takes a requeued job as resume=auto, never an explicit choice."""
    from histolight.training.preemption import resume_when_requeued

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_when_requeued(None, None) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_when_requeued(None, None) == "auto"
    assert resume_when_requeued(None, "x/last.ckpt") is None  # an explicit checkpoint is kept


def test_preemption_signal_saves_last_ckpt_then_calls_submitits_handler(tmp_path, monkeypatch):
    import signal

    from lightning.pytorch import Trainer

    from histolight.training.preemption import PreemptionCheckpoint
    from histolight.training.trainer import last_checkpoint_callback

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        trainer = Trainer(callbacks=[last_checkpoint_callback(tmp_path)], logger=False, enable_progress_bar=False)
        saved = []
        monkeypatch.setattr(trainer, "save_checkpoint", lambda p: (saved.append(p), Path(p).write_bytes(b"state")))
        cb = PreemptionCheckpoint()
        cb.on_train_start(trainer, None)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert saved == [] and calls == [], "no signal, nothing saved"
        os.kill(os.getpid(), signal.SIGUSR2)
        assert saved == [] and calls == [], "the handler only notes the signal: the state may be mid-validation"
        cb.on_train_batch_end(trainer, None, None, None, 1)  # the next boundary where the state is whole
        assert calls == [signal.SIGUSR2], "submitit's handler (requeue) runs after the save"
        assert (tmp_path / "last.ckpt").read_bytes() == b"state" and len(saved) == 1
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temp file was renamed over it
        cb.on_train_end(trainer, None)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert len(saved) == 1 and len(calls) == 2  # after the save: submitit's handler alone again

        late = PreemptionCheckpoint()  # signalled during the last validation: saved when training ends
        late.on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGUSR2)
        late.on_train_end(trainer, None)
        assert len(saved) == 2 and len(calls) == 3
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_last_shard_to_finish_writes_the_merged_cohort_files(tiny_demo, tmp_path):
    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles

    ds = Dataset(tiny_demo / "slides", rois=tiny_demo / "rois", name="demo")
    opts = dict(outdir=tmp_path, qc=None, workers=1, progress=False, report=False)
    r0 = extract_tiles(ds, shard_index=0, num_shards=2, **opts)
    assert not (r0.tile_dir / "tiles.parquet").exists()  # shard 1's slides are missing: nothing merged yet
    r1 = extract_tiles(ds, shard_index=1, num_shards=2, **opts)
    merged = pd.read_parquet(r1.tile_dir / "tiles.parquet").sort_values("tile_id").reset_index(drop=True)
    shards = pd.concat([pd.read_parquet(r.table_path) for r in (r0, r1)]).sort_values("tile_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, shards)
    assert sorted(pd.read_csv(r1.tile_dir / "summary.csv")["slide"]) == sorted(ds.names)
