"""Records of the files a histolight writer generated, so a later run can tell them from files a user edited or
added: a record maps paths (relative to a root folder) to SHA-1 digests; a file whose digest still matches its
record is unchanged since it was written.

Used by the ROI writers (one slide's ROI files written side by side, recorded in ``<folder>/.generated/<slide>.json``
and accepted together by the ROI lookup) and by the demo cohort (its manifest records every generated file).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

#: sub-folder of an output folder that holds the records of its generated files
GENERATED = ".generated"


def digest(path: str | os.PathLike) -> str:
    """SHA-1 hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_of(files: Iterable[str | os.PathLike], root: str | os.PathLike) -> dict[str, str]:
    """``{path relative to root (POSIX): digest}`` of ``files``."""
    return {Path(f).relative_to(root).as_posix(): digest(f) for f in files}


def record_path(folder: str | os.PathLike, key: str) -> Path:
    """Where the record ``key`` of ``folder`` lives: ``<folder>/.generated/<key>.json``."""
    return Path(folder) / GENERATED / f"{key}.json"


def read_record(path: str | os.PathLike) -> dict[str, str]:
    """A record written as JSON (empty when missing or unreadable: nothing is known to be generated)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in rec.items()} if isinstance(rec, dict) else {}


def unchanged(record: dict[str, str], root: str | os.PathLike, rel: str) -> bool:
    """True when ``root/rel`` exists and still has the digest ``record`` holds for it."""
    p = Path(root) / rel
    return rel in record and p.is_file() and digest(p) == record[rel]


def is_recorded_set(record: dict[str, str], files: Iterable[str | os.PathLike], root: str | os.PathLike) -> bool:
    """True when ``files`` are exactly the files of ``record``, each unchanged."""
    rels = [Path(f).relative_to(root).as_posix() for f in files]
    return set(rels) == set(record) and all(unchanged(record, root, r) for r in rels)


__all__ = ["GENERATED", "digest", "record_of", "record_path", "read_record", "unchanged", "is_recorded_set"]
