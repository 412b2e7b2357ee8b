"""Reinhard stain normalization (methods `reinhard`, `reinhard_fast`, `reinhard_mask`, `reinhard_fast_mask`).

Fit: `means`, `stds` of CIELAB (L 0..100, a, b) over the target's pixels (tissue pixels for the `_mask`
methods and for contexts). Each LAB channel is mapped by (x - mu_s) * sd_t / sd_s + mu_t, done as one 3x4 map
on the CIELAB non-linearity f; the `_mask` methods leave background (luma >= mask_threshold) untouched.
"""

from __future__ import annotations

import cv2
import numpy as np

from histolight.norm import np_ops
from histolight.norm.family import DeviceTensors, Family, all_ok
from histolight.norm.np_ops import Degenerate

_LIN_LUT = np_ops.linear_lut()
_LIN_LUT.flags.writeable = False


def _lin_lut(factor) -> np.ndarray:
    """uint8 -> linear RGB table (float32, 256), after brightness scaling by `factor` unless None."""
    return _LIN_LUT if factor is None else np_ops.linear_lut(factor)


class Reinhard(Family):
    """Reinhard et al. 2001 colour transfer in CIELAB, with optional brightness standardization and mask."""

    fit_keys = ("means", "stds")

    def image_stats(self, img: np.ndarray, context: bool) -> dict:
        o = self.options
        p = self.bright_p(img)
        fac = None if p is None else np_ops.brightness_factor(p)
        work = img if fac is None else cv2.convertScaleAbs(img, alpha=float(fac))
        m8 = np_ops.luma_tissue_mask(work, o["mask_threshold"])
        n = cv2.countNonZero(m8)
        if n < o["min_tissue_pixels"]:
            raise Degenerate("too_few_tissue_pixels", f"{n} < {o['min_tissue_pixels']}")
        lab = np_ops.f_to_lab(np_ops.lab_f(img, _lin_lut(fac)))
        mean, std = np_ops.reinhard_stats_lab(lab, m8 if (self.mask or context) else None)
        return {"mean": mean, "std": std, "bright": p}

    def average_fit(self, stats: list[dict]) -> dict:
        return {
            "means": np.mean([s["mean"] for s in stats], 0).tolist(),
            "stds": np.mean([s["std"] for s in stats], 0).tolist(),
        }

    def context_maps(self, stats: dict, tgt: dict) -> dict:
        return {"fmap": np_ops.reinhard_map(stats["mean"], stats["std"], tgt["means"], tgt["stds"]).astype(np.float32)}

    def transform(self, img: np.ndarray, tgt: dict, ctx: dict | None) -> np.ndarray:
        o = self.options
        s = None if ctx is None else ctx["stats"]
        p = self.bright_p(img) if s is None else s["bright"]
        fac = None if p is None else np_ops.brightness_factor(p)
        m8 = None
        if self.mask or s is None:
            work = img if fac is None else cv2.convertScaleAbs(img, alpha=float(fac))
            m8 = np_ops.luma_tissue_mask(work, o["mask_threshold"])
        if s is None:
            n = cv2.countNonZero(m8)
            if n < o["min_tissue_pixels"]:
                raise Degenerate("too_few_tissue_pixels", f"{n} < {o['min_tissue_pixels']}")
        f = np_ops.lab_f(img, _lin_lut(fac))
        if s is None:
            mean, std = np_ops.reinhard_stats_lab(np_ops.f_to_lab(f), m8 if self.mask else None)
            fmap = np_ops.reinhard_map(mean, std, tgt["means"], tgt["stds"]).astype(np.float32)
        else:
            fmap = ctx["fmap"]
        out = np_ops.f_to_rgb_u8(cv2.transform(f, fmap, dst=np_ops.ws("fp", f.shape)))
        if self.mask:
            cv2.copyTo(img, cv2.bitwise_not(m8), out)
        return out

    def transform_batch(self, xf, integer: bool, params, tgt: dict, ctx: dict | None, tensors: DeviceTensors):
        import torch

        from histolight.norm import torch_ops as T

        o = self.options
        bsz = xf.shape[0]
        ok, reasons = all_ok(bsz, xf.device)
        s = None if ctx is None else ctx["stats"]
        xb = self.bright_batch(xf, integer, None if s is None else s["bright"])
        tissue = T.luma_tissue(xb, o["mask_threshold"]) if (self.mask or s is None) else None
        f = T.lab_f(integer, xb)
        if s is None:
            few = tissue.sum(1) < o["min_tissue_pixels"]
            mean, std = T.masked_mean_std(T.f_to_lab(f), tissue if self.mask else None)
            novar = ~(torch.isfinite(std).all(1) & (std >= 1e-4).all(1))
            for b, (fw, nv) in enumerate(zip(few.tolist(), novar.tolist())):
                reasons[b] = "too_few_tissue_pixels" if fw else ("no_colour_variation" if nv else None)
            ok = ~(few | novar)
            std = torch.where(ok[:, None], std, torch.ones_like(std))
            fmap = T.reinhard_map(mean, std, tensors.target("means"), tensors.target("stds"))
            fmap = fmap.float()
        else:
            fmap = tensors.context("fmap", ctx["fmap"], torch.float32)[None].expand(bsz, 3, 4)
        out = T.f_to_rgb(torch.baddbmm(fmap[:, :, 3:], fmap[:, :, :3], f))
        if self.mask:  # background pixels untouched: out = xf + (out - xf) * tissue
            out = out.sub_(xf).mul_(tissue[:, None].to(out.dtype)).add_(xf)
        return out, ok, reasons
