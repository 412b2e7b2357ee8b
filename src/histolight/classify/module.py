"""The tile classifier: a LightningModule over ``timm.create_model(name, pretrained=False, num_classes=...)``.

Metrics (``val/`` and ``test/``; computed once per epoch from all tiles gathered across ranks, so
DDP evaluation counts each tile once): ``loss``, ``acc`` (tile accuracy), ``bal_acc`` (balanced
accuracy = mean recall over the classes present), ``auroc`` (macro one-vs-rest AUROC over the classes
present), ``n_tiles``; with ``slide_metrics`` (weak supervision) also ``slide_auroc`` and ``slide_acc``
from per-slide mean tile probabilities.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from histolight.errors import ConfigError, HistolightError
from histolight.io.weights import load_matching, read_state_dict
from histolight.training.normalize import IMAGENET_MEAN, IMAGENET_STD, normalize_batch
from histolight.training.optim import configure_optimizers

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ timm model


def check_timm_name(name: str) -> None:
    """ConfigError with close matches when ``name`` is not a timm architecture."""
    import timm

    if isinstance(name, str) and timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ConfigError(f"model.name={name!r} is not a timm model.{hint} (see timm.list_models())")


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load local weights (timm/torchvision ``.pth``/``.safetensors`` or a histolight checkpoint) into ``model``.

    Read with :func:`histolight.io.weights.read_state_dict` (safe loading); tensors whose shape differs (typically the classifier head, for another number
    of classes) are skipped and re-initialised; at least one tensor must match.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"model.checkpoint_path={path!r} is invalid: the file does not exist")
    try:
        sd = read_state_dict(path)
        load_matching(model, sd, source=f"model.checkpoint_path '{path}'")
    except ConfigError:
        raise
    except HistolightError as e:
        raise ConfigError(f"model.checkpoint_path={path!r} is invalid: {e}") from None


def create_timm_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    drop_rate: float = 0.0,
    **kwargs,
) -> nn.Module:
    """``timm.create_model(name, pretrained, num_classes, drop_rate)`` plus optional local weights
    (:func:`load_local_weights`)."""
    import timm

    check_timm_name(name)
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    if checkpoint_path:
        load_local_weights(model, str(checkpoint_path))
    return model


def timm_preprocessing(name: str) -> tuple[tuple, tuple]:
    """(mean, std) the architecture's pretrained weights expect (timm's default config)."""
    import timm

    cfg = timm.get_pretrained_cfg(name) if hasattr(timm, "get_pretrained_cfg") else None
    mean = getattr(cfg, "mean", None) or IMAGENET_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def apply_freeze(model: nn.Module, freeze: Any) -> int:
    """Freeze parameters: ``'backbone'`` (all but the classifier head) or a list of name prefixes.

    Returns the number of frozen parameter tensors.
    """
    if freeze in (None, False, "none", []):
        return 0
    if freeze == "backbone":
        head = {id(p) for p in model.get_classifier().parameters()} if hasattr(model, "get_classifier") else set()
        if not head:
            raise HistolightError("model.freeze=backbone: cannot find the classifier head of this model")
        params = [p for p in model.parameters() if id(p) not in head]
    else:
        prefixes = [str(p) for p in freeze]
        names = [n for n, _ in model.named_parameters()]
        for pre in prefixes:
            if not any(n.startswith(pre) for n in names):
                raise ConfigError(f"model.freeze prefix {pre!r} matches no parameter (e.g. {names[:3]})")
        params = [p for n, p in model.named_parameters() if any(n.startswith(pre) for pre in prefixes)]
    for p in params:
        p.requires_grad_(False)
    return len(params)


# ------------------------------------------------------------------------------------------ metrics


class _Collector(Metric):
    """Gathers probabilities, targets, slide numbers and tile indices (concatenated across ranks on compute)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for k in ("probs", "target", "slide", "index"):
            self.add_state(k, default=[], dist_reduce_fx="cat")
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs, target, slide, index, loss_sum):
        self.probs.append(probs.detach().float())
        self.target.append(target.detach().long())
        self.slide.append(slide.detach().long())
        self.index.append(index.detach().long())
        self.loss_sum += loss_sum.detach().double()

    def compute(self):
        def cat(x):
            if isinstance(x, list):
                return torch.cat(x) if x else torch.empty(0)
            return x

        return cat(self.probs), cat(self.target), cat(self.slide), cat(self.index), self.loss_sum


def _macro_auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over classes present in ``y`` (nan when fewer than two are present)."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c in range(probs.shape[1]):
        pos = y == c
        if pos.any() and (~pos).any():
            aucs.append(roc_auc_score(pos.astype(int), probs[:, c]))
    return float(np.mean(aucs)) if aucs and len(np.unique(y)) >= 2 else float("nan")


