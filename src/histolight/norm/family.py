"""The strategy a stain family implements for `StainNormalizer` (`Family`), and what the families share:
fit-dict validation, fit averaging of stain matrices, the cached OD table and torch copies of fit/context arrays.

Images are HxWx3 uint8 RGB (NumPy) or (B,3,N) float32 pixel values in [0, 255] (torch, N = H*W).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from histolight.errors import ConfigError
from histolight.norm import np_ops


@functools.lru_cache(maxsize=8)
def cached_od_lut(io: float) -> np.ndarray:
    """Read-only `np_ops.od_lut(io)` (256 float32 OD values), shared by every normalizer with this `io`."""
    lut = np_ops.od_lut(io)
    lut.flags.writeable = False
    return lut


# ----------------------------------------------------------------------------- fit dicts
def _vec(key, v, n, positive=False):
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (n,) or not np.all(np.isfinite(a)) or (positive and np.any(a <= 0)):
        need = f"{n} finite{' positive' if positive else ''} numbers"
        raise ConfigError(f"normalizer fit '{key}'={v!r} is invalid: expected {need}")
    return a


def _stain_matrix(v):
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (2, 3) or not np.all(np.isfinite(a)):
        raise ConfigError(
            f"normalizer fit 'stain_matrix'={v!r} is invalid: expected 2 rows (H, E) of 3 optical densities (R, G, B)"
        )
    nrm = np.linalg.norm(a, axis=1)
    if np.any(nrm < 1e-6) or abs(float(a[0] @ a[1] / (nrm[0] * nrm[1]))) > 0.9999:
        raise ConfigError(f"normalizer fit 'stain_matrix'={v!r} is invalid: rows must be non-zero and not parallel")
    return a


def canonical_fit(keys: tuple[str, ...], fit: Any) -> dict:
    """Validate a fit dict with exactly `keys`; return it with plain Python floats (JSON-able, exact).

    `stain_matrix`: 2 rows (H, E) of 3 ODs (R, G, B); `max_conc`: 2 positive ODs; `means`: 3 LAB values;
    `stds`: 3 positive LAB values. Raises ConfigError naming the key, the value and what is expected.
    """
    if not isinstance(fit, Mapping):
        raise ConfigError(f"normalizer 'fit'={fit!r} is invalid: expected a mapping with keys {keys}")
    for k in fit:
        if k not in keys:
            raise ConfigError(f"normalizer fit key '{k}'={fit[k]!r} is not valid here: allowed {list(keys)}")
    for k in keys:
        if k not in fit:
            raise ConfigError(f"normalizer 'fit' lacks '{k}': required keys {list(keys)}")
    out = {}
    for k in keys:
        if k == "stain_matrix":
            out[k] = _stain_matrix(fit[k]).tolist()
        else:
            out[k] = _vec(k, fit[k], 2 if k == "max_conc" else 3, positive=k in ("max_conc", "stds")).tolist()
    return out


def average_stain_fit(stats: list[dict], max_conc: bool) -> dict:
    """Fit from per-image stain statistics: mean stain matrix (columns renormalized), mean max concentrations."""
    he = np.mean([s["he"] for s in stats], 0)
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    fit = {"stain_matrix": he.T.tolist()}
    if max_conc:
        fit["max_conc"] = np.mean([s["mc"] for s in stats], 0).tolist()
    return fit


# ----------------------------------------------------------------------------- torch copies
class DeviceTensors:
    """Torch copies, on device `dev`, of the target arrays (`tgt`) and of context values, kept in `cache`.

    `cache` is the normalizer's dict: it is emptied when the fit changes, and its 'ctx' entry when the context does.
    """

    def __init__(self, cache: dict, tgt: dict, dev):
        self.cache, self.tgt, self.dev = cache, tgt, dev

    def target(self, key: str, dtype=None):
        """`tgt[key]` as a tensor (float64 unless `dtype`)."""
        import torch

        ck = ("tgt", key, str(self.dev))
        if ck not in self.cache:
            self.cache[ck] = torch.as_tensor(self.tgt[key], dtype=dtype or torch.float64, device=self.dev)
        return self.cache[ck]

    def context(self, key: str, value, dtype=None):
        """Context value `value` (cached under `key`) as a tensor (float64 unless `dtype`)."""
        import torch

        cache = self.cache.setdefault("ctx", {})
        ck = (key, str(self.dev))
        if ck not in cache:
            cache[ck] = torch.as_tensor(np.asarray(value), dtype=dtype or torch.float64, device=self.dev)
        return cache[ck]


def all_ok(bsz: int, dev):
    """(ok (B,) bool all True, reasons [None] * B): the result of a batch where no image can fail."""
    import torch

    return torch.ones(bsz, dtype=torch.bool, device=dev), [None] * bsz


# ----------------------------------------------------------------------------- the strategy
class Family:
    """One family of stain methods (macenko, reinhard, vahadane, augment): fit format, statistics, transforms.

    An instance holds a method's validated `options` and flags (`bright`: brightness standardization first;
    `mask`: background pixels left untouched). The target arrays `tgt` (from `target(fit)`) and the context
    `ctx` ({'stats': source statistics} plus `context_maps(...)`, or None) belong to the `StainNormalizer` and
    are passed in. Statistics and NumPy transforms raise `np_ops.Degenerate` for images that cannot be fitted.
    """

    #: keys of this family's fit dict (see `canonical_fit`)
    fit_keys: ClassVar[tuple[str, ...]]

    def __init__(self, options: dict, bright: bool, mask: bool):
        self.options = options
        self.bright = bright
        self.mask = mask

    @property
    def min_tissue_pixels(self) -> int:
        """Fewest tissue pixels an image needs to be fitted."""
        return self.options["min_tissue_pixels"]

    def target(self, fit: dict) -> dict[str, np.ndarray]:
        """float64 arrays of a canonical fit, plus 'he' (3x2, columns H, E) when it has a stain matrix."""
        tgt = {k: np.asarray(v, dtype=np.float64) for k, v in fit.items()}
        if "stain_matrix" in tgt:
            tgt["he"] = tgt["stain_matrix"].T.copy()
        return tgt

    def bright_p(self, img: np.ndarray) -> int | None:
        """Brightness percentile value (0-255) of an image when the method standardizes brightness, else None."""
        return np_ops.brightness_value(img, self.options["brightness_percentile"]) if self.bright else None

    def bright_batch(self, xf, integer: bool, p_ctx: int | None):
        """(B,3,N) float32 pixels brightness-standardized (to the context's percentile value when given)."""
        if not self.bright:
            return xf
        import torch

        from histolight.norm import torch_ops as T

        bsz, dev = xf.shape[0], xf.device
        if p_ctx is not None:
            p = [p_ctx] * bsz if integer else torch.full((bsz,), float(p_ctx), device=dev)
        else:
            p = T.brightness_values(xf.to(torch.uint8) if integer else xf, self.options["brightness_percentile"])
        return T.apply_brightness(integer, xf, p)

    def image_stats(self, img: np.ndarray, context: bool) -> dict:
        """Statistics of one image (target fit, or source context: then tissue-only percentiles/means)."""
        raise NotImplementedError

    def average_fit(self, stats: list[dict]) -> dict:
        """Fit dict from the `image_stats` of one or more target images."""
        raise NotImplementedError

    def context_maps(self, stats: dict, tgt: dict) -> dict:
        """Per-pixel maps precomputed from context statistics and the target (merged into the context)."""
        return {}

    def batch_params(self, bsz: int, params) -> np.ndarray | None:
        """Per-image random parameters of a batch of `bsz` images (None: the family has none)."""
        return None

    def transform(self, img: np.ndarray, tgt: dict, ctx: dict | None) -> np.ndarray:
        """One HxWx3 uint8 RGB image -> a new HxWx3 uint8 RGB image."""
        raise NotImplementedError

    def transform_batch(self, xf, integer: bool, params, tgt: dict, ctx: dict | None, tensors: DeviceTensors):
        """(out (B,3,N) float in [0,255], ok (B,) bool, reasons) for float32 pixels xf (B,3,N) in [0,255].

        integer: the caller's tensor was uint8 (values are integers); params: this chunk's `batch_params`;
        tgt, ctx: as for `transform`; tensors: their torch copies on xf's device.
        """
        raise NotImplementedError
