"""NumPy/OpenCV kernels of the stain normalizers (one HxWx3 uint8 RGB image at a time, CPU).

Conventions shared with `torch_ops` (the two must agree within 1 grey level):
- optical density OD = -ln((I + 1) / io), I in [0, 255]; inverse I = io * exp(-OD) - 1.
- brightness standardization: p = q-th percentile (nearest rank) of all channel values,
  I' = clip(rint(float32(I) * float32(255 / p)), 0, 255).
- "tissue" for Macenko/Vahadane: every channel has OD >= beta; for Reinhard: integer luma
  (OpenCV RGB2GRAY, fixed point) < mask_threshold.
- percentiles of float data: linear interpolation between order statistics.
Statistics raise `Degenerate` when an image cannot be fitted (too little tissue, one colour).
"""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np

F32 = np.float32
#: a 99th-percentile stain concentration below this (OD units) means "no stain": passthrough
MIN_MAX_CONC = 0.05
#: Ruifrok & Johnston H and E optical-density vectors (rows, unit length): Vahadane init.
RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float64)
RUIFROK_HE /= np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)


class Degenerate(Exception):
    """The image has too little usable signal for the requested statistics; `.reason` is a slug."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ----------------------------------------------------------------------------- helpers
_TLS = threading.local()
_WS_MAX_PIXELS = 1 << 20


def ws(tag: str, shape: tuple, dtype=F32) -> np.ndarray:
    """Per-thread reusable scratch buffer (avoids page-faulting fresh large temporaries).

    Only for images up to 1 Mpx; never return one to the caller.
    """
    if math.prod(shape[:2]) > _WS_MAX_PIXELS:
        return np.empty(shape, dtype)
    d = getattr(_TLS, "d", None)
    if d is None:
        d = _TLS.d = {}
    a = d.get(tag)
    if a is None or a.shape != shape or a.dtype != dtype:
        a = d[tag] = np.empty(shape, dtype)
    return a


def check_rgb_u8(img) -> np.ndarray:
    """Validate an HxWx3 uint8 RGB array; return it C-contiguous."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"expected an HxWx3 uint8 numpy array, got {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8 (values 0-255), got {img.dtype}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image, shape {img.shape}")
    return np.ascontiguousarray(img)


def _order_stats(x: np.ndarray, lo: int, count: int) -> np.ndarray:
    """Sorted values of ranks lo .. lo+count-1 (0-based, ascending) of 1-D x, exact.

    Tail ranks are found on a candidate subset under/over a threshold estimated from a strided
    sample, which is much cheaper than partitioning all of x.
    """
    n = x.size
    hi = lo + count - 1
    if n > 4096:
        step = n // 1024
        sample = np.sort(x[::step])
        m = sample.size
        if hi < n // 4:  # lower tail: keep x <= t, t above rank hi with margin
            r = min(m - 1, int((hi + 1) / n * m * 1.5) + 16)
            cand = np.compress(x <= sample[r], x)
            if cand.size > hi:
                return np.sort(np.partition(cand, hi)[: hi + 1])[lo:]
        elif lo > n - n // 4:  # upper tail: keep x >= t
            r = max(0, m - 1 - int((n - lo) / n * m * 1.5) - 16)
            cand = np.compress(x >= sample[r], x)
            off = n - cand.size  # rank of cand's smallest element in x
            if lo >= off:
                part = np.partition(cand, lo - off)
                return np.sort(part[lo - off :])[:count]
    part = np.partition(x, lo)
    rest = np.sort(np.partition(part[lo:], min(count - 1, n - lo - 1))[:count])
    return rest


def percentile_lin(values: np.ndarray, q: float) -> float:
    """q-th percentile (0-100) of a 1-D array, linear interpolation (numpy's default rule)."""
    n = values.size
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    if frac > 0 and lo + 1 < n:
        v = _order_stats(values, lo, 2)
        return float(v[0]) + (float(v[1]) - float(v[0])) * frac
    return float(_order_stats(values, lo, 1)[0])


def brightness_value(img: np.ndarray, q: float) -> int:
    """q-th percentile (nearest rank, k = ceil(q/100 N)) of all channel values of a uint8 image."""
    flat = img.reshape(img.shape[0], -1)
    n = flat.size
    if n < 2**24:
        hist = cv2.calcHist([flat], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    else:
        hist = np.bincount(flat.ravel(), minlength=256).astype(np.float64)
    k = max(1, math.ceil(q / 100.0 * n))
    return int(np.searchsorted(np.cumsum(hist), k))


def brightness_factor(p: int) -> np.float32:
    """Scale 255/p (float32) used by brightness standardization; p < 1 is treated as 1."""
    return F32(255.0 / max(int(p), 1))


def brightness_lut(factor: np.float32) -> np.ndarray:
    """uint8 -> uint8 table equal to cv2.convertScaleAbs(v, alpha=factor)."""
    v = np.arange(256, dtype=F32) * F32(factor)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def od_lut(io: float, factor: np.float32 | None = None) -> np.ndarray:
    """256-entry float32 table uint8 -> OD = -ln((I'+1)/io), I' brightness-standardized if factor."""
    v = np.arange(256, dtype=np.float64)
    if factor is not None:
        v = brightness_lut(factor).astype(np.float64)
    return (-np.log((v + 1.0) / io)).astype(F32)


def to_od(img: np.ndarray, lut: np.ndarray, tag: str = "od") -> np.ndarray:
    """HxWx3 uint8 -> HxWx3 float32 via a 256-entry table (scratch buffer `tag`)."""
    h, w, _ = img.shape
    out = ws(tag, (h, w * 3))
    cv2.LUT(img.reshape(h, w * 3), lut.reshape(1, 256), dst=out)
    return out.reshape(h, w, 3)


def od_tissue_vmax(lut: np.ndarray, beta: float) -> int:
    """Largest uint8 value v with lut[v] >= beta (-1 if none): tissue iff max channel <= v."""
    ok = np.flatnonzero(lut >= F32(beta))
    return int(ok.max()) if ok.size else -1


def channel_max(img: np.ndarray) -> np.ndarray:
    """HxW uint8 per-pixel max over the 3 channels."""
    c = cv2.split(img)
    return cv2.max(cv2.max(c[0], c[1]), c[2])


def od_tissue_mask(img: np.ndarray, vmax: int) -> np.ndarray:
    """HxW uint8 mask (255 = tissue: all channels <= vmax, i.e. OD >= beta)."""
    if vmax < 0:
        return np.zeros(img.shape[:2], np.uint8)
    return cv2.compare(channel_max(img), vmax, cv2.CMP_LE)


#: fixed-point luma Y = (9798 R + 19235 G + 3735 B + 2^14) >> 15 (BT.601 weights)
LUMA_COEFFS = (9798, 19235, 3735)
LUMA_SHIFT = 15


def _luma_numpy(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.int32)
    y = x[..., 0] * LUMA_COEFFS[0] + x[..., 1] * LUMA_COEFFS[1] + x[..., 2] * LUMA_COEFFS[2]
    return ((y + (1 << (LUMA_SHIFT - 1))) >> LUMA_SHIFT).astype(np.uint8)


def _cv2_luma_matches() -> bool:
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return bool(np.array_equal(cv2.cvtColor(probe, cv2.COLOR_RGB2GRAY), _luma_numpy(probe)))


_CV2_LUMA = _cv2_luma_matches()


def luma(img: np.ndarray) -> np.ndarray:
    """HxW uint8 fixed-point luma (OpenCV's RGB2GRAY when it uses the same formula)."""
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if _CV2_LUMA else _luma_numpy(img)


def luma_tissue_mask(img: np.ndarray, thr: int) -> np.ndarray:
    """HxW uint8 mask (255 = tissue: luma < thr)."""
    return cv2.compare(luma(img), int(thr), cv2.CMP_LT)


def exp_to_u8(logimg: np.ndarray) -> np.ndarray:
    """float32 ln(I+1) image (overwritten) -> uint8 rint(clip(exp(.) - 1, 0, 255))."""
    cv2.exp(logimg, dst=logimg)
    e2 = logimg.reshape(logimg.shape[0], -1)  # single-channel view: cv2 scalars apply to every value
    cv2.max(e2, 1.0, dst=e2)
    return cv2.convertScaleAbs(logimg, alpha=1.0, beta=-1.0)


def _log_matrix(a: np.ndarray, io: float, offset=None) -> np.ndarray:
    m = np.empty((a.shape[0], a.shape[1] + 1), np.float64)
    m[:, :-1] = -a
    m[:, -1] = math.log(io)
    if offset is not None:
        m[:, -1] -= offset
    return m.astype(F32)


def log_map(od: np.ndarray, a: np.ndarray, io: float, offset=None) -> np.ndarray:
    """Apply OD_out = a @ OD (+ offset) per pixel, return uint8 io * exp(-OD_out) - 1."""
    z = ws("z", od.shape[:2] + (3,))
    return exp_to_u8(cv2.transform(od, _log_matrix(a, io, offset), dst=z))


def log_map_float(od: np.ndarray, a: np.ndarray, io: float, offset=None) -> np.ndarray:
    """As log_map but float32 in [0, 255], unrounded."""
    e = cv2.exp(cv2.transform(od, _log_matrix(a, io, offset), dst=ws("z", od.shape[:2] + (3,))))
    e2 = e.reshape(e.shape[0], -1)
    cv2.subtract(e2, 1.0, dst=e2)
    cv2.threshold(e, 255.0, 0, cv2.THRESH_TRUNC, dst=e)
    cv2.threshold(e, 0.0, 0, cv2.THRESH_TOZERO, dst=e)
    return e


# ----------------------------------------------------------------------------- Macenko
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


def transform3(img: np.ndarray, m: np.ndarray, tag: str = "t3") -> np.ndarray:
    """cv2.transform with a kx3 / kx4 matrix padded to 3 rows (OpenCV's fast 3-channel path)."""
    if m.shape[0] < 3:
        m = np.concatenate([m, np.zeros((3 - m.shape[0], m.shape[1]))], 0)
    return cv2.transform(img, m.astype(F32), dst=ws(tag, img.shape[:2] + (3,)))


def channel(img: np.ndarray, i: int, tag: str) -> np.ndarray:
    """Channel i of an HxWxC float32 image into scratch buffer `tag` (HxW)."""
    return cv2.extractChannel(img, i, dst=ws(tag, img.shape[:2]))


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


def check_max_conc(mc: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(mc)) or np.any(mc < MIN_MAX_CONC):
        raise Degenerate("no_stain_concentration", f"99th percentile concentrations {mc}")
    return mc


def count_tissue(m8: np.ndarray, min_px: int) -> int:
    n = cv2.countNonZero(m8)
    if n < max(min_px, 2):
        raise Degenerate("too_few_tissue_pixels", f"{n} < {min_px}")
    return n


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


# ----------------------------------------------------------------------------- Reinhard
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


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> float32 CIELAB (L 0..100, a, b), exact sRGB/D65 formulas."""
    return f_to_lab(lab_f(img, linear_lut()))


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


# ----------------------------------------------------------------------------- Vahadane
def nnlasso2(b1, b2, g: np.ndarray, lam: float):
    """Closed-form argmin_a>=0 0.5||y - D^T a||^2 + lam*sum(a) for 2 atoms.

    b1, b2: arrays of d_j . y (any shape, same dtype); g: 2x2 Gram D D^T. Returns (a1, a2).
    With u the unconstrained minimizer and g12 >= 0: a = u if u > 0, else the atom whose u is
    positive alone is kept with its single-atom solution max(0, (b_j - lam) / g_jj).
    """
    if g[0, 1] < 0:
        return _nnlasso2_general(b1, b2, g, lam)
    dt = b1.dtype.type
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    c1 = b1 - dt(lam)
    c2 = b2 - dt(lam)
    u1 = c1 * dt(g[1, 1] / det) - c2 * dt(g[0, 1] / det)
    u2 = c2 * dt(g[0, 0] / det) - c1 * dt(g[0, 1] / det)
    zero = dt(0)
    a1 = np.where(u2 > 0, np.maximum(u1, zero), np.maximum(c1 * dt(1.0 / g[0, 0]), zero))
    a2 = np.where(u1 > 0, np.maximum(u2, zero), np.maximum(c2 * dt(1.0 / g[1, 1]), zero))
    return a1, a2


def _nnlasso2_general(b1, b2, g: np.ndarray, lam: float):
    """nnlasso2 by enumerating the KKT cases (any Gram matrix)."""
    dt = b1.dtype.type
    g11, g12, g22 = (dt(g[0, 0]), dt(g[0, 1]), dt(g[1, 1]))
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    c1 = b1 - dt(lam)
    c2 = b2 - dt(lam)
    u1 = (c1 * dt(g[1, 1] / det)) - (c2 * dt(g[0, 1] / det))
    u2 = (c2 * dt(g[0, 0] / det)) - (c1 * dt(g[0, 1] / det))
    s1 = c1 / g11
    s2 = c2 / g22
    both = (u1 > 0) & (u2 > 0)
    one = (s1 > 0) & (s1 * g12 >= c2)
    two = (s2 > 0) & (s2 * g12 >= c1) & ~one
    zero = dt(0)
    a1 = np.where(both, u1, np.where(one, s1, zero))
    a2 = np.where(both, u2, np.where(two, s2, zero))
    return a1, a2


#: over-relaxation of the dictionary step (1 = plain block-coordinate descent); same fixed point,
#: about 2-4x fewer iterations for a given accuracy on H&E tiles (see experiments/stain_normalization.md)
DICT_RELAX = 1.9


def dict_learn(y: np.ndarray, lam: float, n_iter: int, d0: np.ndarray = RUIFROK_HE, finish: bool = True) -> np.ndarray:
    """Sparse non-negative 2-atom dictionary (2x3 float64 rows H, E, unit length) of OD rows y (n,3).

    Alternates the closed-form non-negative lasso codes and one (over-relaxed) block-coordinate
    dictionary pass with projection onto {d >= 0, ||d|| <= 1} (Mairal et al. 2010), the problem solved by
    spams.trainDL(posD=True, posAlpha=True, lambda1=lam) in Vahadane et al. 2016.
    """
    yt = np.ascontiguousarray(y.T, dtype=np.float64)  # (3, n)
    d = d0.astype(np.float64).copy()
    for _ in range(n_iter):
        g = d @ d.T
        if g[0, 0] * g[1, 1] - g[0, 1] ** 2 <= 1e-12:
            break
        b = d @ yt
        a1, a2 = nnlasso2(b[0], b[1], g, lam)
        a12 = float(a1 @ a2)
        ata = np.array([[float(a1 @ a1), a12], [a12, float(a2 @ a2)]])
        yta = np.stack([yt @ a1, yt @ a2], 1)
        for j in range(2):
            if ata[j, j] <= 1e-12:
                continue
            u = d[j] + DICT_RELAX * (yta[:, j] - d.T @ ata[:, j]) / ata[j, j]
            np.maximum(u, 0.0, out=u)
            d[j] = u / max(math.sqrt(float(u @ u)), 1.0)
    return finish_dictionary(d) if finish else d


def finish_dictionary(d: np.ndarray) -> np.ndarray:
    """Normalize rows, order H (larger red OD) first; raise Degenerate if unusable."""
    nrm = np.linalg.norm(d, axis=1)
    if not np.all(np.isfinite(nrm)) or np.any(nrm < 1e-6):
        raise Degenerate("single_stain_direction", f"dictionary atom norms {nrm}")
    d = d / nrm[:, None]
    if abs(float(d[0] @ d[1])) > 0.9999:
        raise Degenerate("single_stain_direction", "stain vectors are parallel")
    if d[0, 0] < d[1, 0]:
        d = d[::-1].copy()
    return d


def fit_subsample_index(m8: np.ndarray, max_px: int) -> np.ndarray:
    """Flat indices of tissue pixels, every ceil(n/max_px)-th in raster order."""
    idx = np.flatnonzero(m8.ravel().view(bool))
    stride = max(1, math.ceil(idx.size / max_px))
    return idx[::stride]


def vahadane_codes(od: np.ndarray, d: np.ndarray, lam: float):
    """Per-pixel non-negative lasso codes (a1, a2) HxW float32 of OD HxWx3 for dictionary d (2x3).

    Same solution as nnlasso2, with the affine parts done as 3x4 OpenCV transforms of OD.
    """
    g = d @ d.T
    if g[0, 1] < 0:
        b = transform3(od, d)
        return nnlasso2(channel(b, 0, "c0"), channel(b, 1, "c1"), g, lam)
    ginv = np.linalg.inv(g)
    m1 = np.zeros((3, 4))  # rows: u1, u2, s1  (u = G^-1 (D od - lam), s_j = (d_j od - lam) / g_jj)
    m1[:2, :3] = ginv @ d
    m1[:2, 3] = -lam * ginv.sum(1)
    m1[2, :3] = d[0] / g[0, 0]
    m1[2, 3] = -lam / g[0, 0]
    m2 = np.zeros((3, 4))  # row 0: s2
    m2[0, :3] = d[1] / g[1, 1]
    m2[0, 3] = -lam / g[1, 1]
    t1 = transform3(od, m1, "t3")
    u1, u2, s1 = (channel(t1, i, f"c{i}") for i in range(3))
    s2 = channel(transform3(od, m2, "t3b"), 0, "c3")
    pos2 = cv2.compare(u2, 0.0, cv2.CMP_GT)
    pos1 = cv2.compare(u1, 0.0, cv2.CMP_GT)
    a1 = cv2.threshold(s1, 0.0, 0, cv2.THRESH_TOZERO)[1]
    cv2.copyTo(cv2.threshold(u1, 0.0, 0, cv2.THRESH_TOZERO, dst=u1)[1], pos2, a1)
    a2 = cv2.threshold(s2, 0.0, 0, cv2.THRESH_TOZERO)[1]
    cv2.copyTo(cv2.threshold(u2, 0.0, 0, cv2.THRESH_TOZERO, dst=u2)[1], pos1, a2)
    return a1, a2


def vahadane_dictionary(od: np.ndarray, m8: np.ndarray, opts: dict) -> np.ndarray:
    """2x3 float64 stain dictionary (rows H, E) by sparse NMF on a subsample of tissue OD pixels.

    Initialized with the Macenko stain vectors of the same pixels (Ruifrok's if the Macenko angles
    are degenerate); a tile of one colour raises Degenerate.
    """
    n = count_tissue(m8, opts["min_tissue_pixels"])
    try:
        d0 = macenko_he(od, m8, n, 1.0).T
    except Degenerate as e:
        if e.reason == "no_colour_variation":  # one colour: nothing to separate
            raise
        d0 = RUIFROK_HE
    idx = fit_subsample_index(m8, opts["max_fit_pixels"])
    y = od.reshape(-1, 3)[idx].astype(np.float64)
    return dict_learn(y, opts["lambda_fit"], opts["n_iter"], d0)


def vahadane_max_conc(a1, a2, m8, tissue_only: bool) -> np.ndarray:
    if tissue_only:
        sel = m8.ravel().view(bool)
        a1, a2 = np.compress(sel, a1.ravel()), np.compress(sel, a2.ravel())
    return check_max_conc(np.array([percentile_lin(a1.ravel(), 99), percentile_lin(a2.ravel(), 99)]))


def vahadane_stats_od(od: np.ndarray, m8: np.ndarray, opts: dict, maxc_tissue_only: bool = False):
    """(he 3x2, max_conc 2) float64: sparse NMF stain matrix and 99th-percentile codes."""
    d = vahadane_dictionary(od, m8, opts)
    a1, a2 = vahadane_codes(od, d, opts["lambda_code"])
    return d.T.copy(), vahadane_max_conc(a1, a2, m8, maxc_tissue_only)


def vahadane_render(a1, a2, src_mc, tgt_he, tgt_mc, io: float) -> np.ndarray:
    """uint8 RGB from codes (HxW float32) scaled by tgt_mc / src_mc and the target stain matrix."""
    z = ws("zero", a1.shape)
    z.fill(0)
    a = cv2.merge([a1, a2, z], dst=ws("a12", a1.shape + (3,)))
    m = np.zeros((3, 3))
    m[:, :2] = tgt_he * (tgt_mc / src_mc)[None, :]
    return log_map(a, m, io)


def vahadane_tile(od, m8, opts: dict, tgt_he, tgt_mc) -> np.ndarray:
    """Per-tile Vahadane: fit the source on this tile and render it with the target."""
    d = vahadane_dictionary(od, m8, opts)
    a1, a2 = vahadane_codes(od, d, opts["lambda_code"])
    return vahadane_render(a1, a2, vahadane_max_conc(a1, a2, m8, False), tgt_he, tgt_mc, opts["io"])


def vahadane_apply_od(od, src_he, src_mc, tgt_he, tgt_mc, lam: float, io: float) -> np.ndarray:
    """Vahadane with known source statistics (context)."""
    a1, a2 = vahadane_codes(od, src_he.T, lam)
    return vahadane_render(a1, a2, src_mc, tgt_he, tgt_mc, io)


# ----------------------------------------------------------------------------- augment
def stain_basis3(he: np.ndarray) -> np.ndarray:
    """3x3 float64 [h, e, h x e] (unit columns) completing a 3x2 stain matrix to a basis."""
    r = np.cross(he[:, 0], he[:, 1])
    nrm = np.linalg.norm(r)
    if nrm < 1e-6:
        raise Degenerate("single_stain_direction", "stain vectors are parallel")
    return np.concatenate([he, (r / nrm)[:, None]], 1)


def augment_map(basis3: np.ndarray, params: np.ndarray):
    """(3x3 map, 3 offset) in OD: OD' = M diag(a_h, a_e, 1) M^-1 OD + M (b_h, b_e, 0)."""
    a = basis3 @ np.diag([params[0], params[1], 1.0]) @ np.linalg.inv(basis3)
    off = basis3 @ np.array([params[2], params[3], 0.0])
    return a, off


def hue_offset(dh: float) -> float:
    """Hue shift (fraction of the circle) as degrees in [0, 360)."""
    return float((dh * 360.0) % 360.0)


def hsv_jitter(img: np.ndarray, dh: float, ss: float, vs: float) -> np.ndarray:
    """Hue shift dh (fraction of the circle), saturation/value scales.

    img: HxWx3 RGB, uint8 or float32 in [0, 255]; returns uint8.
    """
    hsv = cv2.cvtColor(np.multiply(img, F32(1.0 / 255.0), dtype=F32), cv2.COLOR_RGB2HSV)
    m = np.array([[1, 0, 0, hue_offset(dh)], [0, ss, 0, 0], [0, 0, vs, 0]], F32)
    hsv = cv2.transform(hsv, m)
    h = hsv[..., 0]
    np.subtract(h, F32(360.0), out=h, where=h >= F32(360.0))  # wrap explicitly (OpenCV SIMD differs)
    np.clip(hsv[..., 1], 0.0, 1.0, out=hsv[..., 1])
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return cv2.convertScaleAbs(rgb, alpha=255.0)
