"""Speed (and agreement) benchmark of histolight.norm on real 256 px H&E tiles.

    python bench/bench_norm.py [--quick] [--slide PATH] [--batch 32] [--json out.json] [--no-agreement]

Speed: images/s per method for NumPy (one image at a time) and PyTorch (batched), each with
per-tile source statistics ("tile") and with a contextual source fit on the slide thumbnail
("ctx"), single-threaded (cv2.setNumThreads(1), torch.set_num_threads(1)); torchstain timed in
the same rounds as the reference (NumPy backend for the NumPy columns, torch backend for the
torch columns) and the ratio printed. BLAS is limited to one thread (OMP/OPENBLAS/MKL_NUM_THREADS=1). With a CUDA device, torch batched is also timed on GPU.
Agreement: mean absolute difference (grey levels) to torchstain on the same tiles and target.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread everywhere,
    os.environ.setdefault(_v, "1")  # numpy BLAS included

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

cv2.setNumThreads(1)
torch.set_num_threads(1)

from histolight.norm import StainNormalizer, available_methods, np_ops  # noqa: E402
from histolight.norm.make_presets import find_slide  # noqa: E402

TS_REF = {
    "macenko": "macenko",
    "macenko_fast": "macenko",
    "vahadane": "macenko",
    "augment": "macenko",
    "reinhard": "reinhard",
    "reinhard_fast": "reinhard",
    "reinhard_mask": "reinhard",
    "reinhard_fast_mask": "reinhard",
}


def load_tiles(slide_path, n_max=96, size=256):
    import openslide

    with openslide.OpenSlide(str(slide_path)) as s:
        w, h = s.dimensions
        full = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
        thumb = np.asarray(s.get_thumbnail((1024, 1024)).convert("RGB"))
    tiles = []
    for y in range(0, h - size + 1, size // 2):
        for x in range(0, w - size + 1, size // 2):
            t = np.ascontiguousarray(full[y : y + size, x : x + size])
            if (np_ops.luma(t) < 220).mean() >= 0.5:
                tiles.append(t)
    idx = np.linspace(0, len(tiles) - 1, min(n_max, len(tiles))).round().astype(int)
    return [tiles[i] for i in sorted(set(idx.tolist()))], thumb


class Timer:
    """Best-of-rounds images/s of several workloads, measured interleaved (round-robin), so that a
    method and its torchstain reference see the same machine load."""

    def __init__(self):
        self.jobs, self.best, self.best_cpu = {}, {}, {}

    def add(self, key, fn, items):
        self.jobs[key] = (fn, items)
        fn(items[0])  # warm-up
        self.best[key] = self.best_cpu[key] = 0.0

    def run(self, seconds_each, rounds):
        """Best wall-clock rate per job; `best_cpu` holds the rate by this process's CPU time."""
        per = seconds_each / rounds
        for _ in range(rounds):
            for key, (fn, items) in self.jobs.items():
                n, t0, c0, dt, i = 0, time.perf_counter(), time.process_time(), 0.0, 0
                while dt < per or n == 0:
                    n += fn(items[i % len(items)])
                    i += 1
                    dt = time.perf_counter() - t0
                self.best[key] = max(self.best[key], n / dt)
                self.best_cpu[key] = max(self.best_cpu[key], n / max(time.process_time() - c0, 1e-9))
        return self.best


