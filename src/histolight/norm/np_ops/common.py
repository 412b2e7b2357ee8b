"""Kernels every NumPy stain family uses: scratch buffers, input checks, percentiles, brightness
standardization, optical density and tissue masks, luma, OD log maps, and the `Degenerate` signal.

Images are HxWx3 uint8 RGB (C-contiguous); OD images HxWx3 float32; masks HxW uint8 (255 = tissue).
"""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np

F32 = np.float32
#: a 99th-percentile stain concentration below this (OD units) means "no stain": passthrough
MIN_MAX_CONC = 0.05


class Degenerate(Exception):
    """The image has too little usable signal for the requested statistics; `.reason` is a slug."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


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


def transform3(img: np.ndarray, m: np.ndarray, tag: str = "t3") -> np.ndarray:
    """cv2.transform with a kx3 / kx4 matrix padded to 3 rows (OpenCV's fast 3-channel path)."""
    if m.shape[0] < 3:
        m = np.concatenate([m, np.zeros((3 - m.shape[0], m.shape[1]))], 0)
    return cv2.transform(img, m.astype(F32), dst=ws(tag, img.shape[:2] + (3,)))


def channel(img: np.ndarray, i: int, tag: str) -> np.ndarray:
    """Channel i of an HxWxC float32 image into scratch buffer `tag` (HxW)."""
    return cv2.extractChannel(img, i, dst=ws(tag, img.shape[:2]))


def check_max_conc(mc: np.ndarray) -> np.ndarray:
    """Return the 2 max concentrations (99th percentiles, OD units); raise Degenerate if any is below MIN_MAX_CONC."""
    if not np.all(np.isfinite(mc)) or np.any(mc < MIN_MAX_CONC):
        raise Degenerate("no_stain_concentration", f"99th percentile concentrations {mc}")
    return mc


def count_tissue(m8: np.ndarray, min_px: int) -> int:
    """Number of tissue pixels of an HxW uint8 mask; raise Degenerate below max(min_px, 2)."""
    n = cv2.countNonZero(m8)
    if n < max(min_px, 2):
        raise Degenerate("too_few_tissue_pixels", f"{n} < {min_px}")
    return n
