"""Environment failures that surface as confusing exceptions, turned into one line that names the likely cause.

- Memory: under an address-space limit (``ulimit -v``, a batch system's memory cap) a large shared library
  (torch, OpenCV) fails to load with ``ImportError: ... failed to map segment from shared object``, or an import
  raises ``MemoryError`` (or, under such a limit, ``SystemError``: an extension whose allocation failed).
- Disk: ``OSError`` ENOSPC / EDQUOT (no space left, quota exceeded) while writing outputs.
"""

from __future__ import annotations

import errno
import resource
import traceback

#: messages of loader / allocator failures caused by a memory limit
MEMORY_MESSAGES = ("failed to map segment", "cannot allocate memory")


def _limit() -> int:
    return resource.getrlimit(resource.RLIMIT_AS)[0]


def _memory_limit() -> str:
    soft = _limit()
    if soft == resource.RLIM_INFINITY:
        return "no address-space limit is set (ulimit -v), so the machine or a container cap ran out"
    return f"the address-space limit is {soft / 2**30:.1f} GiB (ulimit -v)"


def _while_importing(exc: BaseException) -> bool:
    return any("importlib._bootstrap" in f.filename or f.name == "<module>" for f in traceback.extract_tb(exc.__traceback__))


def environment_error(exc: BaseException) -> str | None:
    """One line naming the likely cause when ``exc`` is a memory or disk-space failure, else None."""
    text = str(exc).lower()
    mapped = isinstance(exc, (ImportError, OSError)) and any(m in text for m in MEMORY_MESSAGES)
    limited = _limit() != resource.RLIM_INFINITY
    if mapped or (_while_importing(exc) and (isinstance(exc, MemoryError) or (limited and isinstance(exc, SystemError)))):
        return (
            f"out of memory while loading libraries ({type(exc).__name__}: {exc}); the likely cause is memory: "
            f"{_memory_limit()}. torch alone maps several GiB of address space: raise the limit (ulimit -v unlimited, "
            "or request more memory from the batch system)"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing '{exc.filename}'" if exc.filename else ""
        return f"no space left on the disk{where} ({exc.strerror}); free space or choose another output folder"
    return None


__all__ = ["MEMORY_MESSAGES", "environment_error"]
