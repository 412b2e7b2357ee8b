"""The one per-slide loop: every task that does something to each slide of a cohort runs through here.

>>> res = run_per_slide(dataset.names, fn, out_dir=out, workers=2)
>>> res.summary_line()   # '10 slides: 8 done, 1 skipped, 1 failed, 0 empty; failures listed in .../slides.csv'

What it guarantees, whatever ``fn`` does:

- **One status vocabulary** (:data:`STATUSES`): ``done``, ``skipped`` (nothing to do: finished earlier, claimed
  by another run, or ``fn`` raised :class:`SkipSlide`), ``failed`` (with the reason), ``empty`` (ran, produced
  nothing, e.g. 0 tiles kept).
- **One exception policy**: a :class:`HistolightError` (bad input) fails that slide with its message; any
  other exception (a bug, or a library tripping on an odd file) fails that slide too, and its full
  traceback is logged at ERROR level; ``KeyboardInterrupt`` stops the run. One slide never stops the batch.
- **Workers** (``workers > 1``): each slide runs in a spawned worker process. A worker that dies (killed, out
  of memory, a segfault in a decoder) fails only the slide it held; a fresh worker takes over the rest.
  Workers exit within a second when this process dies, so a killed run leaves no orphans.
- **Claims**: while a slide is being processed its claim file ``<out_dir>/.claims/<slide>.claim`` is locked
  (``flock``) and names the owner (host, pid, start time). A second run into the same folder skips slides
  another live run holds; claims of dead runs are taken over (the kernel drops a dead process's lock; a claim
  from another host is honoured while its heartbeat is fresher than ``stale_after`` seconds). ``fn`` is
  called only under the claim, so it must itself check whether the slide is already complete.
- **Summary**: one row per slide (``slide, status, reason, seconds`` + ``fn``'s columns), written atomically to
  ``<out_dir>/<summary_name>``; :meth:`CohortResult.summary_line` is the run's last log line.

The task wrapper turns ``n_failed`` into the process exit status (see :func:`failure_exit_code`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import pickle
import re
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

import pandas as pd

from histolight.config.schema import check, is_pos_int
from histolight.errors import HistolightError

log = logging.getLogger(__name__)

STATUSES = ("done", "skipped", "failed", "empty")
EXIT_SLIDES_FAILED = 2  # process exit status when slides failed beyond the policy (1 = bad config / crash)
BASE_COLUMNS = ["slide", "status", "reason", "seconds"]


class SkipSlide(HistolightError):
    """Raised by a per-slide function: nothing to do for this slide (status ``skipped``, the message is the reason)."""


# ---------------------------------------------------------------------------------------------- options


@dataclass
class PerSlideOptions:
    """Options every per-slide task accepts (mixed into the task schemas).

    Attributes:
        workers: slide worker processes (1 = in this process).
        allow_failures: exit 0 even when slides failed (they are still listed in the summary).
        max_failed: exit 0 while at most this fraction (0-1) of the slides failed; null = none may fail.
    """

    workers: int = 1
    allow_failures: bool = False
    max_failed: float | None = None

    def __post_init__(self):
        check(is_pos_int(self.workers), "workers", self.workers, "must be an integer >= 1")
        check(isinstance(self.allow_failures, bool), "allow_failures", self.allow_failures, "must be true or false")
        check(
            self.max_failed is None
            or (
                isinstance(self.max_failed, (int, float)) and not isinstance(self.max_failed, bool) and 0 <= self.max_failed <= 1
            ),
            "max_failed",
            self.max_failed,
            "must be null or a fraction of slides between 0 and 1 (e.g. 0.05)",
        )


def failure_exit_code(n_failed: int, n_slides: int, allow_failures: bool = False, max_failed: float | None = None) -> int:
    """0 when the failures are within the policy, else :data:`EXIT_SLIDES_FAILED`."""
    if n_failed <= 0 or allow_failures:
        return 0
    if max_failed is not None and n_slides > 0 and n_failed / n_slides <= max_failed:
        return 0
    return EXIT_SLIDES_FAILED


# ---------------------------------------------------------------------------------------------- result


@dataclass
class CohortResult:
    """What :func:`run_per_slide` did: ``table`` has one row per slide of this shard, in input order."""

    table: pd.DataFrame
    summary_path: Path | None = None
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        st = self.table["status"] if len(self.table) else pd.Series(dtype=object)
        return {s: int((st == s).sum()) for s in STATUSES}

    @property
    def failed(self) -> dict[str, str]:
        """``{slide: reason}`` of the failed slides."""
        t = self.table
        if not len(t):
            return {}
        bad = t[t["status"] == "failed"]
        return dict(zip(bad["slide"], bad["reason"].fillna("")))

    def metrics(self) -> dict[str, Any]:
        """``n_slides, n_done, n_skipped, n_failed, n_empty`` (+ ``summary``: where the table is)."""
        c = self.counts
        out: dict[str, Any] = {"n_slides": int(len(self.table)), **{f"n_{s}": c[s] for s in STATUSES}}
        if self.summary_path is not None:
            out["summary"] = str(self.summary_path)
        return out

    def summary_line(self) -> str:
        c = self.counts
        line = f"{len(self.table)} slide(s): {c['done']} done, {c['skipped']} skipped, {c['failed']} failed, {c['empty']} empty"
        if c["failed"]:
            line += f"; failures listed in {self.summary_path}" if self.summary_path else f": {sorted(self.failed)}"
        return line


# ---------------------------------------------------------------------------------------------- progress

_PROGRESS: Callable[[str, int, int | None], None] | None = None
_CURRENT: str | None = None


def report_progress(n: int, total: int | None = None) -> None:
    """Advance the current slide's inner progress bar by ``n`` units (tiles, strips, ...) out of ``total``.

    Call it from inside a per-slide function; it is a no-op outside :func:`run_per_slide`."""
    if _PROGRESS is not None and _CURRENT is not None:
        _PROGRESS(_CURRENT, int(n), None if total is None else int(total))


def _call(fn: Callable[[str], dict | None], name: str) -> dict:
    """Run ``fn(name)`` and turn its outcome into a summary row; only ``KeyboardInterrupt``/``SystemExit`` escape."""
    global _CURRENT
    t0 = time.time()
    _CURRENT = name
    try:
        out = fn(name) or {}
        if not isinstance(out, dict):
            raise TypeError(f"a per-slide function must return a dict or None, got {type(out).__name__}")
        row = {"status": "done", "reason": None, **out}
        if row["status"] not in STATUSES:
            raise ValueError(f"per-slide function returned status {row['status']!r}; allowed: {STATUSES}")
    except SkipSlide as e:
        row = {"status": "skipped", "reason": str(e)}
    except HistolightError as e:
        row = {"status": "failed", "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one slide never stops the batch; the traceback is logged by the parent
        row = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "_traceback": traceback.format_exc()}
    finally:
        _CURRENT = None
    row["slide"] = name
    row["seconds"] = round(time.time() - t0, 3)
    return row


# ---------------------------------------------------------------------------------------------- claims


def _claim_file_name(name: str) -> str:
    """A safe file name for slide ``name`` (any characters; never a path): sanitized stem + hash."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "slide"
    return f"{stem}-{hashlib.sha1(name.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}.claim"


