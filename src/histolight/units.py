"""Tile geometry units: microns or a magnification, the folder label ``<px>px_<um>um``.

The one magnification convention of histolight: ``10x`` = 1.0 um/px (so ``20x`` = 0.5, ``40x`` = 0.25).
"""

from __future__ import annotations

import math
import re
from typing import Any

from histolight.config.schema import check, is_pos_num

MICRONS_AT_1X = 10.0  # um/px at magnification 1x: mpp = MICRONS_AT_1X / magnification

_MAG = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[xX]\s*$")


def parse_tile_um(tile_um: Any) -> tuple[float | None, float | None]:
    """``(microns, None)`` for a number, ``(None, magnification)`` for a string like ``"10x"``.

    Raises ``ValueError`` naming ``tile_um`` otherwise.
    """
    allowed = "must be a positive number of microns (e.g. 128) or a magnification string like '10x' (10x = 1.0 um/px)"
    if isinstance(tile_um, bool):
        check(False, "tile_um", tile_um, allowed)
    if isinstance(tile_um, (int, float)):
        check(is_pos_num(tile_um), "tile_um", tile_um, allowed)
        return float(tile_um), None
    if isinstance(tile_um, str):
        m = _MAG.match(tile_um)
        if m and float(m.group(1)) > 0:
            return None, float(m.group(1))
        try:  # "128" from a CLI string
            v = float(tile_um)
        except ValueError:
            v = None
        check(v is not None and math.isfinite(v) and v > 0, "tile_um", tile_um, allowed)
        return float(v), None
    check(False, "tile_um", tile_um, allowed)
    raise AssertionError  # unreachable


def tile_um_label(tile_um: Any) -> str:
    """Folder suffix, Slideflow style: ``128`` -> ``128um``, ``112.5`` -> ``112.5um``, ``"10x"`` -> ``10x``."""
    um, mag = parse_tile_um(tile_um)
    if mag is not None:
        return f"{mag:g}x"
    return f"{um:g}um"


def tile_dir_name(tile_px: int, tile_um: Any) -> str:
    """``<tile_px>px_<tile_um>um`` (or ``<tile_px>px_10x``)."""
    return f"{int(tile_px)}px_{tile_um_label(tile_um)}"


def mag_to_mpp(mag: float) -> float:
    """Microns per pixel of magnification ``mag`` (``10`` -> 1.0 um/px)."""
    return MICRONS_AT_1X / float(mag)
