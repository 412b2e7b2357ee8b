"""`StainNormalizer`: fit to a target, transform HxWx3 uint8 images (NumPy) or (B,3,H,W) tensors (torch)."""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from histolight.errors import ConfigError
from histolight.norm import np_ops
from histolight.norm._presets import preset_fit
from histolight.norm._spec import COMMON_KEYS, DEFAULT_PRESET, METHODS, check_method, validate_options
from histolight.norm.np_ops import Degenerate

# Macenko settings used to estimate the stain basis of `augment` (it has no such options).
_AUG_MACENKO = {"alpha": 1.0, "beta": 0.15, "min_tissue_pixels": 256}


_CPU_CHUNK = 4  # images per chunk when transform_batch runs on CPU
_LIN_LUT = np_ops.linear_lut()
_LIN_LUT.flags.writeable = False


@functools.lru_cache(maxsize=8)
def _OD_LUT(io: float) -> np.ndarray:
    lut = np_ops.od_lut(io)
    lut.flags.writeable = False
    return lut


def _lin_lut(factor) -> np.ndarray:
    return _LIN_LUT if factor is None else np_ops.linear_lut(factor)


class NormalizerWarning(UserWarning):
    """A tile was passed through unchanged (too little tissue / degenerate colours)."""


def available_methods() -> tuple[str, ...]:
    """Names accepted by `StainNormalizer` / `build_normalizer` (besides 'none')."""
    return tuple(METHODS)


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


_FIT_KEYS = {
    "macenko": ("stain_matrix", "max_conc"),
    "vahadane": ("stain_matrix", "max_conc"),
    "reinhard": ("means", "stds"),
    "augment": ("stain_matrix",),
}


def _canonical_fit(family: str, fit: Any) -> dict:
    """Validate a fit dict; return it with plain Python floats (JSON-able, exact)."""
    if not isinstance(fit, Mapping):
        raise ConfigError(f"normalizer 'fit'={fit!r} is invalid: expected a mapping with keys {_FIT_KEYS[family]}")
    keys = _FIT_KEYS[family]
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


def _as_rgb_u8(img) -> np.ndarray:
    """HxWx3 uint8 numpy from a numpy array or a (3,H,W) uint8 torch tensor."""
    if type(img).__module__.startswith("torch"):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3,H,W) tensor, got shape {tuple(img.shape)}")
        img = img.detach().permute(1, 2, 0).cpu().numpy()
    return np_ops.check_rgb_u8(img)