class Claims:
    """Per-slide claim files under ``root``, locked with ``flock`` while held (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, stale_after: float = 600.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stale_after = float(stale_after)
        self.host = socket.gethostname()
        self.held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="histolight-claims", daemon=True)
        self._beat.start()

    def path(self, name: str) -> Path:
        return self.root / _claim_file_name(name)

    def acquire(self, name: str) -> str | None:
        """Take the claim of ``name``; None on success, else why not (who holds it)."""
        import fcntl

        path = self.path(name)
        for _ in range(5):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                return f"being processed by another run ({_describe(owner)})"
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released and removed it between our open and lock: try again
                os.close(fd)
                continue
            owner = _read_owner(fd)
            if owner and owner.get("host") != self.host and time.time() - os.fstat(fd).st_mtime < self.stale_after:
                os.close(fd)  # another machine's run (its lock may not be visible here): honour a fresh heartbeat
                return f"being processed by another run ({_describe(owner)})"
            if owner:
                log.info("%s: taking over the stale claim of %s", name, _describe(owner))
            me = {"host": self.host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            with self._lock:
                self.held[name] = fd
            return None
        return "its claim file keeps changing (another run is cycling through it); try again"

    def release(self, name: str) -> None:
        """Drop the claim: remove the file (while still locked) and unlock."""
        with self._lock:
            fd = self.held.pop(name, None)
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name))
        os.close(fd)

    def close(self) -> None:
        """Release every claim still held and remove the claims folder if no other run uses it."""
        self._stop.set()
        for name in list(self.held):
            self.release(name)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # only succeeds when empty

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(60.0, self.stale_after / 4)):
            with self._lock:
                names = list(self.held)
            for name in names:
                with contextlib.suppress(OSError):
                    os.utime(self.path(name))


def _read_owner(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}"


# ---------------------------------------------------------------------------------------------- workers


def _worker_main(conn, fn, parent_pid: int) -> None:
    """A slide worker: receive slide names, send back ``("progress", ...)`` and ``("result", name, row)``."""
    global _PROGRESS

    def watch_parent():  # exit promptly when the parent is gone, even in the middle of a slide
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.25)

    threading.Thread(target=watch_parent, name="histolight-parent-watch", daemon=True).start()
    with contextlib.suppress(Exception):
        import cv2

        cv2.setNumThreads(1)  # one slide per process: no oversubscription
    _PROGRESS = lambda name, n, total: conn.send(("progress", name, n, total))  # noqa: E731
    while True:
        try:
            name = conn.recv()
        except (EOFError, OSError):
            return
        if name is None:
            return
        conn.send(("result", name, _call(fn, name)))


def _start_method() -> str | None:
    """``spawn`` (fresh interpreters: safe after OpenSlide/OpenCV started threads here, which ``fork`` is not);
    ``HISTOLIGHT_MP_START`` overrides. None when spawning cannot work (a main script read from stdin)."""
    env = os.environ.get("HISTOLIGHT_MP_START")
    if env:
        return env
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return None
    return "spawn"


@dataclass
class _Worker:
    process: Any
    conn: Any
    slide: str | None = None


def _describe_death(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        hint = " (SIGKILL: often the out-of-memory killer)" if sig == "SIGKILL" else ""
        return f"the worker process was killed by {sig}{hint} while processing this slide; rerun to retry it"
    return f"the worker process died (exit code {code}) while processing this slide; rerun to retry it"


# ---------------------------------------------------------------------------------------------- the loop


def shard(names: Sequence[str], shard_index: int = 0, num_shards: int = 1) -> list[str]:
    """Deterministic split by slide: shard ``i`` of ``n`` takes every ``n``-th slide of the sorted names from ``i``."""
    if not (0 <= shard_index < num_shards):
        raise HistolightError(f"shard_index={shard_index} is invalid: must be in [0, num_shards={num_shards})")
    return sorted(names)[shard_index::num_shards]


def run_per_slide(
    names: Sequence[str],
    fn: Callable[[str], dict | None],
    *,
    out_dir: str | os.PathLike | None = None,
    workers: int = 1,
    shard_index: int = 0,
    num_shards: int = 1,
    summary_name: str | None = "slides.csv",
    claims: bool | str | os.PathLike = True,
    stale_after: float = 600.0,
    desc: str = "slides",
    unit: str = "items",
    progress: bool = True,
) -> CohortResult:
    """Call ``fn(name)`` for each slide of this shard and return what happened (never raises for a slide).

    Args:
        names: slide names (sharding sorts them; this shard's slides keep that order).
        fn: ``fn(name) -> dict | None``; the dict's items become summary columns, and its optional
            ``status`` (``done``/``empty``/``skipped``) and ``reason`` override the default ``done``. With
            ``workers > 1`` it must be picklable (a module-level function or a ``functools.partial`` of one).
        out_dir: folder for the summary and (with ``claims``) the ``.claims/`` folder; None = neither.
        workers: processes running slides in parallel (1 = this process).
        shard_index, num_shards: this job's share of the cohort (see :func:`shard`).
        summary_name: CSV file name of the summary table in ``out_dir`` (None = not written).
        claims: claim each slide while processing it, so concurrent runs never collide: ``True`` = claims in
            ``<out_dir>/.claims``; a folder = in ``<folder>/.claims`` (the shared product folder, when the
            summary goes elsewhere); ``False`` = no claims.
        stale_after: seconds after which another host's claim without a heartbeat is taken over.
        desc: label of the slide progress bar; ``unit``: what :func:`report_progress` counts (tiles, strips, ...).
    """
    t0 = time.time()
    mine = shard(names, shard_index, num_shards) if num_shards > 1 else list(names)
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d slides", shard_index, num_shards, len(mine), len(names))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    claim_root = (out if claims is True else Path(claims)) if claims is not False else None
    store = Claims(claim_root / ".claims", stale_after) if claim_root is not None else None
    rows: dict[str, dict] = {}
    bars = _Bars(desc, len(mine), progress, unit)
    try:
        n_workers = max(1, min(int(workers), len(mine)))
        method = _start_method() if n_workers > 1 else None
        if n_workers > 1 and method is None:
            log.warning("cannot start worker processes from a script read from stdin; running the slides in this process")
        if n_workers > 1 and method is not None:
            try:
                pickle.dumps(fn)
            except Exception as e:  # noqa: BLE001 - any pickling failure means: run serially
                log.warning("the per-slide function cannot be sent to worker processes (%s); running in this process", e)
                method = None
        if n_workers > 1 and method is not None:
            _run_pool(mine, fn, n_workers, mp.get_context(method), store, rows, bars)
        else:
            _run_serial(mine, fn, store, rows, bars)
    finally:
        bars.close()
        if store is not None:
            store.close()
    table = _table([rows[n] for n in mine])
    summary = out / summary_name if (out is not None and summary_name) else None
    if summary is not None:
        from histolight.io.atomic import atomic_write_text

        atomic_write_text(summary, table.to_csv(index=False))
    res = CohortResult(table, summary, time.time() - t0)
    return res


def _record(rows: dict, name: str, row: dict, bars: _Bars) -> None:
    tb = row.pop("_traceback", None)
    rows[name] = row
    if row["status"] == "failed":
        if tb:
            log.error("slide %s failed with an unexpected error (a bug, or a file the reader cannot handle):\n%s", name, tb)
        else:
            log.error("slide %s failed: %s", name, row.get("reason"))
    elif row["status"] == "skipped":
        log.info("slide %s skipped: %s", name, row.get("reason"))
    bars.slide_done(name, row["status"])


def _run_serial(names, fn, store, rows, bars) -> None:
    global _PROGRESS
    prev, _PROGRESS = _PROGRESS, bars.units
    try:
        for name in names:
            why = store.acquire(name) if store is not None else None
            if why is not None:
                _record(rows, name, {"slide": name, "status": "skipped", "reason": why, "seconds": 0.0}, bars)
                continue
            try:
                _record(rows, name, _call(fn, name), bars)
            finally:
                if store is not None:
                    store.release(name)
    finally:
        _PROGRESS = prev


def _run_pool(names, fn, n_workers: int, ctx, store, rows, bars) -> None:
    pending = deque(names)
    pool: list[_Worker] = []

    def start() -> _Worker:
        parent, child = ctx.Pipe(duplex=True)
        # not a daemon: a slide function may start processes of its own (DataLoader workers); the parent-death
        # watchdog and the shutdown below end the worker instead
        p = ctx.Process(target=_worker_main, args=(child, fn, os.getpid()), daemon=False, name="histolight-slide-worker")
        p.start()
        child.close()
        return _Worker(p, parent)

    def assign(w: _Worker) -> None:
        while pending:
            name = pending.popleft()
            why = store.acquire(name) if store is not None else None
            if why is not None:
                _record(rows, name, {"slide": name, "status": "skipped", "reason": why, "seconds": 0.0}, bars)
                continue
            w.slide = name
            w.conn.send(name)
            return

    def finish(w: _Worker, name: str, row: dict) -> None:
        w.slide = None
        if store is not None:
            store.release(name)
        _record(rows, name, row, bars)

    try:
        for _ in range(n_workers):
            pool.append(start())
        for w in pool:
            assign(w)
        while any(w.slide is not None for w in pool):
            busy = [w for w in pool if w.slide is not None]
            ready = mp_wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.5)
            for w in busy:
                if w.conn in ready or w.conn.poll():
                    try:
                        while w.slide is not None and w.conn.poll():
                            msg = w.conn.recv()
                            if msg[0] == "progress":
                                bars.units(*msg[1:])
                            else:
                                finish(w, msg[1], msg[2])
                    except (EOFError, OSError):
                        pass  # the worker died: handled through its sentinel below
                    if w.slide is None:
                        assign(w)
                        continue
                if w.slide is not None and not w.process.is_alive():
                    w.process.join()
                    name = w.slide
                    finish(
                        w,
                        name,
                        {"slide": name, "status": "failed", "reason": _describe_death(w.process.exitcode), "seconds": 0.0},
                    )
                    if pending:
                        log.warning("a slide worker died; starting a new one for the %d remaining slide(s)", len(pending))
                        i = pool.index(w)
                        w.conn.close()
                        pool[i] = start()
                        assign(pool[i])
    finally:
        for w in pool:
            with contextlib.suppress(OSError, BrokenPipeError):
                w.conn.send(None)
        deadline = time.time() + 5
        for w in pool:
            w.process.join(max(0.0, deadline - time.time()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()


def _table(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in BASE_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    return df[BASE_COLUMNS + [c for c in df.columns if c not in BASE_COLUMNS]]


class _Bars:
    """The slide bar, plus a units bar (tiles, strips) that appears on the first :func:`report_progress`."""

    def __init__(self, desc: str, total: int, enabled: bool, unit: str = "items"):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.slides = tqdm(total=total, desc=desc, unit="slide", disable=not enabled, position=0)
        self.inner = None
        self.unit = unit
        self.totals: dict[str, int] = {}

    def units(self, name: str, n: int, total: int | None) -> None:
        if self.inner is None:
            self.inner = self._tqdm(
                total=0, desc=f"  {self.unit}", unit=self.unit.rstrip("s"), disable=not self.enabled, position=1, leave=False
            )
        if total is not None and self.totals.get(name) != total:
            self.inner.total = (self.inner.total or 0) + total - self.totals.get(name, 0)
            self.totals[name] = total
            self.inner.refresh()
        if n:
            self.inner.update(n)

    def slide_done(self, name: str, status: str) -> None:
        self.slides.update(1)
        self.slides.set_postfix_str(f"{name}: {status}", refresh=True)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.slides.close()


__all__ = [
    "STATUSES",
    "EXIT_SLIDES_FAILED",
    "SkipSlide",
    "PerSlideOptions",
    "CohortResult",
    "Claims",
    "run_per_slide",
    "report_progress",
    "failure_exit_code",
    "shard",
]
