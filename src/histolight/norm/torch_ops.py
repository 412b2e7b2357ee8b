"""PyTorch kernels of the stain normalizers: batched (B,3,N) float32 (N = H*W), input's device.

Mirrors `np_ops` (same conventions, see its docstring) so that both agree within 1 grey level.
Small per-image statistics (covariances, stain matrices, percentiles) are float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from histolight.norm import np_ops

_FLT_EPS = 1.1920928955078125e-07


def _t(a, ref: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=ref.device)


def mat3(m, x: torch.Tensor) -> torch.Tensor:
    """Fixed 3x3 matrix (numpy) times (B,3,N) x, as bmm (broadcast matmul is much slower on CPU)."""
    return torch.bmm(_t(m, x).expand(x.shape[0], 3, 3), x)


# ----------------------------------------------------------------------------- percentiles
def _order_stats(x: torch.Tensor, lo: int, count: int) -> torch.Tensor:
    """Sorted values of ranks lo .. lo+count-1 (0-based) of 1-D x (exact, tail-candidate trick)."""
    n = x.numel()
    hi = lo + count - 1
    if n > 4096:
        step = n // 1024
        sample = torch.sort(x[::step]).values
        m = sample.numel()
        if hi < n // 4:
            r = min(m - 1, int((hi + 1) / n * m * 1.5) + 16)
            cand = x[x <= sample[r]]
            if cand.numel() > hi:
                return torch.topk(cand, hi + 1, largest=False, sorted=True).values[lo:]
        elif lo > n - n // 4:
            r = max(0, m - 1 - int((n - lo) / n * m * 1.5) - 16)
            cand = x[x >= sample[r]]
            off = n - cand.numel()
            if lo >= off:
                top = torch.topk(cand, cand.numel() - (lo - off), largest=True, sorted=True).values
                return top.flip(0)[:count]
    return torch.sort(x).values[lo : lo + count]


def percentile_1d(x: torch.Tensor, q: float) -> float:
    """q-th percentile (linear interpolation) of a 1-D tensor, as np_ops.percentile_lin."""
    n = x.numel()
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    frac = pos - lo
    if frac > 0 and lo + 1 < n:
        v = _order_stats(x, lo, 2).double().tolist()
        return v[0] + (v[1] - v[0]) * frac
    return float(_order_stats(x, lo, 1)[0])


def row_percentiles(v: torch.Tensor, qs, mask: torch.Tensor | None, ok: torch.Tensor) -> torch.Tensor:
    """(B, len(qs)) float64 percentiles of each row of (B,N) v over mask entries (all if None).

    Rows with ok False give NaN.
    """
    out = torch.full((v.shape[0], len(qs)), float("nan"), dtype=torch.float64)
    rows = torch.nonzero(ok).flatten().tolist()
    if v.device.type == "cpu":  # same exact order statistics, NumPy's selection is faster on CPU
        vn = v.numpy()
        mn = None if mask is None else mask.numpy()
        for b in rows:
            x = vn[b] if mn is None else np.compress(mn[b], vn[b])
            if x.size >= 1:
                out[b] = torch.tensor([np_ops.percentile_lin(x, q) for q in qs], dtype=torch.float64)
        return out
    for b in rows:
        x = v[b] if mask is None else v[b][mask[b]]
        if x.numel() >= 1:
            out[b] = torch.tensor([percentile_1d(x, q) for q in qs], dtype=torch.float64)
    return out.to(v.device)


# ----------------------------------------------------------------------------- helpers
def brightness_values(x: torch.Tensor, q: float):
    """Per-image q-th percentile (nearest rank) of all channel values: int list for uint8
    input, float tensor otherwise."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    n = flat.shape[1]
    k = max(1, math.ceil(q / 100.0 * n))
    if x.dtype == torch.uint8:
        off = (torch.arange(b, device=x.device) * 256)[:, None]
        hist = torch.bincount((flat.long() + off).flatten(), minlength=256 * b).view(b, 256)
        return (torch.cumsum(hist, 1) < k).sum(1).tolist()
    return torch.kthvalue(flat.float(), k, dim=1).values


