"""Per-slide claim files: two runs into one output folder never process the same slide at the same time.

While a slide is being processed its claim file ``<root>/<slide>-<hash>.claim`` is locked with ``flock`` and names
the owner (host, pid, start time). Another run skips slides a live run holds; claims of dead runs are taken over
(the kernel drops a dead process's lock; a claim from another host is honoured while its heartbeat, the file's
mtime refreshed by a thread, is fresher than ``stale_after`` seconds). Used by :func:`histolight.cohort.run_per_slide`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


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
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a concurrent run that finished removed the (then empty) claims folder
                self.root.mkdir(parents=True, exist_ok=True)
                continue
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
