"""Tile classifiers: labelled TFRecord tiles -> a timm model -> per-tile and per-slide predictions.

    from histolight.classify import (prepare_tiles, split_patients, LabelMap, TileDataModule,
                                     TileClassifier, save_model, load_model, predict_tfrecords, train)
    tiles, _ = prepare_tiles(ds, tile_px=128, tile_um=64, tiles_root="tiles", label_source="roi")
    tiles["split"] = split_patients(tiles, "annotations", dataset=ds)
    lm = LabelMap.from_labels(tiles["label"])
    dm = TileDataModule(tiles, lm, tile_px=128, balance="tile")
    module = TileClassifier("resnet18", lm.names)
    metrics = train(data_config, model_config, ds, "outputs/run")     # all of the above + fit + model folder

Modules: :mod:`~.labels` (label sources, label map), :mod:`~.splits` (patient splits, balancing),
:mod:`~.data` (TFRecord tile datasets, samplers), :mod:`~.augment`, :mod:`~.datamodule`,
:mod:`~.module` (LightningModule, metrics), :mod:`~.artifacts` (model folder), :mod:`~.predict`,
:mod:`~.pipeline` (extract + label), :mod:`~.config` (validated data/model options), :mod:`~.training` (``train``).
Splits, augmentation, optimizers and the model-folder format come from :mod:`histolight.training`, shared with
segmentation.
"""

from histolight.classify.artifacts import LoadedModel, load_model, make_model_config, read_model_config, save_model
from histolight.classify.augment import build_transform
from histolight.classify.data import (
    EvalDistributedSampler,
    StreamingTileDataset,
    TileDataset,
    WeightedDistributedSampler,
    find_tfrecords,
    index_tfrecords,
)
from histolight.classify.datamodule import TileDataModule
from histolight.classify.labels import LABEL_SOURCES, LabelMap, UnknownLabelError, label_tiles, read_label_table, tile_id
from histolight.classify.module import TileClassifier, classification_metrics, create_timm_model
from histolight.classify.pipeline import PreparedTiles, prepare_tiles
from histolight.classify.predict import aggregate_slides, evaluate_predictions, predict_tfrecords, write_heatmaps
from histolight.classify.splits import balance_weights, check_splits, split_patients
from histolight.classify.training import train

__all__ = [
    "LABEL_SOURCES",
    "LabelMap",
    "UnknownLabelError",
    "label_tiles",
    "read_label_table",
    "tile_id",
    "split_patients",
    "check_splits",
    "balance_weights",
    "find_tfrecords",
    "index_tfrecords",
    "TileDataset",
    "StreamingTileDataset",
    "WeightedDistributedSampler",
    "EvalDistributedSampler",
    "build_transform",
    "TileDataModule",
    "TileClassifier",
    "create_timm_model",
    "classification_metrics",
    "LoadedModel",
    "make_model_config",
    "save_model",
    "load_model",
    "read_model_config",
    "predict_tfrecords",
    "aggregate_slides",
    "evaluate_predictions",
    "write_heatmaps",
    "PreparedTiles",
    "prepare_tiles",
    "train",
]
