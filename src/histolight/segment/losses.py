"""Segmentation losses with per-pixel weights (ignore padding, emphasise edges) and class weights.

Every term takes ``logits`` ``(B, C, H, W)``, ``target`` and ``weight`` ``(B, H, W)`` (0 = ignore):

- target for ``multiclass``: ``(B, H, W)`` int64 class indices (0 = background);
- for ``binary``: ``(B, H, W)`` 0/1 (``C == 1``); for ``multilabel``: ``(B, N, H, W)`` 0/1.

Terms: ``ce`` (cross-entropy; binary cross-entropy in binary/multilabel modes, alias ``bce``),
``focal`` (Lin et al. 2017), ``dice`` and ``jaccard`` (soft, per class, averaged over the classes
present in the batch, like segmentation_models_pytorch). Combine with weights: ``ce+dice``.

Class weights (:attr:`SegmentConfig.class_weights`) scale each class's pixels in ``ce``/``focal``
(binary: ``[background, foreground]``; multilabel: one weight per label channel, applied to its
positive pixels) and each class's term in ``dice``/``jaccard``.

Edge weights in the spirit of Ronneberger et al. (U-Net, 2015): :func:`edge_weight_map` makes
pixels near label boundaries weigh ``1 + edge_weight * exp(-d^2 / (2 sigma^2))``, ``d`` the
distance to the nearest boundary in px.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)``: pixels whose 3x3 neighbourhood holds another label (any channel for ``(N, H, W)``)."""
    k = np.ones((3, 3), np.uint8)
    if mask.ndim == 3:
        out = np.zeros(mask.shape[1:], bool)
        for ch in mask:
            out |= boundary_map(ch)
        return out
    m = np.ascontiguousarray(mask.astype(np.uint8))
    return cv2.dilate(m, k) != cv2.erode(m, k)


def edge_weight_map(mask: np.ndarray, edge_weight: float, sigma: float) -> np.ndarray:
    """``(H, W)`` float32 weights ``1 + edge_weight * exp(-d^2 / (2 sigma^2))`` (``d``: px to the nearest edge)."""
    hw = mask.shape[-2:]
    if edge_weight <= 0:
        return np.ones(hw, np.float32)
    b = boundary_map(mask)
    if not b.any():
        return np.ones(hw, np.float32)
    d = cv2.distanceTransform((~b).astype(np.uint8), cv2.DIST_L2, 3)
    return (1.0 + edge_weight * np.exp(-(d**2) / (2.0 * sigma**2))).astype(np.float32)


class SegmentLoss(nn.Module):
    """Weighted sum of loss terms, e.g. ``SegmentLoss('multiclass', {'ce': 1, 'dice': 1}, n_classes=4)``."""

    def __init__(
        self,
        mode: str,
        terms: dict[str, float],
        n_classes: int,
        class_weights=None,
        focal_gamma: float = 2.0,
        smooth: float = 1.0,
    ):
        super().__init__()
        self.mode = mode
        self.terms = {("ce" if k == "bce" else k): float(v) for k, v in terms.items()}
        self.n_classes = n_classes
        self.focal_gamma = float(focal_gamma)
        self.smooth = float(smooth)
        cw = torch.ones(n_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", cw, persistent=False)

    # ------------------------------------------------------------------ helpers
    def _pixel_class_weight(self, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel (and per-channel for multilabel) class weight, same shape as the pixelwise loss."""
        cw = self.class_weights
        if self.mode == "multiclass":
            return cw[target]
        if self.mode == "binary":
            return cw[target.long()].unsqueeze(1)
        # multilabel: weight positives of channel c by cw[c], negatives by 1
        t = target.float()
        return 1.0 + (cw.view(1, -1, 1, 1) - 1.0) * t

    def _pixelwise(self, kind: str, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cwp = self._pixel_class_weight(target)
        if self.mode == "multiclass":
            logp = F.log_softmax(logits, 1)
            lp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
            loss = -lp_t
            if kind == "focal":
                loss = loss * (1 - lp_t.exp()).clamp_min(0) ** self.focal_gamma
            w = weight * cwp
        else:
            t = target.float().unsqueeze(1) if self.mode == "binary" else target.float()
            loss = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
            if kind == "focal":
                p = torch.sigmoid(logits)
                p_t = p * t + (1 - p) * (1 - t)
                loss = loss * (1 - p_t).clamp_min(0) ** self.focal_gamma
            w = weight.unsqueeze(1) * cwp
        return (loss * w).sum() / w.sum().clamp_min(1e-6)

    def _region(self, kind: str, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiclass":
            p = logits.softmax(1)
            t = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
            cw = self.class_weights
        elif self.mode == "binary":
            p = torch.sigmoid(logits)
            t = target.float().unsqueeze(1)
            cw = self.class_weights[1:]  # the foreground channel
        else:
            p = torch.sigmoid(logits)
            t = target.float()
            cw = self.class_weights
        w = weight.unsqueeze(1)
        dims = (0, 2, 3)
        inter = (p * t * w).sum(dims)
        card = ((p + t) * w).sum(dims)
        if kind == "dice":
            score = (2 * inter + self.smooth) / (card + self.smooth)
        else:
            score = (inter + self.smooth) / (card - inter + self.smooth)
        present = ((t * w).sum(dims) > 0).float()
        cw = cw * present
        return ((1 - score) * cw).sum() / cw.sum().clamp_min(1e-6)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            weight = torch.ones((logits.shape[0], *logits.shape[2:]), device=logits.device)
        if self.mode == "multiclass":
            target = target.long()
        total = logits.new_zeros(())
        for kind, w in self.terms.items():
            if kind in ("ce", "focal"):
                total = total + w * self._pixelwise(kind, logits, target, weight)
            else:
                total = total + w * self._region(kind, logits, target, weight)
        return total