def apply_brightness(integer: bool, xf: torch.Tensor, p) -> torch.Tensor:
    """Brightness-standardized float32 image, rounded like cv2.convertScaleAbs (also for float input).

    p: per-image percentile values (int list, or a float tensor for float input).
    """
    vals = p if isinstance(p, list) else p.tolist()
    fac = torch.tensor([float(np.float32(255.0 / max(float(v), 1.0))) for v in vals], dtype=torch.float32, device=xf.device)
    return torch.clamp_(torch.round_(xf * fac.view(-1, 1, 1)), 0, 255)


def log1(xf: torch.Tensor) -> torch.Tensor:
    """ln(I + 1) (B,3,N) float32; OD = ln(io) - ln(I + 1)."""
    return torch.log(xf + 1.0)


def od_tissue(integer: bool, xf: torch.Tensor, od: torch.Tensor, io: float, beta: float) -> torch.Tensor:
    """(B,N) bool: every channel OD >= beta (integer threshold for integer input)."""
    if integer:
        return xf.amax(1) <= np_ops.od_tissue_vmax(np_ops.od_lut(io), beta)
    return od.amin(1) >= beta


def luma_tissue(xf: torch.Tensor, thr: int) -> torch.Tensor:
    """(B,N) bool: fixed-point luma < thr (same integer formula as NumPy for integer input)."""
    cr, cg, cb = np_ops.LUMA_COEFFS
    y = xf[:, 0] * cr + xf[:, 1] * cg + xf[:, 2] * cb
    return y < float(thr * (1 << np_ops.LUMA_SHIFT) - (1 << (np_ops.LUMA_SHIFT - 1)))


def exp_out(z: torch.Tensor) -> torch.Tensor:
    """In place: z = clip(exp(z) - 1, 0, 255) (z holds ln(I + 1))."""
    return torch.clamp_(torch.exp_(z).sub_(1.0), 0, 255)


def log_map(lg: torch.Tensor, a: torch.Tensor, io: float, offset: torch.Tensor | None = None) -> torch.Tensor:
    """(B,3,N) float in [0,255]: io * exp(-(a @ OD + offset)) - 1 with OD = ln(io) - lg.

    lg: (B,3,N) ln(I + 1); a: (B,3,3) float64; offset: (B,3) OD or None. One fused baddbmm:
    ln(out + 1) = ln(io) (1 - a 1) + a lg - offset.
    """
    log_io = math.log(io)
    bias = log_io * (1.0 - a.sum(2))
    if offset is not None:
        bias = bias - offset
    return exp_out(torch.baddbmm(bias.float()[:, :, None], a.float(), lg))


def codes_map(codes: torch.Tensor, a: torch.Tensor, io: float) -> torch.Tensor:
    """(B,3,N) float in [0,255]: io * exp(-(a @ codes)) - 1 with codes (B,K,N), a (B,3,K) float64."""
    return exp_out(torch.baddbmm(torch.full((1, 1, 1), math.log(io), device=codes.device), -a.float(), codes))


# ----------------------------------------------------------------------------- Macenko
def tissue_ok(mask: torch.Tensor, min_px: int):
    n = mask.sum(1)
    ok = n >= max(min_px, 2)
    reasons = [None if k else "too_few_tissue_pixels" for k in ok.tolist()]
    return n, ok, reasons


