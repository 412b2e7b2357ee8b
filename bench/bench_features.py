"""Feature extraction throughput: tiles/s of ``histolight.features.extract_features`` against a plain PyTorch loop
timed in the same run, for ResNet-50 and ViT-B/16 on the CPU, from TFRecords and straight from slides.

    python bench/bench_features.py --quick      # ~2-4 min on 2 cores: 2 slides, 64 tiles per TFRecord source
    python bench/bench_features.py --tiles 512  # more tiles per slide

Sources: a tiny synthetic demo cohort (``histolight.demo``, 2 slides, generated under ``--work``) read directly, and
TFRecords of random JPEG tiles (``--tiles`` per slide). Baselines (same tiles, same random-init network):

- TFRecords: ``DataLoader(TileDataset)`` of decoded uint8 tiles -> float/255 -> Normalize -> model, one loop;
- slides: the same grid and QC (``extract.plan.plan_slide``), tiles read with ``grid.read_run`` into a list,
  then a DataLoader over the decoded tiles -> model (read first, then compute: no overlap).

Each line prints tiles/s of both and the ratio (histolight / baseline); > 1 means faster. Networks are built with
random weights (nothing is downloaded), so only speed is measured. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {"ResNet-50": "resnet50_imagenet", "ViT-B/16": "vit_base_patch16_224_imagenet"}


def make_tfrecords(d: Path, n_slides: int, n_tiles: int, px: int) -> Path:
    import cv2
    import numpy as np

    from histolight.io.tfrecord import TFRecordWriter

    d = d / f"{px}px_{px // 2}um"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(n_slides):
        with TFRecordWriter(d / f"t{s}.tfrecords", slide=f"t{s}") as w:
            for i in range(n_tiles):
                img = cv2.GaussianBlur(rng.integers(0, 255, (px, px, 3), dtype=np.uint8), (5, 5), 0)
                w.write_tile(cv2.imencode(".jpg", img)[1].tobytes(), px * i + px // 2, px // 2)
    return d


def baseline_tfrecords(ext, tfr: Path, batch_size: int) -> int:
    import torch
    from torch.utils.data import DataLoader

    from histolight.classify.data import TileDataset
    from histolight.io.tilestore import find_tfrecords, index_tfrecords

    mean = torch.tensor(ext.preprocessing.norm_mean).view(1, 3, 1, 1)
    std = torch.tensor(ext.preprocessing.norm_std).view(1, 3, 1, 1)
    n = 0
    with torch.no_grad():
        for p in find_tfrecords(tfr):
            for b in DataLoader(TileDataset(index_tfrecords([p])), batch_size=batch_size):
                ext.net((b["image"].float() / 255 - mean) / std)
                n += len(b["image"])
    return n


def baseline_slides(ext, ds, tile_px: int, tile_um: float, batch_size: int) -> int:
    import torch
    from torch.utils.data import DataLoader

    from histolight.config.schema import from_config
    from histolight.extract.config import ExtractConfig
    from histolight.extract.plan import plan_slide

    cfg = from_config(ExtractConfig, {"tile_px": tile_px, "tile_um": tile_um, "roi_method": "ignore", "report": False}, "b")
    mean = torch.tensor(ext.preprocessing.norm_mean).view(1, 3, 1, 1)
    std = torch.tensor(ext.preprocessing.norm_std).view(1, 3, 1, 1)
    n = 0
    for name in ds.names:
        with ds.open(name) as slide:
            plan = plan_slide(slide, cfg, None)
            tiles = [t for run in plan.grid.runs(plan.candidates) for t in plan.grid.read_run(slide, run)]
        x = [torch.from_numpy(t.transpose(2, 0, 1).copy()) for t in tiles]
        with torch.no_grad():
            for b in DataLoader(x, batch_size=batch_size):
                ext.net((b.float() / 255 - mean) / std)
                n += len(b)
    return n


def timed(fn):
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small tile counts (a few minutes on 2 cores)")
    ap.add_argument("--tiles", type=int, default=None, help="tiles per TFRecord (default 64, --quick 32)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench" / "features"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import torch

    from histolight.dataset import Dataset
    from histolight.demo import ensure_demo
    from histolight.features import build_feature_extractor, extract_features

    work = Path(a.work)
    n_tiles = a.tiles or (32 if a.quick else 64)
    px, um = 224, 112
    tfr = make_tfrecords(work / "tiles", 2, n_tiles, px)
    demo = ensure_demo(
        work / "demo", n_slides=2, seed=0, width=1536 if a.quick else 2048, height=1024 if a.quick else 1536, mpp=0.5
    )
    ds = Dataset(demo / "slides", name="benchdemo")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; batch {a.batch_size}")
    print(f"{'model':10s} {'source':9s} {'tiles':>6s} {'histolight t/s':>15s} {'baseline t/s':>13s} {'ratio':>6s}")
    for label in a.models:
        ext = build_feature_extractor(MODELS[label], device="cpu", tile_px=px)
        import histolight.classify.data  # noqa: F401 - imports and the first forward are not timed
        import histolight.extract.plan  # noqa: F401

        ext(torch.zeros(2, 3, px, px, dtype=torch.uint8))
        cases = [
            (
                "tfrecords",
                lambda ext=ext: extract_features(
                    ext, tfr, work / "out_tfr", batch_size=a.batch_size, overwrite=True, progress=False
                ),
                lambda ext=ext: baseline_tfrecords(ext, tfr, a.batch_size),
            ),
            (
                "slides",
                lambda ext=ext: extract_features(
                    ext,
                    None,
                    work / "out_wsi",
                    dataset=ds,
                    tile_px=px,
                    tile_um=um,
                    extract={"roi_method": "ignore"},
                    batch_size=a.batch_size,
                    overwrite=True,
                    progress=False,
                ),
                lambda ext=ext: baseline_slides(ext, ds, px, um, a.batch_size),
            ),
        ]
        for source, ours, base in cases:
            res, t_ours = timed(ours)
            n_ours = int(res.table["tiles"].fillna(0).sum())
            n_base, t_base = timed(base)
            r_ours, r_base = n_ours / t_ours, n_base / t_base
            print(f"{label:10s} {source:9s} {n_ours:6d} {r_ours:15.1f} {r_base:13.1f} {r_ours / r_base:6.2f}", flush=True)
            assert n_ours == n_base, (n_ours, n_base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
