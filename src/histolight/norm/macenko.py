"""Macenko stain normalization (methods `macenko`, `macenko_fast`): OD stain matrix and max concentrations.

Fit: `stain_matrix` 2x3 (rows H, E of OD R, G, B) and `max_conc` (99th-percentile H, E concentrations).
A source image (or the context) is mapped in OD by HE_t diag(maxC_t / maxC_s) pinv(HE_s).
"""

from __future__ import annotations

import math

import numpy as np

from histolight.norm import np_ops
from histolight.norm.family import DeviceTensors, Family, all_ok, average_stain_fit, cached_od_lut


def macenko_stats(img: np.ndarray, opts: dict, p: int | None, context: bool) -> dict:
    """{'he': 3x2 stain matrix, 'mc': 2 max concentrations, 'bright': p} of an HxWx3 uint8 RGB image.

    opts: io, beta, alpha, min_tissue_pixels; p: brightness percentile value to standardize to (None: as is);
    context: max concentrations over tissue pixels only.
    """
    lut = np_ops.od_lut(opts["io"], None if p is None else np_ops.brightness_factor(p))
    od = np_ops.to_od(img, lut)
    m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, opts["beta"]))
    he, mc = np_ops.macenko_stats_od(od, m8, opts["alpha"], opts["min_tissue_pixels"], context)
    return {"he": he, "mc": mc, "bright": p}


class Macenko(Family):
    """Macenko et al. 2009 on optical density, with optional brightness standardization."""

    fit_keys = ("stain_matrix", "max_conc")

    def image_stats(self, img: np.ndarray, context: bool) -> dict:
        return macenko_stats(img, self.options, self.bright_p(img), context)

    def average_fit(self, stats: list[dict]) -> dict:
        return average_stain_fit(stats, max_conc=True)

    def context_maps(self, stats: dict, tgt: dict) -> dict:
        fac = None if stats["bright"] is None else np_ops.brightness_factor(stats["bright"])
        return {
            "lut": np_ops.od_lut(self.options["io"], fac),
            "map": np_ops.macenko_map(stats["he"], stats["mc"], tgt["he"], tgt["max_conc"]),
        }

    def transform(self, img: np.ndarray, tgt: dict, ctx: dict | None) -> np.ndarray:
        o = self.options
        if ctx is not None:
            return np_ops.log_map(np_ops.to_od(img, ctx["lut"]), ctx["map"], o["io"])
        p = self.bright_p(img)
        lut = cached_od_lut(o["io"]) if p is None else np_ops.od_lut(o["io"], np_ops.brightness_factor(p))
        od = np_ops.to_od(img, lut)
        m8 = np_ops.od_tissue_mask(img, np_ops.od_tissue_vmax(lut, o["beta"]))
        he, mc = np_ops.macenko_stats_od(od, m8, o["alpha"], o["min_tissue_pixels"])
        return np_ops.log_map(od, np_ops.macenko_map(he, mc, tgt["he"], tgt["max_conc"]), o["io"])

    def transform_batch(self, xf, integer: bool, params, tgt: dict, ctx: dict | None, tensors: DeviceTensors):
        from histolight.norm import torch_ops as T

        o = self.options
        bsz = xf.shape[0]
        ok, reasons = all_ok(bsz, xf.device)
        xb = self.bright_batch(xf, integer, None if ctx is None else ctx["stats"]["bright"])
        lg = T.log1(xb)
        if ctx is not None:
            a = tensors.context("map", ctx["map"]).expand(bsz, 3, 3)
        else:
            od = math.log(o["io"]) - lg
            mask = T.od_tissue(integer, xb, od, o["io"], o["beta"])
            he, mc, ok, reasons = T.macenko_stats(od, mask, o["alpha"], o["min_tissue_pixels"])
            a = T.macenko_map(he, mc, tensors.target("he"), tensors.target("max_conc"))
        return T.log_map(lg, a, o["io"]), ok, reasons
