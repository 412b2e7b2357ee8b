"""NumPy stain augmentation kernels: H&E concentration scale/shift in OD and HSV jitter."""

from __future__ import annotations

import cv2
import numpy as np

from histolight.norm.np_ops.common import F32, Degenerate


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
