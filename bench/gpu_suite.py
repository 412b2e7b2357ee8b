"""GPU benchmark suite: the figures that need an accelerator, each part timed against its own baseline in the same run.

    python bench/gpu_suite.py                       # on a CUDA machine (what bench/gpu_suite.sh runs; < 8 min)
    python bench/gpu_suite.py --device cpu --tiny   # smoke mode: every part on tiny inputs on the CPU (~10-30 s)
    python bench/gpu_suite.py --only seg_train tiled --json out.json

Parts (each prints its figures; one failing part is recorded and the others still run):

- ``seg_train``   segmentation training step (forward + loss + backward + AdamW step) of the demo architecture
                  (Unet / MobileNetV3, 3 classes): images/s in float32 and with AMP (autocast: float16 + GradScaler on
                  CUDA, bfloat16 where float16 is unavailable), and the speed-up.
- ``tiled``       tiled inference (:func:`histolight.segment.inference.tiled_logits`) on one large image: MP/s per
                  tile size, against one forward pass of the whole image (time ratio and the layout's pixel ratio).
- ``norm``        stain normalizers (:class:`histolight.norm.StainNormalizer`, torch, batched ``transform_batch``):
                  images/s of every method that builds from a preset.
- ``features``    feature extraction (:mod:`histolight.features`) from TFRecords of random JPEG tiles through the
                  tile loader (``DataLoader`` workers): tiles/s, and the share of the time spent waiting for the
                  loader (compute-bound when low), against the network alone on a resident batch.
- ``classifier``  tile-classifier training step (:class:`histolight.classify.module.TileClassifier`, timm ResNet-50):
                  images/s in float32 and with AMP.

``--tiny`` shrinks every input and swaps in small networks (MobileNetV3-Small encoders, ResNet-18 features): it checks
that every part runs, its numbers mean nothing.

The summary (device, torch, every part's numbers) goes to ``--json`` and, when the environment variable ``OUT`` is
set, to ``$OUT/gpu_suite.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

PARTS = ("seg_train", "tiled", "norm", "features", "classifier")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device, reps: int) -> float:
    """Best wall seconds of ``fn()`` over ``reps`` calls after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def _amp(device):
    """``(autocast context factory, GradScaler or None, dtype name)`` of this device's mixed precision."""
    import torch

    if device.type == "cuda":
        dtype = torch.float16
        return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda"), "float16"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None, "bfloat16"


def _encoder(tiny: bool) -> str:
    """The segmentation encoder: the demo architecture's (``experiment=seg_multiclass``), or a small one to smoke-test."""
    return "tu-mobilenetv3_small_050" if tiny else "tu-mobilenetv3_large_100"


