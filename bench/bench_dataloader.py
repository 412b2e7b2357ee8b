"""Tile loader throughput: tiles/s delivered by TileDataModule (read + JPEG decode + augmentation +
normalization, in DataLoader workers) against the raw read rate of the same TFRecords, in one run.

    python bench/bench_dataloader.py                       # demo cohort, 128 px / 64 um tiles
    python bench/bench_dataloader.py --workers 0 2 4 8 --samples 8192 --tiles-dir /data/tiles/cohort

Baselines (timed here, same files): ``raw read`` = every record's bytes through the index (pread,
no decoding), ``decode only`` = raw read + JPEG decode in this process. The loader rows print
tiles/s and the ratio to ``raw read``; a ratio near ``decode only``'s means decoding, not I/O, bounds
the loader, and the loader scales with workers (cores). Compare the loader rate with what the model
consumes (tiles/s of a training step on your accelerator) to know whether it will starve it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default=str(ROOT / "data" / "demo"), help="demo cohort (generated if missing)")
    ap.add_argument("--tiles-dir", default=str(ROOT / "outputs" / "work" / "tiles" / "demo"),
                    help="root of extracted tiles (extracted there if missing)")
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--tile-um", type=float, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=4096, help="tiles drawn per loader measurement")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the TFRecords for the raw baselines")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from histolight.classify import LabelMap, TileDataModule, prepare_tiles, split_patients
    from histolight.dataset import Dataset
    from histolight.demo import ensure_demo
    from histolight.io import TFRecordReader, decode_image

    torch.set_num_threads(1)  # as in DataLoader workers; the main process only collates
    tile_um = int(args.tile_um) if float(args.tile_um).is_integer() else args.tile_um
    demo = ensure_demo(args.demo_dir)
    ds = Dataset(demo / "slides", rois=demo / "rois", annotations=demo / "annotations.csv")
    tiles, info = prepare_tiles(ds, tile_px=args.tile_px, tile_um=tile_um, tiles_dir=args.tiles_dir, progress=False,
                                extract_options={"qc": ["otsu"], "report": False})
    tiles["split"] = split_patients(tiles, "annotations", dataset=ds)
    files = sorted(tiles["tfrecord"].unique())
    n_rec = sum(len(TFRecordReader(f)) for f in files)
    size_mb = sum(os.path.getsize(f) for f in files) / 2**20
    print(f"TFRecords: {len(files)} files, {n_rec} records, {size_mb:.1f} MiB in {info.tile_dir}; "
          f"{len(tiles)} labelled tiles, {args.tile_px} px; cpu cores: {os.cpu_count()}")

    # ---- baselines: raw read, decode
    def raw_pass(decode: bool) -> float:
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.repeat):
            for f in files:
                r = TFRecordReader(f, verify=False)
                for i in range(len(r)):
                    b = r.read(i)["image_raw"]
                    if decode:
                        decode_image(b)
                    n += 1
                r.close()
        return n / (time.perf_counter() - t0)

    raw = raw_pass(False)
    dec = raw_pass(True)
    print(f"{'raw read (index + pread, no decode)':48s} {raw:10.0f} tiles/s   1.00x")
    print(f"{'decode only (1 process)':48s} {dec:10.0f} tiles/s   {dec / raw:.2f}x")

    # ---- the datamodule: train loader (augmentation on), map-style and streaming
    lm = LabelMap.from_labels(tiles["label"])
    aug = {"flip": True, "rot90": True, "color_jitter": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1,
                                                         "hue": 0.02, "p": 0.5},
           "stain_augment": None, "jpeg": {"quality": [60, 95], "p": 0.3}}
    for streaming in (False, True):
        for w in args.workers:
            dm = TileDataModule(tiles, lm, tile_px=args.tile_px, batch_size=args.batch_size, num_workers=w,
                                streaming=streaming, balance="tile", samples_per_epoch=args.samples, augment=aug,
                                shuffle_buffer=512, persistent_workers=False)
            loader = dm.train_dataloader()
            it = iter(loader)
            first = next(it)  # worker start-up excluded
            n = 0
            t0 = time.perf_counter()
            for b in it:
                n += b["image"].shape[0]
            dt = time.perf_counter() - t0
            rate = n / dt
            name = f"datamodule {'streaming' if streaming else 'map-style'} workers={w} (decode+aug)"
            print(f"{name:48s} {rate:10.0f} tiles/s   {rate / raw:.2f}x   batch {tuple(first['image'].shape)}")
            del it, loader
    print("ratio = tiles/s relative to the raw read rate of the same TFRecords (measured above in this run)")


if __name__ == "__main__":
    main()
