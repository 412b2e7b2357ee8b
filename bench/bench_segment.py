"""Whole-slide segmentation inference benchmark: tiled + blended inference vs a plain single forward pass of
the same image, timed in the same run (the overhead of tiling and blending).

    python bench/bench_segment.py                      # CPU, random-init demo architecture (~1-3 min on 2 cores)
    python bench/bench_segment.py --model outputs/<run>  # a trained model folder
    python bench/bench_segment.py --device cuda        # on a GPU (falls back with a message if none)
    python bench/bench_segment.py --quick              # smaller image, fewer repeats
    python bench/bench_segment.py --tiles 128,256,512 --batch 16

What is timed (one warm-up call each, then ``--repeat`` rounds with the cases interleaved; the best time of each;
megapixels = H x W / 1e6 of the input):

- ``single``  ``SegmentModel.run_forward``: one forward pass over the whole image padded to a multiple of 32
              (the baseline; needs memory for the whole image's activations, which tiling avoids).
- ``tiled_T`` ``SegmentModel.run_tiled_inference`` with tiles of ``T`` px (``--tiles``; ``--overlap`` of a tile,
              ``--batch`` tiles per pass), blended with a raised-cosine window; output exactly H x W.
- ``slide_T`` ``SegmentModel.run_slide_inference`` on an in-memory slide (``VirtualSlide``) whose thumbnail at the
              model's mpp is the same image: strips read with ``slide.read`` (includes the resampling reads).

Reported: MP/s of each, throughput relative to ``single`` (1.0 = no overhead; overlapping tiles send about
``1/(1-overlap)^2`` times the pixels through the network, and small tiles use the CPU less well), the mean
difference to the single pass in the interior, and peak RSS. ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def _image(h: int, w: int, seed: int = 0):
    """H&E-like test image: demo-cohort texture if available, else smooth noise."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = cv2.resize(cv2.GaussianBlur(small, (0, 0), 1.0), (w, h), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
    return cv2.addWeighted(img, 0.9, noise, 1.0, 0)


def _time_interleaved(fns: dict, repeat: int, sync) -> dict:
    """Best wall time of each callable over ``repeat`` rounds, the cases interleaved within each round (so a
    burst of load on a shared machine hits every case alike); one warm-up call each first."""
    for fn in fns.values():  # warm-up (kernel selection, allocations)
        fn()
        sync()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="trained model folder (default: random-init demo architecture)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--height", type=int, default=1536)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--tiles", default=None, help="comma-separated tile sizes to time (default: the model's size and 512)")
    ap.add_argument("--overlap", type=float, default=None, help="tile overlap fraction (default: the model's)")
    ap.add_argument("--batch", type=int, default=None, help="tiles per forward pass (default: the model's)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="1024 x 768 image, 2 repeats")
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from histolight.segment import SegmentConfig, load_model_and_config
    from histolight.segment.model import SegmentModel
    from histolight.wsi import VirtualSlide

    if a.quick:
        a.height, a.width, a.repeat = 768, 1024, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: running on cpu")
        device = "cpu"
    if a.model:
        model, cfg = load_model_and_config(a.model, device=device)
        source = a.model
    else:  # the architecture of experiment=seg_multiclass, random weights (speed does not depend on them)
        torch.manual_seed(0)
        cfg = SegmentConfig(mode="multiclass", labels=["tumor", "stroma", "necrosis"], mpp=4, size=256,
                            encoder_name="tu-mobilenetv3_large_100")
        model = SegmentModel(cfg).to(device).eval()
        source = f"random-init {cfg.arch}/{cfg.encoder_name}"
    tiles = [int(t) for t in a.tiles.split(",")] if a.tiles else sorted({cfg.tile_px, 512})
    overlap = cfg.overlap if a.overlap is None else a.overlap
    batch = a.batch or cfg.infer_batch_size
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    img = _image(a.height, a.width)
    mp = a.height * a.width / 1e6
    res = {"device": device, "torch_threads": torch.get_num_threads(), "model": source, "image_hw": [a.height, a.width],
           "tiles": tiles, "overlap": overlap, "batch": batch, "mode": cfg.mode, "repeat": a.repeat}
    print(f"{source} on {device} ({torch.get_num_threads()} threads): image {a.height} x {a.width} ({mp:.2f} MP), "
          f"tiles {tiles}, overlap {overlap}, batch {batch}, best of {a.repeat}")
    # the same image as a slide (at half the model's mpp, so strips are resampled like a real read)
    slide = VirtualSlide(np.ascontiguousarray(np.repeat(np.repeat(img, 2, 0), 2, 1)), mpp=cfg.mpp / 2, downsamples=(1, 2, 8))
    cases = {"single": lambda: model.run_forward(img)}
    for t in tiles:
        cases[f"tiled_{t}"] = (lambda t=t: model.run_tiled_inference(img, tile_px=t, overlap=overlap, batch_size=batch))
    cases[f"slide_{tiles[0]}"] = lambda: model.run_slide_inference(slide, tile_px=tiles[0], overlap=overlap, batch_size=batch)
    with torch.inference_mode():
        times = _time_interleaved(cases, a.repeat, sync)
        p1 = model.run_forward(img)
        p2 = {t: model.run_tiled_inference(img, tile_px=t, overlap=overlap, batch_size=batch) for t in tiles}
    res["seconds"] = times
    res["mp_per_s"] = {k: mp / v for k, v in times.items()}
    res["throughput_vs_single"] = {k: times["single"] / v for k, v in times.items()}
    res["tiled_vs_single_mean_abs_diff"] = {t: float(np.abs(p1 - p2[t])[..., t // 4:-(t // 4), t // 4:-(t // 4)].mean())
                                            for t in tiles}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for k in cases:
        what = {"single": "one pass, padded"}.get(k, "tiles + blending" if k.startswith("tiled") else "slide.read strips + tiles + blending")
        print(f"  {k:12s} {res['mp_per_s'][k]:7.3f} MP/s  ({times[k]:6.2f} s)  {res['throughput_vs_single'][k]:5.2f} x single   ({what})")
    print("  mean |tiled - single| probability in the interior: "
          + ", ".join(f"tile {t}: {v:.4f}" for t, v in res["tiled_vs_single_mean_abs_diff"].items())
          + f"; peak RSS {res['peak_rss_mb']:.0f} MB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
