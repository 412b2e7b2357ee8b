"""The timed cases of ``bench_extract.py``, each run in a fresh interpreter (``bench_extract.py --_case <json>``).

Every case imports what any case uses first (:func:`preimport`, outside the clock), runs OpenCV single-threaded,
and returns a JSON-able dict: ``tiles``, ``seconds`` (wall), ``tiles_per_s``, ``cpu_s``, ``tiles_per_cpu_s`` and
peak RSS (``rss_mb`` of the process, ``rss_children_mb`` of its workers).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

TILE_PX = 256
QUALITY = 95


def preimport() -> None:
    """Import everything any case uses, before its clock starts (a per-process cost, the same for every case)."""
    import cv2
    import numpy  # noqa: F401
    import omegaconf  # noqa: F401
    import openslide  # noqa: F401
    import pandas  # noqa: F401
    import PIL.ImageFile  # noqa: F401 - imported by OpenSlide's first associated image
    import pyarrow.pandas_compat  # noqa: F401 - imported by the first pandas -> Arrow conversion
    import pyarrow.parquet  # noqa: F401
    import pyarrow.vendored.version  # noqa: F401
    import simplejpeg  # noqa: F401
    import tifffile  # noqa: F401

    import histolight.io.tfrecord
    import histolight.wsi.tiff_tiles as tt
    from histolight.wsi import Slide  # noqa: F401

    for name in tt.available_decoders():
        tt._make_decoder(name)
    import histolight.extract
    import histolight.extract.report
    import histolight.qc.otsu  # noqa: F401

    cv2.setNumThreads(1)  # every case single-threaded OpenCV, as the extractor's worker processes are


def _cpu() -> float:
    """CPU seconds (user + system) of this process and its waited-for children so far."""
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def _rss() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ch = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(me, 1), "rss_children_mb": round(ch, 1)}


def _result(n: int, dt: float, cpu: float, **extra) -> dict:
    return {
        "tiles": n,
        "seconds": round(dt, 4),
        "tiles_per_s": round(n / dt, 1),
        "cpu_s": round(cpu, 4),
        "tiles_per_cpu_s": round(n / max(cpu, 1e-9), 1),
        **extra,
        **_rss(),
    }


def grid_tiles(width: int, height: int, extract_px: int) -> list[tuple[int, int]]:
    """Top-left corners (base px) of the non-overlapping grid of ``extract_px`` tiles inside the slide."""
    xs = range(0, width - extract_px + 1, extract_px)
    return [(x, y) for y in range(0, height - extract_px + 1, extract_px) for x in xs]


# ---------------------------------------------------------------------------------------------- cases


def case_pipeline(slides: list[str], outdir: str, reader: str, tile_um, tiles: dict | None = None) -> dict:
    """The plain pipeline, single process: read each tile at level 0 (``reader``: ``openslide`` =
    ``OpenSlide.read_region`` -> RGB, or ``direct`` = ``histolight.wsi.Slide.read_region``), ``cv2.resize``
    (INTER_AREA) to 256 px when ``tile_um`` is in microns (none for a magnification: 256 level-0 px), JPEG encode
    (cv2, q95), ``TFRecordWriter``. ``tiles``: slide path -> list of top-left corners in base px (default: the whole
    non-overlapping grid)."""
    import cv2
    import numpy as np
    import openslide

    from histolight.io.tfrecord import TFRecordWriter
    from histolight.wsi import Slide

    preimport()
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

        microns = not isinstance(tile_um, str)
        ext = round(float(tile_um) / mpp) if microns else TILE_PX
        with TFRecordWriter(Path(outdir) / f"{name}.tfrecords", slide=name) as w:
            for x, y in (tiles or {}).get(path) or grid_tiles(width, height, ext):
                img = read(x, y, ext)
                if microns:
                    img = cv2.resize(img, (TILE_PX, TILE_PX), interpolation=cv2.INTER_AREA)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
                w.write_tile(buf.tobytes(), x + ext // 2, y + ext // 2)
                n += 1
    return _result(n, time.perf_counter() - t0, _cpu() - c0)


def case_extractor(slides: list[str], outdir: str, workers: int, options: dict) -> dict:
    """``histolight.extract.extract_tiles`` end to end (runner, per-slide files, cohort table, summary, report)."""
    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles

    preimport()
    ds = Dataset(slides=slides)
    c0, t0 = _cpu(), time.perf_counter()
    res = extract_tiles(ds, tile_px=TILE_PX, outdir=outdir, workers=workers, overwrite=True, progress=False, **options)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    s = res.summary
    bad = s[~s["status"].isin(["done"])]
    if len(bad):
        raise RuntimeError(f"extractor failed: {bad[['slide', 'status', 'reason']].to_dict('records')}")
    return _result(int(s["kept"].sum()), dt, cpu, grid_tiles=int(s["grid_tiles"].sum()))


def case_slide(slide_path: str, outdir: str, options: dict) -> dict:
    """One slide through the per-slide path a cohort run takes for each slide: open it
    (:class:`~histolight.wsi.Slide`) and :func:`~histolight.extract.extract_slide` into a fresh folder (plan, QC,
    tiles, TFRecord + index, tile table, summary JSON, report images); no runner, no cohort files."""
    from histolight.extract import extract_slide, make_config
    from histolight.wsi import Slide

    preimport()
    cfg = make_config(tile_px=TILE_PX, **options)
    c0, t0 = _cpu(), time.perf_counter()
    with Slide(slide_path) as slide:
        res = extract_slide(slide, cfg, outdir)
    return _result(res.kept, time.perf_counter() - t0, _cpu() - c0)


def case_overhead(slide_path: str, outdir: str, options: dict, reps: int = 15) -> dict:
    """Per-slide fixed cost: the per-slide path (:func:`case_slide`) against the tiles' own work in the same process
    (the kept tiles read through the grid with the extractor's read-ahead, filtered, encoded and written to a TFRecord) and against the plain pipeline
    on the same tiles (:func:`case_pipeline`), best of ``reps`` each, interleaved, in one warm process (what each slide
    of a cohort costs); plus the fixed parts timed alone (open, plan = grid + ROI + QC, report images, table +
    summary)."""
    import numpy as np

    from histolight.extract import extract_slide, make_config
    from histolight.extract.filters import tile_reject_reason
    from histolight.extract.layout import write_meta
    from histolight.extract.plan import plan_slide, tile_table
    from histolight.extract.report import save_slide_images
    from histolight.extract.slide import _read_ahead as read_ahead
    from histolight.io.images import encode_image
    from histolight.io.tables import write_parquet
    from histolight.io.tfrecord import TFRecordWriter
    from histolight.wsi import Slide

    preimport()
    cfg = make_config(tile_px=TILE_PX, **options)
    out = Path(outdir)
    with Slide(slide_path) as s:
        res = extract_slide(s, cfg, out / "warm")
    kept = {(int(x), int(y)) for x, y in zip(res.table.x, res.table.y)}

    def whole():
        with Slide(slide_path) as slide:
            extract_slide(slide, cfg, out / "whole")

    def tiles():
        with Slide(slide_path) as slide:
            plan = plan_slide(slide, cfg, None, apply_qc=False)
            g = plan.grid
            idx = np.asarray([i for i in range(len(g)) if (int(g.x[i]), int(g.y[i])) in kept])
            with TFRecordWriter(out / "tiles.tfrecords", slide=slide.name) as w:
                for run, imgs, _ in read_ahead(slide, g, g.runs(idx), False, True):  # the extractor's tile loop
                    for i, img in zip(run, imgs):
                        tile_reject_reason(img, cfg.grayspace_threshold, cfg.grayspace_fraction)
                        w.write_tile(encode_image(img, cfg.img_format, cfg.quality), int(g.loc_x[i]), int(g.loc_y[i]))

    parts: dict = {"open": [], "plan": [], "report_images": [], "table_meta": []}

    def pieces():
        t = time.perf_counter()
        slide = Slide(slide_path)
        parts["open"].append(time.perf_counter() - t)
        t = time.perf_counter()
        plan = plan_slide(slide, cfg, None)
        parts["plan"].append(time.perf_counter() - t)
        t = time.perf_counter()
        (out / "meta").mkdir(parents=True, exist_ok=True)
        save_slide_images(slide, plan, [], [], out / "meta")
        parts["report_images"].append(time.perf_counter() - t)
        t = time.perf_counter()
        write_parquet(tile_table(plan, plan.candidates, slide.name), out / "meta" / "t.parquet")
        write_meta(out, res)
        parts["table_meta"].append(time.perf_counter() - t)
        slide.close()

    def plain():
        case_pipeline(
            [slide_path], str(out), "openslide", options.get("tile_um", 128), {slide_path: sorted(kept, key=lambda t: t[::-1])}
        )

    best = {"whole": float("inf"), "tiles": float("inf"), "plain": float("inf")}
    cpu = dict(best)
    for _ in range(reps):
        for key, fn in (("whole", whole), ("tiles", tiles), ("plain", plain)):
            c, t = _cpu(), time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
            cpu[key] = min(cpu[key], _cpu() - c)
        pieces()
    return {
        "tiles": len(kept),
        "seconds": round(best["whole"], 4),
        "tiles_seconds": round(best["tiles"], 4),
        "overhead_ms": round(1e3 * (best["whole"] - best["tiles"]), 1),
        "overhead_cpu_ms": round(1e3 * (cpu["whole"] - cpu["tiles"]), 1),
        "plain_seconds": round(best["plain"], 4),
        "warm_ratio": round(best["plain"] / best["whole"], 3),
        "warm_cpu_ratio": round(cpu["plain"] / cpu["whole"], 3),
        "parts_ms": {k: round(1e3 * min(v), 1) for k, v in parts.items()},
        "tiles_per_s": round(len(kept) / best["whole"], 1),
        "cpu_s": round(cpu["whole"], 4),
        "tiles_per_cpu_s": round(len(kept) / cpu["whole"], 1),
        **_rss(),
    }


def case_readpath(slide_path: str, quick: bool) -> dict:
    """Per stored tile and per extraction region at level 0: OpenSlide ``read_region`` vs the direct reader, the
    JPEG decoders on the same bytes, and the max abs pixel difference between the two read paths at every level."""
    import cv2
    import numpy as np
    import openslide

    from histolight.wsi import Slide
    from histolight.wsi.tiff_tiles import TiffTileReader, _make_decoder, available_decoders, jpeg_stream

    osr = openslide.OpenSlide(slide_path)
    s = Slide(slide_path)
    r = s.tile_reader
    assert r is not None, s.tile_reader_note
    lv = r.levels[0]
    tw, th = lv.tile_w, lv.tile_h
    W, H = s.dimensions
    rng = np.random.default_rng(0)
    tiles = rng.choice(
        lv.tiles_across * lv.tiles_down, size=min(lv.tiles_across * lv.tiles_down, 40 if quick else 120), replace=False
    )
    out: dict = {"tile": f"{tw}x{th}", "decoders": {}}
    ext = round(128 / s.mpp)

    def timeit(fn, items):
        fn(items[0])
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        return (time.perf_counter() - t0) / len(items) * 1e6  # us per item

    def os_read(loc, level, size):
        return np.asarray(osr.read_region(loc, level, size).convert("RGB"))

    full = [int(t) for t in tiles if (t % lv.tiles_across + 1) * tw <= W and (t // lv.tiles_across + 1) * th <= H]
    locs = [((t % lv.tiles_across) * tw, (t // lv.tiles_across) * th) for t in full]
    out["tile_openslide_us"] = round(timeit(lambda p: os_read(p, 0, (tw, th)), locs), 1)
    rd = TiffTileReader.from_openslide(osr, slide_path, decoder=r.decoder, cache_bytes=0, verify=False)
    out["tile_direct_us"] = round(timeit(lambda t: rd.read_tile(0, t % lv.tiles_across, t // lv.tiles_across), full), 1)
    out["tile_stored_jpeg_us"] = round(timeit(lambda p: rd.stored_jpeg(0, p[0], p[1], tw, th), locs), 1)
    rd.close()
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
    maxdiff = 0
    for name, pts in (
        ("grid", grid_tiles(W, H, ext)[: (60 if quick else 200)]),
        ("random", [(int(rng.integers(0, W - ext)), int(rng.integers(0, H - ext))) for _ in range(60 if quick else 200)]),
    ):
        out[f"region_{name}_openslide_us"] = round(timeit(lambda p: os_read(p, 0, (ext, ext)), pts), 1)
        r.cache.clear()
        out[f"region_{name}_direct_us"] = round(timeit(lambda p: s.read_region(p, 0, (ext, ext)), pts), 1)
        for p in pts[:40]:
            maxdiff = max(
                maxdiff, int(np.abs(os_read(p, 0, (ext, ext)).astype(np.int16) - s.read_region(p, 0, (ext, ext))).max())
            )
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
            maxdiff = max(
                maxdiff,
                int(np.abs(s.read_region(loc, level, (w, h)).astype(np.int16) - plain.read_region(loc, level, (w, h))).max()),
            )
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


def case_parallel(slide_path: str, n: int = 600) -> dict:
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


CASES = {
    "pipeline": case_pipeline,
    "extractor": case_extractor,
    "slide": case_slide,
    "overhead": case_overhead,
    "readpath": case_readpath,
    "parallel": case_parallel,
}