def macenko_he(od: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, ok: torch.Tensor, reasons: list, alpha: float):
    """(he (B,3,2) float64, ok) Macenko stain matrices; updates `reasons`, see np_ops.macenko_he."""
    bsz = od.shape[0]
    ok = ok.clone()
    w = mask.to(od.dtype)[:, None]
    nn = torch.clamp(n, min=1).to(torch.float64)
    mean = (od * w).sum(2).double() / nn[:, None]
    c = (od - mean.float()[:, :, None]).mul_(w)
    cov = torch.bmm(c, c.transpose(1, 2)).double() / nn[:, None, None]
    cov = torch.where(ok[:, None, None], cov, torch.eye(3, dtype=cov.dtype, device=cov.device))
    evals, evecs = torch.linalg.eigh(cov)
    novar = ~(torch.isfinite(evals).all(1) & (evals[:, 2] > 1e-10))
    for b in torch.nonzero(ok & novar).flatten().tolist():
        reasons[b] = "no_colour_variation"
    ok = ok & ~novar
    basis = torch.stack([evecs[:, :, 1], evecs[:, :, 2]], 1)  # (B,2,3)
    basis = basis * torch.where(basis.sum(2, keepdim=True) < 0, -1.0, 1.0)
    p = torch.bmm(basis.float(), od)
    phi = torch.atan2(p[:, 1], p[:, 0])
    pc = row_percentiles(phi, (alpha, 100 - alpha), mask, ok).cpu().numpy()
    he = torch.zeros(bsz, 3, 2, dtype=torch.float64)
    basis_np = basis.cpu().numpy()
    for b in torch.nonzero(ok).flatten().tolist():
        try:
            he[b] = torch.from_numpy(np_ops.he_from_angles(basis_np[b], float(pc[b, 0]), float(pc[b, 1])))
        except np_ops.Degenerate as e:
            ok[b] = False
            reasons[b] = e.reason
    he = he.to(od.device)
    he = torch.where(ok[:, None, None], he, torch.eye(3, 2, dtype=he.dtype, device=he.device))
    return he, ok


def max_conc(c1: torch.Tensor, c2: torch.Tensor, mask, ok: torch.Tensor, reasons: list, tissue_only: bool):
    """(B,2) float64 99th percentiles of two (B,N) concentration maps; updates ok/reasons."""
    m = mask if tissue_only else None
    mc = torch.cat([row_percentiles(c, (99,), m, ok) for c in (c1, c2)], 1)
    bad = ~(torch.isfinite(mc).all(1) & (mc >= np_ops.MIN_MAX_CONC).all(1))
    for b in torch.nonzero(ok & bad).flatten().tolist():
        reasons[b] = "no_stain_concentration"
    return mc, ok & ~bad


def macenko_stats(od: torch.Tensor, mask: torch.Tensor, alpha: float, min_px: int, maxc_tissue_only: bool = False):
    """Per image (he (B,3,2) f64, max_conc (B,2) f64, ok (B,) bool, reasons list)."""
    n, ok, reasons = tissue_ok(mask, min_px)
    he, ok = macenko_he(od, mask, n, ok, reasons, alpha)
    c = torch.bmm(torch.linalg.pinv(he).float(), od)
    mc, ok = max_conc(c[:, 0], c[:, 1], mask, ok, reasons, maxc_tissue_only)
    return he, mc, ok, reasons


def macenko_map(src_he, src_mc, tgt_he, tgt_mc) -> torch.Tensor:
    """(B,3,3) float64 OD map, see np_ops.macenko_map."""
    scale = torch.nan_to_num(tgt_mc / src_mc, nan=1.0, posinf=1.0, neginf=1.0)
    return tgt_he @ torch.diag_embed(scale) @ torch.linalg.pinv(src_he)


# ----------------------------------------------------------------------------- LAB (Reinhard)
def lab_f(integer: bool, xb: torch.Tensor) -> torch.Tensor:
    """(B,3,N) f(XYZ/white) of float32 RGB values xb in [0,255], see np_ops.lab_f."""
    if integer:
        lut = _t(np_ops.linear_lut(), xb)
        lin = lut.index_select(0, xb.to(torch.int32).flatten()).view(xb.shape)
    else:
        v = xb / 255.0
        lin = torch.where(v <= 0.04045, v / 12.92, torch.pow((v + 0.055) / 1.055, 2.4))
    xyz = mat3(np_ops.RGB2XYZN, lin)
    # piecewise f without branches (torch.where / masks are slow on CPU): the linear part is the
    # tangent of the cube root at T0, so cbrt(max(t, T0)) + 7.787 (min(t, T0) - T0) is the same
    # function (to 3e-7, the CIE constants' own continuity error).
    t0 = np_ops.LAB_T0
    f = torch.pow(torch.clamp(xyz, min=t0), 1.0 / 3.0)
    return f.add_(torch.clamp_(xyz, max=t0).sub_(t0).mul_(7.787))


