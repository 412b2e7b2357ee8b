"""One model-folder format for every trained model (segmentation, tile classifiers, slide-level MIL models).

A model folder holds two files::

    <kind>_config.json     kind = segment | classifier | mil
    weights.safetensors    the network's state dict (always written as safetensors; an older weights.pt is
                           read with torch.load(weights_only=True), see histolight.io.weights)

``<kind>_config.json``::

    {"format": "histolight-model", "format_version": 1, "kind": "segment" | "classifier" | "mil",
     "weights": "weights.safetensors",
     "model": {...},                 # network config (segment: arch, encoder, loss, inference options, ...;
                                     #                 classifier: timm_name, model_kwargs, drop_rate, ...)
     "data": {...},                  # data config (segment: mode, labels, mpp, size, ...; classifier: label
                                     #              source, split, ...)
     "labels": [...],                # output class names in channel order
     "geometry": {"mpp": ..., "tile_px": ..., "tile_um": ...},   # um/px and px of the network input
     "normalizer": null | {...},     # the stain normalizer with its fit (StainNormalizer.to_config())
     "input_norm": {"mean": [r, g, b], "std": [r, g, b]},       # [0, 1] units
     "metrics": {...}, "training": {...},                        # provenance (run config, checkpoint, ...)
     "histolight_version": "...", "created": "YYYY-MM-DDTHH:MM:SS"}

Older folders keep loading (:func:`read_model_folder` reports them as ``legacy``): segmentation ``model.pth`` +
``segment_config.json`` (format ``histolight.segment.model/1``) and classifiers ``weights.pt`` +
``model_config.json`` (format ``histolight.tile_classifier``). Existing model files are replaced only with
``overwrite=True`` (:func:`check_overwrite`, called by training before any work).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from histolight.errors import HistolightError
from histolight.io.weights import read_state_dict

FORMAT = "histolight-model"
FORMAT_VERSION = 1
KINDS = ("segment", "classifier", "mil")
WEIGHTS_FILES = ("weights.safetensors", "weights.pt")
#: today's older layouts: kind -> (config file, weights file, format value in the config)
LEGACY = {
    "segment": ("segment_config.json", "model.pth", "histolight.segment.model/1"),
    "classifier": ("model_config.json", "weights.pt", "histolight.tile_classifier"),
}
#: keys every ``<kind>_config.json`` carries (besides format, version, kind, weights)
REQUIRED_KEYS = ("model", "data", "labels", "geometry", "normalizer", "input_norm")


def config_name(kind: str) -> str:
    """``<kind>_config.json``."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {list(KINDS)}")
    return f"{kind}_config.json"


def model_files(folder: str | os.PathLike, kind: str) -> list[Path]:
    """The model files of ``kind`` present in ``folder`` (new and older layouts)."""
    f = Path(folder)
    names = {config_name(kind), *WEIGHTS_FILES, *LEGACY.get(kind, ())[:2]}
    return sorted(f / n for n in names if (f / n).is_file())


def check_overwrite(folder: str | os.PathLike, kind: str, overwrite: bool) -> None:
    """Refuse (:class:`HistolightError`) to write a ``kind`` model where one exists, unless ``overwrite``."""
    found = model_files(folder, kind)
    if found and not overwrite:
        raise HistolightError(
            f"'{folder}' already holds a {kind} model ({', '.join(p.name for p in found)}); pass overwrite=True "
            "(task.overwrite=true) to replace it, or choose another folder"
        )


def _weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """The state dict as safetensors bytes (no pickle: loading it never runs code)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()})


def save_model_folder(
    folder: str | os.PathLike, kind: str, state_dict: dict[str, torch.Tensor], meta: dict, overwrite: bool = False
) -> Path:
    """Write ``<kind>_config.json`` (``meta`` + format keys) and the weights into ``folder``, atomically.

    ``meta`` needs :data:`REQUIRED_KEYS`. Older model files of the same kind in ``folder`` are removed once the
    new ones are written (only with ``overwrite``: otherwise an existing model is an error). Returns ``folder``.
    """
    import histolight
    from histolight.io.atomic import atomic_write, atomic_write_json
    from histolight.io.tables import json_default

    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing} (required: {list(REQUIRED_KEYS)})")
    folder = Path(folder)
    check_overwrite(folder, kind, overwrite)
    old = model_files(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    wname, data = WEIGHTS_FILES[0], _weights_bytes(state_dict)
    with atomic_write(folder / wname, "wb") as fh:
        fh.write(data)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "weights": wname,
        **{k: v for k, v in meta.items() if k not in ("format", "format_version", "kind", "weights")},
        "histolight_version": histolight.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_json(folder / config_name(kind), doc, default=json_default)
    for p in old:
        if p.name not in (wname, config_name(kind)):
            p.unlink(missing_ok=True)
    return folder


@dataclass
class ModelFolder:
    """A model folder on disk: ``kind``, the parsed config ``meta`` (the raw older JSON when ``legacy``) and the
    ``weights`` file (read with :meth:`state_dict`)."""

    kind: str
    folder: Path
    meta: dict
    weights: Path
    legacy: bool = False

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` on the CPU (safetensors, or a torch pickle read with ``weights_only=True``; see
        :mod:`histolight.io.weights`)."""
        return read_state_dict(self.weights)


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except ValueError as e:
        raise HistolightError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise HistolightError(f"{p}: expected a JSON object")
    return d


