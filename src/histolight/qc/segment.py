"""``qc.Segment``: a trained segmentation model as a QC method (Slideflow's ``sf.slide.qc.Segment``).

>>> qc = Segment("outputs/<run>/")              # a model folder from task=train_seg
>>> m = qc(slide)                               # QCMask at the model's mpp, True = drop
>>> rois = qc.generate_rois(slide)              # labelled polygons in base px

What is dropped (``threshold_direction='less'``, the default: keep what the model segments):

- binary: pixels predicted background (probability < ``config.threshold``);
- multiclass: pixels whose argmax is background (0), or, with ``class_idx``, whose argmax is not ``class_idx``;
- multilabel: pixels where every channel is negative, or, with ``class_idx``, where that channel is negative.

``threshold_direction='greater'`` inverts this (drop what the model segments: use it for a model
trained on artifacts such as pen marks). Predictions are cached per slide, so calling the QC and
then :meth:`Segment.generate_rois` on the same slide runs the model once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from histolight.qc.base import QCMask


class Segment:
    """QC with a trained segmentation model.

    Args:
        model_path: model folder (``segment_config.json`` + ``weights.safetensors``), its weights file or a ``.ckpt``;
            read safely (:mod:`histolight.io.weights`).
        class_idx: multiclass: the class index to keep (1..N; 0 is background); multilabel: the
            channel (0..N-1); None = any foreground.
        threshold_direction: ``'less'`` drops pixels *not* predicted as tissue/``class_idx``;
            ``'greater'`` drops pixels predicted as it.
        device: torch device for inference (``'auto'``/None = cuda if available, ``'cpu'``, ``'cuda[:n]'``).
    """

    name = "segment"

    def __init__(
        self,
        model_path: str | os.PathLike,
        class_idx: int | None = None,
        threshold_direction: str = "less",
        device: str | None = None,
    ):
        if threshold_direction not in ("less", "greater"):
            raise ValueError(f"threshold_direction={threshold_direction!r} is invalid: must be 'less' or 'greater'")
        self.model_path = str(model_path)
        if not Path(self.model_path).exists():
            raise ValueError(f"model_path={self.model_path!r} does not exist (a model folder written by task=train_seg)")
        self.class_idx = class_idx
        self.threshold_direction = threshold_direction
        self.device = device
        self._model = None
        self._cache: tuple[str, np.ndarray] | None = None
        cfg = self.config  # loads the model; validates class_idx against it
        if class_idx is not None:
            if cfg.mode == "binary":
                raise ValueError("class_idx is not used by binary models (leave it null)")
            hi = cfg.n_out - 1
            lo = 1 if cfg.mode == "multiclass" else 0
            if not (isinstance(class_idx, int) and lo <= class_idx <= hi):
                raise ValueError(
                    f"class_idx={class_idx!r} is invalid for this {cfg.mode} model: allowed {lo}..{hi} "
                    f"({', '.join(f'{i}={n}' for i, n in enumerate(cfg.class_names) if i >= lo)})"
                )

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        if self._model is None:
            from histolight.segment.rois import load_segment_model

            self._model = load_segment_model(self.model_path, self.device)  # once per process, shared with other users
        return self._model

    @property
    def config(self):
        return self.model.config

    @property
    def role(self) -> str | None:
        """``'tissue'`` when this QC keeps tissue (masks background), for extraction reports."""
        return "tissue" if self.threshold_direction == "less" else None

    def __getstate__(self):  # picklable for worker processes: the model is reloaded there
        d = dict(self.__dict__)
        d["_model"] = None
        d["_cache"] = None
        return d

    def __repr__(self) -> str:
        return f"Segment({self.model_path!r}, class_idx={self.class_idx}, threshold_direction={self.threshold_direction!r})"

    # ------------------------------------------------------------------ prediction
    def _key(self, slide) -> str:
        return f"{getattr(slide, 'path', '')}|{getattr(slide, 'name', '')}|{slide.dimensions}|{slide.mpp}"

    def predict_labels(self, slide) -> np.ndarray:
        """Label prediction of ``slide`` at the model's mpp (cached for the last slide)."""
        key = self._key(slide)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.model.run_slide_inference(slide, output="labels"))
        return self._cache[1]

    def keep_mask(self, labels: np.ndarray) -> np.ndarray:
        """Bool ``(H, W)``: pixels the model segments as tissue (or as ``class_idx``)."""
        cfg = self.config
        if cfg.mode == "binary":
            return labels > 0
        if cfg.mode == "multiclass":
            return labels != 0 if self.class_idx is None else labels == self.class_idx
        return labels.any(0) if self.class_idx is None else labels[self.class_idx] > 0

    def __call__(self, slide) -> QCMask:
        keep = self.keep_mask(self.predict_labels(slide))
        drop = ~keep if self.threshold_direction == "less" else keep
        return QCMask(drop, self.config.mpp, self.name)

    def generate_rois(
        self,
        slide,
        min_area_mm2: float | None = None,
        min_hole_mm2: float | None = None,
        simplify_tolerance: float | None = None,
    ):
        """Labelled ROIs (base px) of ``slide`` from the model's prediction (write them with ``write_rois``).

        See :func:`histolight.segment.rois.generate_rois` for the parameters.
        """
        from histolight.segment.rois import generate_rois

        return generate_rois(
            slide,
            self.model,
            min_area_mm2=min_area_mm2,
            min_hole_mm2=min_hole_mm2,
            simplify_tolerance=simplify_tolerance,
            labels_pred=self.predict_labels(slide),
        )
