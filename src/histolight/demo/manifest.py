"""The demo cohort's record of the files it generated (``manifest.json`` ``files``: ``{relative path: sha1}``), so
regenerating it with other parameters never replaces a file the user edited or added, and removes only files it
generated itself (e.g. the slides of a larger earlier demo).

A file at a generated path is replaced only when it is absent, identical to the new content, or unchanged since an
earlier generation (its digest is in the record); otherwise it is kept, left out of the new record (so it stays
the user's) and reported. While a cohort is being (re)generated the manifest has ``config: null`` (incomplete) and
its record lists, per path, the earlier digest and the one about to be written (``[old, new]``), so an
interrupted generation leaves nothing unaccounted for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from histolight.io.atomic import atomic_write, atomic_write_json
from histolight.utils.filesets import digest

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: files written once per cohort (besides the manifest)
COHORT_FILES = ("annotations.csv", "masks/labels.json")


def slide_files(name: str) -> list[str]:
    """The files generated for demo slide ``name``, relative to the cohort root."""
    return [f"slides/{name}.svs", f"rois/{name}.csv", f"rois_qupath/{name}.geojson", f"masks/{name}.png", f"qc/{name}.json"]


def read_manifest(root: Path) -> dict:
    """The cohort's manifest ({} when absent or unreadable)."""
    try:
        m = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def previous_record(root: Path) -> dict[str, set[str]]:
    """The digests earlier generations wrote in ``root``, per path: the manifest's record (complete or in
    progress); for a manifest from before records, every file of its slides as it is now (they were generated;
    edits from then on cannot be told); {} without a manifest."""
    m = read_manifest(root)
    if isinstance(m.get("files"), dict):
        return {rel: {v} if isinstance(v, str) else set(v) for rel, v in m["files"].items()}
    names = [s["slide"] for s in m.get("slides", []) if isinstance(s, dict) and "slide" in s]
    rels = [*COHORT_FILES, *(r for n in names for r in slide_files(n))]
    return {r: {digest(root / r)} for r in rels if (root / r).is_file()}


def mark_incomplete(root: Path, known: dict[str, set[str]], writing: dict[str, str]) -> None:
    """The in-progress manifest (``config: null``): every digest earlier generations wrote and those about to be."""
    paths = sorted(set(known) | set(writing))
    record = {rel: sorted(known.get(rel, set()) | ({writing[rel]} if rel in writing else set())) for rel in paths}
    atomic_write_json(root / MANIFEST, {"config": None, "files": record})


def place(root: Path, rel: str, data: bytes, new: str, known: dict[str, set[str]]) -> bool:
    """Write ``data`` (digest ``new``) to ``root/rel`` unless a file the user edited or added is there (its digest
    is neither ``new`` nor one that histolight wrote). Returns False when the existing file was kept."""
    p = root / rel
    if p.is_file():
        cur = digest(p)
        if cur == new:
            return True
        if cur not in known.get(rel, set()):
            return False
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(p, "wb") as fh:
        fh.write(data)
    return True


def remove_stale(root: Path, known: dict[str, set[str]], keep: set[str]) -> list[str]:
    """Delete the generated files not in ``keep`` that are unchanged since; return the edited ones (kept)."""
    edited = []
    for rel in sorted(set(known) - keep):
        p = root / rel
        if not p.is_file():
            continue
        if digest(p) in known[rel]:
            p.unlink()
        else:
            edited.append(rel)
    return edited


def warn_kept(root: Path, kept: list[str]) -> None:
    if kept:
        log.warning(
            "demo cohort %s: kept %d file(s) edited or added by hand instead of regenerating or removing them: %s "
            "(delete them to let the demo regenerate them)",
            root,
            len(kept),
            ", ".join(kept[:10]) + (" ..." if len(kept) > 10 else ""),
        )


__all__ = [
    "MANIFEST",
    "COHORT_FILES",
    "slide_files",
    "read_manifest",
    "previous_record",
    "mark_incomplete",
    "place",
    "remove_stale",
    "warn_kept",
]
