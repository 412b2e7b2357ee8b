"""Cost of TFRecord CRC verification: every tile of a set of TFRecords read with and without checking its CRCs.

    python bench/bench_crc.py                 # 8 files x 1000 tiles of 256 px JPEG (q90), best of 3
    python bench/bench_crc.py --quick         # 4 files x 250 tiles, best of 2 (~20 s)
    python bench/bench_crc.py --files 16 --tiles 2000 --tile-px 512 --reps 5

Tiles: 256 px JPEG tiles cut from a synthetic H&E demo slide (``histolight.demo``, generated once into ``--out``),
written by ``histolight.io.TFRecordWriter`` and cycled to fill ``--files`` x ``--tiles`` records. Rows (tiles/s, best
of ``--reps``, the two variants of each row interleaved; the files are in the page cache, so I/O costs little and
the CRC's share is as large as it gets):

- ``read``: every record's bytes through the index (``TFRecordReader.read``: pread + Example decoding), the
  baseline ``verify=False`` against ``verify=True`` (both CRCs of every record checked);
- ``read + decode``: what a model is fed: ``TileDataset`` items (read, strict JPEG decode, uint8 tensor), same pair;
- ``crc32c``: the checksum alone over every record's bytes (MB/s), and which implementation ``masked_crc32c`` uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def demo_tiles(out: Path, px: int, quality: int) -> list[bytes]:
    """Encoded JPEG tiles (``px`` x ``px``) of a synthetic H&E demo slide, tissue and background as they come."""
    from histolight.demo import ensure_demo
    from histolight.io.images import encode_image
    from histolight.wsi import Slide

    demo = ensure_demo(out / "demo", n_slides=1, width=2048, height=2048, workers=1)
    slide = Slide(next((demo / "slides").glob("*.svs")))
    w, h = slide.dimensions
    return [
        encode_image(slide.read_region((x, y), 0, (px, px)), "jpg", quality)
        for y in range(0, h - px + 1, px)
        for x in range(0, w - px + 1, px)
    ]


def write_files(out: Path, tiles: list[bytes], n_files: int, per_file: int) -> list[str]:
    from histolight.io import TFRecordWriter

    paths = []
    for f in range(n_files):
        p = out / f"slide{f:03d}.tfrecords"
        with TFRecordWriter(p, slide=p.stem, fsync=False) as w:
            for i in range(per_file):
                w.write_tile(tiles[(f * per_file + i) % len(tiles)], 128 + 256 * (i % 64), 128 + 256 * (i // 64))
        paths.append(str(p))
    return paths


def time_read(paths: list[str], verify: bool) -> tuple[float, int]:
    from histolight.io import TFRecordReader

    t0, n = time.perf_counter(), 0
    for p in paths:
        with TFRecordReader(p, verify=verify, write_index=False) as r:
            for i in range(len(r)):
                r.read(i)
                n += 1
    return time.perf_counter() - t0, n


def time_dataset(paths: list[str], verify: bool) -> tuple[float, int]:
    from histolight.classify.data import TileDataset
    from histolight.io.tilestore import index_tfrecords

    ds = TileDataset(index_tfrecords(paths), verify=verify)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return time.perf_counter() - t0, len(ds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "crc"), help="demo slide and TFRecords go here")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tiles", type=int, default=1000, help="tiles per file")
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--reps", type=int, default=3, help="best of N for every measurement")
    ap.add_argument("--quick", action="store_true", help="--files 4 --tiles 250 --reps 2")
    args = ap.parse_args(argv)
    if args.quick:
        args.files, args.tiles, args.reps = 4, 250, 2

    import crc32c
    import cv2

    from histolight.io.tfrecord_format import masked_crc32c

    cv2.setNumThreads(1)
    out = Path(args.out)
    tfr = out / f"{args.tile_px}px_q{args.quality}_{args.files}x{args.tiles}"
    tfr.mkdir(parents=True, exist_ok=True)
    tiles = demo_tiles(out, args.tile_px, args.quality)
    paths = write_files(tfr, tiles, args.files, args.tiles)
    size = sum(os.path.getsize(p) for p in paths)
    print(
        f"{len(paths)} TFRecords x {args.tiles} tiles ({args.tile_px} px JPEG q{args.quality}, "
        f"{size / len(paths) / args.tiles / 1024:.1f} KiB/tile, {size / 2**20:.0f} MiB) in {tfr}"
    )
    print(
        f"masked_crc32c: crc32c {getattr(crc32c, '__version__', '?')} ({type(crc32c.crc32c).__name__}, "
        f"hardware_based={crc32c.hardware_based}); load average {os.getloadavg()[0]:.1f}"
    )
    time_read(paths, False)  # warm the page cache and the imports

    rows = []
    for name, fn in (("read", time_read), ("read + decode", time_dataset)):
        best = {False: float("inf"), True: float("inf")}
        n = 0
        for _ in range(args.reps):
            for verify in (False, True):
                dt, n = fn(paths, verify)
                best[verify] = min(best[verify], dt)
        rows.append((name, n / best[False], n / best[True]))

    datas = [Path(p).read_bytes() for p in paths]
    t0 = time.perf_counter()
    for d in datas:
        masked_crc32c(d)
    crc_mb_s = size / 2**20 / (time.perf_counter() - t0)

    print(f"\n{'':16s}{'verify=False':>16s}{'verify=True':>16s}{'ratio':>10s}")
    for name, off, on in rows:
        print(f"{name:16s}{off:>12,.0f} t/s{on:>12,.0f} t/s{on / off:>10.3f}")
    print(f"{'crc32c':16s}{crc_mb_s:>13,.0f} MB/s over the records' bytes")


if __name__ == "__main__":
    main()