def _train_rate(model, loss_of, make_batch, device, steps: int, amp: bool, warmup: int = 2) -> float:
    """Images/s of ``steps`` optimizer steps (after ``warmup`` steps)."""
    import contextlib

    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast, scaler, _ = _amp(device) if amp else ((contextlib.nullcontext), None, None)
    batch = make_batch()
    n = batch[0].shape[0]

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_of(model, batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    model.train()
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * n / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------- parts


def part_seg_train(device, tiny: bool) -> dict:
    import torch

    from histolight.segment import SegmentConfig
    from histolight.segment.model import SegmentModel

    size, batch, steps = (64, 2, 1) if tiny else (512, 16, 20)
    torch.manual_seed(0)
    cfg = SegmentConfig(
        mode="multiclass", labels=["tumor", "stroma", "necrosis"], mpp=4, size=size, encoder_name="tu-mobilenetv3_large_100"
    )
    model = SegmentModel(cfg).to(device)

    def make_batch():
        x = torch.rand(batch, 3, size, size, device=device)
        y = torch.randint(0, cfg.n_out, (batch, size, size), device=device)
        return x, y, torch.ones(batch, size, size, device=device)

    def loss_of(m, b):
        return m.loss_fn(m(b[0]), b[1], b[2])

    fp32 = _train_rate(model, loss_of, make_batch, device, steps, amp=False)
    amp = _train_rate(model, loss_of, make_batch, device, steps, amp=True)
    print(
        f"  seg_train: {size} px, batch {batch}: float32 {fp32:.1f} img/s, AMP ({_amp(device)[2]}) {amp:.1f} img/s = {amp / fp32:.2f}x"
    )
    return {
        "size": size,
        "batch": batch,
        "img_per_s_fp32": fp32,
        "img_per_s_amp": amp,
        "amp_speedup": amp / fp32,
        "amp_dtype": _amp(device)[2],
    }


def part_tiled(device, tiny: bool) -> dict:
    import torch

    from histolight.segment import SegmentConfig
    from histolight.segment.inference import plan_tiles, single_pass_logits, tiled_logits
    from histolight.segment.model import SegmentModel

    side, tiles, reps = (256, [64, 128], 1) if tiny else (4096, [512, 1024], 3)
    torch.manual_seed(0)
    cfg = SegmentConfig(
        mode="multiclass", labels=["tumor", "stroma", "necrosis"], mpp=4, size=256, encoder_name="tu-mobilenetv3_large_100"
    )
    net = SegmentModel(cfg).to(device).eval().net
    img = torch.rand(3, side, side, device=device)
    mp = side * side / 1e6
    out: dict = {"image_px": side}
    with torch.inference_mode():
        single = _best(lambda: single_pass_logits(net, img), device, reps)
        out["single_mp_per_s"] = mp / single
        print(f"  tiled: {side} x {side} image: single pass {mp / single:.2f} MP/s")
        for t in tiles:
            s = _best(lambda t=t: tiled_logits(net, img, t, cfg.overlap, cfg.infer_batch_size), device, reps)
            lay = plan_tiles(side, side, t, cfg.overlap, cfg.infer_batch_size)
            out[f"tile_{t}"] = {
                "mp_per_s": mp / s,
                "time_vs_single": s / single,
                "pixels_vs_single": lay.cost,
                "tiles": lay.n_tiles,
            }
            print(
                f"    tile {t}: {mp / s:.2f} MP/s, {s / single:.2f}x the time of one pass ({lay.n_tiles} tiles, {lay.cost:.3f}x the pixels)"
            )
    return out


def part_norm(device, tiny: bool) -> dict:
    import torch

    from histolight.norm import StainNormalizer, available_methods, available_presets

    batch, px, reps = (4, 64, 1) if tiny else (256, 256, 5)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, px, px, generator=g) * 120 + 100).to(torch.uint8).to(device)
    preset = available_presets()[0] if available_presets() else None
    out = {"batch": batch, "px": px}
    for method in available_methods():
        try:
            n = StainNormalizer(method, preset=preset) if method != "augment" else StainNormalizer(method)
            s = _best(lambda n=n: n.transform_batch(x), device, reps)
            out[method] = batch / s
            print(f"  norm {method}: {batch / s:.0f} img/s ({px} px, batch {batch})")
        except Exception as e:  # noqa: BLE001 - one method that cannot run is reported, the others still run
            out[method] = f"error: {type(e).__name__}: {e}"
            print(f"  norm {method}: {out[method]}")
    return out


