"""Deep-learning QC in a few lines (Slideflow's ``qc.StridedDL``): a model scores tiles over the whole slide.

The slide is cut into a grid of cells of ``tile_um`` microns (or a magnification such as ``'40x'``: ``tile_px`` px at
that um/px), each read at ``tile_px`` x ``tile_px`` px, fed to the model in batches of ``batch_size`` and scored; a
cell is masked (True = drop) where its score is below ``threshold`` (``threshold_direction='less'``, e.g. an in-focus
probability) or above it (``'greater'``, e.g. an artifact probability). The mask has one pixel per cell.

A subclass only builds its model (see ``docs/qc_models.md``)::

    class MyFocus(StridedDL):
        def build_model(self):
            net = FocusNet()
            load_matching(net, read_state_dict("/models/focus.safetensors"))  # histolight.io.weights: no unpickling
            return net.eval()

    extract_tiles(dataset, qc=["otsu", MyFocus(tile_px=64, tile_um="40x")])

The model is built lazily in the process that runs it (worker processes rebuild it from the picklable QC object).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from histolight.qc.base import QCMask
from histolight.units import mag_to_mpp, parse_tile_um

log = logging.getLogger(__name__)


class StridedDL:
    """Base class of a deep-learning QC method scoring ``tile_px`` px tiles in a grid over the slide.

    Args:
        model: a callable (e.g. a ``torch.nn.Module``) taking a float32 batch ``N x 3 x tile_px x tile_px`` (RGB, 0-1)
            and returning ``N`` or ``N x C`` scores; or None when the subclass implements :meth:`build_model`.
        pred_idx: the output column used as the score when the model returns ``N x C``.
        tile_px: model input size (px).
        tile_um: cell size in microns, or a magnification such as ``'40x'`` (then ``tile_px`` px at that um/px).
        batch_size: tiles per model call.
        threshold: score threshold.
        threshold_direction: ``'less'`` masks cells scored below ``threshold``; ``'greater'`` masks those above it.
        device: torch device (``'auto'``/None = cuda if available, ``'cpu'``, ``'cuda[:n]'``).
        name: the mask's name (reports).

    Calling it returns a :class:`QCMask` (one px per cell, at ``cell um/px``); ``method(slide, threshold=False)``
    returns the raw scores instead (``rows x cols`` float32).
    """

    role = None  # the mask drops what the model rejects (neither tissue detection nor blur)

    def __init__(
        self,
        model: Any = None,
        pred_idx: int = 0,
        tile_px: int = 64,
        tile_um: Any = "40x",
        *,
        batch_size: int = 32,
        threshold: float = 0.5,
        threshold_direction: str = "less",
        device: str | None = "auto",
        name: str = "strided_dl",
    ):
        um, mag = parse_tile_um(tile_um)
        if not (isinstance(tile_px, int) and tile_px >= 1):
            raise ValueError(f"tile_px={tile_px!r} is invalid: must be an integer >= 1 (model input size in px)")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size={batch_size!r} is invalid: must be an integer >= 1")
        if threshold_direction not in ("less", "greater"):
            raise ValueError(f"threshold_direction={threshold_direction!r} is invalid: must be 'less' or 'greater'")
        self._model = model
        self._built = model is None
        self.pred_idx = int(pred_idx)
        self.tile_px = tile_px
        self.tile_um = tile_um
        #: cell side in microns
        self.cell_um = um if um is not None else mag_to_mpp(mag) * tile_px
        self.batch_size = batch_size
        self.threshold = float(threshold)
        self.threshold_direction = threshold_direction
        self.device = device
        self.name = name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tile_px={self.tile_px}, tile_um={self.tile_um!r}, pred_idx={self.pred_idx}, "
            f"threshold={self.threshold:g}, threshold_direction={self.threshold_direction!r})"
        )

    def __getstate__(self):  # a model built by build_model() is rebuilt in the process that unpickles this
        d = dict(self.__dict__)
        if d["_built"]:
            d["_model"] = None
        return d

    # ------------------------------------------------------------------ model
    def build_model(self) -> Any:
        """The model, built on first use (override in a subclass; read weights with :mod:`histolight.io.weights`)."""
        raise NotImplementedError(f"{type(self).__name__}: pass model=... or implement build_model()")

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = self.build_model()
        return self._model

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Scores (``N``, float32) of ``batch`` (``N x tile_px x tile_px x 3`` uint8 RGB): the model on the batch as
        a float tensor ``N x 3 x H x W`` in 0-1 on :attr:`device`, column ``pred_idx`` of a 2-D output."""
        import torch

        from histolight.utils.device import resolve_device

        model = self.model
        dev = resolve_device(self.device)
        if isinstance(model, torch.nn.Module):
            model.to(dev).eval()
        x = torch.from_numpy(batch).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            y = model(x)
        y = y.detach().float().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float32)
        return (y[:, self.pred_idx] if y.ndim == 2 else y.reshape(len(batch))).astype(np.float32)

    # ------------------------------------------------------------------ slide
    def scores(self, slide) -> tuple[np.ndarray, float]:
        """``(scores, cell_mpp)``: the model's score per cell (``rows x cols`` float32) and the cell size in um/px of
        the slide-wide grid (``rows = round(H0 * mpp0 / cell_um)``, at least 1; cells tile the slide exactly)."""
        W, H = slide.dimensions
        cols = max(1, round(W * slide.mpp / self.cell_um))
        rows = max(1, round(H * slide.mpp / self.cell_um))
        cw, ch = W / cols, H / rows  # base px per cell
        read_mpp = self.cell_um / self.tile_px
        out = np.zeros(rows * cols, np.float32)
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        for b in range(0, len(cells), self.batch_size):
            part = cells[b : b + self.batch_size]
            batch = np.stack(
                [slide.read((c * cw, r * ch), (cw, ch), read_mpp, out_size=(self.tile_px, self.tile_px)) for r, c in part]
            )
            out[b : b + len(part)] = self.predict(batch)
        log.debug("%s: %s scored %d cells of %.3g um", slide.name, self.name, len(cells), self.cell_um)
        return out.reshape(rows, cols), W * slide.mpp / cols

    def __call__(self, slide, threshold: bool = True) -> QCMask | np.ndarray:
        s, mpp = self.scores(slide)
        if not threshold:
            return s
        drop = s < self.threshold if self.threshold_direction == "less" else s > self.threshold
        return QCMask(drop, mpp, self.name, detector=type(self).__name__)
