"""Build QC methods from config: names, dicts, lists (``["otsu", "blur"]``, ``{"name": "segment", ...}``).

Register a method with :func:`register_qc` (a class/factory, or a ``"module:attr"`` string that is
imported only when used). Factories whose signature accepts ``tile_mpp`` receive the extraction's
tile um/px (the blur QC uses it for its default working mpp); QC *objects* in a spec that have a
``for_tile_mpp(tile_mpp)`` method are replaced by its result, so ``GaussianV2()`` passed as an object works at
4x the tile um/px like ``"blur"`` does.

Spawned worker processes start with the built-in registry only: :func:`capture_qc` takes the entries a spec
uses (:class:`QCPlugins`, picklable when the factories are module-level) and ``build_qc(..., plugins=...)``
re-registers them in the worker.

>>> build_qc(["otsu", {"name": "blur", "sigma": 2}], tile_mpp=0.5)
[Otsu(...), GaussianV2(...)]
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
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
    "gaussian_v1": "histolight.qc.blur:Gaussian",
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


@dataclass
class QCPlugins:
    """Registry entries a QC spec uses (``name -> factory or "module:attr"``; ``alias -> names``), carried to worker
    processes; :meth:`install` adds the missing ones to this process's registry."""

    methods: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)

    def install(self) -> None:
        for name, f in self.methods.items():
            QC_REGISTRY.setdefault(name, f)
        for name, ms in self.aliases.items():
            QC_ALIASES.setdefault(name, list(ms))


def capture_qc(spec: Any, key: str = "qc") -> QCPlugins:
    """The registry entries that ``spec`` uses (checked as :func:`validate_qc_spec`), for :func:`build_qc` in a
    worker process that never saw :func:`register_qc` / :func:`register_qc_alias` calls of this one."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    names = [i if isinstance(i, str) else i.get("name") for i in items if isinstance(i, (str, dict))]
    aliases = {n: list(QC_ALIASES[n]) for n in names if n in QC_ALIASES}
    used = [x if isinstance(x, str) else x["name"] for x in validate_qc_spec(spec, key) if isinstance(x, (str, dict))]
    return QCPlugins({n: QC_REGISTRY[n] for n in used if n in QC_REGISTRY}, aliases)


def bind_tile_mpp(method: Any, tile_mpp: float | None) -> Any:
    """``method.for_tile_mpp(tile_mpp)`` when the QC object has it (e.g. :class:`~histolight.qc.blur.GaussianV2`:
    a copy working at 4x the tile um/px unless its ``mpp`` was set), else ``method``."""
    bind = getattr(method, "for_tile_mpp", None)
    return bind(tile_mpp) if tile_mpp is not None and callable(bind) else method


def build_qc(spec: Any, *, tile_mpp: float | None = None, key: str = "qc", plugins: QCPlugins | None = None) -> list[Callable]:
    """QC callables from ``spec`` (see module docstring). QC objects in the list pass through, bound to ``tile_mpp``
    (:func:`bind_tile_mpp`). ``plugins`` (from :func:`capture_qc` in the parent process) are registered first.

    Raises :class:`ConfigError` naming ``key`` for unknown names or bad options.
    """
    if plugins is not None:
        plugins.install()
    methods = []
    for item in validate_qc_spec(spec, key):
        if callable(item) and not isinstance(item, (str, dict)):
            methods.append(bind_tile_mpp(item, tile_mpp))
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
    if n in ("blur", "gaussian", "gaussian_v1", "gaussian_v2"):
        return "blur"
    return None
