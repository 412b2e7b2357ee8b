"""Patch segmentation training (``data=seg_patches``): memory flat with slide size, and crop throughput of on-the-fly
reading and of the patch cache against a plain baseline timed in the same run.

    python bench/bench_seg_patches.py                    # 8k^2 and 32k^2 px slides at 0.5 um/px (a few minutes)
    python bench/bench_seg_patches.py --quick            # 4k^2 and 16k^2, fewer crops
    python bench/bench_seg_patches.py --sizes 8192,65536 --crops 256 --json out.json

Synthetic slides (written once into ``--work``, default a temp folder): JPEG-tiled Aperio-style pyramids (256 px
tiles, downsamples 1/4/16) streamed tile by tile (never held whole), textured pink, with gland-like ROIs (circles of
20-35 um radius) on a jittered 256 um grid, so the number of polygons grows with the slide's area.

What is measured:

- ``peak RSS``: a fresh process trains one epoch of a small U-Net on one slide with ``segment.train`` in patch mode
  (``--crops`` crops of 128 px at 1 um/px, 8 validation windows, colour statistics from 16 crops, no evaluation)
  and reports its peak resident memory (``ru_maxrss``). Flat memory = the largest within 15% of the smallest.
- crops/s on the largest slide, the same ``--crops`` random windows (256 px at 1 um/px = 512 base px) for each case:
  ``baseline``   OpenSlide ``read_region`` at level 0 + ``cv2.resize`` + ``cv2.fillPoly`` of every ROI polygon
                 whose box touches the window (a plain loop: what one would write by hand);
  ``on-the-fly`` :func:`histolight.segment.patches.read_crop` (the slide layer's ``Slide.read`` + per-crop ROI
                 rasterization with holes, validity map);
  ``cached``     reading image, mask and validity of a patch from the HDF5 patch cache
                 (:mod:`histolight.segment.patch_cache`); its one-off build time is printed too.
  Ratios are crops/s relative to the baseline (> 1 = faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

MPP = 0.5
TILE = 256


def _tiles(w: int, h: int, ds: int, bank):
    """Row-major ``TILE``-px tiles of a ``w x h`` level (texture from ``bank``, white past the level's edge)."""
    import numpy as np

    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            t = bank[(tx // TILE * 7 + ty // TILE * 13 + ds) % len(bank)].copy()
            if tx + TILE > w or ty + TILE > h:
                t[max(0, h - ty) :, :] = 255
                t[:, max(0, w - tx) :] = 255
            yield np.ascontiguousarray(t)


def write_slide(path: Path, size: int) -> None:
    """A ``size x size`` px JPEG-tiled Aperio-style pyramid at ``MPP`` um/px, written tile by tile."""
    import cv2
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    bank = []
    for _ in range(8):
        n = rng.normal(0, 1, (TILE // 8, TILE // 8, 3)).astype(np.float32)
        n = cv2.resize(n, (TILE, TILE), interpolation=cv2.INTER_CUBIC)
        bank.append(np.clip(np.array([215, 150, 200]) + 25 * n, 0, 255).astype(np.uint8))
    mag = round(10.0 / MPP)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, ds in enumerate((1, 4, 16)):
            w = h = size // ds
            desc = (
                f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] ({TILE}x{TILE}) JPEG/RGB Q=80"
                + ("" if k == 0 else f" -> {w}x{h}")
                + f"|AppMag = {mag}|MPP = {MPP:.4f}"
            )
            tif.write(
                _tiles(w, h, ds, bank),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": 80},
                photometric="rgb",
                description=desc,
                metadata=None,
                subfiletype=0 if k == 0 else 1,
            )


def write_rois(path: Path, size: int, seed: int = 0) -> int:
    """Gland-like circles (20-35 um radius) on a jittered 256 um grid over the slide; returns how many."""
    import numpy as np
    import shapely

    from histolight.roi import ROI, write_rois

    rng = np.random.default_rng(seed)
    step = int(256 / MPP)
    rois = []
    for y in range(step // 2, size - step // 2, step):
        for x in range(step // 2, size - step // 2, step):
            r = rng.uniform(20, 35) / MPP
            c = shapely.Point(x + rng.uniform(-step / 4, step / 4), y + rng.uniform(-step / 4, step / 4))
            rois.append(ROI(f"g{len(rois)}", c.buffer(r, 8), "gland"))
    write_rois(rois, path)
    return len(rois)


def make_cohort(work: Path, sizes: list[int]) -> dict[int, Path]:
    """``{size: cohort folder}`` with ``slides/s<size>.svs`` and ``rois/s<size>.csv`` (reused when present)."""
    out = {}
    for s in sizes:
        d = work / f"cohort_{s}"
        slide = d / "slides" / f"s{s}.svs"
        if not slide.exists():
            (d / "slides").mkdir(parents=True, exist_ok=True)
            (d / "rois").mkdir(exist_ok=True)
            t = time.time()
            n = write_rois(d / "rois" / f"s{s}.csv", s)
            tmp = slide.with_suffix(".tmp")
            write_slide(tmp, s)
            tmp.rename(slide)
            print(
                f"  wrote {slide.name}: {s} x {s} px, {n} ROIs, {slide.stat().st_size / 2**20:.0f} MiB, {time.time() - t:.0f} s"
            )
        out[s] = d
    return out


def bench_config(crops: int, size: int = 128):
    from histolight.segment import SegmentConfig

    return SegmentConfig(
        mode="binary",
        labels=["gland"],
        mpp=1.0,
        size=size,
        patches=True,
        crops_per_epoch=crops,
        batch_size=16,
        val_windows=8,
        stats_crops=16,
        encoder_name="tu-mobilenetv3_small_100",
        model_kwargs={"encoder_depth": 3, "decoder_channels": [64, 32, 16]},
        infer_tile_px=256,
        epochs=1,
    )


def child_train(cohort: Path, crops: int) -> None:
    """(subprocess) one epoch of patch training on the cohort's slide; prints ``{"peak_rss_mib": ...}``."""
    import torch

    from histolight import segment
    from histolight.dataset import Dataset

    torch.set_num_threads(2)
    ds = Dataset(cohort / "slides", rois=cohort / "rois")
    name = ds.names[0]
    with tempfile.TemporaryDirectory() as dest:
        t = time.time()
        segment.train(
            bench_config(crops),
            ds,
            dest,
            train_slides=[name],
            val_slides=[name],
            evaluate=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            n_overlays=0,
        )
        secs = time.time() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": rss, "train_s": secs}))


def throughput(cohort: Path, crops: int) -> dict:
    """crops/s of the baseline, on-the-fly reading and the patch cache on the same windows (module docstring)."""
    import cv2
    import numpy as np
    import openslide

    from histolight.dataset import Dataset
    from histolight.segment.patch_cache import CachedPatches, build_patch_cache
    from histolight.segment.patches import SlideHandles, describe_slide, read_crop, sample_window

    cfg = bench_config(crops, size=256)
    ds = Dataset(cohort / "slides", rois=cohort / "rois")
    name = ds.names[0]
    sp = describe_slide(ds, name, cfg, seed=0)
    side = sp.crop_base(cfg.size, cfg.mpp)
    rng = np.random.default_rng(1)
    wins = [sample_window(sp, side, rng, fg=rng.random() < cfg.fg_crop_prob) for _ in range(crops)]
    polys = [np.asarray(r.geometry.exterior.coords) for r in sp.rois]
    boxes = sp.bounds

    osl = openslide.OpenSlide(str(ds.path(name)))
    scale = cfg.size / side

    def baseline(x0, y0):
        img = np.asarray(osl.read_region((int(x0), int(y0)), 0, (int(side), int(side))).convert("RGB"))
        img = cv2.resize(img, (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
        mask = np.zeros((cfg.size, cfg.size), np.uint8)
        for p, b in zip(polys, boxes):
            if b[0] < x0 + side and b[2] > x0 and b[1] < y0 + side and b[3] > y0:
                cv2.fillPoly(mask, [np.round((p - [x0, y0]) * scale - 0.5).astype(np.int32)], 1)
        return img, mask

    handles = SlideHandles()

    def timed(fn, items) -> float:
        fn(*items[0])  # warm-up
        t = time.perf_counter()
        for it in items:
            fn(*it)
        return len(items) / (time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        path = build_patch_cache(tmp, [sp], [], cfg, crops, seed=0, progress=False)
        build_s = time.time() - t
        cache = CachedPatches(path, "train", cfg, n=crops, seed=0)
        g = cache._open()
        idx = [(int(k),) for k in np.random.default_rng(2).permutation(crops)]
        res = {}
        for _ in range(2):  # two interleaved rounds, best of each (load on a shared machine)
            for case, fn, items in (
                ("baseline", baseline, wins),
                ("on-the-fly", lambda x, y: read_crop(handles, sp, x, y, cfg), wins),
                ("cached", lambda k: (g["image"][k], g["mask"][k], g["valid"][k]), idx),
            ):
                res[case] = max(res.get(case, 0.0), timed(fn, items))
        cache._file.close()
    osl.close()
    return {"crops_per_s": res, "cache_build_s": build_s, "crop_px": cfg.size, "window_base_px": side}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8192,32768", help="slide sides in px at 0.5 um/px (comma-separated)")
    ap.add_argument("--crops", type=int, default=64, help="crops per training epoch and per throughput case")
    ap.add_argument("--work", help="folder for the synthetic slides (kept; default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="4k^2 and 16k^2 slides, 64 crops")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-memory", action="store_true", help="only the throughput cases (no training processes)")
    ap.add_argument("--child-train", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_train:
        child_train(Path(a.child_train), a.crops)
        return {}
    if a.quick:
        a.sizes, a.crops = "4096,16384", 32
    sizes = [int(s) for s in a.sizes.split(",")]
    print(f"bench_seg_patches: sizes {sizes} px at {MPP} um/px, {a.crops} crops; load average {os.getloadavg()}")
    tmp = None if a.work else tempfile.TemporaryDirectory()
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    cohorts = make_cohort(work, sizes)
    mem = {}
    for s, d in ({} if a.no_memory else cohorts).items():
        cmd = [sys.executable, __file__, "--child-train", str(d), "--crops", str(a.crops)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"training on {s} px failed:\n{out.stderr[-3000:]}")
        mem[s] = json.loads(out.stdout.strip().splitlines()[-1])
    flat = None
    if mem:
        print("\npeak RSS of one epoch of patch training (fresh process each):")
        print(f"  {'slide':>14} {'peak RSS MiB':>13} {'train s':>8}")
        for s, m in mem.items():
            print(f"  {f'{s} x {s}':>14} {m['peak_rss_mib']:13.0f} {m['train_s']:8.1f}")
        lo, hi = min(m["peak_rss_mib"] for m in mem.values()), max(m["peak_rss_mib"] for m in mem.values())
        flat = hi <= 1.15 * lo
        print(f"  largest / smallest = {hi / lo:.3f} ({'within' if flat else 'NOT within'} 15%)")
    tp = throughput(cohorts[sizes[-1]], a.crops)
    base = tp["crops_per_s"]["baseline"]
    print(f"\ncrops/s on the {sizes[-1]} px slide ({tp['crop_px']} px crops at 1 um/px, {tp['window_base_px']:.0f} base px):")
    for case, v in tp["crops_per_s"].items():
        print(f"  {case:>11} {v:8.1f} crops/s   x{v / base:.2f} vs baseline")
    print(f"  (patch cache build, once: {tp['cache_build_s']:.1f} s for {a.crops} patches)")
    result = {"sizes": sizes, "crops": a.crops, "memory": mem, "memory_flat": flat, **tp, "load": os.getloadavg()}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
