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
  Workers exit within a second when this process dies, so a killed run leaves no orphans. Where workers cannot
  run (an unguarded script, see :func:`run_per_slide`), the slides run in this process after one warning.
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
import logging
import os
import pickle
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

import pandas as pd

from histolight.claims import Claims
from histolight.config.schema import check, is_pos_int
from histolight.errors import HistolightError
from histolight.utils.procs import describe_exit, exit_with_parent, start_context, worker_payload

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
        m = self.max_failed
        ok = m is None or (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m <= 1)
        check(ok, "max_failed", m, "must be null or a fraction of slides between 0 and 1 (e.g. 0.05)")


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
        return {s: int((self.table["status"] == s).sum()) for s in STATUSES}

    @property
    def failed(self) -> dict[str, str]:
        """``{slide: reason}`` of the failed slides."""
        bad = self.table[self.table["status"] == "failed"]
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


# ---------------------------------------------------------------------------------------------- workers


def _worker_main(conn, payload: bytes, parent_pid: int) -> None:
    """A slide worker: load the pickled per-slide function, say ``("ready",)`` (or ``("startup_error", why)``), then
    receive slide names and send back ``("progress", ...)`` and ``("result", name, row)``."""
    global _PROGRESS

    exit_with_parent(parent_pid)  # promptly, even in the middle of a slide
    with contextlib.suppress(Exception):
        import cv2

        cv2.setNumThreads(1)  # one slide per process: no oversubscription
    try:
        fn = pickle.loads(payload)
    except Exception as e:  # noqa: BLE001 - whatever stops the function from loading here is a start-up failure
        why = f"the per-slide function cannot be loaded in a worker process ({type(e).__name__}: {e})"
        conn.send(("startup_error", f"{why}; define it in a module that worker processes can import"))
        return
    conn.send(("ready",))
    _PROGRESS = lambda name, n, total: conn.send(("progress", name, n, total))  # noqa: E731
    while True:
        try:
            name = conn.recv()
        except (EOFError, OSError):
            return
        if name is None:
            return
        conn.send(("result", name, _call(fn, name)))


@dataclass
class _Worker:
    process: Any
    conn: Any
    slide: str | None = None
    ready: bool = False
    error: str | None = None  # why it could not start, as it reported


def _row(name: str, status: str, reason: str) -> dict:
    return {"slide": name, "status": status, "reason": reason, "seconds": 0.0}


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
        workers: processes running slides in parallel (1 = this process). Workers are spawned, and a spawned
            process first re-runs the main script's top level, so **a script must start the run under**
            ``if __name__ == "__main__":``. Without the guard (or from a script read from stdin, or with a ``fn``
            that cannot be pickled) the slides run in this process, after one warning that says why and how to
            fix it. Notebooks, the REPL and ``python -c`` need no guard, but a ``fn`` defined there cannot be
            loaded by workers (define it in a module). A worker that ends before it is ready is a start-up
            failure, not a slide's: when none could start, the slides run in this process (with the warning);
            when workers ran but no new one can start, the slides left fail with that reason.
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
        todo = mine
        if n_workers > 1:
            why, payload = worker_payload(fn)
            if why is None:
                todo, why = _run_pool(mine, payload, n_workers, store, rows, bars)
            if todo:
                log.warning(
                    "workers=%d: running %d slide(s) in this process, not in worker processes: %s.", workers, len(todo), why
                )
        _run_serial(todo, fn, store, rows, bars)
    finally:
        bars.close()
        if store is not None:
            store.close()
    table = _table([rows[n] for n in mine])
    summary = out / summary_name if (out is not None and summary_name) else None
    if summary is not None:
        from histolight.io.atomic import atomic_write_text

        atomic_write_text(summary, table.to_csv(index=False))
    return CohortResult(table, summary, time.time() - t0)


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
                _record(rows, name, _row(name, "skipped", why), bars)
                continue
            try:
                _record(rows, name, _call(fn, name), bars)
            finally:
                if store is not None:
                    store.release(name)
    finally:
        _PROGRESS = prev


