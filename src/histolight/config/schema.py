"""Dataclass schemas for config sections whose mistakes would otherwise be silent.

Each schema validates itself in ``__post_init__`` and raises ``ValueError`` naming the field, the
bad value and what is allowed; :func:`from_config` adds the config path (``task.tile_px``) and
rejects unknown keys with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from histolight.errors import ConfigError

T = TypeVar("T")


def to_dict(node: Any) -> dict:
    """A plain, resolved dict from a DictConfig / mapping / None."""
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ValueError('<key>=<value!r> is invalid: <allowed>')`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: {allowed}")


def is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def is_pos_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_labels(key: str, labels: Any, min_len: int = 1) -> list[str] | None:
    """A list of unique, non-empty strings (or None)."""
    if labels is None:
        return None
    check(isinstance(labels, (list, tuple)), key, labels, "must be a list of class names, e.g. [tumor, stroma]")
    labels = list(labels)
    check(len(labels) >= min_len, key, labels, f"needs at least {min_len} label(s)")
    for lab in labels:
        check(isinstance(lab, str) and lab.strip() != "", key, labels, "every label must be a non-empty string")
    dups = sorted({lab for lab in labels if labels.count(lab) > 1})
    check(not dups, key, labels, f"labels must be unique (repeated: {dups})")
    check("background" not in labels, key, labels, "'background' is implicit (class 0); do not list it")
    return labels


_COHORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_cohort_name(name: Any) -> str:
    """``name`` if it is a safe folder name (letters, digits, ``.``, ``_``, ``-``; no path separators), else a
    :class:`ConfigError` saying what is allowed."""
    s = str(name)
    if not _COHORT_NAME.match(s) or s in (".", ".."):
        raise ConfigError(
            f"dataset.name={name!r} is invalid: a cohort name is a short folder name of letters, digits, '.', '_' "
            "and '-' (at most 128 characters, no '/'), e.g. dataset.name=tcga_brca"
        )
    return s


def default_cohort_name(slides: Any) -> str:
    """The cohort name implied by a slide source: the base name of the (first) slide folder, made safe."""
    first = slides[0] if isinstance(slides, (list, tuple)) and slides else slides
    p = Path(os.fspath(first)) if first not in (None, "") else Path("cohort")
    base = p.name if not p.suffix or p.is_dir() else p.parent.name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-")[:128]
    return safe or "cohort"


#: OmegaConf's placeholder for a value the command line must give (``model: ???``)
MISSING = "???"


def from_config(cls: type[T], node: Any, prefix: str, ignore: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from a config section, raising :class:`ConfigError` with full key paths.

    A value left ``???`` (required, see :data:`MISSING`) is an error saying what to set, e.g. ``task.model is not
    set: add task.model=<value> to the command line; it must be a trained model folder ...``.
    """
    d = to_dict(node)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in d if k not in names and k not in ignore]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" Did you mean '{prefix}.{close[0]}'?" if close else ""
        raise ConfigError(f"unknown key '{prefix}.{k}'.{hint} Allowed keys: {', '.join(names)}")
    kw = {k: v for k, v in d.items() if k in names}
    missing = [k for k, v in kw.items() if isinstance(v, str) and v == MISSING]
    if missing:
        raise ConfigError(_missing_message(cls, kw, missing[0], prefix))
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config '{prefix}': {e}") from None


def _missing_message(cls: type, kw: dict, key: str, prefix: str) -> str:
    """``<prefix>.<key> is not set: add <prefix>.<key>=<value> to the command line`` plus what the schema allows for
    it (its own message for a null value, when it has one)."""
    msg = f"{prefix}.{key} is not set: add {prefix}.{key}=<value> to the command line"
    try:
        cls(**{**kw, key: None})
    except (ValueError, TypeError) as e:
        head, sep, allowed = str(e).partition(" is invalid: ")
        if sep and head.startswith(f"{key}="):
            msg += f"; it {allowed}" if allowed.startswith("must ") else f" ({allowed})"
    return msg


@dataclass
class DatasetConfig:
    """The cohort (config group ``dataset``)."""

    slides: Any
    name: str | None = None
    rois: Any = None
    annotations: str | None = None
    mpp_override: float | None = None
    recursive: bool = False
    labels: list[str] | None = None
    demo: dict | None = field(default=None)
    include_detections: bool = False

    def __post_init__(self):
        check(self.slides not in (None, "", []), "slides", self.slides, "must be a folder or slide file (or a list)")
        check(
            isinstance(self.include_detections, bool),
            "include_detections",
            self.include_detections,
            "must be true or false (read QuPath cell/detection objects as ROIs too)",
        )
        check(
            self.mpp_override is None or is_pos_num(self.mpp_override),
            "mpp_override",
            self.mpp_override,
            "must be null or a positive number of microns per pixel (e.g. 0.25 for 40x, 0.5 for 20x)",
        )
        self.labels = check_labels("labels", self.labels)
        try:
            self.name = check_cohort_name(default_cohort_name(self.slides) if self.name in (None, "") else self.name)
        except ConfigError as e:  # re-raised as the schema's ValueError, which from_config prefixes
            raise ValueError(str(e).replace("dataset.name=", "name=")) from None
