"""Method table (method -> family and flags), option defaults and config validation for `histolight.norm`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from histolight.errors import ConfigError

#: method -> (family, brightness standardization, background mask)
METHODS: dict[str, tuple[str, bool, bool]] = {
    "macenko": ("macenko", True, False),
    "macenko_fast": ("macenko", False, False),
    "reinhard": ("reinhard", True, False),
    "reinhard_fast": ("reinhard", False, False),
    "reinhard_mask": ("reinhard", True, True),
    "reinhard_fast_mask": ("reinhard", False, True),
    "vahadane": ("vahadane", False, False),
    "augment": ("augment", False, False),
}

#: keys every config may carry besides the method options
COMMON_KEYS = ("method", "preset", "fit", "fit_path", "context")

DEFAULT_PRESET = "v1"


def _num(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False, integer=False):
    def check(key: str, v: Any):
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or not math.isfinite(float(v)):
            kind = "an integer" if integer else "a finite number"
            raise ConfigError(f"normalizer option '{key}'={v!r} is invalid: must be {kind}")
        v = int(v) if integer else float(v)
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            lb = "(" if lo_open else "["
            rb = ")" if hi_open else "]"
            raise ConfigError(f"normalizer option '{key}'={v!r} is out of range: allowed {lb}{lo}, {hi}{rb}")
        return v

    return check


def _opt_int(key: str, v: Any):
    if v is None:
        return None
    return _num(0, 2**63 - 1, integer=True)(key, v)


# option name -> (default, validator); per family
_IO = (240.0, _num(1.0, 255.0))
_BETA = (0.15, _num(0.0, 3.0))
_MINPX = (256, _num(1, 10**9, integer=True))
_BRIGHT = (90.0, _num(0.0, 100.0, lo_open=True))
_MASKTHR = (220, _num(1, 255, integer=True))

OPTIONS: dict[str, dict[str, tuple[Any, Callable]]] = {
    "macenko": {"io": _IO, "alpha": (1.0, _num(0.0, 50.0, hi_open=True)), "beta": _BETA, "min_tissue_pixels": _MINPX},
    "reinhard": {"mask_threshold": _MASKTHR, "min_tissue_pixels": _MINPX},
    "vahadane": {
        "io": _IO,
        "beta": _BETA,
        "lambda_fit": (0.1, _num(0.0, 10.0)),
        "lambda_code": (0.01, _num(0.0, 10.0)),
        "n_iter": (10, _num(0, 10000, integer=True)),
        "max_fit_pixels": (2048, _num(16, 10**8, integer=True)),
        "min_tissue_pixels": _MINPX,
    },
    "augment": {
        "io": _IO,
        "stain_alpha": (0.1, _num(0.0, 1.0, hi_open=True)),
        "stain_beta": (0.05, _num(0.0, 2.0)),
        "hue": (0.02, _num(0.0, 0.5)),
        "saturation": (0.1, _num(0.0, 1.0)),
        "value": (0.1, _num(0.0, 1.0, hi_open=True)),
        "seed": (None, _opt_int),
    },
}


def option_spec(method: str) -> dict[str, tuple[Any, Callable]]:
    """Allowed options of `method` with (default, validator)."""
    family, bright, _ = METHODS[method]
    spec = dict(OPTIONS[family])
    if bright:
        spec["brightness_percentile"] = _BRIGHT
    return spec


def check_method(method: Any) -> str:
    """`method` if it names a method of `METHODS`, else ConfigError listing the allowed ones."""
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"normalizer 'method'={method!r} is not supported: allowed {['none', *METHODS]}")
    return method


def validate_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate `options` (no common keys). Raises ConfigError (a ValueError)."""
    spec = option_spec(method)
    out = {}
    for k, v in options.items():
        if k not in spec:
            raise ConfigError(
                f"normalizer key '{k}'={v!r} is not valid for method '{method}': allowed {sorted([*COMMON_KEYS, *spec])}"
            )
        out[k] = spec[k][1](k, v)
    for k, (default, _) in spec.items():
        out.setdefault(k, default)
    return {k: out[k] for k in spec}
