"""`StainNormalizer`: fit to a target, transform HxWx3 uint8 images (NumPy) or (B,3,H,W) tensors (torch).

The facade owns the fit (target) and context (source) state, fit sources (preset, fit dict, fit_path), passthrough
statistics and config round trips; the per-family work (statistics, transforms) is a `Family` strategy:
`macenko`, `reinhard`, `vahadane`, `augment`.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from histolight.errors import ConfigError
from histolight.norm import np_ops
from histolight.norm.augment import Augment
from histolight.norm.family import DeviceTensors, Family, canonical_fit
from histolight.norm.macenko import Macenko
from histolight.norm.np_ops import Degenerate
from histolight.norm.options import COMMON_KEYS, DEFAULT_PRESET, METHODS, check_method, validate_options
from histolight.norm.presets import preset_fit
from histolight.norm.reinhard import Reinhard
from histolight.norm.vahadane import Vahadane

#: family name (see `options.METHODS`) -> its strategy
FAMILIES: dict[str, type[Family]] = {"macenko": Macenko, "reinhard": Reinhard, "vahadane": Vahadane, "augment": Augment}

_CPU_CHUNK = 4  # images per chunk when transform_batch runs on CPU


class NormalizerWarning(UserWarning):
    """A tile was passed through unchanged (too little tissue / degenerate colours)."""


def available_methods() -> tuple[str, ...]:
    """Names accepted by `StainNormalizer` / `build_normalizer` (besides 'none')."""
    return tuple(METHODS)


def _as_rgb_u8(img) -> np.ndarray:
    """HxWx3 uint8 numpy from a numpy array or a (3,H,W) uint8 torch tensor."""
    if type(img).__module__.startswith("torch"):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3,H,W) tensor, got shape {tuple(img.shape)}")
        img = img.detach().permute(1, 2, 0).cpu().numpy()
    return np_ops.check_rgb_u8(img)


class StainNormalizer:
    """Stain normalizer built by method name.

    Args:
        method: one of `available_methods()`.
        preset: shipped preset name for the target fit (default 'v1' when no fit/fit_path).
        fit: a fit dict as in `to_config()['fit']` (takes precedence over fit_path and preset).
        fit_path: JSON file holding a fit dict or a `to_config()` dict.
        context: config flag telling callers to `set_context(slide thumbnail)` per slide.
        **options: method options (see `histolight.norm.option_spec(method)`).

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
        self.family, bright, mask = METHODS[self.method]
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
        self._family: Family = FAMILIES[self.family](self.options, bright, mask)
        self._fit: dict = {}
        self._tgt: dict = {}
        self._ctx: dict | None = None
        self._torch_cache: dict = {}
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
        self._fit = canonical_fit(self._family.fit_keys, fit)
        self._torch_cache = {}
        self._tgt = self._family.target(self._fit)
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
                stats.append(self._family.image_stats(_as_rgb_u8(im), context=False))
            except Degenerate as e:
                skipped.append(f"#{i}: {e}")
        if not stats or (single and skipped):
            raise ValueError(
                f"cannot fit stain normalizer '{self.method}' to this target: "
                f"{'; '.join(skipped)} (need at least {self._family.min_tissue_pixels} tissue pixels "
                "and more than one colour)"
            )
        if skipped:
            warnings.warn(
                f"fit '{self.method}': skipped {len(skipped)} of {len(imgs)} images ({'; '.join(skipped)})",
                NormalizerWarning,
                stacklevel=2,
            )
        self.set_fit(self._family.average_fit(stats))
        return self

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
            stats = self._family.image_stats(img, context=True)
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
        self._ctx.update(self._family.context_maps(self._ctx["stats"], self._tgt))

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
        For 'augment', each call draws new parameters (see `sample_params`).
        """
        img = np_ops.check_rgb_u8(img)
        try:
            out = self._family.transform(img, self._tgt, self._ctx)
        except Degenerate as e:
            self._count(0, [e.reason])
            return img.copy()
        self._count(1, [])
        return out

    # ------------------------------------------------------------------ augmentation
    def _augment_family(self, what: str) -> Augment:
        if not isinstance(self._family, Augment):
            raise ValueError(f"{what} is only for method 'augment', not {self.method!r}")
        return self._family

    def sample_params(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n,7) float64 random augmentation parameters
        [alpha_H, alpha_E, beta_H, beta_E, hue_shift (fraction of circle), sat_scale, value_scale]."""
        return self._augment_family("sample_params").sample_params(n, rng)

    def augment(self, img: np.ndarray, params) -> np.ndarray:
        """Apply stain + HSV augmentation with explicit `params` (7 floats, see sample_params)."""
        return self._augment_family("augment").apply(img, params, self._tgt, self._ctx)

    # ------------------------------------------------------------------ torch transform
    def transform_batch(self, x, params=None):
        """Normalize a (B,3,H,W) uint8 or float ([0,255]) torch tensor on its own device.

        Returns the same dtype/device/shape. Per-image statistics are batched; images that
        cannot be fitted are returned unchanged and counted in `stats`. For 'augment',
        `params` (B,7) may be given, else they are drawn like `sample_params(B)`.
        """
        import torch

        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B,3,H,W) tensor, got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"expected uint8 or float tensor, got {x.dtype}")
        bsz, _, h, w = x.shape
        if bsz == 0:
            return x.clone()
        integer = x.dtype == torch.uint8
        prm = self._family.batch_params(bsz, params)
        tensors = DeviceTensors(self._torch_cache, self._tgt, x.device)
        # on CPU, chunks of a few images keep temporaries in cache (and avoid page-faulting
        # huge fresh buffers); on GPU the whole batch goes at once
        step = _CPU_CHUNK if x.device.type == "cpu" else bsz
        outs, oks, reasons = [], [], []
        with torch.no_grad():
            for i in range(0, bsz, step):
                xf = x[i : i + step].reshape(-1, 3, h * w).float()
                if not integer:
                    xf = torch.clamp(xf, 0, 255)
                chunk = None if prm is None else prm[i : i + step]
                out, ok, rs = self._family.transform_batch(xf, integer, chunk, self._tgt, self._ctx, tensors)
                if not bool(ok.all()):
                    out = torch.where(ok[:, None, None], out, xf)
                outs.append(torch.round_(out).to(torch.uint8) if integer else out.to(x.dtype))
                oks.append(ok)
                reasons += rs
        ok = torch.cat(oks)
        self._count(int(ok.sum()), [r or "degenerate" for r, k in zip(reasons, ok.tolist()) if not k])
        return torch.cat(outs).reshape(bsz, 3, h, w)


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


__all__ = ["StainNormalizer", "build_normalizer", "available_methods", "NormalizerWarning"]
