"""Regenerate the shipped presets (`norm/presets/*.json`) from the CMU-1 small-region H&E slide.

    python -m histolight.norm.make_presets [--slide PATH] [--out DIR] [--check]

Deterministic: fixed tile grid, fixed selection rule, no randomness; values rounded to 6 decimals.
`--check` recomputes and compares with the files instead of writing them (exit 1 on mismatch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from histolight.norm import np_ops
from histolight.norm.normalizer import StainNormalizer
from histolight.norm.options import METHODS
from histolight.norm.presets import PRESET_DIR

SLIDE_NAME = "cmu_small_region.svs"
TISSUE_LUMA = 220  # a pixel is tissue if its luma < 220
MIN_TISSUE_FRACTION = 0.7  # a tile qualifies if >= 70% of its pixels are tissue

#: preset name -> (level-0 region size read, output tile size, number of tiles, description)
PRESETS = {
    "v1": (
        256,
        256,
        24,
        "24 tissue tiles of 256 px at level 0 (0.499 um/px, ~20x) of CMU-1 small region, per-tile fits averaged",
    ),
    "v2": (
        512,
        256,
        8,
        "8 tissue tiles of 512 px at level 0 resized to 256 px (INTER_AREA, ~1 um/px, ~10x) "
        "of CMU-1 small region, per-tile fits averaged",
    ),
}

_DUMMY = {
    "macenko": {"stain_matrix": np_ops.RUIFROK_HE.tolist(), "max_conc": [1.0, 1.0]},
    "vahadane": {"stain_matrix": np_ops.RUIFROK_HE.tolist(), "max_conc": [1.0, 1.0]},
    "augment": {"stain_matrix": np_ops.RUIFROK_HE.tolist()},
    "reinhard": {"means": [50.0, 0.0, 0.0], "stds": [1.0, 1.0, 1.0]},
}


def find_slide(explicit: str | None = None) -> Path | None:
    """The CMU slide: explicit path, $HISTOLIGHT_CMU_SLIDE, or ../shared/data/slides next to the repo."""
    cands = [explicit, os.environ.get("HISTOLIGHT_CMU_SLIDE")]
    here = Path(__file__).resolve()
    for up in [Path.cwd(), *here.parents]:
        cands.append(str(up.parent / "shared" / "data" / "slides" / SLIDE_NAME))
        cands.append(str(up / "shared" / "data" / "slides" / SLIDE_NAME))
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def tissue_tiles(slide_path: Path, region: int, size: int, n: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """Up to n evenly spread qualifying tiles (HxWx3 uint8 RGB, `size` px) and their level-0 (x, y)."""
    import openslide

    with openslide.OpenSlide(str(slide_path)) as s:
        w, h = s.dimensions
        full = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    cands = []
    step = region // 2
    for y in range(0, h - region + 1, step):
        for x in range(0, w - region + 1, step):
            t = full[y : y + region, x : x + region]
            if (np_ops.luma(np.ascontiguousarray(t)) < TISSUE_LUMA).mean() >= MIN_TISSUE_FRACTION:
                cands.append((x, y))
    if not cands:
        raise RuntimeError(f"no tile of {region} px with >= {MIN_TISSUE_FRACTION:.0%} tissue in {slide_path}")
    pick = sorted(set(np.linspace(0, len(cands) - 1, min(n, len(cands))).round().astype(int).tolist()))
    coords = [list(cands[i]) for i in pick]
    tiles = []
    for x, y in coords:
        t = np.ascontiguousarray(full[y : y + region, x : x + region])
        if region != size:
            t = cv2.resize(t, (size, size), interpolation=cv2.INTER_AREA)
        tiles.append(t)
    return tiles, coords


def _round(v):
    if isinstance(v, list):
        return [_round(x) for x in v]
    return round(float(v), 6)


def build_preset(name: str, slide_path: Path) -> dict:
    """The preset document `name` computed from the slide."""
    region, size, n, desc = PRESETS[name]
    tiles, coords = tissue_tiles(slide_path, region, size, n)
    fits = {}
    for method, (family, _, _) in METHODS.items():
        norm = StainNormalizer(method, fit=_DUMMY[family]).fit(tiles)
        fits[method] = {k: _round(v) for k, v in norm.fit_params.items()}
    sha = hashlib.sha256(slide_path.read_bytes()).hexdigest()
    return {
        "name": name,
        "description": desc,
        "provenance": {
            "command": "python -m histolight.norm.make_presets",
            "slide": SLIDE_NAME,
            "slide_sha256": sha,
            "level": 0,
            "region_px": region,
            "tile_px": size,
            "tile_origins_xy": coords,
            "selection": (
                f"grid of {region}px regions (stride {region // 2}); keep those with >= "
                f"{MIN_TISSUE_FRACTION:.0%} pixels of luma < {TISSUE_LUMA}; take {len(coords)} "
                "evenly spaced in raster order"
            ),
            "fit": "StainNormalizer(method).fit(tiles) with default options: per-tile statistics averaged",
            "rounding": "6 decimals",
        },
        "fits": fits,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", help=f"path to {SLIDE_NAME}")
    ap.add_argument("--out", default=str(PRESET_DIR), help="output directory")
    ap.add_argument("--check", action="store_true", help="compare with existing files, do not write")
    args = ap.parse_args(argv)
    slide = find_slide(args.slide)
    if slide is None:
        print(f"cannot find {SLIDE_NAME}; pass --slide", file=sys.stderr)
        return 2
    out = Path(args.out)
    bad = 0
    for name in PRESETS:
        doc = build_preset(name, slide)
        text = json.dumps(doc, indent=1) + "\n"
        path = out / f"{name}.json"
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{path}: {'identical' if same else 'DIFFERS'}")
            bad += not same
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(doc['provenance']['tile_origins_xy'])} tiles)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