def f_to_lab(f: torch.Tensor) -> torch.Tensor:
    """(B,3,N) f -> CIELAB (L 0..100, a, b)."""
    return mat3(np_ops.F2LAB[:, :3], f).add_(_t(np_ops.F2LAB[:, 3], f)[:, None])


def reinhard_map(src_mean, src_std, tgt_mean, tgt_std) -> torch.Tensor:
    """(B,3,4) float64 map on f, see np_ops.reinhard_map; inputs (B,3) / (3,) float64."""
    f2lab = torch.as_tensor(np_ops.F2LAB, dtype=torch.float64, device=src_mean.device)
    a, a0 = f2lab[:, :3], f2lab[:, 3]
    ainv = torch.as_tensor(np.linalg.inv(np_ops.F2LAB[:, :3]), dtype=torch.float64, device=src_mean.device)
    k = tgt_std / src_std
    o = tgt_mean - k * src_mean
    m = torch.empty(src_mean.shape[0], 3, 4, dtype=torch.float64, device=src_mean.device)
    m[:, :, :3] = ainv @ torch.diag_embed(k) @ a
    m[:, :, 3] = (ainv @ (k * a0 + o - a0)[:, :, None])[..., 0]
    return m


def f_to_rgb(f: torch.Tensor) -> torch.Tensor:
    """(B,3,N) f (overwritten) -> float sRGB in [0,255] (unrounded), see np_ops.f_to_rgb_u8."""
    f0, s0 = np_ops.LAB_F0, np_ops.SRGB_T0
    fc = torch.clamp(f, min=f0)
    xyz = (fc * fc).mul_(fc).add_(torch.clamp_(f, max=f0).sub_(f0).mul_(1.0 / 7.787))  # branch-free, as lab_f
    lin = torch.clamp_(mat3(np_ops.XYZN2RGB, xyz), 0.0, 1.0)
    g = torch.pow(torch.clamp(lin, min=s0), 1.0 / 2.4).mul_(1.055 * 255.0).sub_(0.055 * 255.0)
    return g.add_(torch.clamp_(lin, max=s0).sub_(s0).mul_(12.92 * 255.0))


def masked_mean_std(lab: torch.Tensor, mask: torch.Tensor | None):
    """(means, stds) (B,3) float64 over mask pixels (all if None), population std."""
    if mask is None:
        n = torch.full((lab.shape[0], 1), float(lab.shape[2]), dtype=torch.float64, device=lab.device)
        mean = lab.sum(2).double() / n
        c = lab - mean.float()[:, :, None]
    else:
        w = mask.to(lab.dtype)[:, None]
        n = torch.clamp(w.sum(2).double(), min=1.0)
        mean = (lab * w).sum(2).double() / n
        c = (lab - mean.float()[:, :, None]).mul_(w)
    var = (c * c).sum(2).double() / n
    return mean, torch.sqrt(var)


