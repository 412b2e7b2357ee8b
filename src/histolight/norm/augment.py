"""Stain augmentation (method `augment`): random H&E concentration scale/shift in OD, then HSV jitter.

Fit: `stain_matrix` 2x3 (rows H, E of OD R, G, B), the basis of the decomposition. Parameters per image are
7 floats [alpha_H, alpha_E, beta_H, beta_E, hue_shift (fraction of circle), sat_scale, value_scale].
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from histolight.norm import np_ops
from histolight.norm.family import DeviceTensors, Family, all_ok, average_stain_fit, cached_od_lut
from histolight.norm.macenko import macenko_stats

#: Macenko settings used to estimate the stain basis of `augment` (it has no such options).
AUG_MACENKO = {"alpha": 1.0, "beta": 0.15, "min_tissue_pixels": 256}


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


class Augment(Family):
    """Random stain augmentation on the target's (or the context's) H&E basis; draws from `rng` (seeded by `seed`)."""

    fit_keys = ("stain_matrix",)

    def __init__(self, options: dict, bright: bool, mask: bool):
        super().__init__(options, bright, mask)
        self.rng = np.random.default_rng(options["seed"])

    @property
    def min_tissue_pixels(self) -> int:
        return AUG_MACENKO["min_tissue_pixels"]

    def image_stats(self, img: np.ndarray, context: bool) -> dict:
        return macenko_stats(img, {**AUG_MACENKO, "io": self.options["io"]}, None, context)

    def average_fit(self, stats: list[dict]) -> dict:
        return average_stain_fit(stats, max_conc=False)

    def context_maps(self, stats: dict, tgt: dict) -> dict:
        return {"basis3": np_ops.stain_basis3(stats["he"])}

    def basis3(self, tgt: dict, ctx: dict | None) -> np.ndarray:
        """3x3 float64 [h, e, h x e] of the context, else of the target (cached in `tgt`)."""
        if ctx is not None:
            return ctx["basis3"]
        if "basis3" not in tgt:
            tgt["basis3"] = np_ops.stain_basis3(tgt["he"])
        return tgt["basis3"]

    def sample_params(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """(n,7) float64 random parameters drawn from `rng` (default: this family's generator)."""
        return sample_augment_params(n, self.rng if rng is None else rng, self.options)

    def apply(self, img: np.ndarray, params, tgt: dict, ctx: dict | None) -> np.ndarray:
        """HxWx3 uint8 RGB image augmented with explicit `params` (7 floats) -> new HxWx3 uint8 RGB image."""
        img = np_ops.check_rgb_u8(img)
        params = np.asarray(params, dtype=np.float64)
        a, off = np_ops.augment_map(self.basis3(tgt, ctx), params)
        od = np_ops.to_od(img, cached_od_lut(self.options["io"]))
        if params[4] != 0 or params[5] != 1 or params[6] != 1:
            out = np_ops.log_map_float(od, a, self.options["io"], off)
            return np_ops.hsv_jitter(out, params[4], params[5], params[6])
        return np_ops.log_map(od, a, self.options["io"], off)

    def transform(self, img: np.ndarray, tgt: dict, ctx: dict | None) -> np.ndarray:
        return self.apply(img, self.sample_params(1)[0], tgt, ctx)

    def batch_params(self, bsz: int, params) -> np.ndarray:
        """`params` (B,7) as float64, or B fresh draws when None."""
        prm = self.sample_params(bsz) if params is None else np.asarray(params, dtype=np.float64)
        if prm.shape != (bsz, 7):
            raise ValueError(f"params must have shape ({bsz}, 7), got {prm.shape}")
        return prm

    def transform_batch(self, xf, integer: bool, params, tgt: dict, ctx: dict | None, tensors: DeviceTensors):
        import torch

        from histolight.norm import torch_ops as T

        o = self.options
        prm, dev = params, xf.device
        ok, reasons = all_ok(xf.shape[0], dev)
        maps = [np_ops.augment_map(self.basis3(tgt, ctx), p) for p in prm]
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
