"""Speed (and agreement) benchmark of histolight.norm on real 256 px H&E tiles.

    python bench/bench_norm.py [--quick] [--slide PATH] [--batch 32] [--json out.json] [--no-agreement]

Speed: images/s per method for NumPy (one image at a time) and PyTorch (batched), each with
per-tile source statistics ("tile") and with a contextual source fit on the slide thumbnail
("ctx"), single-threaded (cv2.setNumThreads(1), torch.set_num_threads(1)); torchstain timed in
the same run as the reference (NumPy backend for the NumPy columns, torch backend for the
torch columns) and the ratio printed. With a CUDA device, torch batched is also timed on GPU.
Agreement: mean absolute difference (grey levels) to torchstain on the same tiles and target.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import cv2
import numpy as np
import torch

cv2.setNumThreads(1)
torch.set_num_threads(1)

from histolight.norm import StainNormalizer, available_methods, np_ops  # noqa: E402
from histolight.norm.make_presets import find_slide  # noqa: E402

TS_REF = {"macenko": "macenko", "macenko_fast": "macenko", "vahadane": "macenko", "augment": "macenko",
          "reinhard": "reinhard", "reinhard_fast": "reinhard", "reinhard_mask": "reinhard",
          "reinhard_fast_mask": "reinhard"}


def load_tiles(slide_path, n_max=96, size=256):
    import openslide

    with openslide.OpenSlide(str(slide_path)) as s:
        w, h = s.dimensions
        full = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
        thumb = np.asarray(s.get_thumbnail((1024, 1024)).convert("RGB"))
    tiles = []
    for y in range(0, h - size + 1, size // 2):
        for x in range(0, w - size + 1, size // 2):
            t = np.ascontiguousarray(full[y:y + size, x:x + size])
            if (np_ops.luma(t) < 220).mean() >= 0.5:
                tiles.append(t)
    idx = np.linspace(0, len(tiles) - 1, min(n_max, len(tiles))).round().astype(int)
    return [tiles[i] for i in sorted(set(idx.tolist()))], thumb


def rate(fn, items, min_time, rounds=5):
    """images/s of fn over items: best of `rounds` rounds of at least min_time/rounds seconds each
    (the best round is the least disturbed by other processes; see also the printed load average)."""
    fn(items[0])
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            for it in items:
                n += fn(it)
                dt = time.perf_counter() - t0
                if dt >= min_time / rounds:
                    break
            if dt >= min_time / rounds:
                break
        best = max(best, n / dt)
    return best


def bench_speed(tiles, thumb, args, methods):
    import torchstain

    t = args.min_time
    target = tiles[len(tiles) // 2]
    res = {"torchstain": {}, "methods": {}}
    # torchstain reference (one image at a time; torch backend takes CHW tensors)
    chw = [torch.from_numpy(x).permute(2, 0, 1).contiguous() for x in tiles]
    for name, cls in (("macenko", torchstain.normalizers.MacenkoNormalizer),
                      ("reinhard", torchstain.normalizers.ReinhardNormalizer)):
        ref_np = cls(backend="numpy")
        ref_np.fit(target)
        ref_t = cls(backend="torch")
        ref_t.fit(torch.from_numpy(target).permute(2, 0, 1).contiguous())
        kw = {"stains": False} if name == "macenko" else {}
        res["torchstain"][name] = {
            "numpy": rate(lambda x: (ref_np.normalize(x, **kw), 1)[1], tiles, t),
            "torch": rate(lambda x: (ref_t.normalize(x, **kw), 1)[1], chw, t)}
    bs = args.batch
    batches = [torch.from_numpy(np.stack(tiles[i:i + bs])).permute(0, 3, 1, 2).contiguous()
               for i in range(0, len(tiles) - bs + 1, bs)] or [
        torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()]
    cuda = torch.cuda.is_available()
    gbatches = [b.cuda() for b in batches] if cuda else None
    for m in methods:
        r = {}
        for mode in ("tile", "ctx"):
            n = StainNormalizer(m, seed=0) if m == "augment" else StainNormalizer(m)
            if mode == "ctx":
                n.set_context(thumb)
            r[f"numpy_{mode}"] = rate(lambda x: (n.transform(x), 1)[1], tiles, t)
            r[f"torch_{mode}"] = rate(lambda b: (n.transform_batch(b), b.shape[0])[1], batches, t, args.rounds)
            if cuda:
                def gfn(b):
                    n.transform_batch(b)
                    torch.cuda.synchronize()
                    return b.shape[0]
                r[f"cuda_{mode}"] = rate(gfn, gbatches, t, args.rounds)
        ref = res["torchstain"][TS_REF[m]]
        r["ratio_numpy"] = {k: r[f"numpy_{k}"] / ref["numpy"] for k in ("tile", "ctx")}
        r["ratio_torch"] = {k: r[f"torch_{k}"] / ref["torch"] for k in ("tile", "ctx")}
        res["methods"][m] = r
        print(f"  {m:19s} np tile {r['numpy_tile']:7.0f}  np ctx {r['numpy_ctx']:7.0f}  "
              f"torch tile {r['torch_tile']:7.0f}  torch ctx {r['torch_ctx']:7.0f}"
              + (f"  cuda tile {r['cuda_tile']:8.0f}  cuda ctx {r['cuda_ctx']:8.0f}" if cuda else ""),
              flush=True)
    return res


def bench_agreement(tiles):
    """MAD (grey levels) to torchstain per method on the same target and source tiles."""
    import torchstain

    target = tiles[len(tiles) // 2]
    src = [x for i, x in enumerate(tiles) if i != len(tiles) // 2]
    out = {}

    def std_b(x):
        return cv2.convertScaleAbs(x, alpha=float(np_ops.brightness_factor(np_ops.brightness_value(x, 90))))

    for m, ts_name, pre in (("macenko_fast", "macenko", None), ("macenko", "macenko", std_b),
                            ("reinhard_fast", "reinhard", None), ("reinhard", "reinhard", std_b)):
        cls = {"macenko": torchstain.normalizers.MacenkoNormalizer,
               "reinhard": torchstain.normalizers.ReinhardNormalizer}[ts_name]
        ref = cls(backend="numpy")
        ref.fit(target if pre is None else pre(target))
        ours = StainNormalizer(m).fit(target)
        diffs, maxd, n_ok = [], 0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x in src:
                a = ours.transform(x).astype(np.int16)
                r = ref.normalize(x if pre is None else pre(x), **({"stains": False} if ts_name == "macenko" else {}))
                b = np.asarray(r[0] if isinstance(r, tuple) else r).astype(np.int16)
                d = np.abs(a - b)
                diffs.append(d.mean())
                maxd = max(maxd, int(np.percentile(d, 99.9)))
                n_ok += 1
        out[m] = {"reference": f"torchstain {ts_name} (numpy)" + (" on brightness-standardized input" if pre else ""),
                  "mad_mean": float(np.mean(diffs)), "mad_worst_tile": float(np.max(diffs)),
                  "p99.9_abs_diff_worst_tile": maxd, "tiles": n_ok}
        print(f"  {m:14s} vs {out[m]['reference']}: MAD {out[m]['mad_mean']:.3f} "
              f"(worst tile {out[m]['mad_worst_tile']:.3f}, 99.9th pct |diff| <= {maxd}) over {n_ok} tiles")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short timings (about a minute in all)")
    ap.add_argument("--slide", help="path to cmu_small_region.svs")
    ap.add_argument("--batch", type=int, default=32, help="torch batch size")
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-agreement", action="store_true")
    args = ap.parse_args(argv)
    args.min_time = 0.5 if args.quick else 2.5
    args.rounds = 3 if args.quick else 5  # for torch batches (each call is a whole batch)
    slide = find_slide(args.slide)
    if slide is None:
        sys.exit("cmu_small_region.svs not found: pass --slide")
    tiles, thumb = load_tiles(slide, n_max=64 if args.quick else 96)
    import torchstain

    info = {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
            "torch": torch.__version__, "torchstain": getattr(torchstain, "__version__", "?"),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": 1, "tile_px": 256, "n_tiles": len(tiles), "batch": args.batch, "quick": args.quick}
    info["loadavg_start"] = os.getloadavg()
    print(f"histolight.norm benchmark: {len(tiles)} tiles of 256 px from {slide.name}, 1 thread, "
          f"torch batch {args.batch}, cuda={info['cuda']}, load average {info['loadavg_start']}")
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    res = bench_speed(tiles, thumb, args, args.methods.split(","))
    ts = res["torchstain"]
    print("\nimages/s (256 px, 1 thread); ratio = ours / torchstain (same backend kind)")
    print(f"torchstain reference: macenko numpy {ts['macenko']['numpy']:.0f}, torch {ts['macenko']['torch']:.0f}; "
          f"reinhard numpy {ts['reinhard']['numpy']:.0f}, torch {ts['reinhard']['torch']:.0f}")
    hdr = f"{'method':19s} {'ref':8s} {'np tile':>8s} {'x':>5s} {'np ctx':>8s} {'x':>5s} {'th tile':>8s} {'x':>5s} {'th ctx':>8s} {'x':>5s}"
    print(hdr)
    for m, r in res["methods"].items():
        print(f"{m:19s} {TS_REF[m]:8s} {r['numpy_tile']:8.0f} {r['ratio_numpy']['tile']:5.1f} "
              f"{r['numpy_ctx']:8.0f} {r['ratio_numpy']['ctx']:5.1f} {r['torch_tile']:8.0f} "
              f"{r['ratio_torch']['tile']:5.1f} {r['torch_ctx']:8.0f} {r['ratio_torch']['ctx']:5.1f}")
    if not args.no_agreement:
        print("\nagreement with torchstain (same target tile, per-tile source statistics):")
        res["agreement"] = bench_agreement(tiles[: 24 if args.quick else len(tiles)])
    info["loadavg_end"] = os.getloadavg()
    res["info"] = info
    res["seconds"] = time.perf_counter() - t0
    print(f"\ntotal {res['seconds']:.0f} s, load average at end {info['loadavg_end']} "
          f"(on {os.cpu_count()} CPUs; other processes slow every column alike)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
