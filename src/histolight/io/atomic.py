"""Atomic file writes: write a temp file in the target's directory, fsync, then `os.replace`.

Readers never see a half-written file; on error the temp file is removed and any
existing target is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

__all__ = ["AtomicFile", "atomic_write", "atomic_save_npz", "atomic_write_text", "atomic_write_json"]


class AtomicFile:
    """A temp file `.<name>.tmp-<pid>-<token>` next to `path`; `commit()` renames it onto `path`.

    `abort()` (or garbage collection without commit) deletes the temp file.
    """

    def __init__(
        self, path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None, buffering: int = -1, fsync: bool = True
    ):
        if mode not in ("wb", "w", "wt"):
            raise ValueError(f"AtomicFile mode must be 'wb', 'w' or 'wt', got {mode!r}")
        self.path = os.fspath(path)
        self.fsync = fsync
        d, name = os.path.split(os.path.abspath(self.path))
        self.tmp_path = os.path.join(d, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        # os.open with 0o666 honours the umask (mkstemp would force 0600 on the final file).
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            self.file: IO[Any] = os.fdopen(fd, mode, buffering=buffering, encoding=encoding)
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp_path)
            raise
        self.done = False

    def commit(self) -> None:
        """Flush, fsync and atomically move the temp file onto `path`."""
        if self.done:
            return
        try:
            self.file.flush()
            if self.fsync:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self.done = True
        if self.fsync:
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        """Close and delete the temp file; the target is untouched. Idempotent."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)

    def __del__(self):  # never leave temp files behind
        if not getattr(self, "done", True):
            self.abort()


def _fsync_dir(d: str) -> None:
    """Best effort: persist a rename (no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None, fsync: bool = True
) -> Iterator[IO[Any]]:
    """Context manager yielding a file; on clean exit it replaces `path` atomically, on error it is discarded."""
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    af = AtomicFile(path, mode, encoding=encoding, fsync=fsync)
    try:
        yield af.file
    except BaseException:
        af.abort()
        raise
    af.commit()


def atomic_save_npz(path: str | os.PathLike, *args: Any, compressed: bool = False, **arrays: Any) -> None:
    """`np.savez` (or `savez_compressed`) to exactly `path` (no '.npz' appended), atomically."""
    with atomic_write(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, *args, **arrays)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **json_kwargs: Any) -> None:
    """`json.dump(obj)` to `path` atomically (trailing newline)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, **json_kwargs)
        f.write("\n")
