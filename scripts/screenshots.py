"""Regenerate the README pictures from the demo cohort:

- ``docs/report.png``: the extraction report (tiles of three demo slides, QC ``otsu`` + ``blur``) rendered by
  headless Chromium;
- ``docs/overlay.png``: a segmentation overlay (titled panels and colour legend) of a held-out demo slide by
  ``--model <model folder>`` (for the README: the run of ``make demo``), else by a small U-Net trained here for 6
  epochs (a few CPU minutes; a rougher prediction than ``make demo``'s);
- ``docs/mil_heatmap.jpg`` (with ``--mil-run <run of experiment=mil_demo>``): the attention | evidence heatmap of
  that run's most confidently right ``high_necrosis`` out-of-fold example, scaled to 1400 px wide (JPEG).

    .venv/bin/python scripts/screenshots.py [--model outputs/<date>/<time>] [--mil-run outputs/<date>/<time>] [--out docs]

Needs Chromium for the report (``apt-get install -y chromium``); without it only the overlay is written.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["tumor", "stroma", "necrosis"]
REPORT_SLIDES = ["demo_000", "demo_003", "demo_008"]
OVERLAY_SLIDE = "demo_008"
WINDOW = (1280, 1500)


def demo_dataset():
    from histolight.dataset import Dataset
    from histolight.demo import ensure_demo

    root = ensure_demo(ROOT / "data" / "demo")
    return Dataset(root / "slides", rois=root / "rois", annotations=root / "annotations.csv", name="demo")


def report_png(ds, work: Path, dest: Path) -> Path | None:
    from histolight.extract import extract_tiles
    from histolight.extract.tfreport import find_browser
    from histolight.io.images import write_png

    exe = find_browser()
    if exe is None:
        print("no Chromium installed (apt-get install -y chromium): docs/report.png not regenerated", file=sys.stderr)
        return None
    res = extract_tiles(
        ds, outdir=work / "tiles", tile_px=128, tile_um=64, qc=["otsu", "blur"], slides=REPORT_SLIDES, progress=False
    )
    shot = work / "report.png"
    w, h = WINDOW
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={w},{h}"]
    subprocess.run([*cmd, f"--screenshot={shot}", res.report_path.as_uri()], capture_output=True, timeout=120, check=True)
    import cv2

    img = cv2.cvtColor(cv2.imread(str(shot), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    write_png(dest, img)
    return dest


def overlay_png(ds, model: Path | None, work: Path, dest: Path) -> Path:
    from histolight.segment import SegmentConfig, train
    from histolight.segment.outputs import segment_slide

    if model is None:
        cfg = SegmentConfig(
            mode="multiclass",
            labels=LABELS,
            mpp=4,
            size=128,
            crops_per_epoch=64,
            batch_size=16,
            encoder_name="tu-mobilenetv3_small_100",
            model_kwargs={"decoder_channels": [128, 64, 32, 16, 16]},
            infer_tile_px=512,
        )
        names = [n for n in ds.names if n != OVERLAY_SLIDE]
        model = work / "seg"
        metrics = train(
            cfg,
            ds,
            dest=model,
            epochs=6,
            train_slides=names[:-2],
            val_slides=names[-2:],
            n_overlays=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
        )
        print(f"segmentation model: val mIoU {metrics['val/miou']:.3f} after {metrics['epochs']} epochs")
    segment_slide(OVERLAY_SLIDE, ds, str(model), str(work / "segment"), rois=False, device="cpu")
    shutil.copyfile(work / "segment" / f"{OVERLAY_SLIDE}.overlay.png", dest)
    return dest


def mil_png(run: Path, dest: Path) -> Path | None:
    import cv2

    from histolight.mil.report import EXAMPLES, out_of_fold

    pred = out_of_fold(run)
    pred = pred[pred["label"] == "high_necrosis"].sort_values("prob_high_necrosis", ascending=False)
    pngs = [run / EXAMPLES / "heatmaps" / f"{s}.png" for s in pred["id"]]
    png = next((p for p in pngs if p.is_file()), None)
    if png is None:
        print(f"no high_necrosis heatmap in {run / EXAMPLES}: docs/mil_heatmap.jpg not regenerated", file=sys.stderr)
        return None
    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    scale = min(1.0, 1400 / img.shape[1])
    img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else img
    if not cv2.imwrite(str(dest), img, [cv2.IMWRITE_JPEG_QUALITY, 85]):
        raise OSError(f"could not write {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a trained demo segmentation model folder (default: train one)")
    ap.add_argument("--mil-run", type=Path, help="a run folder of experiment=mil_demo (writes mil_heatmap.jpg)")
    ap.add_argument("--only", nargs="+", choices=["report", "overlay", "mil"], help="write only these pictures")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where report.png, overlay.png, mil_heatmap.jpg go")
    args = ap.parse_args(argv)
    want = set(args.only or ["report", "overlay", "mil"])
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if "mil" in want and args.mil_run is not None:
        written.append(mil_png(args.mil_run, args.out / "mil_heatmap.jpg"))
    if want & {"report", "overlay"}:
        ds = demo_dataset()
        with tempfile.TemporaryDirectory(prefix="histolight-shots-") as tmp:
            work = Path(tmp)
            if "report" in want:
                written.append(report_png(ds, work, args.out / "report.png"))
            if "overlay" in want:
                written.append(overlay_png(ds, args.model, work, args.out / "overlay.png"))
    for p in written:
        if p is not None:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