def _identify(p: Path) -> tuple[str, bool] | None:
    """(kind, legacy) of a config JSON file, or None when it is no histolight model config."""
    d = _read_json(p)
    fmt = d.get("format")
    if fmt == FORMAT and d.get("kind") in KINDS:
        return d["kind"], False
    for kind, (_, _, legacy_fmt) in LEGACY.items():
        if fmt == legacy_fmt:
            return kind, True
    return None


def find_config(path: str | os.PathLike, kind: str | None = None) -> Path:
    """The config JSON of the model at ``path`` (a folder, its config JSON or its weights file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise HistolightError(f"model '{p}' not found (give a model folder, its config JSON or its weights file)")
    if p.is_file() and p.suffix == ".json":
        return p
    folder = p if p.is_dir() else p.parent
    kinds = [kind] if kind else list(KINDS)
    for k in kinds:
        for name in (config_name(k), *LEGACY.get(k, ())[:1]):
            if (folder / name).is_file():
                return folder / name
    other = [k for k in KINDS if k not in kinds and any((folder / n).is_file() for n in (config_name(k), *LEGACY.get(k, ())[:1]))]
    hint = f"; it holds a {other[0]} model" if other else ""
    want = kind or " | ".join(KINDS)
    raise HistolightError(
        f"no {want} model in '{folder}' (expected <kind>_config.json + {' or '.join(WEIGHTS_FILES)}, or an older "
        f"model.pth + segment_config.json / weights.pt + model_config.json){hint}"
    )


def read_model_folder(path: str | os.PathLike, kind: str | None = None) -> ModelFolder:
    """Locate and check a model folder of ``kind`` (any kind when None), in the current or an older layout.

    Raises :class:`HistolightError` for a missing folder or file, another kind, or a newer format version.
    """
    cfg = find_config(path, kind)
    ident = _identify(cfg)
    if ident is None:
        raise HistolightError(f"{cfg} is not a histolight model config (format={_read_json(cfg).get('format')!r})")
    got, legacy = ident
    if kind is not None and got != kind:
        raise HistolightError(f"{cfg} describes a {got} model, not a {kind} model")
    meta = _read_json(cfg)
    if legacy:
        name = meta.get("weights") or LEGACY[got][1]
    else:
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise HistolightError(
                f"{cfg} has format_version={version!r}; this histolight reads up to {FORMAT_VERSION} (upgrade histolight)"
            )
        missing = [k for k in REQUIRED_KEYS if k not in meta]
        if missing:
            raise HistolightError(f"{cfg} lacks {missing}")
        name = meta.get("weights", WEIGHTS_FILES[0])
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise HistolightError(f"{cfg}: weights={name!r} is invalid: must be the name of a file in the model folder")
    weights = cfg.parent / name
    if not weights.is_file():
        raise HistolightError(f"{weights} is missing: the model folder '{cfg.parent}' holds {cfg.name} but not its weights")
    return ModelFolder(got, cfg.parent, meta, weights, legacy)


def is_model_folder(path: str | os.PathLike, kind: str | None = None) -> bool:
    """True when ``path`` is a model folder (or its config / weights file) of ``kind`` (any kind when None)."""
    try:
        read_model_folder(path, kind)
    except HistolightError:
        return False
    return True


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "WEIGHTS_FILES",
    "LEGACY",
    "REQUIRED_KEYS",
    "config_name",
    "model_files",
    "check_overwrite",
    "save_model_folder",
    "ModelFolder",
    "find_config",
    "read_model_folder",
    "is_model_folder",
]
