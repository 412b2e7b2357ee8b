"""Tile loader throughput: tiles/s delivered by TileDataModule (read + JPEG decode + augmentation +
normalization, in DataLoader workers) against the raw read rate of the same TFRecords, in one run.

    python bench/bench_dataloader.py                       # demo cohort, 128 px / 64 um tiles
    python bench/bench_dataloader.py --quick               # fewer samples / worker counts (~1 min)
    python bench/bench_dataloader.py --workers 0 2 4 8 --samples 8192 --tiles-dir /data/tiles/cohort

Baselines (timed here, same files): ``raw read`` = every record's bytes through the index (pread,
no decoding), ``decode only`` = raw read + JPEG decode in this process. The loader rows print
tiles/s and the ratio to ``raw read``; a ratio near ``decode only``'s means decoding, not I/O, bounds
the loader, and the loader scales with workers (cores). The last line times a training step of the
model (``--model``, default the experiment's) on this machine's device (CUDA when available): the
loader keeps up when it delivers more tiles/s than that step consumes.
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
    ap.add_argument(
        "--tiles-dir",
        default=str(ROOT / "outputs" / "work" / "tiles" / "demo"),
        help="root of extracted tiles (extracted there if missing)",
    )
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--tile-um", type=float, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=4096, help="tiles drawn per loader measurement")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the TFRecords for the raw baselines")
    ap.add_argument("--reps", type=int, default=2, help="best of N for every loader measurement")
    ap.add_argument("--model", default="mobilenetv3_small_100", help="timm model for the consumption reference")
    ap.add_argument("--quick", action="store_true", help="--samples 2048 --workers 0 2 --reps 1")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.workers, args.reps = 2048, [0, 2], 1
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
    tiles, info = prepare_tiles(
        ds,
        tile_px=args.tile_px,
        tile_um=tile_um,
        tiles_root=args.tiles_dir,
        progress=False,
        extract_options={"qc": ["otsu"], "report": False},
    )
    tiles["split"] = split_patients(tiles, "annotations", dataset=ds)
    files = sorted(tiles["tfrecord"].unique())
    n_rec = sum(len(TFRecordReader(f)) for f in files)
    size_mb = sum(os.path.getsize(f) for f in files) / 2**20
    print(
        f"TFRecords: {len(files)} files, {n_rec} records, {size_mb:.1f} MiB in {info.tile_dir}; "
        f"{len(tiles)} labelled tiles, {args.tile_px} px; cpu cores: {os.cpu_count()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    # ---- baselines: raw read, decode
    def raw_pass(decode: bool) -> tuple[float, float]:
        """(tiles/s wall, tiles per CPU-second of this process)."""
        t0, c0 = time.perf_counter(), time.process_time()
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
        return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)

    raw, raw_cpu = max(raw_pass(False) for _ in range(args.reps))
    dec, dec_cpu = max(raw_pass(True) for _ in range(args.reps))
    print(f"{'':48s} {'tiles/s':>10s}   {'ratio':>5s}   {'tiles/CPU-s':>11s}")
    print(f"{'raw read (index + pread, no decode)':48s} {raw:10.0f}   {1:5.2f}x   {raw_cpu:11.0f}")
    print(f"{'decode only (1 process)':48s} {dec:10.0f}   {dec / raw:5.2f}x   {dec_cpu:11.0f}")

    # ---- the datamodule: train loader (augmentation on), map-style and streaming
    lm = LabelMap.from_labels(tiles["label"])
    aug = {
        "flip": True,
        "rot90": True,
        "color_jitter": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.02, "p": 0.5},
        "stain": None,
        "jpeg": {"quality": [60, 95], "p": 0.3},
    }
    for streaming in (False, True):
        for w in args.workers:
            dm = TileDataModule(
                tiles,
                lm,
                tile_px=args.tile_px,
                batch_size=args.batch_size,
                num_workers=w,
                streaming=streaming,
                balance="tile",
                samples_per_epoch=args.samples,
                augment=aug,
                shuffle_buffer=512,
                persistent_workers=False,
            )
            loader = dm.train_dataloader()
            best, best_cpu = 0.0, None
            for _ in range(args.reps):
                it = iter(loader)
                first = next(it)  # worker start-up excluded
                n = 0
                t0, c0 = time.perf_counter(), time.process_time()
                for b in it:
                    n += b["image"].shape[0]
                rate = n / (time.perf_counter() - t0)
                if rate > best:  # CPU time is only this process's: meaningful without workers
                    best, best_cpu = rate, (n / max(time.process_time() - c0, 1e-9) if w == 0 else None)
                del it
            name = f"datamodule {'streaming' if streaming else 'map-style'} workers={w} (decode+aug)"
            cpu = f"{best_cpu:11.0f}" if best_cpu else f"{'-':>11s}"
            print(
                f"{name:48s} {best:10.0f}   {best / raw:5.2f}x   {cpu}   batch {tuple(first['image'].shape)} "
                f"{first['image'].dtype}"
            )
            del loader

    # ---- what the model consumes: one training step (forward + backward + AdamW) on this device
    import timm

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    net = timm.create_model(args.model, pretrained=False, num_classes=len(lm)).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x = torch.randint(0, 255, (args.batch_size, 3, args.tile_px, args.tile_px), dtype=torch.uint8, device=dev)
    y = torch.randint(0, len(lm), (args.batch_size,), device=dev)
    from histolight.training.normalize import normalize_batch

    def step():
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(normalize_batch(x, (0.5,) * 3, (0.25,) * 3)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    n_steps = 20 if dev.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    cons = n_steps * args.batch_size / (time.perf_counter() - t0)
    print(f"{'model train step ' + args.model + ' on ' + dev.type:48s} {cons:10.0f}   {cons / raw:5.2f}x")
    print(
        "ratio = tiles/s relative to the raw read rate of the same TFRecords (measured above in this run); "
        f"load average now {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
