"""Worker processes: can they be *spawned* from the code running now, how one ended, ending with the parent.

A spawned process is a fresh interpreter (safe after OpenSlide/OpenCV started threads in this one, which ``fork``
is not). Before it runs anything it re-runs the main script's top level as ``__mp_main__``, so a script must start
its work under ``if __name__ == "__main__":`` (:data:`GUARD`); without the guard every worker would start the work
again (Python stops such a worker with a ``RuntimeError`` about the "bootstrapping phase"). A notebook, the REPL,
``python -c`` and ``python -m <package>`` (its ``__main__.py``) are not re-run, so they need no guard.
"""

from __future__ import annotations

import ast
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

GUARD = 'if __name__ == "__main__":'
#: environment variable that chooses the start method (``fork``, ``forkserver``) and skips the checks on ``__main__``
START_METHOD_VAR = "HISTOLIGHT_MP_START"


def start_context():
    """The multiprocessing context worker processes start with: ``spawn``, or ``$HISTOLIGHT_MP_START``."""
    return mp.get_context(os.environ.get(START_METHOD_VAR) or "spawn")


def worker_payload(fn: Any) -> tuple[str | None, bytes]:
    """``(why fn cannot run in worker processes started from here, or None; fn pickled)``: ``fn`` must pickle, and
    :func:`spawn_problem` must find nothing (unless :data:`START_METHOD_VAR` chooses the start method)."""
    try:
        payload = pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001 - any pickling failure means: run in this process
        return f"the per-slide function cannot be sent to worker processes ({e}); use a module-level function", b""
    return (None if os.environ.get(START_METHOD_VAR) else spawn_problem()), payload


def spawn_problem() -> str | None:
    """Why spawned worker processes cannot start from the ``__main__`` running now, with the fix; None when they can.

    Checked: a main script that is not a file (read from stdin: a worker cannot re-run it), and the main script's statement being
    executed now (the one that leads here) lying outside :data:`GUARD` (every worker would run it again)."""
    main = sys.modules.get("__main__")
    spec, path = getattr(main, "__spec__", None), getattr(main, "__file__", None)
    if (spec is None and path is None) or (spec is not None and spec.name.rpartition(".")[2] == "__main__"):
        return None  # a notebook, the REPL, `python -c`, `python -m <package>`: nothing of __main__ is re-run
    if spec is None and not os.path.isfile(path):
        return f"worker processes cannot re-run the main script {path} (read from stdin?); save it to a file and run that"
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None or under_guard(frame.f_code.co_filename, frame.f_lineno):
        return None
    return (
        f"{frame.f_code.co_filename} starts this run at its top level (line {frame.f_lineno}), outside an `{GUARD}` "
        f"block, and every worker process would run the script again. To use workers, put the script's work under `{GUARD}`"
    )


def under_guard(path: str, line: int) -> bool:
    """Whether ``line`` of the Python file ``path`` is in the body of an ``if __name__ == "__main__":`` block."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return False
    tests = ('__name__ == "__main__"', '"__main__" == __name__')
    return any(
        isinstance(n, ast.If)
        and ast.unparse(n.test).replace("'", '"') in tests
        and n.body[0].lineno <= line <= n.body[-1].end_lineno
        for n in ast.walk(tree)
    )


def describe_exit(code: int | None, when: str) -> str:
    """``the worker process died (exit code 1) <when>`` / ``... was killed by SIGKILL (...) <when>``."""
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        hint = " (SIGKILL: often the out-of-memory killer)" if sig == "SIGKILL" else ""
        return f"the worker process was killed by {sig}{hint} {when}"
    return f"the worker process died (exit code {code}) {when}"


def exit_with_parent(parent_pid: int, poll_s: float = 0.25) -> None:
    """Start a daemon thread that ends this process (exit status 3) as soon as its parent ``parent_pid`` is gone."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(3)

    threading.Thread(target=watch, name="histolight-parent-watch", daemon=True).start()
