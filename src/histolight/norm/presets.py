"""Shipped presets: `presets/<name>.json` = {"name", "description", "provenance", "fits": {method: fit}}."""

from __future__ import annotations

import json
import re
from pathlib import Path

from histolight.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """Whole preset document (fits for every method plus how it was made)."""
    names = available_presets()
    if not isinstance(name, str) or not _NAME.match(name) or name not in names:
        raise ConfigError(f"normalizer 'preset'={name!r} is unknown: allowed {names}")
    with open(PRESET_DIR / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def preset_fit(name: str, method: str) -> dict:
    """The fit of `method` in preset `name`."""
    doc = load_preset(name)
    fits = doc.get("fits", {})
    if method not in fits:
        raise ConfigError(f"normalizer 'preset'={name!r} has no fit for method {method!r}: it has {sorted(fits)}")
    return fits[method]
