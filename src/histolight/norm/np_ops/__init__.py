"""NumPy/OpenCV kernels of the stain normalizers (one HxWx3 uint8 RGB image at a time, CPU), by family.

`common` (shared), `macenko`, `reinhard`, `vahadane`, `augment`; every public kernel is also reachable as
`np_ops.<name>`.

Conventions shared with `torch_ops` (the two must agree within 1 grey level):
- optical density OD = -ln((I + 1) / io), I in [0, 255]; inverse I = io * exp(-OD) - 1.
- brightness standardization: p = q-th percentile (nearest rank) of all channel values,
  I' = clip(rint(float32(I) * float32(255 / p)), 0, 255).
- "tissue" for Macenko/Vahadane: every channel has OD >= beta; for Reinhard: integer luma
  (OpenCV RGB2GRAY, fixed point) < mask_threshold.
- percentiles of float data: linear interpolation between order statistics.
Statistics raise `Degenerate` when an image cannot be fitted (too little tissue, one colour).
"""

from histolight.norm.np_ops.augment import augment_map, hsv_jitter, hue_offset, stain_basis3
from histolight.norm.np_ops.common import (
    F32,
    LUMA_COEFFS,
    LUMA_SHIFT,
    MIN_MAX_CONC,
    Degenerate,
    brightness_factor,
    brightness_lut,
    brightness_value,
    channel,
    channel_max,
    check_max_conc,
    check_rgb_u8,
    count_tissue,
    exp_to_u8,
    log_map,
    log_map_float,
    luma,
    luma_tissue_mask,
    od_lut,
    od_tissue_mask,
    od_tissue_vmax,
    percentile_lin,
    to_od,
    transform3,
    ws,
)
from histolight.norm.np_ops.macenko import he_from_angles, macenko_he, macenko_map, macenko_stats_od, plane_basis
from histolight.norm.np_ops.reinhard import (
    F2LAB,
    LAB_F0,
    LAB_T0,
    LAB_WHITE,
    RGB2XYZ,
    RGB2XYZN,
    SRGB_T0,
    XYZN2RGB,
    f_to_lab,
    f_to_rgb_u8,
    lab_f,
    linear_lut,
    reinhard_map,
    reinhard_stats_lab,
    srgb_to_linear,
)
from histolight.norm.np_ops.vahadane import (
    DICT_RELAX,
    RUIFROK_HE,
    dict_learn,
    finish_dictionary,
    fit_subsample_index,
    nnlasso2,
    vahadane_apply_od,
    vahadane_codes,
    vahadane_dictionary,
    vahadane_max_conc,
    vahadane_render,
    vahadane_stats_od,
    vahadane_tile,
)

__all__ = [
    # common
    "F32",
    "MIN_MAX_CONC",
    "LUMA_COEFFS",
    "LUMA_SHIFT",
    "Degenerate",
    "ws",
    "check_rgb_u8",
    "percentile_lin",
    "brightness_value",
    "brightness_factor",
    "brightness_lut",
    "od_lut",
    "to_od",
    "od_tissue_vmax",
    "channel_max",
    "od_tissue_mask",
    "luma",
    "luma_tissue_mask",
    "exp_to_u8",
    "log_map",
    "log_map_float",
    "transform3",
    "channel",
    "check_max_conc",
    "count_tissue",
    # Macenko
    "plane_basis",
    "he_from_angles",
    "macenko_he",
    "macenko_stats_od",
    "macenko_map",
    # Reinhard
    "LAB_WHITE",
    "RGB2XYZ",
    "RGB2XYZN",
    "XYZN2RGB",
    "F2LAB",
    "LAB_T0",
    "LAB_F0",
    "SRGB_T0",
    "srgb_to_linear",
    "linear_lut",
    "lab_f",
    "f_to_lab",
    "reinhard_stats_lab",
    "reinhard_map",
    "f_to_rgb_u8",
    # Vahadane
    "RUIFROK_HE",
    "DICT_RELAX",
    "nnlasso2",
    "dict_learn",
    "finish_dictionary",
    "fit_subsample_index",
    "vahadane_codes",
    "vahadane_dictionary",
    "vahadane_max_conc",
    "vahadane_stats_od",
    "vahadane_render",
    "vahadane_tile",
    "vahadane_apply_od",
    # augment
    "stain_basis3",
    "augment_map",
    "hue_offset",
    "hsv_jitter",
]