def classification_metrics(
    probs: np.ndarray, target: np.ndarray, slides: np.ndarray | None = None, slide_level: bool = False
) -> dict[str, float]:
    """Tile accuracy, balanced accuracy, macro AUROC (+ slide-level AUROC/accuracy from mean probabilities)."""
    probs, target = np.asarray(probs, np.float64), np.asarray(target)
    out: dict[str, float] = {"n_tiles": float(len(target))}
    if len(target) == 0:
        return out
    pred = probs.argmax(1)
    out["acc"] = float((pred == target).mean())
    recalls = [float((pred[target == c] == c).mean()) for c in np.unique(target)]
    out["bal_acc"] = float(np.mean(recalls))
    out["auroc"] = _macro_auroc(target, probs)
    if slide_level and slides is not None:
        import pandas as pd

        df = pd.DataFrame(probs).assign(_s=np.asarray(slides), _y=target)
        g = df.groupby("_s")
        sp = g[list(range(probs.shape[1]))].mean().to_numpy()
        sy = g["_y"].agg(lambda s: s.value_counts().index[0]).to_numpy()
        out["slide_auroc"] = _macro_auroc(sy, sp)
        out["slide_acc"] = float((sp.argmax(1) == sy).mean())
        out["n_slides"] = float(len(sy))
    return out


# ------------------------------------------------------------------------------------------ module


class TileClassifier(L.LightningModule):
    """A timm classifier for tiles.

    Args:
        model_name: timm architecture (``timm.list_models()``), created with ``pretrained`` (default
            False: no download) and ``num_classes=len(classes)``.
        classes: class names, in label-map order.
        checkpoint_path: optional local weights to start from (head skipped when its shape differs).
        drop_rate: dropout before the classifier head.
        freeze: None | ``'backbone'`` | list of parameter-name prefixes to freeze.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        optimizer, scheduler, scheduler_interval, warmup_epochs: Hydra ``_partial_`` nodes (or callables) and
            options of :func:`histolight.training.optim.configure_optimizers`.
        slide_metrics: also report slide-level AUROC/accuracy (weak supervision).
        model_config: the artifact description saved in every checkpoint (``checkpoint['histolight']``).
        mean, std: preprocessing; uint8 batches (what the tile datasets deliver) are normalized by
            :meth:`forward` on the device.
    """

    def __init__(
        self,
        model_name: str,
        classes: Sequence[str],
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        drop_rate: float = 0.0,
        freeze: Any = None,
        label_smoothing: float = 0.0,
        optimizer: Any = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        warmup_epochs: int = 0,
        slide_metrics: bool = False,
        model_config: dict | None = None,
        model_kwargs: dict | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "model_config"])
        self.classes = list(classes)
        self.net = create_timm_model(
            model_name,
            len(self.classes),
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            drop_rate=drop_rate,
            **(model_kwargs or {}),
        )
        self.n_frozen = apply_freeze(self.net, freeze)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.warmup_epochs = int(warmup_epochs)
        self.label_smoothing = float(label_smoothing)
        self.slide_metrics = slide_metrics
        self.model_config = model_config
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.val_collector = _Collector()
        self.test_collector = _Collector()
        self.last_metrics: dict[str, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of normalized float images, or of uint8 tiles (normalized here)."""
        if x.dtype == torch.uint8:
            x = normalize_batch(x, self.mean, self.std)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if "image" not in batch:  # every tile of the batch was corrupt and skipped (data.on_corrupt=skip)
            return None
        logits = self(batch["image"])
        y = batch["label"]
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        bs = y.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def _eval_step(self, batch, collector: _Collector):
        if "image" not in batch:  # every tile of the batch was corrupt and skipped
            return
        logits = self(batch["image"])
        y = batch["label"]
        if (y < 0).any():
            raise HistolightError("evaluation batch holds unlabelled tiles (label -1)")
        loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
        collector.update(logits.float().softmax(1), y, batch["slide"], batch["index"], loss_sum)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_collector)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_collector)

    def _eval_epoch_end(self, collector: _Collector, prefix: str):
        probs, target, slide, index, loss_sum = collector.compute()
        collector.reset()
        idx = index.cpu().numpy()
        if len(np.unique(idx)) != len(idx):
            raise HistolightError(
                f"{prefix}: {len(idx) - len(np.unique(idx))} tiles were evaluated twice "
                "(a sampler padded the split; use EvalDistributedSampler)"
            )
        m = classification_metrics(probs.cpu().numpy(), target.cpu().numpy(), slide.cpu().numpy(), self.slide_metrics)
        if len(target):
            m["loss"] = float(loss_sum) / len(target)
        if self.trainer is not None and self.trainer.sanity_checking:
            return
        self.last_metrics[prefix] = m
        for k, v in m.items():
            if not (isinstance(v, float) and math.isnan(v)):
                # identical on every rank already (gathered above); sync_dist only silences Lightning's DDP warning
                self.log(f"{prefix}/{k}", float(v), prog_bar=k in ("bal_acc", "loss"), sync_dist=True)

    def on_validation_epoch_end(self):
        self._eval_epoch_end(self.val_collector, "val")

    def on_test_epoch_end(self):
        self._eval_epoch_end(self.test_collector, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return {"probs": self(batch["image"]).float().softmax(1), "index": batch["index"]}

    def configure_optimizers(self):
        return configure_optimizers(
            [p for p in self.parameters() if p.requires_grad],
            self.optimizer_factory,
            self.scheduler_factory,
            interval=self.scheduler_interval,
            warmup_epochs=self.warmup_epochs,
            trainer=self._trainer,
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.model_config is not None:
            checkpoint["histolight"] = self.model_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "histolight" in checkpoint:
            self.model_config = checkpoint["histolight"]


__all__ = [
    "TileClassifier",
    "create_timm_model",
    "check_timm_name",
    "load_local_weights",
    "apply_freeze",
    "timm_preprocessing",
    "classification_metrics",
]
