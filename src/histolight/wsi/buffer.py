"""Reading slides through a fast local buffer folder (Slideflow's ``buffer=``: an SSD or a ramdisk).

>>> with buffered("/nfs/slides/CMU-1.svs", "/dev/shm/hl") as local:   # copied in, removed on exit
...     slide = Slide(local)

Each copy goes into its own new folder under the buffer (``<buffer>/hl-<random>/``) and keeps the slide's file name,
so the slide name (and its tile ids) is unchanged, names with spaces or parentheses need no escaping, and two workers
or two runs sharing one buffer never meet. Companion files that some formats keep beside the slide (MIRAX's
``<name>/`` folder) are copied with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from histolight.errors import HistolightError


@contextlib.contextmanager
def buffered(path: str | os.PathLike, buffer: str | os.PathLike | None) -> Iterator[str]:
    """Yield the path to read ``path`` from: ``path`` itself when ``buffer`` is None, else a copy in a fresh folder
    under ``buffer`` (created if needed), removed with its folder on exit, whatever happens inside the block.

    Raises :class:`HistolightError` naming ``buffer`` when the copy cannot be made (e.g. the buffer is full).
    """
    if buffer is None:
        yield str(path)
        return
    src = Path(path)
    root = Path(buffer)
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="hl-", dir=root))
    except OSError as e:
        raise HistolightError(f"buffer={str(buffer)!r}: cannot create a folder there ({e}); give a writable folder") from None
    try:
        local = folder / src.name
        try:
            shutil.copyfile(src, local)
            companion = src.with_suffix("")
            if src.suffix.lower() == ".mrxs" and companion.is_dir():
                shutil.copytree(companion, folder / companion.name)
        except OSError as e:
            raise HistolightError(
                f"buffer={str(buffer)!r}: cannot copy slide '{src}' there ({e}); free space or choose another buffer"
            ) from None
        yield str(local)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