def _run_pool(names, payload: bytes, n_workers: int, store, rows, bars) -> tuple[list[str], str | None]:
    """Run ``names`` in worker processes. Returns ``(slides, why)``: the slides for this process to run when no
    worker could start at all. Once workers did start here, slides left when none can be started are failed."""
    ctx = start_context()
    pending = deque(names)
    pool: list[_Worker] = []
    failed_starts: list[str] = []  # why workers could not start
    started = False  # a worker got ready: workers can run here

    def start() -> None:
        parent, child = ctx.Pipe(duplex=True)
        # not a daemon: a slide function may start processes of its own (DataLoader workers); the parent-death
        # watchdog and the shutdown below end the worker instead
        p = ctx.Process(target=_worker_main, args=(child, payload, os.getpid()), daemon=False, name="histolight-slide-worker")
        try:
            p.start()
            pool.append(_Worker(p, parent))
        except OSError as e:  # out of processes or memory
            failed_starts.append(f"it could not be started ({e})")
        child.close()

    def assign(w: _Worker) -> None:
        while pending:
            name = pending.popleft()
            why = store.acquire(name) if store is not None else None
            if why is not None:
                _record(rows, name, _row(name, "skipped", why), bars)
                continue
            try:
                w.conn.send(name)
                w.slide = name
            except OSError:  # the worker has just ended (handled by the loop): the slide waits for another one
                pending.appendleft(name)
                if store is not None:
                    store.release(name)
            return

    def finish(w: _Worker, name: str, row: dict) -> None:
        w.slide = None
        if store is not None:
            store.release(name)
        _record(rows, name, row, bars)

    def read(w: _Worker) -> None:
        nonlocal started
        with contextlib.suppress(EOFError, OSError):  # a dead worker is handled through its sentinel
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = started = True
                elif msg[0] == "startup_error":
                    w.error = msg[1]
                elif msg[0] == "progress":
                    bars.units(*msg[1:])
                else:
                    finish(w, msg[1], msg[2])

    try:
        for _ in range(n_workers):
            start()
        while pool and (pending or any(w.slide is not None for w in pool)):
            mp_wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=0.5)
            for w in list(pool):
                read(w)
                if w.ready and w.slide is None:
                    assign(w)
                if w.process.is_alive():
                    continue
                w.process.join()
                read(w)  # what it sent just before it ended
                pool.remove(w)
                w.conn.close()
                code = w.process.exitcode
                if w.slide is not None:
                    finish(
                        w, w.slide, _row(w.slide, "failed", describe_exit(code, "while processing this slide; rerun to retry it"))
                    )
                if not w.ready:
                    failed_starts.append(w.error or describe_exit(code, "before it was ready"))
                elif pending:
                    log.warning("a slide worker died; starting a new one for the %d remaining slide(s)", len(pending))
                    start()
        if pending and not started:
            return list(pending), f"no worker process could start: {failed_starts[0]}"
        for name in pending:
            reason = f"not processed: no new worker process could start ({failed_starts[-1]}); rerun to retry it"
            _record(rows, name, _row(name, "failed", reason), bars)
        if failed_starts:
            log.warning("%d slide worker process(es) failed to start: %s", len(failed_starts), failed_starts[0])
        return [], None
    finally:
        for w in pool:
            with contextlib.suppress(OSError):
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
        self.slides.set_postfix_str(f"{name}: {status}", refresh=False)
        if self.slides.n + 1 < (self.slides.total or 0):
            self.slides.update(1)  # one line per slide (postfix and count together)
            return
        if self.inner is not None:  # the last slide: the units bar goes first, close() draws the final line once
            self.inner.close()
            self.inner = None
        self.slides.n += 1

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
    "run_per_slide",
    "report_progress",
    "failure_exit_code",
    "shard",
]
