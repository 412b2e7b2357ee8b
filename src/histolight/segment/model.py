"""The segmentation LightningModule (training, validation metrics, inference) and overlay pictures.

The network is :class:`histolight.segment.net.SegmentNet`; optimizers come from the ``_partial_`` nodes of the
config through :func:`histolight.training.optim.configure_optimizers`.

:class:`SegmentModel` (a ``LightningModule``, like Slideflow's ``SegmentModel``) trains it and
runs inference: :meth:`SegmentModel.run_tiled_inference` on any ``H x W x 3`` array and
:meth:`SegmentModel.run_slide_inference` on a whole slide, in strips.

Output shapes (probabilities, float32): binary ``(H, W)``; multiclass ``(N + 1, H, W)`` with
channel 0 = background; multilabel ``(N, H, W)``. ``output='labels'`` gives uint8 ``(H, W)``
(binary 0/1, multiclass class index) or ``(N, H, W)`` 0/1 (multilabel).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch

from histolight import viz
from histolight.segment.config import SegmentConfig
from histolight.segment.inference import single_pass_logits, tiled_logits
from histolight.segment.losses import SegmentLoss
from histolight.segment.net import SegmentNet, load_encoder_weights
from histolight.training.optim import configure_optimizers

log = logging.getLogger(__name__)

OUTPUTS = ("proba", "logits", "labels")


# ---------------------------------------------------------------------------------------------- colours / overlays


def palette(class_names: Sequence[str]) -> np.ndarray:
    """``(n, 3)`` uint8 colours of ``class_names`` from the shared label palette (:func:`histolight.viz.palette`)."""
    return viz.palette(class_names)


def colorize(labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Class map ``(H, W)`` (or multilabel ``(N, H, W)``) -> RGB ``(H, W, 3)`` uint8 (:func:`histolight.viz.colorize`)."""
    return viz.colorize(labels, class_names)


def overlay(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.6) -> np.ndarray:
    """Image ``(H, W, 3)`` with the predicted classes blended in, background untouched (:func:`histolight.viz.blend_labels`)."""
    fg = labels.any(0) if labels.ndim == 3 else labels > 0
    return viz.blend_labels(image, colorize(labels, class_names), fg, alpha)


def panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``[image | truth | prediction]`` side by side under titles, with the colour legend below."""
    key = viz.legend_image(viz.label_colors(class_names))
    return viz.panels(
        [(image, "image"), (colorize(truth, class_names), "truth"), (colorize(pred, class_names), "prediction")], key
    )


# ---------------------------------------------------------------------------------------------- module


class SegmentModel(L.LightningModule):
    """Whole-slide segmentation model.

    Args:
        config: :class:`SegmentConfig` (or its dict, e.g. from a checkpoint's hyperparameters).
        load_pretrained: load ``config.encoder_weights`` into the encoder (training start). False
            when rebuilding a trained model: the weights then come from the model folder / the checkpoint
            and nothing is read from the network.
        n_overlays: validation slides drawn as ``[image | truth | prediction]`` overlays.
        overlay_every: draw overlays every this many epochs (and at the last one); 0 = never.
    """

    def __init__(
        self,
        config: SegmentConfig | dict,
        load_pretrained: bool = False,
        n_overlays: int = 3,
        overlay_every: int = 5,
    ):
        super().__init__()
        if isinstance(config, SegmentConfig):
            cfg = config
        else:
            d = dict(config)
            if not load_pretrained:
                d["encoder_weights"] = None  # weights come from the saved state; never look the file up again
            cfg = SegmentConfig.from_dict(d)
        self.config = cfg
        self.save_hyperparameters({"config": cfg.to_dict(), "n_overlays": n_overlays, "overlay_every": overlay_every})
        self.net = SegmentNet(cfg)
        if load_pretrained and cfg.encoder_weights:
            load_encoder_weights(self.net, cfg.encoder_weights, cfg.encoder_name)
        self.loss_fn = SegmentLoss(cfg.mode, cfg.loss_terms, cfg.n_classes, cfg.class_weights, cfg.focal_gamma)
        self.n_overlays = n_overlays
        self.overlay_every = overlay_every
        self.overlay_dir: Path | None = None
        self._metrics_built = False
        self._overlays: list = []
        self._normalizer = None

    # ------------------------------------------------------------------ basics
    @property
    def mode(self) -> str:
        return self.config.mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> logits ``(B, C, H, W)``."""
        return self.net(x)

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., C, H, W)`` -> probabilities (softmax for multiclass, sigmoid otherwise)."""
        return logits.softmax(-3) if self.mode == "multiclass" else torch.sigmoid(logits)

    def to_labels(self, proba: torch.Tensor | np.ndarray):
        """Probabilities ``(C, H, W)`` -> labels (see module docstring); works on tensors and arrays."""
        thr = self.config.threshold
        if isinstance(proba, np.ndarray):
            if self.mode == "multiclass":
                return proba.argmax(0).astype(np.uint8)
            if self.mode == "binary":
                p = proba[0] if proba.ndim == 3 else proba
                return (p > thr).astype(np.uint8)
            return (proba > thr).astype(np.uint8)
        if self.mode == "multiclass":
            return proba.argmax(-3).to(torch.uint8)
        if self.mode == "binary":
            return (proba[..., 0, :, :] > thr).to(torch.uint8)
        return (proba > thr).to(torch.uint8)

    # ------------------------------------------------------------------ training
    def _build_metrics(self):
        from torchmetrics.classification import (
            MulticlassF1Score,
            MulticlassJaccardIndex,
            MultilabelF1Score,
            MultilabelJaccardIndex,
        )

        n = self.config.n_classes
        if self.mode == "multilabel":
            thr = self.config.threshold
            self.val_iou = MultilabelJaccardIndex(num_labels=n, threshold=thr, average="none").to(self.device)
            self.val_dice = MultilabelF1Score(num_labels=n, threshold=thr, average="none").to(self.device)
        else:
            self.val_iou = MulticlassJaccardIndex(num_classes=n, average="none").to(self.device)
            self.val_dice = MulticlassF1Score(num_classes=n, average="none").to(self.device)
        self._metrics_built = True

    def _reset_val(self):
        if not self._metrics_built:
            self._build_metrics()
        self.val_iou.reset()
        self.val_dice.reset()
        n = self.config.n_classes
        self._support = torch.zeros(n, dtype=torch.float64)
        self._predcount = torch.zeros(n, dtype=torch.float64)
        self._val_loss_sum = 0.0
        self._val_loss_n = 0
        self._overlays = []

    def training_step(self, batch: dict, batch_idx: int):
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["mask"], batch["weight"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_validation_epoch_start(self):
        self._reset_val()

    def validation_step(self, batch: dict, batch_idx: int):
        c = self.config
        for i in range(batch["image"].shape[0]):
            img, mask, weight = batch["image"][i], batch["mask"][i], batch["weight"][i]
            logits = tiled_logits(self.net, img, c.tile_px, c.overlap, c.infer_batch_size, max_side=c.size)
            loss = self.loss_fn(logits[None], mask[None], weight[None])
            self._val_loss_sum += float(loss)
            self._val_loss_n += 1
            proba = self.activation(logits)
            valid = weight > 0
            if self.mode == "multilabel":
                p = proba.permute(1, 2, 0)[valid]
                t = mask.permute(1, 2, 0)[valid].long()
                self.val_iou.update(p, t)
                self.val_dice.update(p, t)
                self._support += t.sum(0).double().cpu()
                self._predcount += (p > c.threshold).sum(0).double().cpu()
            else:
                lab = self.to_labels(proba).long()[valid]
                t = mask[valid].long()
                self.val_iou.update(lab, t)
                self.val_dice.update(lab, t)
                n = c.n_classes
                self._support += torch.bincount(t, minlength=n).double().cpu()
                self._predcount += torch.bincount(lab, minlength=n).double().cpu()
            if self._want_overlays() and len(self._overlays) < self.n_overlays:
                hv = int(valid.any(1).sum())
                wv = int(valid.any(0).sum())
                im = (img[:, :hv, :wv].permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
                pr = self.to_labels(proba).cpu().numpy()
                tr = mask.cpu().numpy().astype(np.uint8)
                if self.mode == "multilabel":
                    pr, tr = pr[:, :hv, :wv], tr[:, :hv, :wv]
                else:
                    pr, tr = pr[:hv, :wv], tr[:hv, :wv]
                self._overlays.append((batch["name"][i], panel(im, tr, pr, c.class_names)))

    def _want_overlays(self) -> bool:
        if self.n_overlays <= 0 or self.overlay_every <= 0 or self.trainer is None or self.trainer.sanity_checking:
            return False
        e = self.current_epoch
        last = self.trainer.max_epochs is not None and e + 1 >= self.trainer.max_epochs
        return last or e % self.overlay_every == 0 or self._in_validate()

    def _in_validate(self) -> bool:
        """True inside ``trainer.validate`` (not the validation loop of ``trainer.fit``)."""
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        return str(getattr(fn, "value", fn)) == "validate"

    def compute_val_metrics(self) -> dict[str, float]:
        """Per-class and mean IoU / Dice over every validation pixel since the last reset.

        Means (``val/miou``, ``val/mdice``) average the classes present in the truth or the prediction.
        """
        iou = self.val_iou.compute().double().cpu()
        dice = self.val_dice.compute().double().cpu()
        present = (self._support + self._predcount) > 0
        names = self.config.class_names
        out = {}
        for k, name in enumerate(names):
            if present[k]:
                out[f"val/iou_{name}"] = float(iou[k])
                out[f"val/dice_{name}"] = float(dice[k])
        out["val/miou"] = float(iou[present].mean()) if present.any() else 0.0
        out["val/mdice"] = float(dice[present].mean()) if present.any() else 0.0
        if self.mode == "multiclass":
            fg = present.clone()
            fg[0] = False
            out["val/miou_fg"] = float(iou[fg].mean()) if fg.any() else 0.0
        out["val/loss"] = self._val_loss_sum / max(1, self._val_loss_n)
        return out

    def on_validation_epoch_end(self):
        if self._val_loss_n == 0:
            return
        metrics = self.compute_val_metrics()
        for k, v in metrics.items():
            self.log(k, v, prog_bar=k in ("val/miou", "val/loss"), batch_size=1, sync_dist=True)
        if self._overlays and not self.trainer.sanity_checking:
            self._log_overlays()

    def _log_overlays(self):
        from histolight.io.images import write_png

        tag = "best" if self._in_validate() else f"epoch{self.current_epoch:03d}"
        d = self.overlay_dir or Path(self.trainer.default_root_dir) / "overlays"
        d.mkdir(parents=True, exist_ok=True)
        for name, img in self._overlays:
            write_png(d / f"{tag}_{name}.png", img)
        for lg in self.loggers:
            if hasattr(lg, "log_image"):
                try:
                    lg.log_image(
                        key="val/overlays",
                        images=[im for _, im in self._overlays],
                        caption=[f"{n}: image | truth | prediction" for n, _ in self._overlays],
                        step=self.global_step,
                    )
                except Exception as e:  # noqa: BLE001 - never fail training over a picture
                    log.warning("could not log overlays to %s: %s", type(lg).__name__, e)

    def configure_optimizers(self):
        c = self.config
        return configure_optimizers(
            [p for p in self.parameters() if p.requires_grad],
            c.optimizer,
            c.scheduler,
            interval=c.scheduler_interval,
            warmup_epochs=c.warmup_epochs,
            trainer=self._trainer,
            max_epochs=c.epochs,
        )

    # ------------------------------------------------------------------ inference
    @property
    def normalizer(self):
        """The stain normalizer of ``config.normalizer`` (None when unset)."""
        if self._normalizer is None and self.config.normalizer:
            from histolight.norm import build_normalizer

            self._normalizer = build_normalizer(self.config.normalizer)
        return self._normalizer

    def _prepare(self, image: np.ndarray, context: np.ndarray | None = None) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"expected an H x W x 3 RGB array, got {getattr(image, 'shape', type(image))}")
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        n = self.normalizer
        if n is not None:
            if getattr(n, "use_context", False):
                n.set_context(context if context is not None else image)
            image = n.transform(image)
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(self.device)
        return x.float().div_(255.0)

    def _finish(self, logits: torch.Tensor, output: str) -> np.ndarray:
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is invalid: must be one of {list(OUTPUTS)}")
        if output == "logits":
            out = logits
        else:
            out = self.activation(logits)
            if output == "labels":
                return self.to_labels(out).cpu().numpy()
        out = out.cpu().numpy().astype(np.float32, copy=False)
        return out[0] if self.mode == "binary" else out

    @torch.no_grad()
    def run_tiled_inference(
        self,
        image: np.ndarray,
        tile_px: int | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        output: str = "proba",
    ) -> np.ndarray:
        """Segment an ``H x W x 3`` uint8 RGB array at the model's mpp with overlapping, blended tiles.

        Args:
            image: the image, already at ``config.mpp`` um/px.
            tile_px: px per forward pass ``batch_size * tile_px**2`` (default ``config.infer_tile_px``, else
                ``config.size``; a multiple of 32), in tiles of at most ``config.size`` px (:meth:`_tiled`).
            overlap: tile overlap as a fraction of the tile (default ``config.overlap``).
            batch_size: tiles per forward pass (default ``config.infer_batch_size``).
            output: ``proba`` (default), ``logits`` or ``labels``.

        Returns: exactly ``H x W`` outputs: binary ``(H, W)``, multiclass ``(N + 1, H, W)``,
        multilabel ``(N, H, W)`` (see the module docstring for labels).
        """
        tile = int(tile_px or self.config.tile_px)
        if tile % 32:
            raise ValueError(f"tile_px={tile} must be a multiple of 32")
        return self._finish(self._tiled(self._prepare(image), tile, overlap, batch_size), output)

    def _tiled(self, x: torch.Tensor, tile: int, overlap: float | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Logits ``(C, H, W)`` of the ``(3, H, W)`` input ``x`` in eval mode, tiled and blended.

        Tiles are at most ``config.size`` px (the training crop) on a side: the BatchNorm statistics of the network
        were learnt on feature maps of such crops (at 64 px the deepest maps are 2 x 2, all border), and larger tiles
        shift its deep features away from them (issue 11 item 8: a model trained on 64 px crops then marks most of a
        512 px tile as foreground). ``tile`` (``infer_tile_px``) sets the pixels per forward pass
        (``batch_size * tile**2``): beyond the crop size it puts more crops in a pass, and the prediction is the same.
        """
        c = self.config
        was = self.training
        self.eval()
        try:
            return tiled_logits(
                self.net,
                x,
                tile,
                c.overlap if overlap is None else overlap,
                batch_size or c.infer_batch_size,
                max_side=c.size,
            )
        finally:
            self.train(was)

    @torch.no_grad()
    def run_forward(self, image: np.ndarray, output: str = "proba") -> np.ndarray:
        """One forward pass over the whole array (padded to a multiple of 32): the untiled reference."""
        was = self.training
        self.eval()
        try:
            logits = single_pass_logits(self.net, self._prepare(image))
        finally:
            self.train(was)
        return self._finish(logits, output)

    def iter_slide_inference(
        self,
        slide,
        output: str = "proba",
        strip_px: int | None = None,
        tile_px: int | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Segment a whole slide at ``config.mpp`` strip by strip, yielding each strip's prediction as it is made.

        Each strip of ``strip_px`` rows (default ``max(2 * tile, 1024)``) is read with half a tile of context rows
        above and below (``slide.read``), segmented with the tiles of :meth:`run_tiled_inference` and cropped, so
        memory is one strip whatever the slide size.

        Yields ``(y0, rows)``, top to bottom, covering the slide's grid at ``config.mpp`` (``slide.size_at_mpp``,
        ``H x W``): ``rows`` are ``(C, n, W)`` float32 for ``proba``/``logits`` (binary: ``C = 1``), ``(n, W)`` uint8
        (binary 0/1, multiclass class index) or ``(N, n, W)`` uint8 (multilabel) for ``labels``.
        """
        from tqdm.auto import tqdm

        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is invalid: must be one of {list(OUTPUTS)}")
        c = self.config
        mpp = c.mpp
        W, H = slide.size_at_mpp(mpp)
        ds = mpp / slide.mpp
        tile = int(tile_px or c.tile_px)
        halo = min(tile, c.size) // 2
        strip = int(strip_px or max(2 * tile, 1024))
        context = None
        n = self.normalizer
        if n is not None and getattr(n, "use_context", False):
            context = slide.thumbnail(max_size=2048)
        for y0 in tqdm(range(0, H, strip), desc=f"segment {getattr(slide, 'name', '')}", leave=False, disable=not progress):
            y1 = min(H, y0 + strip)
            r0, r1 = max(0, y0 - halo), min(H, y1 + halo)
            img = slide.read((0.0, r0 * ds), (W * ds, (r1 - r0) * ds), mpp, out_size=(W, r1 - r0))
            logits = self._tiled(self._prepare(img, context), tile, overlap, batch_size)[:, y0 - r0 : y1 - r0]
            if output == "labels":
                yield y0, self.to_labels(self.activation(logits)).cpu().numpy()
            else:
                yield y0, (logits if output == "logits" else self.activation(logits)).cpu().numpy()

    @torch.no_grad()
    def run_slide_inference(
        self,
        slide,
        output: str = "proba",
        strip_px: int | None = None,
        tile_px: int | None = None,
        overlap: float | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """Segment a whole slide at ``config.mpp``, reading it in horizontal strips (:meth:`iter_slide_inference`).

        ``slide``: a slide object or the path of a slide file (opened with :func:`histolight.wsi.open_slide`).

        Returns: the slide's grid at ``config.mpp`` (``slide.size_at_mpp``): binary ``(H, W)``,
        multiclass ``(N + 1, H, W)``, multilabel ``(N, H, W)`` (float32 probabilities, or uint8 labels).
        """
        if isinstance(slide, (str, os.PathLike)):
            from histolight.wsi import open_slide

            with contextlib.closing(open_slide(slide)) as s:
                return self.run_slide_inference(s, output, strip_px, tile_px, overlap, batch_size, progress)
        W, H = slide.size_at_mpp(self.config.mpp)
        ch = 1 if self.mode == "binary" else self.config.n_out
        if output == "labels":
            out = np.zeros((H, W) if self.mode != "multilabel" else (ch, H, W), np.uint8)
        else:
            out = np.zeros((ch, H, W), np.float32)
        for y0, rows in self.iter_slide_inference(slide, output, strip_px, tile_px, overlap, batch_size, progress):
            out[..., y0 : y0 + rows.shape[-2], :] = rows
        return out[0] if (self.mode == "binary" and output != "labels") else out


__all__ = ["SegmentNet", "SegmentModel", "load_encoder_weights", "palette", "colorize", "overlay", "panel"]
