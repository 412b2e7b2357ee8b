"""Tile-extraction benchmark: a plain OpenSlide baseline vs histolight, timed in the same run on the same slides.

    python bench/bench_extract.py            # full run (3-9 min on the 2-core VM, depending on other load)
    python bench/bench_extract.py --quick    # 1-2 min

What is timed (every case runs in its own fresh Python process, so peak RSS is per case):

- ``baseline``   plain pipeline, single process: ``openslide.OpenSlide.read_region`` at level 0 (tile footprint in
                 base px) -> RGB -> ``cv2.resize`` (INTER_AREA) to ``tile_px`` -> JPEG encode (cv2, quality 95) ->
                 ``histolight.io.tfrecord.TFRecordWriter``.
- ``direct``     the same pipeline, reading through ``histolight.wsi.Slide`` (direct tile reader,
                 :mod:`histolight.wsi.tiff_tiles`) instead of OpenSlide: isolates the read path.
- ``extractor``  ``histolight.extract.extract_tiles`` with ``workers=1`` and ``workers=2``, with its filters set to
                 keep every grid tile (``qc=[]``, ``roi_method='ignore'``, grayspace/whitespace fractions 1.0,
                 ``report=False``) so it writes the same tiles as the baseline. Worker scaling (extraction
                 parallelises over slides, spawned workers) uses a cohort of links to the largest synthetic slide:
                 4 x 8192^2 (``--quick``) or 2 x 16384^2. Every case runs OpenCV single-threaded.
- ``parallel control``: the same tile-decode loop in 1 and in 2 processes at once (no extractor): how much a
                 second process can add on this machine at the time of the run (other load makes it < 2x).

Headline case: 256 px tiles at 0.5 um/px (``tile_um=128``) from a synthetic 0.25 um/px Aperio-style slide
(8192 x 8192 base px; generated once with ``histolight.demo.write_aperio_svs`` and cached under
``outputs/bench/extract/slides``). Also the real CMU slide (0.499 um/px, so 128 um ~ 257 base px -> 256 px, ~1:1).
Memory: peak RSS (``ru_maxrss``) of each case process and of its worker children, on two slide sizes.

The read-path section times OpenSlide ``read_region`` against the direct reader per stored tile and per region,
compares JPEG decoders, and checks that both give the same pixels (max abs difference printed).

Tiles/s = tiles written / wall seconds of the case (slide open included, process start excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

DEFAULT_OUT = ROOT / "outputs" / "bench" / "extract"
CMU = ROOT.parent / "shared" / "data" / "slides" / "cmu_small_region.svs"
TILE_PX = 256
TILE_UM = 128.0
QUALITY = 95


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


# ---------------------------------------------------------------------------------------------- cases (child side)


def _grid(width: int, height: int, extract_px: int):
    xs = [x for x in range(0, width - extract_px + 1, extract_px)]
    ys = [y for y in range(0, height - extract_px + 1, extract_px)]
    return [(x, y) for y in ys for x in xs]


def _preimport() -> None:
    """Import everything any case uses, before its clock starts (a per-process cost, the same for every case)."""
    import cv2
    import numpy  # noqa: F401
    import omegaconf  # noqa: F401
    import openslide  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import tifffile  # noqa: F401

    import histolight.io.tfrecord
    import histolight.wsi.tiff_tiles as tt
    from histolight.wsi import Slide  # noqa: F401

    for name in tt.available_decoders():
        tt._make_decoder(name)
    import histolight.extract
    import histolight.extract.report  # noqa: F401

    cv2.setNumThreads(1)  # every case single-threaded OpenCV, as the extractor's worker processes are


def _cpu() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far."""
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def _rss() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ch = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(me, 1), "rss_children_mb": round(ch, 1)}


