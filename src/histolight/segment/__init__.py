"""Whole-slide tissue segmentation (the Slideflow ``sf.segment`` API on Lightning + smp).

    from histolight import segment
    cfg = segment.SegmentConfig(mode="multiclass", labels=["tumor", "stroma", "necrosis"], mpp=4, size=256)
    segment.export_thumbs_and_masks(dataset, mpp=4, dest="thumbs", labels=cfg.labels, mode=cfg.mode)  # optional
    metrics = segment.train(cfg, dataset, dest="outputs/seg")         # segment_config.json + weights.safetensors
    model, cfg = segment.load_model_and_config("outputs/seg")
    proba = model.run_tiled_inference(image)                          # any H x W x 3 array at cfg.mpp
    pred = model.run_slide_inference(slide)                           # whole slide, in strips
    rois = segment.generate_rois(slide, model)                        # labelled polygons in base px
    dataset.generate_rois("outputs/seg", dest="rois_pred")            # CSV + GeoJSON per slide
    qc = histolight.qc.Segment("outputs/seg")                         # QC for extraction

Heavy imports (torch, lightning, smp) happen when a name is first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SegmentConfig": "histolight.segment.config",
    "config_from_hydra": "histolight.segment.config",
    "export_thumbs_and_masks": "histolight.segment.data",
    "load_thumb_mask": "histolight.segment.data",
    "ThumbMask": "histolight.segment.data",
    "SegmentDataModule": "histolight.segment.datamodule",
    "SegmentLoss": "histolight.segment.losses",
    "SegmentModel": "histolight.segment.model",
    "SegmentNet": "histolight.segment.net",
    "overlay": "histolight.segment.model",
    "train": "histolight.segment.training",
    "split_slides": "histolight.segment.training",
    "save_model": "histolight.segment.io",
    "load_model_and_config": "histolight.segment.io",
    "generate_rois": "histolight.segment.rois",
    "generate_dataset_rois": "histolight.segment.rois",
    "masks_to_rois": "histolight.segment.rois",
    "mask_to_polygons": "histolight.segment.rois",
    "tiled_logits": "histolight.segment.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'histolight.segment' has no attribute {name!r}")


def __dir__():
    return __all__
