"""Build QC methods from config: names, dicts, lists (``["otsu", "blur"]``, ``{"name": "segment", ...}``).

Register a method with :func:`register_qc` (a class/factory, or a ``"module:attr"`` string that is
imported only when used). Factories whose signature accepts ``tile_mpp`` receive the extraction's
tile um/px (the blur QC uses it for its default working mpp).

>>> build_qc(["otsu", {"name": "blur", "sigma": 2}], tile_mpp=0.5)
[Otsu(...), GaussianV2(...)]
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from histolight.errors import ConfigError

#: names that expand to several methods; facades add theirs (``histolight.compat.slideflow``: ``qc='both'``)
QC_ALIASES: dict[str, list[str]] = {}

#: name -> factory or "module:attr"
QC_REGISTRY: dict[str, Callable | str] = {
    "otsu": "histolight.qc.otsu:Otsu",
    "blur": "histolight.qc.blur:GaussianV2",
    "gaussian": "histolight.qc.blur:GaussianV2",
    "gaussian_v2": "histolight.qc.blur:GaussianV2",
    "segment": "histolight.qc.segment:Segment",
}


def register_qc(name: str, factory: Callable | str | None = None):
    """Register ``factory`` (callable returning a QC method, or ``"module:attr"``) as ``name``.

    Usable as a decorator: ``@register_qc("segment")``.
    """
    if factory is None:

        def deco(f):
            QC_REGISTRY[name] = f
            return f

        return deco
    QC_REGISTRY[name] = factory
    return factory


def register_qc_alias(name: str, methods: list[str]) -> None:
    """Make ``name`` expand to the QC ``methods`` (each a registered name) in every QC spec."""
    unknown = [m for m in methods if m not in QC_REGISTRY]
    if unknown:
        raise ConfigError(f"QC alias '{name}': unknown method(s) {unknown}; known: {sorted(QC_REGISTRY)}")
    QC_ALIASES[name] = list(methods)


def qc_names() -> list[str]:
    return sorted([*QC_REGISTRY, *QC_ALIASES])


def _resolve(name: str) -> Callable:
    f = QC_REGISTRY[name]
    if isinstance(f, str):
        mod, attr = f.split(":")
        f = getattr(importlib.import_module(mod), attr)
        QC_REGISTRY[name] = f
    return f


def _accepts(f: Callable, kw: str) -> bool:
    try:
        params = inspect.signature(f).parameters
    except (TypeError, ValueError):
        return False
    return kw in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _unknown(name: Any, key: str) -> ConfigError:
    close = difflib.get_close_matches(str(name), qc_names(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"{key}={name!r} is not a known QC method.{hint} Allowed: {qc_names()} "
        "(or a dict {name: <method>, ...options}, or a list of these)"
    )


def validate_qc_spec(spec: Any, key: str = "qc") -> list:
    """Normalise a QC spec to a list of ``str | dict`` items and check the names (no imports of heavy modules)."""
    if spec is None or spec is False or spec == "none" or spec == "":
        return []
    if isinstance(spec, (str, dict)) or callable(spec):
        spec = [spec]
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f"{key}={spec!r} is invalid: must be null, a QC method name, a dict with 'name', or a list of these")
    out = []
    for item in spec:
        if callable(item) and not isinstance(item, (str, dict)):
            out.append(item)
            continue
        if isinstance(item, str):
            name = item
        elif isinstance(item, dict):
            name = item.get("name")
            if name is None:
                raise ConfigError(f"{key}: the QC entry {item!r} needs a 'name' (one of {qc_names()})")
        else:
            raise ConfigError(f"{key}: the QC entry {item!r} must be a method name or a dict with 'name'")
        if name == "none":
            continue
        if name not in QC_REGISTRY and name not in QC_ALIASES:
            raise _unknown(name, key)
        if name in QC_ALIASES:
            if isinstance(item, dict) and len(item) > 1:
                raise ConfigError(f"{key}: the alias '{name}' takes no options; list its methods {QC_ALIASES[name]} instead")
            out.extend(QC_ALIASES[name])
        else:
            out.append(item)
    return out


def build_qc(spec: Any, *, tile_mpp: float | None = None, key: str = "qc") -> list[Callable]:
    """QC callables from ``spec`` (see module docstring). Callables in the list pass through unchanged.

    Raises :class:`ConfigError` naming ``key`` for unknown names or bad options.
    """
    methods = []
    for item in validate_qc_spec(spec, key):
        if callable(item) and not isinstance(item, (str, dict)):
            methods.append(item)
            continue
        if isinstance(item, str):
            name, opts = item, {}
        else:
            opts = dict(item)
            name = opts.pop("name")
        f = _resolve(name)
        if tile_mpp is not None and "tile_mpp" not in opts and _accepts(f, "tile_mpp"):
            opts["tile_mpp"] = tile_mpp
        try:
            methods.append(f(**opts))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key}: cannot build QC method '{name}' with options {opts}: {e}") from None
    return methods


def qc_role(method: Any, name: str | None = None) -> str | None:
    """``'tissue'`` (masks background), ``'blur'`` or None, from the method's ``role`` attribute or its name."""
    role = getattr(method, "role", None)
    if role:
        return role
    n = (name or getattr(method, "name", "") or "").lower()
    if n in ("otsu", "segment", "tissue"):
        return "tissue"
    if n in ("blur", "gaussian", "gaussian_v2"):
        return "blur"
    return None