# ----------------------------------------------------------------------------- the class
class StainNormalizer:
    """Stain normalizer built by method name.

    Args:
        method: one of `available_methods()`.
        preset: shipped preset name for the target fit (default 'v1' when no fit/fit_path).
        fit: a fit dict as in `to_config()['fit']` (takes precedence over fit_path and preset).
        fit_path: JSON file holding a fit dict or a `to_config()` dict.
        context: config flag telling callers to `set_context(slide thumbnail)` per slide.
        **options: method options (see `histolight.norm._spec.option_spec(method)`).

    Images are RGB: `transform` takes HxWx3 uint8 numpy; `transform_batch` takes (B,3,H,W)
    uint8 or float ([0,255]) torch tensors on any device. Fits, presets and contexts are
    statistics of the *target* (fit) and of the *source* (context, else each tile).
    """

    def __init__(
        self,
        method: str,
        preset: str | None = None,
        fit: Mapping | None = None,
        fit_path: str | None = None,
        context: bool = False,
        **options,
    ):
        self.method = check_method(method)
        self.family, self._bright, self._mask = METHODS[self.method]
        self.options = validate_options(self.method, options)
        if not isinstance(context, bool):
            raise ConfigError(f"normalizer 'context'={context!r} is invalid: allowed true or false")
        self.use_context = context
        if preset is not None and not isinstance(preset, str):
            raise ConfigError(f"normalizer 'preset'={preset!r} is invalid: expected a preset name or null")
        if fit_path is not None and not isinstance(fit_path, (str, Path)):
            raise ConfigError(f"normalizer 'fit_path'={fit_path!r} is invalid: expected a path or null")
        self.preset: str | None = None
        self.fit_path = None if fit_path is None else str(fit_path)
        self._fit: dict = {}
        self._ctx: dict | None = None
        self._torch_cache: dict = {}
        seed = self.options.get("seed")
        self._rng = np.random.default_rng(seed)
        self.reset_stats()
        if fit is not None:
            self.set_fit(fit)
            self.preset = preset
        elif fit_path is not None:
            self._load_fit_path(fit_path)
        else:
            self.fit_preset(preset or DEFAULT_PRESET)

    # ------------------------------------------------------------------ fit / config
    @property
    def fit_params(self) -> dict:
        """Copy of the target fit (JSON-able)."""
        return copy.deepcopy(self._fit)

    def set_fit(self, fit: Mapping) -> StainNormalizer:
        """Use a fit dict (validated) as the target."""
        self._fit = _canonical_fit(self.family, fit)
        self._torch_cache = {}
        self._tgt = {k: np.asarray(v, dtype=np.float64) for k, v in self._fit.items()}
        if "stain_matrix" in self._tgt:
            self._tgt["he"] = self._tgt["stain_matrix"].T.copy()
        self.preset = None
        self._refresh_context()
        return self

    def fit_preset(self, name: str) -> StainNormalizer:
        """Fit to a shipped preset (see `available_presets()`)."""
        self.set_fit(preset_fit(name, self.method))
        self.preset = name
        return self

    def _load_fit_path(self, path) -> None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"normalizer 'fit_path'={str(path)!r} is invalid: no such file")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"normalizer 'fit_path'={str(path)!r} is invalid: not readable JSON ({e})") from None
        if isinstance(doc, Mapping) and "fit" in doc:
            m = doc.get("method", self.method)
            if m != self.method:
                raise ConfigError(f"normalizer 'fit_path'={str(path)!r} holds a fit for method {m!r}, not {self.method!r}")
            doc = doc["fit"]
        self.set_fit(doc)
        self.fit_path = str(path)

    def fit(self, images) -> StainNormalizer:
        """Fit the target to one HxWx3 uint8 RGB image or a list of them (fits averaged).

        Raises ValueError if the image (or every image of the list) has too little tissue
        or no colour variation; degenerate members of a list are skipped with a warning.
        """
        single = isinstance(images, np.ndarray) or (
            type(images).__module__.startswith("torch") and getattr(images, "ndim", 0) == 3
        )
        imgs = [images] if single else list(images)
        if not imgs:
            raise ValueError(f"cannot fit '{self.method}': empty list of images")
        stats, skipped = [], []
        for i, im in enumerate(imgs):
            try:
                stats.append(self._image_stats(_as_rgb_u8(im), context=False))
            except Degenerate as e:
                skipped.append(f"#{i}: {e}")
        if not stats or (single and skipped):
            raise ValueError(
                f"cannot fit stain normalizer '{self.method}' to this target: "
                f"{'; '.join(skipped)} (need at least {self._min_px()} tissue pixels "
                "and more than one colour)"
            )
        if skipped:
            warnings.warn(
                f"fit '{self.method}': skipped {len(skipped)} of {len(imgs)} images ({'; '.join(skipped)})",
                NormalizerWarning,
                stacklevel=2,
            )
        self.set_fit(self._average_fit(stats))
        return self

    def _min_px(self) -> int:
        return self.options.get("min_tissue_pixels", _AUG_MACENKO["min_tissue_pixels"])

    def _average_fit(self, stats: list[dict]) -> dict:
        if self.family == "reinhard":
            return {
                "means": np.mean([s["mean"] for s in stats], 0).tolist(),
                "stds": np.mean([s["std"] for s in stats], 0).tolist(),
            }
        he = np.mean([s["he"] for s in stats], 0)
        he = he / np.linalg.norm(he, axis=0, keepdims=True)
        fit = {"stain_matrix": he.T.tolist()}
        if self.family != "augment":
            fit["max_conc"] = np.mean([s["mc"] for s in stats], 0).tolist()
        return fit

    def to_config(self) -> dict:
        """JSON-able dict (method, fit, options) that `build_normalizer` rebuilds exactly."""
        cfg = {"method": self.method, "preset": self.preset, "fit": self.fit_params, "context": self.use_context}
        cfg.update(copy.deepcopy(self.options))
        return cfg

    def save(self, path) -> None:
        """Write `to_config()` as JSON (usable as `fit_path`)."""
        Path(path).write_text(json.dumps(self.to_config(), indent=2) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        ctx = ", context set" if self._ctx is not None else ""
        src = f"preset={self.preset!r}" if self.preset else "custom fit"
        return f"StainNormalizer({self.method!r}, {src}{ctx})"

    def __getstate__(self):
        st = self.__dict__.copy()
        st["_torch_cache"] = {}
        return st

    # ------------------------------------------------------------------ statistics
    def _bright_p(self, img: np.ndarray) -> int | None:
        return np_ops.brightness_value(img, self.options["brightness_percentile"]) if self._bright else None

    def _image_stats(self, img: np.ndarray, context: bool) -> dict:
        """Source/target statistics of one image (context: tissue-only percentiles/means)."""
        o = self.options
        fam = self.family
        if fam == "reinhard":
            p = self._bright_p(img)
            fac = None if p is None else np_ops.brightness_factor(p)
            work = img if fac is None else cv2.convertScaleAbs(img, alpha=float(fac))
            m8 = np_ops.luma_tissue_mask(work, o["mask_threshold"])
            n = cv2.countNonZero(m8)
            if n < o["min_tissue_pixels"]:
                raise Degenerate("too_few_tissue_pixels", f"{n} < {o['min_tissue_pixels']}")
            lab = np_ops.f_to_lab(np_ops.lab_f(img, _lin_lut(fac)))
            mean, std = np_ops.reinhard_stats_lab(lab, m8 if (self._mask or context) else None)
            return {"mean": mean, "std": std, "bright": p}
        if fam in ("macenko", "augment"):
            mo = o if fam == "macenko" else {**_AUG_MACENKO, "io": o["io"]}
            p = self._bright_p(img) if fam == "macenko" else None
            lut = np_ops.od_lut(mo["io"], None if p is None else np_ops.brightness_factor(p))
            od = np_ops.to_od(img, lut)
            m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, mo["beta"]))
            he, mc = np_ops.macenko_stats_od(od, m8, mo["alpha"], mo["min_tissue_pixels"], context)
            return {"he": he, "mc": mc, "bright": p}
        lut = np_ops.od_lut(o["io"])
        od = np_ops.to_od(img, lut)
        m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, o["beta"]))
        he, mc = np_ops.vahadane_stats_od(od, m8, o, context)
        return {"he": he, "mc": mc, "bright": None}

    # ------------------------------------------------------------------ context
    @property
    def context_params(self) -> dict | None:
        """Source statistics from `set_context` (JSON-able) or None."""
        if self._ctx is None:
            return None
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self._ctx["stats"].items()}

    def set_context(self, image) -> StainNormalizer:
        """Fit the *source* statistics once on a larger context (e.g. the slide thumbnail, HxWx3
        uint8 RGB) and use them for every tile until cleared with `set_context(None)`.

        Context statistics use tissue pixels only (thumbnails are mostly background); the
        brightness percentile uses all pixels. Raises ValueError if the context is degenerate.
        """
        self._torch_cache.pop("ctx", None)
        if image is None:
            self._ctx = None
            return self
        img = _as_rgb_u8(image)
        try:
            stats = self._image_stats(img, context=True)
        except Degenerate as e:
            raise ValueError(f"cannot use this context for '{self.method}': {e}") from None
        self._ctx = {"stats": stats}
        self._refresh_context()
        return self

    def _refresh_context(self) -> None:
        """Precompute per-pixel maps from the context stats and the current target."""
        self._torch_cache.pop("ctx", None)
        if self._ctx is None:
            return
        s, t, o = self._ctx["stats"], self._tgt, self.options
        fam = self.family
        if fam == "macenko":
            fac = None if s["bright"] is None else np_ops.brightness_factor(s["bright"])
            self._ctx["lut"] = np_ops.od_lut(o["io"], fac)
            self._ctx["map"] = np_ops.macenko_map(s["he"], s["mc"], t["he"], t["max_conc"])
        elif fam == "augment":
            self._ctx["basis3"] = np_ops.stain_basis3(s["he"])
        elif fam == "reinhard":
            self._ctx["fmap"] = np_ops.reinhard_map(s["mean"], s["std"], t["means"], t["stds"]).astype(np.float32)

    def _aug_basis3(self) -> np.ndarray:
        if self._ctx is not None:
            return self._ctx["basis3"]
        if "basis3" not in self._tgt:
            self._tgt["basis3"] = np_ops.stain_basis3(self._tgt["he"])
        return self._tgt["basis3"]

    # ------------------------------------------------------------------ passthrough stats
    def reset_stats(self) -> dict:
        """Zero the counters (e.g. per slide); return the previous ones."""
        old = getattr(self, "stats", None)
        self.stats = {"transformed": 0, "passthrough": 0, "reasons": {}}
        self._warned = False
        return old

    def _count(self, n_ok: int, reasons: list[str]) -> None:
        self.stats["transformed"] += n_ok
        for r in reasons:
            self.stats["passthrough"] += 1
            self.stats["reasons"][r] = self.stats["reasons"].get(r, 0) + 1
        if reasons and not self._warned:
            self._warned = True
            warnings.warn(
                f"stain normalizer '{self.method}': image passed through unchanged ({reasons[0]}); "
                "further passthroughs are only counted in .stats until reset_stats()",
                NormalizerWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ numpy transform
    def __call__(self, img: np.ndarray) -> np.ndarray:
        return self.transform(img)

    def transform(self, img: np.ndarray) -> np.ndarray:
        """Normalize one HxWx3 uint8 RGB image; returns a new HxWx3 uint8 RGB image.

        Images that cannot be fitted (per-tile statistics, no context) are returned unchanged
        and counted in `stats['passthrough']` (one NormalizerWarning per `reset_stats`).
        """
        img = np_ops.check_rgb_u8(img)
        if self.family == "augment":
            out = self.augment(img, self.sample_params(1)[0])
            self._count(1, [])
            return out
        try:
            out = self._transform_np(img)
        except Degenerate as e:
            self._count(0, [e.reason])
            return img.copy()
        self._count(1, [])
        return out

    def _transform_np(self, img: np.ndarray) -> np.ndarray:
        o, t, ctx = self.options, self._tgt, self._ctx
        fam = self.family
        if fam == "macenko":
            if ctx is not None:
                return np_ops.log_map(np_ops.to_od(img, ctx["lut"]), ctx["map"], o["io"])
            p = self._bright_p(img)
            lut = _OD_LUT(o["io"]) if p is None else np_ops.od_lut(o["io"], np_ops.brightness_factor(p))
            od = np_ops.to_od(img, lut)
            m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, o["beta"]))
            he, mc = np_ops.macenko_stats_od(od, m8, o["alpha"], o["min_tissue_pixels"])
            return np_ops.log_map(od, np_ops.macenko_map(he, mc, t["he"], t["max_conc"]), o["io"])
        if fam == "reinhard":
            s = None if ctx is None else ctx["stats"]
            p = self._bright_p(img) if s is None else s["bright"]
            fac = None if p is None else np_ops.brightness_factor(p)
            m8 = None
            if self._mask or s is None:
                work = img if fac is None else cv2.convertScaleAbs(img, alpha=float(fac))
                m8 = np_ops.luma_tissue_mask(work, o["mask_threshold"])
            if s is None:
                n = cv2.countNonZero(m8)
                if n < o["min_tissue_pixels"]:
                    raise Degenerate("too_few_tissue_pixels", f"{n} < {o['min_tissue_pixels']}")
            f = np_ops.lab_f(img, _lin_lut(fac))
            if s is None:
                mean, std = np_ops.reinhard_stats_lab(np_ops.f_to_lab(f), m8 if self._mask else None)
                fmap = np_ops.reinhard_map(mean, std, t["means"], t["stds"]).astype(np.float32)
            else:
                fmap = ctx["fmap"]
            out = np_ops.f_to_rgb_u8(cv2.transform(f, fmap, dst=np_ops.ws("fp", f.shape)))
            if self._mask:
                cv2.copyTo(img, cv2.bitwise_not(m8), out)
            return out
        # vahadane
        lut = _OD_LUT(o["io"])
        od = np_ops.to_od(img, lut)
        if ctx is None:
            m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, o["beta"]))
            return np_ops.vahadane_tile(od, m8, o, t["he"], t["max_conc"])
        s = ctx["stats"]
        return np_ops.vahadane_apply_od(od, s["he"], s["mc"], t["he"], t["max_conc"], o["lambda_code"], o["io"])

    # ------------------------------------------------------------------ augmentation
    def sample_params(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n,7) float64 random augmentation parameters
        [alpha_H, alpha_E, beta_H, beta_E, hue_shift (fraction of circle), sat_scale, value_scale]."""
        if self.family != "augment":
            raise ValueError(f"sample_params is only for method 'augment', not {self.method!r}")
        rng = self._rng if rng is None else rng
        return sample_augment_params(n, rng, self.options)

    def augment(self, img: np.ndarray, params) -> np.ndarray:
        """Apply stain + HSV augmentation with explicit `params` (7 floats, see sample_params)."""
        img = np_ops.check_rgb_u8(img)
        params = np.asarray(params, dtype=np.float64)
        a, off = np_ops.augment_map(self._aug_basis3(), params)
        od = np_ops.to_od(img, _OD_LUT(self.options["io"]))
        if params[4] != 0 or params[5] != 1 or params[6] != 1:
            out = np_ops.log_map_float(od, a, self.options["io"], off)
            return np_ops.hsv_jitter(out, params[4], params[5], params[6])
        return np_ops.log_map(od, a, self.options["io"], off)

    # ------------------------------------------------------------------ torch transform
    def transform_batch(self, x, params=None):
        """Normalize a (B,3,H,W) uint8 or float ([0,255]) torch tensor on its own device.

        Returns the same dtype/device/shape. Per-image statistics are batched; images that
        cannot be fitted are returned unchanged and counted in `stats`. For 'augment',
        `params` (B,7) may be given, else they are drawn like `sample_params(B)`.
        """
        import torch

        from histolight.norm import torch_ops as T

        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B,3,H,W) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"expected uint8 or float tensor, got {x.dtype}")
        bsz, _, h, w = x.shape
        if bsz == 0:
            return x.clone()
        integer = x.dtype == torch.uint8
        prm = None
        if self.family == "augment":
            prm = self.sample_params(bsz) if params is None else np.asarray(params, dtype=np.float64)
            if prm.shape != (bsz, 7):
                raise ValueError(f"params must have shape ({bsz}, 7), got {prm.shape}")
        # on CPU, chunks of a few images keep temporaries in cache (and avoid page-faulting
        # huge fresh buffers); on GPU the whole batch goes at once
        step = _CPU_CHUNK if x.device.type == "cpu" else bsz
        outs, oks, reasons = [], [], []
        with torch.no_grad():
            for i in range(0, bsz, step):
                xf = x[i : i + step].reshape(-1, 3, h * w).float()
                if not integer:
                    xf = torch.clamp(xf, 0, 255)
                out, ok, rs = self._batch(xf, integer, None if prm is None else prm[i : i + step], T)
                if not bool(ok.all()):
                    out = torch.where(ok[:, None, None], out, xf)
                outs.append(torch.round_(out).to(torch.uint8) if integer else out.to(x.dtype))
                oks.append(ok)
                reasons += rs
        ok = torch.cat(oks)
        self._count(int(ok.sum()), [r or "degenerate" for r, k in zip(reasons, ok.tolist()) if not k])
        return torch.cat(outs).reshape(bsz, 3, h, w)

    def _batch(self, xf, integer: bool, params, T):
        """(out (B,3,N) float in [0,255], ok (B,) bool, reasons) for float32 pixels xf."""
        import torch

        bsz, dev = xf.shape[0], xf.device
        o, ctx = self.options, self._ctx
        ok = torch.ones(bsz, dtype=torch.bool, device=dev)
        reasons: list = [None] * bsz
        fam = self.family

        def bright(p_ctx):
            if not self._bright:
                return xf
            if p_ctx is not None:
                p = [p_ctx] * bsz if integer else torch.full((bsz,), float(p_ctx), device=dev)
            else:
                p = T.brightness_values(xf.to(torch.uint8) if integer else xf, o["brightness_percentile"])
            return T.apply_brightness(integer, xf, p)

        if fam == "macenko":
            xb = bright(None if ctx is None else ctx["stats"]["bright"])
            lg = T.log1(xb)
            if ctx is not None:
                a = self._ctx_tensor("map", ctx["map"], dev).expand(bsz, 3, 3)
            else:
                od = math.log(o["io"]) - lg
                mask = T.od_tissue(integer, xb, od, o["io"], o["beta"])
                he, mc, ok, reasons = T.macenko_stats(od, mask, o["alpha"], o["min_tissue_pixels"])
                a = T.macenko_map(he, mc, self._tgt_tensor("he", dev), self._tgt_tensor("max_conc", dev))
            return T.log_map(lg, a, o["io"]), ok, reasons
        if fam == "reinhard":
            s = None if ctx is None else ctx["stats"]
            xb = bright(None if s is None else s["bright"])
            tissue = T.luma_tissue(xb, o["mask_threshold"]) if (self._mask or s is None) else None
            f = T.lab_f(integer, xb)
            if s is None:
                few = tissue.sum(1) < o["min_tissue_pixels"]
                mean, std = T.masked_mean_std(T.f_to_lab(f), tissue if self._mask else None)
                novar = ~(torch.isfinite(std).all(1) & (std >= 1e-4).all(1))
                for b, (fw, nv) in enumerate(zip(few.tolist(), novar.tolist())):
                    reasons[b] = "too_few_tissue_pixels" if fw else ("no_colour_variation" if nv else None)
                ok = ~(few | novar)
                std = torch.where(ok[:, None], std, torch.ones_like(std))
                fmap = T.reinhard_map(mean, std, self._tgt_tensor("means", dev), self._tgt_tensor("stds", dev))
                fmap = fmap.float()
            else:
                fmap = self._ctx_tensor("fmap", ctx["fmap"], dev, torch.float32)[None].expand(bsz, 3, 4)
            out = T.f_to_rgb(torch.baddbmm(fmap[:, :, 3:], fmap[:, :, :3], f))
            if self._mask:  # background pixels untouched: out = xf + (out - xf) * tissue
                out = out.sub_(xf).mul_(tissue[:, None].to(out.dtype)).add_(xf)
            return out, ok, reasons
        if fam == "vahadane":
            od = math.log(o["io"]) - T.log1(xf)
            if ctx is not None:
                he = self._ctx_tensor("he", ctx["stats"]["he"], dev, torch.float64)[None].expand(bsz, 3, 2)
                mc = self._ctx_tensor("mc", ctx["stats"]["mc"], dev, torch.float64)[None].expand(bsz, 2)
                a1, a2 = T.vahadane_codes(od, he.transpose(1, 2), o["lambda_code"])
            else:
                mask = T.od_tissue(integer, xf, od, o["io"], o["beta"])
                he, mc, ok, reasons, (a1, a2) = T.vahadane_stats(od, mask, o)
            scale = torch.nan_to_num(self._tgt_tensor("max_conc", dev)[None] / mc, nan=1.0, posinf=1.0)
            a = self._tgt_tensor("he", dev)[None] * scale[:, None, :]
            return T.codes_map(torch.stack([a1, a2], 1), a, o["io"]), ok, reasons
        # augment (params drawn by transform_batch)
        prm = params
        maps = [np_ops.augment_map(self._aug_basis3(), p) for p in prm]
        a = torch.as_tensor(np.stack([m[0] for m in maps]), dtype=torch.float64, device=dev)
        off = torch.as_tensor(np.stack([m[1] for m in maps]), dtype=torch.float64, device=dev)
        out = T.log_map(T.log1(xf), a, o["io"], off)
        hsv_on = (prm[:, 4] != 0) | (prm[:, 5] != 1) | (prm[:, 6] != 1)
        if hsv_on.any():
            hsv = T.rgb_to_hsv(out / 255.0)
            pt = torch.as_tensor(prm, dtype=torch.float32, device=dev)
            hoff = torch.tensor([np_ops.hue_offset(v) for v in prm[:, 4]], dtype=torch.float32, device=dev)
            hue = hsv[:, 0] + hoff[:, None]
            hue = torch.where(hue >= 360.0, hue - 360.0, hue)
            hsv = torch.stack([hue, torch.clamp(hsv[:, 1] * pt[:, 5:6], 0, 1), hsv[:, 2] * pt[:, 6:7]], 1)
            jit = torch.clamp(T.hsv_to_rgb(hsv) * 255.0, 0, 255)
            out = torch.where(torch.as_tensor(hsv_on, device=dev)[:, None, None], jit, out)
        return out, ok, reasons

    def _tgt_tensor(self, key, dev, dtype=None):
        import torch

        ck = ("tgt", key, str(dev))
        if ck not in self._torch_cache:
            self._torch_cache[ck] = torch.as_tensor(self._tgt[key], dtype=dtype or torch.float64, device=dev)
        return self._torch_cache[ck]

    def _ctx_tensor(self, key, value, dev, dtype=None):
        import torch

        cache = self._torch_cache.setdefault("ctx", {})
        ck = (key, str(dev))
        if ck not in cache:
            cache[ck] = torch.as_tensor(np.asarray(value), dtype=dtype or torch.float64, device=dev)
        return cache[ck]


def sample_augment_params(n: int, rng: np.random.Generator, options: Mapping) -> np.ndarray:
    """(n,7) float64 uniform draws: alpha_H, alpha_E in 1 +- stain_alpha; beta_H, beta_E in
    +- stain_beta (OD); hue shift in +- hue (fraction of circle); saturation/value scales in 1 +- s/v."""
    lo = np.array(
        [1 - options["stain_alpha"]] * 2
        + [-options["stain_beta"]] * 2
        + [-options["hue"], 1 - options["saturation"], 1 - options["value"]]
    )
    hi = np.array(
        [1 + options["stain_alpha"]] * 2
        + [options["stain_beta"]] * 2
        + [options["hue"], 1 + options["saturation"], 1 + options["value"]]
    )
    u = rng.random((n, 7))
    return lo + (hi - lo) * u


def build_normalizer(cfg) -> StainNormalizer | None:
    """StainNormalizer from a dict / DictConfig / method name (None or method 'none' -> None).

    Keys: method, preset, fit, fit_path, context and the method's options; unknown keys or
    values raise ConfigError (a ValueError) naming the key, the value and what is allowed.
    """
    if cfg is None:
        return None
    if isinstance(cfg, StainNormalizer):
        return cfg
    if isinstance(cfg, str):
        cfg = {"method": cfg}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"normalizer config {cfg!r} is invalid: expected a mapping with a 'method' key, or null")
    cfg = dict(cfg)
    if "method" not in cfg:
        raise ConfigError(f"normalizer config {cfg!r} lacks 'method': allowed {['none', *METHODS]}")
    method = cfg.pop("method")
    if method is None or method == "none":
        extra = [k for k in cfg if k not in COMMON_KEYS]
        if extra:
            raise ConfigError(
                f"normalizer key '{extra[0]}'={cfg[extra[0]]!r} is not valid for method 'none': allowed {list(COMMON_KEYS)}"
            )
        return None
    check_method(method)
    return StainNormalizer(method, **cfg)


__all__ = ["StainNormalizer", "build_normalizer", "available_methods", "NormalizerWarning", "sample_augment_params"]
