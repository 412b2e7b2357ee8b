"""Slide-level models from feature bags (multiple-instance learning), on the training kit (:mod:`histolight.training`).

- :mod:`~.data`: bags (``<slide>.pt`` + ``<slide>.index.npz``) + a label table -> items (slides or pooled patients),
  patient-level splits / k-fold, tile subsampling (``max_tiles``), class-balanced sampling, padded batches.
- :mod:`~.models`: ``mean_mlp``, ``max_mlp``, ``attention_mil`` (gated, Ilse 2018), ``clam_sb`` (Lu 2021),
  ``transmil`` (Shao 2021), built by name with the bags' width.
- :mod:`~.module`: the LightningModule (loss, AUROC / balanced accuracy / per-class F1 / confusion matrix).
- :mod:`~.training`: :func:`train` (one model folder of kind ``mil`` per fold, ``folds.csv``), :func:`load_mil_model`.
- :mod:`~.predict`: per-slide predictions, per-tile attention, heatmaps and top-tile montages.
- :mod:`~.attention`: top-attended tiles, their share in one class's ROIs, montages read back from the slide.
- :mod:`~.report`: a training run's out-of-fold ROC curve and attention examples, logged to its loggers (W&B).
- :mod:`~.demo`: the demo's necrosis label.
"""

from histolight.mil.models import MODELS, build_mil_model
from histolight.mil.predict import predict
from histolight.mil.training import load_mil_model, train

__all__ = ["MODELS", "build_mil_model", "train", "load_mil_model", "predict"]
