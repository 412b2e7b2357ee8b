"""Vahadane stain normalization (method `vahadane`): sparse non-negative stain separation on OD.

Fit: `stain_matrix` 2x3 (rows H, E of OD R, G, B) and `max_conc` (99th-percentile H, E codes). Each source
pixel's non-negative lasso codes on the source dictionary are rescaled by maxC_t / maxC_s and rendered with the
target stain matrix.
"""

from __future__ import annotations

import math

import numpy as np

from histolight.norm import np_ops
from histolight.norm.family import DeviceTensors, Family, all_ok, average_stain_fit, cached_od_lut


class Vahadane(Family):
    """Vahadane et al. 2016 (sparse NMF dictionary, initialized with Macenko's stain vectors)."""

    fit_keys = ("stain_matrix", "max_conc")

    def image_stats(self, img: np.ndarray, context: bool) -> dict:
        o = self.options
        lut = np_ops.od_lut(o["io"])
        od = np_ops.to_od(img, lut)
        m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, o["beta"]))
        he, mc = np_ops.vahadane_stats_od(od, m8, o, context)
        return {"he": he, "mc": mc, "bright": None}

    def average_fit(self, stats: list[dict]) -> dict:
        return average_stain_fit(stats, max_conc=True)

    def transform(self, img: np.ndarray, tgt: dict, ctx: dict | None) -> np.ndarray:
        o = self.options
        lut = cached_od_lut(o["io"])
        od = np_ops.to_od(img, lut)
        if ctx is None:
            m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, o["beta"]))
            return np_ops.vahadane_tile(od, m8, o, tgt["he"], tgt["max_conc"])
        s = ctx["stats"]
        return np_ops.vahadane_apply_od(od, s["he"], s["mc"], tgt["he"], tgt["max_conc"], o["lambda_code"], o["io"])

    def transform_batch(self, xf, integer: bool, params, tgt: dict, ctx: dict | None, tensors: DeviceTensors):
        import torch

        from histolight.norm import torch_ops as T

        o = self.options
        bsz = xf.shape[0]
        ok, reasons = all_ok(bsz, xf.device)
        od = math.log(o["io"]) - T.log1(xf)
        if ctx is not None:
            he = tensors.context("he", ctx["stats"]["he"], torch.float64)[None].expand(bsz, 3, 2)
            mc = tensors.context("mc", ctx["stats"]["mc"], torch.float64)[None].expand(bsz, 2)
            a1, a2 = T.vahadane_codes(od, he.transpose(1, 2), o["lambda_code"])
        else:
            mask = T.od_tissue(integer, xf, od, o["io"], o["beta"])
            he, mc, ok, reasons, (a1, a2) = T.vahadane_stats(od, mask, o)
        scale = torch.nan_to_num(tensors.target("max_conc")[None] / mc, nan=1.0, posinf=1.0)
        a = tensors.target("he")[None] * scale[:, None, :]
        return T.codes_map(torch.stack([a1, a2], 1), a, o["io"]), ok, reasons
