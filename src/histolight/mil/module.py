"""The Lightning module of MIL models and the slide-level metrics (AUROC, balanced accuracy, per-class F1,
confusion matrix)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F

from histolight.mil.models import build_mil_model


def mil_metrics(probs: np.ndarray, target: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of bag predictions ``probs`` (M, C) against ``target`` (M,) class indices.

    Returns ``n``, ``acc``, ``bal_acc`` (mean recall over classes present), ``auroc`` (binary: of the second
    class; else macro one-vs-rest over classes present; nan with one class), ``f1_<class>`` and ``confusion``
    (C x C list, rows = truth, columns = prediction).
    """
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    probs, target = np.asarray(probs, np.float64), np.asarray(target, np.int64)
    out: dict[str, Any] = {"n": float(len(target))}
    if len(target) == 0:
        return out
    pred = probs.argmax(1)
    out["acc"] = float((pred == target).mean())
    out["bal_acc"] = float(np.mean([(pred[target == c] == c).mean() for c in np.unique(target)]))
    present = np.unique(target)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif probs.shape[1] == 2:
        out["auroc"] = float(roc_auc_score(target, probs[:, 1]))
    else:
        out["auroc"] = float(np.mean([roc_auc_score(target == c, probs[:, c]) for c in present]))
    labels = list(range(len(classes)))
    f1 = f1_score(target, pred, labels=labels, average=None, zero_division=0)
    out.update({f"f1_{c}": float(v) for c, v in zip(classes, f1)})
    out["confusion"] = confusion_matrix(target, pred, labels=labels).tolist()
    return out


class MILModule(L.LightningModule):
    """A MIL network (:func:`histolight.mil.models.build_mil_model`) with its loss, metrics and optimizer.

    Args:
        model_name, in_dim, classes, model_kwargs: the network (``in_dim`` = bag width D).
        label_smoothing: cross-entropy label smoothing.
        optimizer, scheduler, scheduler_interval, warmup_epochs: :func:`histolight.training.optim.configure_optimizers`.

    Batches are :func:`histolight.mil.data.collate_bags` dicts. The loss is the bag cross-entropy; CLAM adds its
    instance loss as ``bag_weight * bag + (1 - bag_weight) * instance``. After each evaluation epoch
    ``last_metrics[split]`` holds :func:`mil_metrics` + ``loss`` and ``last_outputs[split]`` the item indices
    (M,) and probabilities (M, C).
    """

    def __init__(
        self,
        model_name: str,
        in_dim: int,
        classes: Sequence[str],
        model_kwargs: dict | None = None,
        label_smoothing: float = 0.0,
        optimizer: Any = None,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        warmup_epochs: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(classes)
        self.net = build_mil_model(model_name, in_dim, len(self.classes), **(model_kwargs or {}))
        self.last_metrics: dict[str, dict] = {}
        self.last_outputs: dict[str, dict[str, np.ndarray]] = {}
        self._eval: dict[str, list] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, label: torch.Tensor | None = None) -> dict:
        """``x`` (B, N, D), ``mask`` (B, N) -> ``{"logits": (B, C), "scores": (B, N), "instance_loss": ()}``."""
        return self.net(x, mask, label)

    def _loss(self, out: dict, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out["logits"], y, label_smoothing=self.hparams.label_smoothing)
        w = getattr(self.net, "bag_weight", 1.0)
        return loss if w >= 1.0 else w * loss + (1 - w) * out["instance_loss"]

    def training_step(self, batch, batch_idx):
        out = self(batch["x"], batch["mask"], batch["y"])
        loss = self._loss(out, batch["y"])
        bs = len(batch["y"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        return loss

    def _eval_step(self, batch, split: str):
        out = self(batch["x"], batch["mask"])
        loss = F.cross_entropy(out["logits"], batch["y"], reduction="sum")
        rec = self._eval.setdefault(split, [])
        rec.append((batch["index"].cpu(), torch.softmax(out["logits"], 1).float().cpu(), batch["y"].cpu(), float(loss)))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, split: str):
        rec = self._eval.pop(split, [])
        if not rec:
            return
        index, probs, y = (torch.cat([r[i] for r in rec]).numpy() for i in range(3))
        m = mil_metrics(probs, y, self.classes)
        m["loss"] = sum(r[3] for r in rec) / max(1, len(y))
        self.last_metrics[split] = m
        self.last_outputs[split] = {"index": index, "probs": probs}
        if not self.trainer.sanity_checking:
            for k, v in m.items():
                if k != "confusion":
                    self.log(f"{split}/{k}", float(v), prog_bar=k in ("auroc", "loss"))

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        from histolight.training.optim import configure_optimizers

        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        return configure_optimizers(
            params, h.optimizer, h.scheduler, interval=h.scheduler_interval, warmup_epochs=h.warmup_epochs, trainer=self.trainer
        )


__all__ = ["mil_metrics", "MILModule"]
