"""Held-out check of a trained segmentation model on the demo cohort (records in experiments/seg_*.md).

    python experiments/seg_eval_heldout.py outputs/<run> [--out outputs/seg_eval] [--min-area-mm2 0.002]

For every val/test slide of data/demo: ROIs from ``qc.Segment(model).generate_rois`` written as Slideflow CSV and
QuPath GeoJSON, read back with ``histolight.roi.read_rois``; IoU (shapely, base px) of each label's predicted ROIs
with the ground-truth ROIs; the QC mask against the exact tissue mask; then tile extraction with
``qc=[{name: segment, model_path: ...}]`` vs without QC: share of kept tiles whose centre lies on tissue, share of
tissue tiles kept. Writes ``<out>/eval.json`` and the ROI files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "seg_eval"))
    ap.add_argument("--demo", default=str(ROOT / "data" / "demo"))
    ap.add_argument("--min-area-mm2", type=float, default=0.002)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import cv2
    import numpy as np
    import shapely

    from histolight.dataset import Dataset
    from histolight.extract import extract_tiles
    from histolight.qc import Segment
    from histolight.roi import read_rois
    from histolight.segment.rois import write_slide_rois

    demo, out = Path(a.demo), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = Dataset(demo / "slides", rois=demo / "rois", annotations=demo / "annotations.csv")
    held = ds.filter(split=["val", "test"]).names
    qc = Segment(a.model)
    cfg = qc.config
    labels = cfg.labels if cfg.mode != "binary" else [cfg.foreground_name]
    res = {}
    for name in held:
        with ds.open(name) as slide:
            rois = qc.generate_rois(slide, min_area_mm2=a.min_area_mm2)
            assert slide.rois is rois
            truth = ds.rois(name)
            write_slide_rois(rois, out, name)
            back_csv, back_gj = read_rois(out / f"{name}.csv"), read_rois(out / f"{name}.geojson")
            gj = json.loads((out / f"{name}.geojson").read_text())
            row = {
                "n_rois": len(rois),
                "n_truth_rois": len(truth),
                "holes": sum(r.n_holes for r in rois),
                "csv_rois_read": len(back_csv),
                "geojson_rois_read": len(back_gj),
                "geojson_valid": gj["type"] == "FeatureCollection"
                and all(shapely.geometry.shape(f["geometry"]).is_valid for f in gj["features"]),
            }
            ious = []
            for lab in labels:
                p = shapely.unary_union([r.geometry for r in back_csv if r.label == lab])
                t = shapely.unary_union([r.geometry for r in truth if cfg.mode == "binary" or r.label == lab])
                iou = p.intersection(t).area / max(p.union(t).area, 1e-9)
                row[f"iou_{lab}"] = round(iou, 4)
                ious.append(iou)
            row["roi_miou"] = round(float(np.mean(ious)), 4)
            p = shapely.unary_union([r.geometry for r in back_csv])
            t = shapely.unary_union([r.geometry for r in truth])
            row["roi_iou_tissue"] = round(p.intersection(t).area / p.union(t).area, 4)
            m = qc(slide)
            gt = cv2.imread(str(demo / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
            gts = cv2.resize(gt, (m.mask.shape[1], m.mask.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
            keep = ~m.mask
            row["qc_keep_iou_tissue"] = round(float((keep & gts).sum() / (keep | gts).sum()), 4)
        res[name] = row
        print(name, row, flush=True)
    tmp = Path(tempfile.mkdtemp())
    opts = dict(
        tile_px=64,
        tile_um=64,
        slides=held,
        roi_method="ignore",
        workers=1,
        report=False,
        progress=False,
        grayspace_fraction=1.0,
        whitespace_fraction=1.0,
    )
    with_qc = extract_tiles(ds, outdir=tmp / "qc", qc=[{"name": "segment", "model_path": str(a.model)}], **opts).tiles
    no_qc = extract_tiles(ds, outdir=tmp / "all", qc=[], **opts).tiles
    ext = {}
    for name in held:
        gt = cv2.imread(str(demo / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)

        def on_tissue(df, gt=gt):
            return gt[df["loc_y"].astype(int).clip(0, gt.shape[0] - 1), df["loc_x"].astype(int).clip(0, gt.shape[1] - 1)] > 0

        k, e = on_tissue(with_qc[with_qc["slide"] == name]), on_tissue(no_qc[no_qc["slide"] == name])
        ext[name] = {
            "tiles_without_qc": int(len(e)),
            "tiles_with_qc": int(len(k)),
            "kept_tiles_on_tissue": round(float(k.mean()), 4),
            "tissue_tiles_kept": round(float(k.sum() / max(1, e.sum())), 4),
        }
        print(name, ext[name], flush=True)
    summary = {
        "roi_miou_mean": round(float(np.mean([r["roi_miou"] for r in res.values()])), 4),
        "roi_iou_tissue_mean": round(float(np.mean([r["roi_iou_tissue"] for r in res.values()])), 4),
    }
    print(summary)
    result = {"model": str(a.model), "slides": held, "rois": res, "extraction": ext, "summary": summary}
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
