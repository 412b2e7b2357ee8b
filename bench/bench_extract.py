"""Tile-extraction benchmark: a plain OpenSlide pipeline vs histolight, timed in the same run on the same slides.

    python bench/bench_extract.py --quick    # ~2-4 min on the 2-core VM: 8192^2 synthetic slide, best of 2
    python bench/bench_extract.py            # 16384^2 synthetic slide, best of 5 (5-12 min)
    python bench/bench_extract.py --only A C overhead --reps 3
    python bench/bench_extract.py --only A B C --also-src /tmp/old   # + the same cases with another checkout's src/

Cases (every timed run in its own fresh Python process, imports outside the clock; ratio = tiles/s against the
``baseline`` of the same case; ``bench/_extract_cases.py`` has the code):

- **A** resampled: 256 px tiles at 0.5 um/px (``tile_um=128``) from a synthetic 0.25 um/px Aperio-style slide
  (16384^2 base px, ``--quick`` 8192^2; JPEG q90 tiles of 256 px, made with ``histolight.demo`` and cached in
  ``outputs/bench/extract/slides``), every grid tile. ``baseline`` = ``openslide.OpenSlide.read_region`` at level 0
  -> RGB -> ``cv2.resize`` (INTER_AREA) -> JPEG q95 (cv2) -> ``histolight.io.tfrecord.TFRecordWriter``;
  ``direct`` = the same pipeline reading through ``histolight.wsi.Slide``; ``extractor`` =
  ``histolight.extract.extract_tiles(workers=1)`` with QC, ROI and pixel filters off and no report (same tiles).
- **B** level-based: the same slide at ``tile_um='20x'`` (its nearest level, level 0, read as stored: 256 px tiles
  aligned with the stored tiles, so histolight copies the slide's own JPEG tiles); ``baseline`` = ``read_region``
  256^2 at level 0 -> JPEG q95 -> TFRecord (no resize).
- **C** real small slide: ``../shared/data/slides/cmu_small_region.svs`` (2220 x 2967, 0.499 um/px, one level) with
  the extractor's defaults (Otsu QC, grayspace filter, report images); ``baseline`` = the plain pipeline on exactly the
  tiles the extractor keeps (257 base px -> 256 px). ``slide`` = one slide through the per-slide path of a cohort run
  (open + ``extract_slide``: plan, QC, tiles, TFRecord + index, table, summary JSON, report images);
  ``extractor`` = ``extract_tiles`` end to end on a 1-slide cohort (+ runner, cohort table, summary CSV, HTML report).
- **D** two workers: a cohort of two links to the case-A slide, ``extract_tiles(workers=1)`` and ``workers=2``
  (spawned workers, start-up included) against the baseline over the same cohort; with a **parallel control** (one
  tile-decode loop in 1 and 2 processes at once: what a second process can add on the machine right now).
- **overhead**: the per-slide fixed cost on C: the per-slide path minus the tiles' own work (the kept tiles read,
  filtered, encoded, written), best of 15 in one process, and the fixed parts alone (open, plan = grid + ROI + QC,
  report images, tile table + summary).
- **readpath** (full runs, or ``--only readpath``): OpenSlide ``read_region`` vs the direct reader per stored tile and
  per region, JPEG decoders, and the max abs pixel difference of the two read paths at every level.

Tiles/s = tiles written / wall seconds (slide open included); tiles/CPU-s is less sensitive to other processes' load.
Results also go to ``outputs/bench/extract/results[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

if os.environ.get("HL_BENCH_SRC"):  # a case timed with another checkout's package (--also-src)
    sys.path.insert(0, os.environ["HL_BENCH_SRC"])

from _extract_cases import CASES  # noqa: E402

DEFAULT_OUT = ROOT / "outputs" / "bench" / "extract"
CMU = ROOT.parent / "shared" / "data" / "slides" / "cmu_small_region.svs"
#: extractor options that keep every grid tile (the baseline's tiles)
EVERY_TILE = dict(qc=[], roi_method="ignore", grayspace_fraction=1.0, whitespace_fraction=1.0, report=False)
#: goals of issue #17 (ratio to the baseline; overhead in ms)
GOALS = {"A": 3.0, "B": 1.3, "C": 1.0}
OVERHEAD_GOAL_MS = 50


# ---------------------------------------------------------------------------------------------- slides


def _make_slide(path: str, size: int, mpp: float, seed: int) -> None:
    """Synthetic H&E-like ``size x size`` slide at ``mpp``: 2048 px demo-cohort patches (tissue pieces with
    tumor / stroma / necrosis texture on white background), flipped and tiled to cover the slide."""
    import numpy as np

    from histolight.demo import CLASSES, DemoConfig, _layout, _render, write_aperio_svs
    from histolight.roi import rasterize_rois

    p = 2048
    cfg = DemoConfig(n_slides=1, width=p, height=p, mpp=mpp, seed=seed)
    patches = []
    for k in range(2):
        rng = np.random.default_rng([seed, k])
        rois = _layout(cfg, rng, k)
        labels = rasterize_rois(rois, (p, p), 1.0, labels=list(CLASSES), mode="multiclass")
        patches.append(_render(cfg, labels, rng))
    img = np.empty((size, size, 3), np.uint8)
    rng = np.random.default_rng(seed)
    for by in range(0, size, p):
        for bx in range(0, size, p):
            t = patches[int(rng.integers(0, 2))]
            if rng.integers(0, 2):
                t = t[::-1]
            if rng.integers(0, 2):
                t = t[:, ::-1]
            img[by : by + p, bx : bx + p] = t[: size - by, : size - bx]
    write_aperio_svs(path, img, mpp, tile=256, quality=90)


def ensure_slide(out: Path, size: int, mpp: float = 0.25, seed: int = 0) -> Path:
    path = out / "slides" / f"synth_{size}px_{mpp:g}mpp.svs"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        print(f"  generating {path.name} ({size}x{size} px at {mpp} um/px) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--_make", str(path), str(size), str(mpp), str(seed)], check=True)
        print(f"  ... {time.time() - t0:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    return path


def _warm(path: Path) -> None:
    """Read the file once so every case sees it in the page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def kept_tiles(slide: Path, options: dict) -> list[tuple[int, int]]:
    """Top-left corners (base px) of the tiles the extractor keeps on ``slide`` with ``options`` (an untimed run)."""
    from histolight.extract import extract_slide, make_config
    from histolight.wsi import Slide

    with tempfile.TemporaryDirectory() as d, Slide(slide) as s:
        t = extract_slide(s, make_config(tile_px=256, **options), d).table
    return [(int(x), int(y)) for x, y in zip(t.x, t.y)]


