"""One augmentation schema for every training stack (``data.augment``), built on albumentations.

Keys (all optional; ``null``/``false``/``0`` = off):

=================  =====================================================================================
``flip``           true: horizontal and vertical flips, each with p = 0.5
``rot90``          true: a uniformly drawn multiple of 90 degrees
``scale``          s in [0, 1): zoom by U(1 - s, 1 + s) with p = 0.5 (image padded white, masks with 0)
``stain``          s in [0, 1] (H&E optical-density scale 1 +- s, shift +- s/2, p = 0.5) or a mapping of
                   :class:`histolight.norm.transforms.StainAugment` options (``stain_alpha``, ``stain_beta``,
                   ``hue``, ``saturation``, ``value``, ``preset``, ``p``)
``color_jitter``   ``{brightness, contrast, saturation, hue, p}`` (relative changes; hue as a fraction of the
                   colour circle); albumentations ``ColorJitter``
``blur``           p in [0, 1]: a light Gaussian blur (3-5 px kernel) with probability p, or ``{p, blur_limit}``
``jpeg``           ``{quality: [low, high], p}``: JPEG re-compression artefacts
=================  =====================================================================================

Old keys are accepted with a deprecation warning: ``rotate90`` -> ``rot90``, ``stain_augment`` -> ``stain``,
``brightness_contrast: b`` -> ``color_jitter: {brightness: b, contrast: b}``, ``hue_saturation: h`` ->
``color_jitter: {hue: h, saturation: h}`` (both merged into one ``color_jitter`` with p = 0.5).

The pipeline is mask-aware: call it with ``image=`` only (tiles) or with ``image=`` and ``masks=[...]``
(segmentation crops); geometric steps move masks with the image, colour steps touch the image only.
Order: flips, rotation, zoom, stain, colour, blur, JPEG.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

from histolight.config.schema import check

log = logging.getLogger(__name__)

KEYS = ("flip", "rot90", "scale", "stain", "color_jitter", "blur", "jpeg")
#: ``data.augment`` defaults (conf/data/*.yaml state them explicitly)
DEFAULTS: dict[str, Any] = {
    "flip": True,
    "rot90": True,
    "scale": 0.0,
    "stain": None,
    "color_jitter": None,
    "blur": 0.0,
    "jpeg": None,
}
#: every key switched off
OFF: dict[str, Any] = {
    "flip": False,
    "rot90": False,
    "scale": 0.0,
    "stain": None,
    "color_jitter": None,
    "blur": 0.0,
    "jpeg": None,
}
ALIASES = {"rotate90": "rot90", "stain_augment": "stain"}
_JITTER = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02, "p": 0.5}
_STAIN_KEYS = ("stain_alpha", "stain_beta", "hue", "saturation", "value", "preset", "fit", "p")


def _num(key: str, v: Any, lo: float, hi: float, hi_open: bool = False, what: str = "") -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v and (v < hi if hi_open else v <= hi)
    check(ok, key, v, f"must be a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}{what}")
    return float(v)


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Report the use of key ``old`` (now ``new``): a ``DeprecationWarning`` for code and a logged warning for
    Hydra runs (where Python hides deprecation warnings)."""
    msg = f"{old} is deprecated: use {new}"
    warnings.warn(msg, DeprecationWarning, stacklevel=stacklevel + 1)
    log.warning(msg)


def _deprecated(old: str, new: str, prefix: str, warn: bool = True) -> None:
    if warn:
        deprecated(f"{prefix}.{old}", f"{prefix}.{new}", stacklevel=4)


def upgrade_augment(aug: Mapping, prefix: str = "data.augment", warn: bool = True) -> dict:
    """``aug`` with deprecated keys renamed (a deprecation warning each unless ``warn=False``, e.g. when reading a
    saved model's config) and ``brightness_contrast``/``hue_saturation`` merged into ``color_jitter``."""
    aug = dict(aug)
    out = {}
    for k, v in aug.items():
        new = ALIASES.get(k)
        if new is not None:
            _deprecated(k, new, prefix, warn)
            check(new not in aug, f"{prefix}.{k}", v, f"is an old name of {prefix}.{new}; give only one of them")
            out[new] = v
        elif k not in ("brightness_contrast", "hue_saturation"):
            out[k] = v
    bc, hs = aug.get("brightness_contrast"), aug.get("hue_saturation")
    if "brightness_contrast" in aug or "hue_saturation" in aug:
        _deprecated("brightness_contrast/hue_saturation", "color_jitter={brightness, contrast, saturation, hue, p}", prefix, warn)
        check(
            aug.get("color_jitter") is None,
            f"{prefix}.color_jitter",
            aug.get("color_jitter"),
            "cannot be combined with the old keys brightness_contrast / hue_saturation; give only color_jitter",
        )
        b = _num(f"{prefix}.brightness_contrast", bc or 0.0, 0, 1, True)
        h = _num(f"{prefix}.hue_saturation", hs or 0.0, 0, 0.5)
        out["color_jitter"] = {"brightness": b, "contrast": b, "saturation": h, "hue": h, "p": 0.5} if (b or h) else None
    return out