def case_pipeline(slides: list[str], outdir: str, reader: str) -> dict:
    """Plain single-process pipeline over every full grid tile of each slide."""
    import cv2
    import numpy as np
    import openslide

    from histolight.io.tfrecord import TFRecordWriter
    from histolight.wsi import Slide

    cv2.setNumThreads(1)
    _preimport()
    c0, t0 = _cpu(), time.perf_counter()
    n = 0
    for path in slides:
        name = Path(path).stem
        if reader == "openslide":
            osr = openslide.OpenSlide(path)
            mpp = float(osr.properties["openslide.mpp-x"])
            width, height = osr.dimensions

            def read(x, y, e, osr=osr):
                return np.asarray(osr.read_region((x, y), 0, (e, e)).convert("RGB"))
        else:
            slide = Slide(path)
            assert slide.tile_reader is not None, slide.tile_reader_note
            mpp = slide.mpp
            width, height = slide.dimensions

            def read(x, y, e, slide=slide):
                return slide.read_region((x, y), 0, (e, e))

        ext = round(TILE_UM / mpp)
        with TFRecordWriter(Path(outdir) / f"{name}.tfrecords", slide=name) as w:
            for x, y in _grid(width, height, ext):
                img = cv2.resize(read(x, y, ext), (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
                w.write_tile(buf.tobytes(), x + ext // 2, y + ext // 2)
                n += 1
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    return {
        "tiles": n,
        "seconds": round(dt, 3),
        "tiles_per_s": round(n / dt, 1),
        "cpu_s": round(cpu, 3),
        "tiles_per_cpu_s": round(n / cpu, 1),
        **_rss(),
    }


def case_extractor(slides: list[str], outdir: str, workers: int) -> dict:
    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles

    _preimport()
    ds = Dataset(slides=slides)
    c0, t0 = _cpu(), time.perf_counter()
    res = extract_tiles(
        ds,
        tile_px=TILE_PX,
        tile_um=TILE_UM,
        outdir=outdir,
        workers=workers,
        qc=[],
        roi_method="ignore",
        grayspace_fraction=1.0,
        whitespace_fraction=1.0,
        report=False,
        overwrite=True,
        progress=False,
        quality=QUALITY,
    )
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    s = res.summary
    bad = s[s["status"] != "done"]
    if len(bad):
        raise RuntimeError(f"extractor failed: {bad[['slide', 'status', 'reason']].to_dict('records')}")
    n = int(s["kept"].sum())
    return {
        "tiles": n,
        "grid_tiles": int(s["grid_tiles"].sum()),
        "seconds": round(dt, 3),
        "tiles_per_s": round(n / dt, 1),
        "cpu_s": round(cpu, 3),
        "tiles_per_cpu_s": round(n / cpu, 1),
        **_rss(),
    }


def case_readpath(slide_path: str, quick: bool) -> dict:
    """Per stored tile and per region: OpenSlide read_region vs the direct reader (+ decoders); same pixels?"""
    import numpy as np
    import openslide

    from histolight.wsi import Slide
    from histolight.wsi.tiff_tiles import TiffTileReader, available_decoders

    osr = openslide.OpenSlide(slide_path)
    s = Slide(slide_path)
    r = s.tile_reader
    assert r is not None, s.tile_reader_note
    lv = r.levels[0]
    tw, th = lv.tile_w, lv.tile_h
    W, H = s.dimensions
    rng = np.random.default_rng(0)
    n_tiles = lv.tiles_across * lv.tiles_down
    tiles = rng.choice(n_tiles, size=min(n_tiles, 40 if quick else 120), replace=False)
    out: dict = {"tile": f"{tw}x{th}", "decoders": {}}
    ext = round(TILE_UM / s.mpp)

    def timeit(fn, items, reps=1):
        fn(items[0])
        t0 = time.perf_counter()
        for _ in range(reps):
            for it in items:
                fn(it)
        return (time.perf_counter() - t0) / (reps * len(items)) * 1e6  # us per item

    def os_read(loc, level, size):
        return np.asarray(osr.read_region(loc, level, size).convert("RGB"))

    # per stored tile (full tiles only, level 0): OpenSlide (its own cache: distinct tiles each time) vs decode
    full = [int(t) for t in tiles if (t % lv.tiles_across + 1) * tw <= W and (t // lv.tiles_across + 1) * th <= H]
    locs = [((t % lv.tiles_across) * tw, (t // lv.tiles_across) * th) for t in full]
    out["tile_openslide_us"] = round(timeit(lambda p: os_read(p, 0, (tw, th)), locs), 1)
    rd = TiffTileReader.from_openslide(osr, slide_path, decoder=r.decoder, cache_bytes=0, verify=False)
    out["tile_direct_us"] = round(timeit(lambda t: rd.read_tile(0, t % lv.tiles_across, t // lv.tiles_across), full), 1)
    rd.close()
    # decoders alone, on the tile bytes in memory (the same stream rewriting each needs)
    import cv2

    from histolight.wsi.tiff_tiles import _make_decoder, jpeg_stream

    raw = {}
    with open(slide_path, "rb") as fh:
        for t in full:
            fh.seek(int(lv.offsets[t]))
            raw[t] = fh.read(int(lv.counts[t]))
    for dec in available_decoders():
        fn = _make_decoder(dec)
        out["decoders"][dec] = round(timeit(lambda t, fn=fn: fn(raw[t], lv), full), 1)
    flag = getattr(cv2, "IMREAD_COLOR_RGB", None)

    def cv2_decode(t):  # reference only: OpenCV's libjpeg-turbo on the rewritten stream (tables + Adobe marker)
        buf = np.frombuffer(jpeg_stream(lv.prefix, raw[t]), np.uint8)
        return cv2.imdecode(buf, flag) if flag is not None else cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]

    out["decoders"]["cv2.imdecode"] = round(timeit(cv2_decode, full), 1)
    out["cv2_max_abs_diff"] = max(
        int(np.abs(cv2_decode(t).astype(np.int16) - r.read_tile(0, t % lv.tiles_across, t // lv.tiles_across)).max())
        for t in full[:20]
    )
    # regions: extraction footprint (ext x ext base px) on the tile grid (aligned when ext is a tile multiple)
    # and at random offsets; OpenSlide vs direct (fresh cache per pass, like a first visit)
    maxdiff = 0
    for name, pts in (
        ("grid", _grid(W, H, ext)[: (60 if quick else 200)]),
        ("random", [(int(rng.integers(0, W - ext)), int(rng.integers(0, H - ext))) for _ in range(60 if quick else 200)]),
    ):
        out[f"region_{name}_openslide_us"] = round(timeit(lambda p: os_read(p, 0, (ext, ext)), pts), 1)
        r.cache.clear()
        out[f"region_{name}_direct_us"] = round(timeit(lambda p: s.read_region(p, 0, (ext, ext)), pts), 1)
        for p in pts[:40]:
            maxdiff = max(
                maxdiff, int(np.abs(os_read(p, 0, (ext, ext)).astype(np.int16) - s.read_region(p, 0, (ext, ext))).max())
            )
    # every level: aligned, unaligned, edge and out-of-bounds regions through Slide (fast) vs OpenSlide
    plain = Slide(slide_path, fast=False)
    n_cmp = 0
    for level in range(s.level_count):
        lw, lh = s.level_dimensions[level]
        ds = s.level_downsamples[level]
        boxes = [(0, 0, min(lw, 1024), min(lh, 1024)), (tw, th, tw, th), (lw - 100, lh - 80, 200, 160), (-50, -30, 120, 90)]
        boxes += [
            (int(rng.integers(-64, lw)), int(rng.integers(-64, lh)), int(rng.integers(1, 700)), int(rng.integers(1, 700)))
            for _ in range(10 if quick else 40)
        ]
        for x, y, w, h in boxes:
            loc = (round(x * ds), round(y * ds))
            a = s.read_region(loc, level, (w, h))
            b = plain.read_region(loc, level, (w, h))
            maxdiff = max(maxdiff, int(np.abs(a.astype(np.int16) - b).max()))
            n_cmp += 1
    out["max_abs_diff"] = maxdiff
    out["regions_compared"] = n_cmp + 80
    out["extract_px"] = ext
    out.update(_rss())
    return out


def _decode_loop(args) -> float:
    """CPU-bound control: decode ``n`` stored tiles (no cache) of ``slide_path``; returns loop seconds."""
    slide_path, n = args
    from histolight.wsi import Slide

    s = Slide(slide_path)
    r = s.tile_reader
    r.cache_bytes = 0
    r.close()
    lv = r.levels[0]
    order = sorted(range(len(lv.counts)), key=lambda i: -int(lv.counts[i]))[:100]  # tissue tiles
    t0 = time.perf_counter()
    for k in range(n):
        t = order[k % len(order)]
        r.read_tile(0, t % lv.tiles_across, t // lv.tiles_across)
    return time.perf_counter() - t0


def case_parallel_control(slide_path: str, n: int = 600) -> dict:
    """How much a second process can add on this machine right now: the same decode loop in 1 and 2 spawned
    processes at once (aggregate tiles/s); independent of the extractor."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for p in (1, 2):
        with ctx.Pool(p) as pool:
            pool.map(_decode_loop, [(slide_path, 5)] * p)  # start-up and imports outside the clock
            t0 = time.perf_counter()
            pool.map(_decode_loop, [(slide_path, n)] * p)
            out[f"procs_{p}_tiles_per_s"] = round(p * n / (time.perf_counter() - t0), 1)
    out["ratio"] = round(out["procs_2_tiles_per_s"] / out["procs_1_tiles_per_s"], 2)
    return out


# ---------------------------------------------------------------------------------------------- driver


def run_case(spec: dict) -> dict:
    """Run one case in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, __file__, "--_case", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True)
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
                f"  [{r + 1}/{reps}] {key}: {res['tiles']} tiles, {res['seconds']:.2f} s, "
                f"{res['tiles_per_s']:.1f} tiles/s, peak RSS {res['rss_mb']:.0f} MB "
                f"(children {res['rss_children_mb']:.0f} MB)",
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


def _child(spec: dict) -> dict:
    kind = spec.pop("kind")
    if kind == "pipeline":
        return case_pipeline(**spec)
    if kind == "extractor":
        return case_extractor(**spec)
    if kind == "readpath":
        return case_readpath(**spec)
    if kind == "parallel":
        return case_parallel_control(**spec)
    raise ValueError(kind)


def _extractor_available() -> str | None:
    try:
        from histolight.extract import extract_tiles  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller slides / samples (~1-2 min)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="cache of generated slides + JSON results")
    ap.add_argument("--reps", type=int, default=None, help="runs per case, best kept (default 5, --quick 2)")
    ap.add_argument("--no-extractor", action="store_true", help="skip histolight.extract timings")
    ap.add_argument(
        "--only",
        choices=("throughput", "scaling", "readpath"),
        action="append",
        help="run only these sections (repeatable; default all)",
    )
    args = ap.parse_args(argv)
    parts = set(args.only or ("throughput", "scaling", "readpath"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [4096, 8192] if args.quick else [8192, 16384]
    headline = 8192
    reps = args.reps or (2 if args.quick else 5)
    load0 = _loadavg()
    print(
        f"bench_extract: {TILE_PX} px tiles at {TILE_UM / TILE_PX:g} um/px (tile_um={TILE_UM:g}); "
        f"{os.cpu_count()} CPUs; quick={args.quick}; best of {reps} interleaved runs; load average {load0}",
        flush=True,
    )
    slides = {f"synth {s}^2 @0.25": ensure_slide(out, s) for s in sizes}
    head = f"synth {headline}^2 @0.25"
    if CMU.exists():
        slides["CMU real @0.499"] = CMU
    else:
        print(f"  (real slide {CMU} not found: skipped)")
    for p in slides.values():
        _warm(p)
    ext_err = "disabled (--no-extractor)" if args.no_extractor else _extractor_available()
    results: dict = {"quick": args.quick, "reps": reps, "cpus": os.cpu_count(), "load_start": load0}
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        # single-process throughput, every slide
        specs = {}
        for label, path in slides.items() if "throughput" in parts else ():
            specs[(label, "baseline")] = {"kind": "pipeline", "slides": [str(path)], "reader": "openslide"}
            specs[(label, "direct")] = {"kind": "pipeline", "slides": [str(path)], "reader": "direct"}
            if ext_err is None:
                specs[(label, "extractor w=1")] = {"kind": "extractor", "slides": [str(path)], "workers": 1}
        # worker scaling: a cohort of links to one synthetic slide (extraction parallelises over slides); enough
        # tiles per slide that starting the spawned workers (~1 s each) does not dominate
        n_cohort, big = (4, sizes[-1]) if args.quick else (2, sizes[-1])
        cohort_label = f"cohort {n_cohort}x{big}^2"
        cohort = tmp / "cohort"
        cohort.mkdir()
        members = []
        for i in range(n_cohort):
            os.symlink(slides[f"synth {big}^2 @0.25"], cohort / f"s{i}.svs")
            members.append(str(cohort / f"s{i}.svs"))
        if "scaling" in parts:
            specs[(cohort_label, "baseline")] = {"kind": "pipeline", "slides": members, "reader": "openslide"}
        if ext_err is None and "scaling" in parts:
            for w in (1, 2):
                specs[(cohort_label, f"extractor w={w}")] = {"kind": "extractor", "slides": members, "workers": w}
        print(f"\n== throughput: {len(specs)} cases x {reps} runs", flush=True)
        best = run_rounds({f"{a} | {b}": v for (a, b), v in specs.items()}, reps, tmp)
        results["cases"] = best
        if "scaling" in parts:
            ctl = [run_case({"kind": "parallel", "slide_path": str(slides[head])}) for _ in range(2)]
            results["parallel_control"] = ctl
            print(f"  parallel control: {ctl}", flush=True)
        print("\n== read path (level 0)", flush=True)
        rp = {}
        for label, path in slides.items() if "readpath" in parts else ():
            if label.startswith("synth") and label != head:
                continue
            rp[label] = run_case({"kind": "readpath", "slide_path": str(path), "quick": args.quick})
            print(f"  {label}: {rp[label]}", flush=True)
        results["read_path"] = rp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_end"] = _loadavg()

    # ------------------------------------------------------------------ report
    print("\n" + "=" * 104)
    print(
        f"Extraction throughput: {TILE_PX} px tiles @ {TILE_UM / TILE_PX:g} um/px (tile_um {TILE_UM:g}), JPEG q{QUALITY}, "
        f"TFRecord. Best of {reps} (by tiles/s); ratio = vs baseline on the same slide(s).\n"
        "tiles/CPU-s = tiles per CPU second of the case's process and its workers (less sensitive to other load; "
        "not a measure of parallel speed-up)."
    )
    hdr = "slide(s) pipeline tiles sec tiles/s ratio tiles/CPU-s ratio peak_RSS_MB workers_MB runs_(tiles/s)".split()
    widths = [18, 14, 6, 6, 8, 6, 11, 6, 11, 10, 24]
    print(_fmt_row([h.replace("_", " ") for h in hdr], widths))
    labels = list(dict.fromkeys(k.split(" | ")[0] for k in best))
    for label in labels:
        base = best[f"{label} | baseline"]
        for key, r in ((k, v) for k, v in best.items() if k.split(" | ")[0] == label):
            cells = [label, key.split(" | ")[1], r["tiles"], f"{r['seconds']:.2f}", f"{r['tiles_per_s']:.1f}"]
            cells += [f"{r['tiles_per_s'] / base['tiles_per_s']:.2f}x", f"{r['tiles_per_cpu_s']:.1f}"]
            cells += [f"{r['tiles_per_cpu_s'] / base['tiles_per_cpu_s']:.2f}x", f"{r['rss_mb']:.0f}"]
            cells += [f"{r['rss_children_mb']:.0f}", " ".join(f"{v:.0f}" for v in r["runs"])]
            print(_fmt_row(cells, widths))
    if ext_err is not None:
        print(f"\n[extractor] NOT TIMED: {ext_err}")
    else:
        w1, w2 = best.get(f"{cohort_label} | extractor w=1"), best.get(f"{cohort_label} | extractor w=2")
        if w1 and w2:
            print(
                f"\nSecond worker ({cohort_label}): {w2['tiles_per_s'] / w1['tiles_per_s']:.2f}x the throughput of one "
                f"({w1['tiles_per_s']:.0f} -> {w2['tiles_per_s']:.0f} tiles/s; spawned workers, start-up included)"
            )
    for c in results.get("parallel_control", []):
        print(
            f"Parallel control (same tile-decode loop, 1 vs 2 processes at once, no extractor): "
            f"{c['procs_1_tiles_per_s']:.0f} -> {c['procs_2_tiles_per_s']:.0f} tiles/s = {c['ratio']:.2f}x "
            "(what a second process can add on this machine now)"
        )
    synth = [lb for lb in labels if lb.startswith("synth ")]
    if len(synth) >= 2:
        a, b = synth[0], synth[-1]
        print(
            f"\nPeak RSS as the slide grows ({a.split()[1]} -> {b.split()[1]} base px, "
            f"{best[a + ' | baseline']['tiles']} -> {best[b + ' | baseline']['tiles']} tiles):"
        )
        for key in best:
            if key.startswith(a + " | "):
                kind = key.split(" | ")[1]
                print(f"  {kind:>14}: {best[key]['rss_mb']:.0f} MB -> {best[b + ' | ' + kind]['rss_mb']:.0f} MB")
    print("\nRead path, level 0 (us per call; OpenSlide read_region vs direct tile reader, same slide):")
    for label, r in results["read_path"].items():
        print(
            f"  {label}: stored tile {r['tile']}: OpenSlide {r['tile_openslide_us']:.0f} us, direct (pread+decode) "
            f"{r['tile_direct_us']:.0f} us ({r['tile_openslide_us'] / r['tile_direct_us']:.1f}x); decode only: "
            + ", ".join(f"{k} {v:.0f} us" for k, v in r["decoders"].items())
            + f" (cv2 max abs diff {r['cv2_max_abs_diff']})"
        )
        for name in ("grid", "random"):
            o, d = r[f"region_{name}_openslide_us"], r[f"region_{name}_direct_us"]
            print(f"    {r['extract_px']}^2 region ({name}): OpenSlide {o:.0f} us, direct {d:.0f} us ({o / d:.1f}x)")
        print(
            f"    pixels: max |direct - OpenSlide| = {r['max_abs_diff']} over {r['regions_compared']} regions "
            "(every level; aligned, unaligned, edge, out-of-bounds)"
        )
    print(f"\nload average: start {load0}, end {results['load_end']} (other processes on this machine skew timings)")
    (out / ("results_quick.json" if args.quick else "results.json")).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_make":
        _make_slide(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--_case":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