# ---------------------------------------------------------------------------------------------- driver


def run_case(spec: dict) -> dict:
    """Run one case in a fresh interpreter; returns its JSON result."""
    env = dict(os.environ, HL_BENCH_SRC=spec.pop("src")) if "src" in spec else None
    p = subprocess.run([sys.executable, __file__, "--_case", json.dumps(spec)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_rounds(specs: dict, reps: int, tmp: Path) -> dict:
    """Run every case of ``specs`` (key -> spec) ``reps`` times, interleaved (round r runs each case once) so that
    load from other processes hits all cases alike. Keeps each case's best run (highest tiles/s; its RSS is the max
    over runs) plus ``runs`` (tiles/s of every run)."""
    runs: dict = {k: [] for k in specs}
    for r in range(reps):
        for key, spec in specs.items():
            spec = dict(spec)
            d = tmp / f"case-{abs(hash(key)) % 10**8}-{r}"
            d.mkdir()
            spec.setdefault("outdir", str(d))
            res = run_case(spec)
            shutil.rmtree(d, ignore_errors=True)
            runs[key].append(res)
            print(
                f"  [{r + 1}/{reps}] {key}: {res['tiles']} tiles, {res['seconds']:.3f} s, {res['tiles_per_s']:.1f} tiles/s, "
                f"peak RSS {res['rss_mb']:.0f} MB (workers {res['rss_children_mb']:.0f} MB)",
                flush=True,
            )
    out = {}
    for key, rs in runs.items():
        best = dict(max(rs, key=lambda x: x["tiles_per_s"]))
        best["runs"] = [x["tiles_per_s"] for x in rs]
        best["rss_mb"] = max(x["rss_mb"] for x in rs)
        best["rss_children_mb"] = max(x["rss_children_mb"] for x in rs)
        out[key] = best
    return out


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def build_specs(parts: set, synth: Path, cohort: list[str], cmu: Path | None) -> dict:
    """``"<case> | <pipeline>" -> case spec`` of the throughput cases in ``parts``."""
    s = str(synth)
    specs = {}
    if "A" in parts:
        specs["A | baseline"] = {"kind": "pipeline", "slides": [s], "reader": "openslide", "tile_um": 128}
        specs["A | direct"] = {"kind": "pipeline", "slides": [s], "reader": "direct", "tile_um": 128}
        specs["A | extractor"] = {"kind": "extractor", "slides": [s], "workers": 1, "options": {"tile_um": 128, **EVERY_TILE}}
    if "B" in parts:
        specs["B | baseline"] = {"kind": "pipeline", "slides": [s], "reader": "openslide", "tile_um": "20x"}
        specs["B | extractor"] = {"kind": "extractor", "slides": [s], "workers": 1, "options": {"tile_um": "20x", **EVERY_TILE}}
    if "C" in parts and cmu is not None:
        tiles = {str(cmu): kept_tiles(cmu, {"tile_um": 128})}
        specs["C | baseline"] = {"kind": "pipeline", "slides": [str(cmu)], "reader": "openslide", "tile_um": 128, "tiles": tiles}
        specs["C | slide"] = {"kind": "slide", "slide_path": str(cmu), "options": {"tile_um": 128}}
        specs["C | extractor"] = {"kind": "extractor", "slides": [str(cmu)], "workers": 1, "options": {"tile_um": 128}}
    if "D" in parts:
        specs["D | baseline"] = {"kind": "pipeline", "slides": cohort, "reader": "openslide", "tile_um": 128}
        for w in (1, 2):
            specs[f"D | extractor w={w}"] = {
                "kind": "extractor",
                "slides": cohort,
                "workers": w,
                "options": {"tile_um": 128, **EVERY_TILE},
            }
    return specs


def with_other_src(specs: dict, src: Path) -> dict:
    """``specs`` plus, after each histolight case, the same case run with the package in ``src`` (another checkout's
    ``src/``, e.g. the code before a change: ``git archive <commit> src | tar -x -C /tmp/old``), as ``<pipeline> [other]``."""
    out = {}
    for key, spec in specs.items():
        out[key] = spec
        if spec["kind"] != "pipeline":
            out[f"{key} [other]"] = {**spec, "src": str(src)}
    return out


def report(results: dict, reps: int) -> None:
    best = results["cases"]
    print("\n" + "=" * 110)
    print(
        f"Extraction throughput, best of {reps} interleaved runs (tiles/s; ratio = vs the baseline of the same case). "
        "tiles/CPU-s counts the CPU seconds of the case's process and its workers."
    )
    hdr = [
        "case",
        "pipeline",
        "tiles",
        "sec",
        "tiles/s",
        "ratio",
        "tiles/CPU-s",
        "ratio",
        "RSS MB",
        "workers MB",
        "runs (tiles/s)",
    ]
    widths = [5, 14, 6, 7, 8, 6, 11, 6, 7, 10, 22]
    print(_fmt_row(hdr, widths))
    for case in dict.fromkeys(k.split(" | ")[0] for k in best):
        base = best.get(f"{case} | baseline")
        for key, r in ((k, v) for k, v in best.items() if k.split(" | ")[0] == case):
            ratio = f"{r['tiles_per_s'] / base['tiles_per_s']:.2f}x" if base else "-"
            cpu_ratio = f"{r['tiles_per_cpu_s'] / base['tiles_per_cpu_s']:.2f}x" if base else "-"
            cells = [case, key.split(" | ")[1], r["tiles"], f"{r['seconds']:.3f}", f"{r['tiles_per_s']:.1f}", ratio]
            cells += [f"{r['tiles_per_cpu_s']:.1f}", cpu_ratio, f"{r['rss_mb']:.0f}", f"{r['rss_children_mb']:.0f}"]
            print(_fmt_row([*cells, " ".join(f"{v:.0f}" for v in r["runs"])], widths))
    for c in results.get("parallel_control", []):
        print(
            f"D parallel control (one tile-decode loop, 1 vs 2 processes at once): {c['procs_1_tiles_per_s']:.0f} -> "
            f"{c['procs_2_tiles_per_s']:.0f} tiles/s = {c['ratio']:.2f}x (what a second process can add right now)"
        )
    ov = results.get("overhead")
    if ov:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in ov["parts_ms"].items())
        print(
            f"\nPer-slide overhead (CMU, {ov['tiles']} tiles kept): per-slide path {1e3 * ov['seconds']:.1f} ms - tiles' own "
            f"work {1e3 * ov['tiles_seconds']:.1f} ms = {ov['overhead_ms']:.1f} ms wall ({ov['overhead_cpu_ms']:.1f} ms CPU); "
            f"fixed parts alone (ms): {parts}"
        )
        print(
            f"C in one warm process (each slide of a cohort): plain pipeline {1e3 * ov['plain_seconds']:.1f} ms, per-slide "
            f"path {1e3 * ov['seconds']:.1f} ms: {ov['warm_ratio']:.2f}x plain ({ov['warm_cpu_ratio']:.2f}x in CPU time)"
        )
    print("\nGoals (issue #17):")
    for case, goal in GOALS.items():
        for key in (k for k in best if k.startswith(f"{case} | ") and not k.endswith(("baseline", "direct", "[other]"))):
            r = best[key]["tiles_per_s"] / best[f"{case} | baseline"]["tiles_per_s"]
            print(f"  {key:24s} {r:5.2f}x plain (goal >= {goal}x): {'met' if r >= goal else 'NOT met'}")
    if ov:
        r = ov["warm_ratio"]
        print(f"  C | slide, warm process  {r:5.2f}x plain (goal >= {GOALS['C']}x): {'met' if r >= GOALS['C'] else 'NOT met'}")
        print(f"  per-slide overhead       {ov['overhead_ms']:5.1f} ms (goal <= {OVERHEAD_GOAL_MS} ms)")
    for label, r in results.get("read_path", {}).items():
        print(
            f"\nRead path {label}: stored tile {r['tile']}: OpenSlide {r['tile_openslide_us']:.0f} us, direct "
            f"{r['tile_direct_us']:.0f} us, stored JPEG bytes {r['tile_stored_jpeg_us']:.0f} us; decode only: "
            + ", ".join(f"{k} {v:.0f} us" for k, v in r["decoders"].items())
        )
        for name in ("grid", "random"):
            o, d = r[f"region_{name}_openslide_us"], r[f"region_{name}_direct_us"]
            print(f"    {r['extract_px']}^2 region ({name}): OpenSlide {o:.0f} us, direct {d:.0f} us ({o / d:.1f}x)")
        print(f"    max |direct - OpenSlide| = {r['max_abs_diff']} over {r['regions_compared']} regions (every level)")
    print(f"\nload average: start {results['load_start']}, end {results['load_end']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8192^2 synthetic slide, best of 2 (~2-4 min)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="cache of generated slides + JSON results")
    ap.add_argument("--reps", type=int, default=None, help="runs per case, best kept (default 5, --quick 2)")
    ap.add_argument(
        "--only", nargs="+", choices=("A", "B", "C", "D", "overhead", "readpath"), help="sections to run (default: all)"
    )
    ap.add_argument("--also-src", type=Path, help="also time the histolight cases with the package in DIR/src (before/after)")
    args = ap.parse_args(argv)
    parts = set(args.only or ("A", "B", "C", "D", "overhead") + (() if args.quick else ("readpath",)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = 8192 if args.quick else 16384
    reps = args.reps or (2 if args.quick else 5)
    load0 = _loadavg()
    print(
        f"bench_extract: 256 px tiles; {os.cpu_count()} CPUs; quick={args.quick}; best of {reps}; load average {load0}",
        flush=True,
    )
    synth = ensure_slide(out, size)
    cmu = CMU if CMU.exists() else None
    if cmu is None:
        print(f"  (real slide {CMU} not found: case C and the overhead skipped)")
    for p in (synth, cmu):
        if p is not None:
            _warm(p)
    results: dict = {"quick": args.quick, "reps": reps, "cpus": os.cpu_count(), "load_start": load0, "synthetic": str(synth)}
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        cohort = []
        for i in range(2):
            os.symlink(synth, tmp / f"s{i}.svs")
            cohort.append(str(tmp / f"s{i}.svs"))
        specs = build_specs(parts, synth, cohort, cmu)
        if args.also_src:
            specs = with_other_src(specs, args.also_src.resolve() / "src")
        print(f"\n== throughput: {len(specs)} cases x {reps} runs", flush=True)
        results["cases"] = run_rounds(specs, reps, tmp)
        if "D" in parts:
            results["parallel_control"] = [run_case({"kind": "parallel", "slide_path": str(synth)}) for _ in range(2)]
        if "overhead" in parts and cmu is not None:
            d = tmp / "overhead"
            results["overhead"] = run_case(
                {"kind": "overhead", "slide_path": str(cmu), "outdir": str(d), "options": {"tile_um": 128}}
            )
        if "readpath" in parts:
            results["read_path"] = {
                label: run_case({"kind": "readpath", "slide_path": str(p), "quick": args.quick})
                for label, p in ((f"synth {size}^2", synth), ("CMU", cmu))
                if p is not None
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_end"] = _loadavg()
    report(results, reps)
    (out / ("results_quick.json" if args.quick else "results.json")).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_make":
        _make_slide(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--_case":
        spec = json.loads(sys.argv[2])
        print(json.dumps(CASES[spec.pop("kind")](**spec)))
        sys.exit(0)
    sys.exit(main())
