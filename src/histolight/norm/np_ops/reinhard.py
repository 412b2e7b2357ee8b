"""NumPy Reinhard kernels: exact sRGB/D65 CIELAB, masked LAB statistics and the LAB affine folded into one map.

Images are HxWx3 uint8 RGB; `f` images are HxWx3 float32 (the CIELAB non-linearity of XYZ / white).
"""

from __future__ import annotations

import cv2
import numpy as np

from histolight.norm.np_ops.common import F32, Degenerate, brightness_lut, to_od, ws

# CIELAB with exact sRGB / D65 formulas (white as OpenCV: Xn 0.950456, Zn 1.088754). LAB is a
# linear function of f = cbrt-like(XYZ/white), so the Reinhard affine is folded into one 3x4 map
# on f, and only the elementwise non-linearities remain.
LAB_WHITE = np.array([0.950456, 1.0, 1.088754])
RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
RGB2XYZN = RGB2XYZ / LAB_WHITE[:, None]  # linear RGB -> XYZ / white
XYZN2RGB = np.linalg.inv(RGB2XYZN)
F2LAB = np.array([[0.0, 116.0, 0.0, -16.0], [500.0, -500.0, 0.0, 0.0], [0.0, 200.0, -200.0, 0.0]])
_LAB2F = np.linalg.inv(F2LAB[:, :3])
LAB_T0 = 0.008856  # f(t) = cbrt(t) above, 7.787 t + 16/116 below
LAB_F0 = 7.787 * LAB_T0 + 16.0 / 116.0  # f value at the switch
SRGB_T0 = 0.0031308  # sRGB encode: 12.92 x below, 1.055 x^(1/2.4) - 0.055 above


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """float64 sRGB in [0,1] -> linear RGB."""
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_lut(factor: np.float32 | None = None) -> np.ndarray:
    """256-entry float32 table uint8 -> linear RGB (after brightness standardization if factor)."""
    v = np.arange(256, dtype=np.float64) if factor is None else brightness_lut(factor).astype(np.float64)
    return srgb_to_linear(v / 255.0).astype(F32)


def _fmin(x: np.ndarray) -> float:
    return cv2.minMaxLoc(x.reshape(x.shape[0], -1))[0]


def _idx_le(x: np.ndarray, thr: float) -> np.ndarray:
    """Flat indices of x <= thr (for sparse fix-ups of piecewise functions)."""
    return np.flatnonzero(cv2.compare(x.reshape(x.shape[0], -1), float(F32(thr)), cv2.CMP_LE).view(bool))


def lab_f(img: np.ndarray, lin_lut: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float32 f(XYZ/white) (the CIELAB non-linearity), HxWx3 (scratch)."""
    xyz = cv2.transform(to_od(img, lin_lut, "linin"), RGB2XYZN.astype(F32), dst=ws("xyz", img.shape))
    f = np.cbrt(xyz, out=ws("f", img.shape))
    if _fmin(xyz) <= LAB_T0:
        i = _idx_le(xyz, LAB_T0)
        f.ravel()[i] = xyz.ravel()[i] * F32(7.787) + F32(16.0 / 116.0)
    return f


def f_to_lab(f: np.ndarray) -> np.ndarray:
    """float32 f -> CIELAB (L 0..100, a, b) float32."""
    return cv2.transform(f, F2LAB.astype(F32), dst=ws("lab", f.shape))


def reinhard_stats_lab(lab: np.ndarray, m8: np.ndarray | None):
    """(means, stds) float64 of LAB channels over mask pixels (all pixels if m8 is None)."""
    mean, std = cv2.meanStdDev(lab, mask=m8)
    mean, std = mean.ravel(), std.ravel()
    if not np.all(np.isfinite(std)) or np.any(std < 1e-4):
        raise Degenerate("no_colour_variation", f"LAB stds {std}")
    return mean, std


def reinhard_map(src_mean, src_std, tgt_mean, tgt_std) -> np.ndarray:
    """3x4 float64 map on f: LAB affine (x - mu_s) * sd_t / sd_s + mu_t expressed on f."""
    a, a0, ainv = F2LAB[:, :3], F2LAB[:, 3], _LAB2F
    k = np.asarray(tgt_std) / np.asarray(src_std)
    o = np.asarray(tgt_mean) - k * np.asarray(src_mean)
    m = np.empty((3, 4))
    m[:, :3] = ainv @ np.diag(k) @ a
    m[:, 3] = ainv @ (k * a0 + o - a0)
    return m


def f_to_rgb_u8(f: np.ndarray) -> np.ndarray:
    """float32 f -> uint8 sRGB (inverse of lab_f, values clipped to [0, 255])."""
    xyz = cv2.pow(f, 3, dst=ws("xyz", f.shape))
    if _fmin(f) <= LAB_F0:
        i = _idx_le(f, LAB_F0)
        xyz.ravel()[i] = (f.ravel()[i] - F32(16.0 / 116.0)) * F32(1.0 / 7.787)
    lin = cv2.transform(xyz, XYZN2RGB.astype(F32), dst=ws("lin", f.shape))
    cv2.threshold(lin, 0.0, 0, cv2.THRESH_TOZERO, dst=lin)  # > 1 saturates at 255 in the end anyway
    g = cv2.log(lin, dst=ws("g", f.shape))  # log(0) is finite in OpenCV; fixed up below
    np.multiply(g, F32(1.0 / 2.4), out=g)
    cv2.exp(g, dst=g)
    out = cv2.convertScaleAbs(g, alpha=255.0 * 1.055, beta=-255.0 * 0.055)
    if _fmin(lin) <= SRGB_T0:
        i = _idx_le(lin, SRGB_T0)
        out.ravel()[i] = np.rint(lin.ravel()[i] * F32(12.92 * 255.0)).astype(np.uint8)
    return out
