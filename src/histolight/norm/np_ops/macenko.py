"""NumPy Macenko kernels: stain plane from the OD covariance, extreme angles -> stain matrix, max concentrations.

Stain matrices are 3x2 float64 (columns H, E; rows R, G, B optical densities); maps are 3x3 float64 on OD.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from histolight.norm.np_ops.common import (
    F32,
    Degenerate,
    channel,
    check_max_conc,
    count_tissue,
    percentile_lin,
    transform3,
    ws,
)

_ROT = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], F32)  # (x0,x1,x2) -> (x1,x2,x0)


def _masked_cov(od: np.ndarray, m8: np.ndarray, n: int) -> np.ndarray:
    """3x3 float64 population covariance of OD over the n mask pixels (double accumulation)."""
    odm = ws("odm", od.shape)
    odm.fill(0)
    cv2.copyTo(od, m8, odm)
    t1, t2 = ws("t1", od.shape), ws("t2", od.shape)
    s1 = np.array(cv2.sumElems(odm)[:3]) / n
    s2 = np.array(cv2.sumElems(cv2.multiply(odm, odm, dst=t1))[:3]) / n
    s3 = np.array(cv2.sumElems(cv2.multiply(odm, cv2.transform(odm, _ROT, dst=t2), dst=t1))[:3]) / n
    cov = np.diag(s2)
    for i, (a, b) in enumerate(((0, 1), (1, 2), (2, 0))):
        cov[a, b] = cov[b, a] = s3[i]
    return cov - np.outer(s1, s1)


def plane_basis(cov: np.ndarray) -> np.ndarray:
    """2x3 float64 rows (second, first) eigenvectors of a 3x3 covariance, signs fixed (sum >= 0)."""
    w, v = np.linalg.eigh(cov)
    if not np.all(np.isfinite(w)) or w[2] <= 1e-10:
        raise Degenerate("no_colour_variation", f"OD covariance eigenvalues {w}")
    b = np.stack([v[:, 1], v[:, 2]])
    b *= np.where(b.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return b


def he_from_angles(basis: np.ndarray, phi_lo: float, phi_hi: float) -> np.ndarray:
    """3x2 float64 stain matrix (columns H, E) from the extreme angles in the eigen-plane."""
    if not (math.isfinite(phi_lo) and math.isfinite(phi_hi)) or phi_hi - phi_lo < 1e-4:
        raise Degenerate("single_stain_direction", f"angle range {phi_lo}..{phi_hi}")
    v_lo = basis[0] * math.cos(phi_lo) + basis[1] * math.sin(phi_lo)
    v_hi = basis[0] * math.cos(phi_hi) + basis[1] * math.sin(phi_hi)
    return np.stack([v_lo, v_hi], 1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], 1)


def macenko_he(od: np.ndarray, m8: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """3x2 float64 Macenko stain matrix (columns H, E) from OD and its uint8 tissue mask (n pixels)."""
    basis = plane_basis(_masked_cov(od, m8, n))
    p = transform3(od, basis)
    phi = ws("phi", od.shape[:2])
    np.arctan2(channel(p, 1, "c1"), channel(p, 0, "c0"), out=phi)
    phi = np.compress(m8.ravel().view(bool), phi.ravel())
    return he_from_angles(basis, percentile_lin(phi, alpha), percentile_lin(phi, 100 - alpha))


def macenko_stats_od(od: np.ndarray, m8: np.ndarray, alpha: float, min_px: int, maxc_tissue_only: bool = False):
    """(he 3x2, max_conc 2) float64 from an OD image and its uint8 tissue mask."""
    he = macenko_he(od, m8, count_tissue(m8, min_px), alpha)
    sel = m8.ravel().view(bool)
    c = transform3(od, np.linalg.pinv(he))
    mc = []
    for i in range(2):
        ci = channel(c, i, "c0").ravel()
        mc.append(percentile_lin(np.compress(sel, ci) if maxc_tissue_only else ci, 99))
    return he, check_max_conc(np.array(mc))


def macenko_map(src_he, src_mc, tgt_he, tgt_mc) -> np.ndarray:
    """3x3 float64 map OD_src -> OD_out = HE_t diag(maxC_t / maxC_s) pinv(HE_s)."""
    return tgt_he @ np.diag(tgt_mc / src_mc) @ np.linalg.pinv(src_he)