# ----------------------------------------------------------------------------- HSV
def rgb_to_hsv(rgb01: torch.Tensor) -> torch.Tensor:
    """(B,3,N) RGB [0,1] -> HSV (H degrees [0,360), S, V in [0,1]), OpenCV's float formulas."""
    r, g, b = rgb01[:, 0], rgb01[:, 1], rgb01[:, 2]
    v = rgb01.amax(1)
    vmin = rgb01.amin(1)
    diff = v - vmin
    s = diff / (v.abs() + _FLT_EPS)
    k = 60.0 / (diff + _FLT_EPS)
    h = torch.where(v == r, (g - b) * k, torch.where(v == g, (b - r) * k + 120.0, (r - g) * k + 240.0))
    h = torch.where(h < 0, h + 360.0, h)
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(B,3,N) HSV (H degrees, any range; S, V) -> RGB; OpenCV's sector formulas written branch-free:
    channel = V - V S clip(min(k, 4 - k), 0, 1), k = (n + H/60) mod 6, n = 5, 3, 1 for R, G, B."""
    h6, s, v = hsv[:, 0] * (1.0 / 60.0), hsv[:, 1], hsv[:, 2]
    vs = v * s
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        t = torch.clamp_(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        out.append(v - vs * t)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------- Vahadane
def nnlasso2(b1, b2, g: torch.Tensor, lam: float):
    """Closed-form 2-atom non-negative lasso, see np_ops.nnlasso2; g (B,2,2) float64."""
    shape = (-1,) + (1,) * (b1.dim() - 1)
    g11, g12, g22 = (g[:, 0, 0].view(shape), g[:, 0, 1].view(shape), g[:, 1, 1].view(shape))
    det = g11 * g22 - g12 * g12
    dt = b1.dtype
    c1 = b1 - lam
    c2 = b2 - lam
    u1 = c1 * (g22 / det).to(dt) - c2 * (g12 / det).to(dt)
    u2 = c2 * (g11 / det).to(dt) - c1 * (g12 / det).to(dt)
    m1 = (u1 > 0).to(dt)
    m2 = (u2 > 0).to(dt)
    s1 = torch.clamp(c1 * (1.0 / g11).to(dt), min=0)
    s2 = torch.clamp(c2 * (1.0 / g22).to(dt), min=0)
    a1 = s1 + (torch.clamp(u1, min=0) - s1) * m2  # u2 > 0 ? max(u1, 0) : max(s1, 0)
    a2 = s2 + (torch.clamp(u2, min=0) - s2) * m1
    if bool((g12 < 0).any()):  # general KKT enumeration for those images
        s1 = c1 / g11.to(dt)
        s2 = c2 / g22.to(dt)
        both = (u1 > 0) & (u2 > 0)
        one = (s1 > 0) & (s1 * g12.to(dt) >= c2)
        two = (s2 > 0) & (s2 * g12.to(dt) >= c1) & ~one
        zero = torch.zeros((), dtype=dt, device=b1.device)
        neg = g12 < 0
        a1 = torch.where(neg, torch.where(both, u1, torch.where(one, s1, zero)), a1)
        a2 = torch.where(neg, torch.where(both, u2, torch.where(two, s2, zero)), a2)
    return a1, a2


def dict_learn(y: torch.Tensor, w: torch.Tensor, lam: float, n_iter: int, d0: torch.Tensor) -> torch.Tensor:
    """Batched np_ops.dict_learn on padded rows y (B,M,3) float64 with 0/1 weights w (B,M).

    Tiny products are written as broadcast sums: BLAS calls this small cost more in thread
    hand-offs than in arithmetic on a busy CPU.
    """
    d = d0.clone()
    yt = y.transpose(1, 2).contiguous()  # (B,3,M)
    active = torch.ones(d.shape[0], dtype=torch.bool, device=y.device)
    eye2 = torch.eye(2, dtype=d.dtype, device=d.device)
    for _ in range(n_iter):
        g = (d[:, :, None, :] * d[:, None, :, :]).sum(-1)  # (B,2,2)
        active = active & (g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] ** 2 > 1e-12)
        gs = torch.where(active[:, None, None], g, eye2)
        b = (d[:, :, :, None] * yt[:, None]).sum(2)  # (B,2,M)
        a1, a2 = nnlasso2(b[:, 0], b[:, 1], gs, lam)
        a = torch.stack([a1, a2], 1) * w[:, None]  # (B,2,M)
        ata = (a[:, :, None, :] * a[:, None, :, :]).sum(-1)  # (B,2,2)
        yta = (yt[:, :, None, :] * a[:, None, :, :]).sum(-1)  # (B,3,2)
        for j in range(2):
            ajj = ata[:, j, j]
            upd = active & (ajj > 1e-12)
            dta = (d * ata[:, :, j : j + 1]).sum(1)  # (B,3) = D^T ata[:, j]
            u = d[:, j] + np_ops.DICT_RELAX * (yta[:, :, j] - dta) / torch.where(upd, ajj, torch.ones_like(ajj))[:, None]
            u = torch.clamp(u, min=0.0)
            u = u / torch.clamp(torch.sqrt((u * u).sum(1, keepdim=True)), min=1.0)
            d[:, j] = torch.where(upd[:, None], u, d[:, j])
    return d


def vahadane_dictionary(od: torch.Tensor, mask: torch.Tensor, opts: dict):
    """(d (B,2,3) float64 rows H, E; ok; reasons), see np_ops.vahadane_dictionary."""
    bsz = od.shape[0]
    n, ok, reasons = tissue_ok(mask, opts["min_tissue_pixels"])
    init_reasons = [None] * bsz
    he_m, ok_m = macenko_he(od, mask, n, ok, init_reasons, 1.0)
    for b, r in enumerate(init_reasons):
        if r == "no_colour_variation":  # one colour: nothing to separate
            ok[b] = False
            reasons[b] = r
    ruif = torch.as_tensor(np_ops.RUIFROK_HE, dtype=torch.float64, device=od.device)
    d0 = torch.where(ok_m[:, None, None], he_m.transpose(1, 2), ruif)
    m = opts["max_fit_pixels"]
    y = torch.zeros(bsz, m, 3, dtype=torch.float64, device=od.device)
    w = torch.zeros(bsz, m, dtype=torch.float64, device=od.device)
    for b in torch.nonzero(ok).flatten().tolist():
        idx = torch.nonzero(mask[b]).flatten()
        stride = max(1, math.ceil(idx.numel() / m))
        idx = idx[::stride]
        y[b, : idx.numel()] = od[b][:, idx].T.double()
        w[b, : idx.numel()] = 1.0
    if od.device.type == "cpu":  # tiny per-image problems: NumPy has far less per-op overhead on CPU
        d_np = np.stack(
            [
                np_ops.dict_learn(y[b, w[b] > 0].numpy(), opts["lambda_fit"], opts["n_iter"], d0[b].numpy(), finish=False)
                if bool(ok[b])
                else d0[b].numpy()
                for b in range(bsz)
            ]
        )
    else:
        d_np = dict_learn(y, w, opts["lambda_fit"], opts["n_iter"], d0).cpu().numpy()
    dn = torch.zeros(d_np.shape, dtype=torch.float64)
    for b in torch.nonzero(ok).flatten().tolist():
        try:
            dn[b] = torch.from_numpy(np_ops.finish_dictionary(d_np[b]))
        except np_ops.Degenerate as e:
            ok[b] = False
            reasons[b] = e.reason
    dn = dn.to(od.device)
    dn = torch.where(ok[:, None, None], dn, torch.eye(2, 3, dtype=dn.dtype, device=dn.device))
    return dn, ok, reasons


def vahadane_codes(od: torch.Tensor, d: torch.Tensor, lam: float):
    """Per-pixel codes (a1, a2) (B,N) float32 of OD (B,3,N) for dictionaries d (B,2,3) float64."""
    b = torch.bmm(d.float(), od)
    return nnlasso2(b[:, 0], b[:, 1], d @ d.transpose(1, 2), lam)


def vahadane_stats(od: torch.Tensor, mask: torch.Tensor, opts: dict, maxc_tissue_only: bool = False):
    """Per image (he (B,3,2), max_conc (B,2), ok, reasons, codes), see np_ops.vahadane_stats_od."""
    d, ok, reasons = vahadane_dictionary(od, mask, opts)
    a1, a2 = vahadane_codes(od, d, opts["lambda_code"])
    mc, ok = max_conc(a1, a2, mask, ok, reasons, maxc_tissue_only)
    return d.transpose(1, 2), mc, ok, reasons, (a1, a2)