def _tfrecords(d: Path, n_files: int, n_tiles: int, px: int) -> list[str]:
    import cv2
    import numpy as np

    from histolight.io.tfrecord import TFRecordWriter

    rng = np.random.default_rng(0)
    tiles = [
        cv2.imencode(".jpg", cv2.GaussianBlur(rng.integers(0, 255, (px, px, 3), np.uint8), (5, 5), 0))[1].tobytes()
        for _ in range(32)
    ]
    paths = []
    for f in range(n_files):
        p = d / f"t{f}.tfrecords"
        with TFRecordWriter(p, slide=f"t{f}") as w:
            for i in range(n_tiles):
                w.write_tile(tiles[i % len(tiles)], px * i + px // 2, px // 2)
        paths.append(str(p))
    return paths


def part_features(device, tiny: bool) -> dict:
    import torch

    from histolight.features import build_feature_extractor
    from histolight.features.sources import tfrecord_batches

    name, px, n_files, n_tiles, batch, workers = (
        ("resnet18_imagenet", 64, 1, 16, 8, 0) if tiny else ("resnet50_imagenet", 224, 4, 1024, 256, 8)
    )
    ext = build_feature_extractor(name, device=str(device), tile_px=px)
    with tempfile.TemporaryDirectory() as d:
        paths = _tfrecords(Path(d), n_files, n_tiles, px)
        ext(torch.zeros(2, 3, px, px, dtype=torch.uint8))
        wait = compute = 0.0
        n = 0
        t0 = time.perf_counter()
        for p in paths:
            it = iter(tfrecord_batches([p], batch, workers))
            while True:
                t = time.perf_counter()
                b = next(it, None)
                wait += time.perf_counter() - t
                if b is None:
                    break
                t = time.perf_counter()
                ext.forward_batch(b.images)
                _sync(device)
                compute += time.perf_counter() - t
                n += len(b.images)
        total = time.perf_counter() - t0
    resident = torch.randint(0, 255, (batch, 3, px, px), dtype=torch.uint8)
    net_only = batch / _best(lambda: ext.forward_batch(resident), device, 1 if tiny else 5)
    out = {"extractor": name, "tiles": n, "tiles_per_s": n / total, "loader_wait_s": wait, "compute_s": compute}
    out.update(wait_fraction=wait / total, network_only_tiles_per_s=net_only, vs_network_only=(n / total) / net_only)
    print(
        f"  features {name}: {n / total:.0f} tiles/s ({workers} loader workers, batch {batch}); waiting for the loader "
        f"{100 * wait / total:.0f}% of the time; network alone {net_only:.0f} tiles/s ({(n / total) / net_only:.2f}x)"
    )
    return out


def part_classifier(device, tiny: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from histolight.classify.module import TileClassifier

    arch, px, batch, steps = ("mobilenetv3_small_050", 32, 2, 1) if tiny else ("resnet50", 224, 128, 20)
    torch.manual_seed(0)
    model = TileClassifier(arch, ["a", "b"]).to(device)

    def make_batch():
        x = torch.randint(0, 255, (batch, 3, px, px), dtype=torch.uint8, device=device)
        return x, torch.randint(0, 2, (batch,), device=device)

    def loss_of(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    fp32 = _train_rate(model, loss_of, make_batch, device, steps, amp=False, warmup=1 if tiny else 2)
    amp = _train_rate(model, loss_of, make_batch, device, steps, amp=True, warmup=1 if tiny else 2)
    print(f"  classifier {arch}: {px} px, batch {batch}: float32 {fp32:.0f} img/s, AMP {amp:.0f} img/s = {amp / fp32:.2f}x")
    return {"arch": arch, "px": px, "batch": batch, "img_per_s_fp32": fp32, "img_per_s_amp": amp, "amp_speedup": amp / fp32}


RUN = {
    "seg_train": part_seg_train,
    "tiled": part_tiled,
    "norm": part_norm,
    "features": part_features,
    "classifier": part_classifier,
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny inputs: a smoke test of every part (CPU is fine)")
    ap.add_argument("--only", nargs="+", choices=PARTS, help="parts to run (default: all)")
    ap.add_argument("--json", help="write the summary here (also $OUT/gpu_suite.json when OUT is set)")
    a = ap.parse_args(argv)
    import logging

    import torch

    logging.getLogger("histolight").setLevel(logging.WARNING)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu --tiny for the smoke test")
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"gpu_suite on {name}, torch {torch.__version__}, tiny={a.tiny}", flush=True)
    summary: dict = {"device": name, "torch": torch.__version__, "tiny": a.tiny, "parts": {}}
    t_all = time.perf_counter()
    for part in a.only or PARTS:
        t = time.perf_counter()
        try:
            res = RUN[part](device, a.tiny)
        except Exception as e:  # noqa: BLE001 - a failing part is recorded; the others still run
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - t, 1)
        summary["parts"][part] = res
        print(f"  [{part}: {res['seconds']} s]", flush=True)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    text = json.dumps(summary, indent=1, default=str)
    for p in [a.json, os.path.join(os.environ["OUT"], "gpu_suite.json") if os.environ.get("OUT") else None]:
        if p:
            Path(p).write_text(text)
    print(
        f"gpu_suite: {summary['seconds']} s; failed parts: {[k for k, v in summary['parts'].items() if 'error' in v] or 'none'}"
    )
    return summary


if __name__ == "__main__":
    s = main()
    sys.exit(1 if any("error" in v for v in s["parts"].values()) else 0)