def bench_speed(tiles, thumb, args, methods):
    import torchstain

    target = tiles[len(tiles) // 2]
    chw = [torch.from_numpy(x).permute(2, 0, 1).contiguous() for x in tiles]
    refs = {}
    for name, cls in (
        ("macenko", torchstain.normalizers.MacenkoNormalizer),
        ("reinhard", torchstain.normalizers.ReinhardNormalizer),
    ):
        ref_np, ref_t = cls(backend="numpy"), cls(backend="torch")
        ref_np.fit(target)
        ref_t.fit(torch.from_numpy(target).permute(2, 0, 1).contiguous())
        kw = {"stains": False} if name == "macenko" else {}
        refs[name] = (
            lambda x, r=ref_np, kw=kw: (r.normalize(x, **kw), 1)[1],
            lambda x, r=ref_t, kw=kw: (r.normalize(x, **kw), 1)[1],
        )
    bs = args.batch
    batches = [
        torch.from_numpy(np.stack(tiles[i : i + bs])).permute(0, 3, 1, 2).contiguous() for i in range(0, len(tiles) - bs + 1, bs)
    ] or [torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()]
    cuda = torch.cuda.is_available()
    gbatches = [b.cuda() for b in batches] if cuda else None
    res = {"methods": {}}
    for m in methods:
        tm = Timer()
        ref_np, ref_t = refs[TS_REF[m]]
        tm.add("ref_numpy", ref_np, tiles)
        tm.add("ref_torch", ref_t, chw)
        for mode in ("tile", "ctx"):
            n = StainNormalizer(m, seed=0) if m == "augment" else StainNormalizer(m)
            if mode == "ctx":
                n.set_context(thumb)
            tm.add(f"numpy_{mode}", lambda x, n=n: (n.transform(x), 1)[1], tiles)
            tm.add(f"torch_{mode}", lambda b, n=n: (n.transform_batch(b), b.shape[0])[1], batches)
            if cuda:

                def gfn(b, n=n):
                    n.transform_batch(b)
                    torch.cuda.synchronize()
                    return b.shape[0]

                tm.add(f"cuda_{mode}", gfn, gbatches)
        r = dict(tm.run(args.min_time, args.rounds))
        r["cpu_time_rates"] = dict(tm.best_cpu)
        r["ratio_numpy"] = {k: r[f"numpy_{k}"] / r["ref_numpy"] for k in ("tile", "ctx")}
        r["ratio_torch"] = {k: r[f"torch_{k}"] / r["ref_torch"] for k in ("tile", "ctx")}
        res["methods"][m] = r
        print(
            f"  {m:19s} np tile {r['numpy_tile']:6.0f}  np ctx {r['numpy_ctx']:6.0f}  "
            f"torchstain-np {r['ref_numpy']:5.0f} | torch tile {r['torch_tile']:5.0f}  "
            f"torch ctx {r['torch_ctx']:5.0f}  torchstain-torch {r['ref_torch']:5.0f}"
            + (f" | cuda tile {r['cuda_tile']:7.0f}  cuda ctx {r['cuda_ctx']:7.0f}" if cuda else ""),
            flush=True,
        )
    return res


def bench_agreement(tiles):
    """MAD (grey levels) to torchstain per method on the same target and source tiles."""
    import torchstain

    target = tiles[len(tiles) // 2]
    src = [x for i, x in enumerate(tiles) if i != len(tiles) // 2]
    out = {}

    def std_b(x):
        return cv2.convertScaleAbs(x, alpha=float(np_ops.brightness_factor(np_ops.brightness_value(x, 90))))

    for m, ts_name, pre in (
        ("macenko_fast", "macenko", None),
        ("macenko", "macenko", std_b),
        ("reinhard_fast", "reinhard", None),
        ("reinhard", "reinhard", std_b),
    ):
        cls = {"macenko": torchstain.normalizers.MacenkoNormalizer, "reinhard": torchstain.normalizers.ReinhardNormalizer}[
            ts_name
        ]
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
        out[m] = {
            "reference": f"torchstain {ts_name} (numpy)" + (" on brightness-standardized input" if pre else ""),
            "mad_mean": float(np.mean(diffs)),
            "mad_worst_tile": float(np.max(diffs)),
            "p99.9_abs_diff_worst_tile": maxd,
            "tiles": n_ok,
        }
        print(
            f"  {m:14s} vs {out[m]['reference']}: MAD {out[m]['mad_mean']:.3f} "
            f"(worst tile {out[m]['mad_worst_tile']:.3f}, 99.9th pct |diff| <= {maxd}) over {n_ok} tiles"
        )
    return out


def bench_vahadane_vs_sklearn(tiles, n_px=1024):
    """Angle (degrees) between our Vahadane stain vectors and scikit-learn's DictionaryLearning
    (positive code and dictionary, same objective 0.5||Y - AD||^2 + 0.1|A|_1, ||d|| <= 1) on the same
    tissue OD pixels: our converged solver (300 iterations) and our default (Macenko init, 10 iterations)."""
    from sklearn.decomposition import DictionaryLearning

    lut = np_ops.od_lut(240.0)
    rows = []
    for t in tiles:
        od = np_ops.to_od(t, lut).copy()
        m8 = np_ops.od_tissue_mask(t, np_ops.od_tissue_vmax(lut, 0.15))
        y = od.reshape(-1, 3)[np_ops.fit_subsample_index(m8, n_px)].astype(np.float64)
        dl = DictionaryLearning(
            n_components=2,
            alpha=0.1,
            fit_algorithm="cd",
            transform_algorithm="lasso_cd",
            positive_code=True,
            positive_dict=True,
            max_iter=200,
            tol=1e-8,
            random_state=0,
        ).fit(y)
        sk = np_ops.finish_dictionary(dl.components_)
        conv = np_ops.dict_learn(y, 0.1, 300)
        n = cv2.countNonZero(m8)
        default = np_ops.dict_learn(y, 0.1, 10, np_ops.macenko_he(od, m8, n, 1.0).T)

        def ang(a, b):
            return np.degrees(np.arccos(np.clip((a * b).sum(1), -1, 1))).max()

        rows.append((ang(conv, sk), ang(default, sk)))
        print(f"  tile {len(rows)}: max angle to sklearn: converged {rows[-1][0]:.3f} deg, default (10 it) {rows[-1][1]:.2f} deg")
    return {"n_px": n_px, "max_angle_converged_deg": [r[0] for r in rows], "max_angle_default_deg": [r[1] for r in rows]}


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)  # torchstain's own __version__ string is stale
    except PackageNotFoundError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short timings (about a minute in all)")
    ap.add_argument("--slide", help="path to cmu_small_region.svs")
    ap.add_argument("--batch", type=int, default=32, help="torch batch size")
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--no-agreement", action="store_true")
    args = ap.parse_args(argv)
    args.min_time = 0.6 if args.quick else 3.0  # seconds per workload, split into rounds
    args.rounds = 3 if args.quick else 6
    slide = find_slide(args.slide)
    if slide is None:
        sys.exit("cmu_small_region.svs not found: pass --slide")
    tiles, thumb = load_tiles(slide, n_max=64 if args.quick else 96)
    if args.batch > len(tiles):
        args.batch = len(tiles)
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "torch": torch.__version__,
        "torchstain": _dist_version("torchstain"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": 1,
        "tile_px": 256,
        "n_tiles": len(tiles),
        "batch": args.batch,
        "quick": args.quick,
    }
    info["loadavg_start"] = os.getloadavg()
    print(
        f"histolight.norm benchmark: {len(tiles)} tiles of 256 px from {slide.name}, 1 thread, "
        f"torch batch {args.batch}, cuda={info['cuda']}, load average {info['loadavg_start']}"
    )
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    res = bench_speed(tiles, thumb, args, args.methods.split(","))
    print(
        "\nimages/s (256 px tiles, 1 thread); x = ours / torchstain timed interleaved in the same rounds "
        "(NumPy columns vs torchstain numpy backend, torch columns vs torchstain torch backend)"
    )
    print(
        f"{'method':19s} {'ref':8s} {'np tile':>8s} {'x':>5s} {'np ctx':>8s} {'x':>5s} {'ts-np':>6s} "
        f"{'th tile':>8s} {'x':>5s} {'th ctx':>8s} {'x':>5s} {'ts-th':>6s}"
    )
    for m, r in res["methods"].items():
        print(
            f"{m:19s} {TS_REF[m]:8s} {r['numpy_tile']:8.0f} {r['ratio_numpy']['tile']:5.1f} "
            f"{r['numpy_ctx']:8.0f} {r['ratio_numpy']['ctx']:5.1f} {r['ref_numpy']:6.0f} "
            f"{r['torch_tile']:8.0f} {r['ratio_torch']['tile']:5.1f} {r['torch_ctx']:8.0f} "
            f"{r['ratio_torch']['ctx']:5.1f} {r['ref_torch']:6.0f}"
        )
    print("\nsame, by CPU time of this process (less sensitive to other processes on the machine):")
    for m, r in res["methods"].items():
        c = r["cpu_time_rates"]
        print(
            f"{m:19s} {TS_REF[m]:8s} {c['numpy_tile']:8.0f} {c['numpy_tile'] / c['ref_numpy']:5.1f} "
            f"{c['numpy_ctx']:8.0f} {c['numpy_ctx'] / c['ref_numpy']:5.1f} {c['ref_numpy']:6.0f} "
            f"{c['torch_tile']:8.0f} {c['torch_tile'] / c['ref_torch']:5.1f} {c['torch_ctx']:8.0f} "
            f"{c['torch_ctx'] / c['ref_torch']:5.1f} {c['ref_torch']:6.0f}"
        )
    if not args.no_agreement:
        print("\nagreement with torchstain (same target tile, per-tile source statistics):")
        res["agreement"] = bench_agreement(tiles[: 24 if args.quick else len(tiles)])
        if not args.quick:
            print("\nvahadane stain vectors vs scikit-learn DictionaryLearning (same pixels, same objective):")
            res["vahadane_vs_sklearn"] = bench_vahadane_vs_sklearn(tiles[:: max(1, len(tiles) // 6)][:6])
    info["loadavg_end"] = os.getloadavg()
    res["info"] = info
    res["seconds"] = time.perf_counter() - t0
    print(
        f"\ntotal {res['seconds']:.0f} s, load average at end {info['loadavg_end']} "
        f"(on {os.cpu_count()} CPUs; other processes slow every column alike)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