def validate_augment(aug: Mapping | bool | None, prefix: str = "data.augment") -> dict:
    """``data.augment`` with defaults filled in and old keys renamed; ``null``/``false`` switch everything off.

    Raises ``ValueError`` naming ``<prefix>.<key>``, the value and what is allowed.
    """
    if aug is None or aug is False:
        aug = OFF
    check(isinstance(aug, Mapping), prefix, aug, f"must be null/false or a mapping with keys {list(KEYS)}")
    aug = upgrade_augment(aug, prefix)
    unknown = [k for k in aug if k not in KEYS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], KEYS + tuple(ALIASES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        check(False, f"{prefix}.{unknown[0]}", aug[unknown[0]], f"unknown augmentation{hint}; allowed keys: {list(KEYS)}")
    out = {**DEFAULTS, **aug}
    for k in ("flip", "rot90"):
        check(isinstance(out[k], bool), f"{prefix}.{k}", out[k], "must be true or false")
    out["scale"] = _num(f"{prefix}.scale", out["scale"] or 0.0, 0, 1, True, " (zoom range 1 +- scale; 0 = off)")
    out["stain"] = _stain(out["stain"], f"{prefix}.stain")
    out["color_jitter"] = _jitter(out["color_jitter"], f"{prefix}.color_jitter")
    out["blur"] = _blur(out["blur"], f"{prefix}.blur")
    out["jpeg"] = _jpeg(out["jpeg"], f"{prefix}.jpeg")
    return out


def _stain(v: Any, key: str) -> dict | None:
    if v is None or v is False or v == 0:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        s = _num(key, v, 0, 1, what=" (stain jitter strength) or a mapping of StainAugment options")
        return {"stain_alpha": s, "stain_beta": s / 2, "hue": 0.0, "saturation": 0.0, "value": 0.0, "p": 0.5}
    check(
        isinstance(v, Mapping), key, v, "must be null, a strength in [0, 1] or a mapping of StainAugment options (e.g. {p: 0.5})"
    )
    bad = [k for k in v if k not in _STAIN_KEYS]
    check(
        not bad, f"{key}.{bad[0] if bad else ''}", v.get(bad[0]) if bad else None, f"unknown option; allowed {list(_STAIN_KEYS)}"
    )
    if "p" in v:
        _num(f"{key}.p", v["p"], 0, 1, what=" (probability)")
    return dict(v)


def _jitter(v: Any, key: str) -> dict | None:
    if v is None or v is False:
        return None
    check(isinstance(v, Mapping) and set(v) <= set(_JITTER), key, v, f"must be null or a mapping with keys {sorted(_JITTER)}")
    out = {**_JITTER, **v}
    for k in ("brightness", "contrast", "saturation"):
        out[k] = _num(f"{key}.{k}", out[k], 0, 1, True, " (relative change)")
    out["hue"] = _num(f"{key}.hue", out["hue"], 0, 0.5, what=" (fraction of the colour circle)")
    out["p"] = _num(f"{key}.p", out["p"], 0, 1, what=" (probability)")
    return out


def _blur(v: Any, key: str) -> dict | None:
    if v is None or v is False or v == 0:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"p": _num(key, v, 0, 1, what=" (probability of a light blur) or {p, blur_limit}"), "blur_limit": [3, 5]}
    check(isinstance(v, Mapping) and set(v) <= {"p", "blur_limit"}, key, v, "must be null, a probability or {p, blur_limit}")
    lim = list(v.get("blur_limit", [3, 5]))
    check(
        len(lim) == 2 and all(isinstance(x, int) and x >= 3 and x % 2 == 1 for x in lim) and lim[0] <= lim[1],
        f"{key}.blur_limit",
        lim,
        "must be [low, high] odd kernel sizes >= 3",
    )
    return {"p": _num(f"{key}.p", v.get("p", 0.5), 0, 1), "blur_limit": lim}


def _jpeg(v: Any, key: str) -> dict | None:
    if v is None or v is False:
        return None
    check(isinstance(v, Mapping) and set(v) <= {"quality", "p"}, key, v, "must be null or a mapping with keys ['p', 'quality']")
    q = list(v.get("quality", [50, 95]))
    check(
        len(q) == 2 and all(isinstance(x, int) and 1 <= x <= 100 for x in q) and q[0] <= q[1],
        f"{key}.quality",
        q,
        "must be [low, high] integers with 1 <= low <= high <= 100",
    )
    return {"quality": q, "p": _num(f"{key}.p", v.get("p", 0.3), 0, 1)}


def build_augmentation(aug: Mapping | bool | None, prefix: str = "data.augment"):
    """The albumentations ``Compose`` of ``aug`` (validated first), or None when every key is off.

    Call it as ``t(image=img)`` (H x W x 3 uint8) or ``t(image=img, masks=[m1, m2, ...])`` (each H x W):
    geometry applies to image and masks alike, colour to the image only.
    """
    import albumentations as A

    a = validate_augment(aug, prefix)
    t: list = []
    if a["flip"]:
        t += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if a["rot90"]:
        t.append(A.RandomRotate90(p=1.0))
    if a["scale"] > 0:
        s = a["scale"]
        t.append(A.Affine(scale=(1 - s, 1 + s), fill=255, fill_mask=0, p=0.5))
    if a["stain"] is not None:
        from histolight.norm.transforms import StainAugment

        t.append(StainAugment(**a["stain"]))
    cj = a["color_jitter"]
    if cj is not None:
        t.append(
            A.ColorJitter(
                brightness=cj["brightness"], contrast=cj["contrast"], saturation=cj["saturation"], hue=cj["hue"], p=cj["p"]
            )
        )
    if a["blur"] is not None:
        t.append(A.GaussianBlur(blur_limit=tuple(a["blur"]["blur_limit"]), p=a["blur"]["p"]))
    if a["jpeg"] is not None:
        t.append(A.ImageCompression(quality_range=tuple(a["jpeg"]["quality"]), p=a["jpeg"]["p"]))
    return A.Compose(t) if t else None


__all__ = ["KEYS", "DEFAULTS", "OFF", "ALIASES", "deprecated", "upgrade_augment", "validate_augment", "build_augmentation"]
