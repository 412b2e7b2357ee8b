"""The segmentation network: input normalisation (mean/std buffers, saved with the weights) + a
``segmentation_models_pytorch`` model, and its pretrained encoder weights.

Built with ``encoder_weights=None`` always, so building or loading never touches the network; pretrained
encoder weights come from a local file (:func:`load_encoder_weights`, through :mod:`histolight.io.weights`) or,
only when training with a weights *name*, from smp's hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from histolight.errors import ConfigError, HistolightError
from histolight.segment.config import SegmentConfig
from histolight.training.normalize import normalize_batch

log = logging.getLogger(__name__)


class SegmentNet(nn.Module):
    """``(B, 3, H, W)`` float in [0, 1] -> ``(B, n_out, H, W)`` logits."""

    def __init__(self, cfg: SegmentConfig):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.model = smp.create_model(
            cfg.arch,
            encoder_name=cfg.encoder_name,
            encoder_weights=None,
            in_channels=3,
            classes=cfg.n_out,
            **arch_kwargs(cfg.arch, cfg.model_kwargs),
        )
        mean, std = cfg.resolved_input_stats()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in [0, 1] -> ``(B, n_out, H, W)`` logits."""
        return self.model(normalize_batch(x, self.mean, self.std))


def arch_kwargs(arch: str, kwargs: dict) -> dict:
    """``kwargs`` accepted by smp architecture ``arch``; others are dropped with a warning (arch sweeps)."""
    import inspect

    import segmentation_models_pytorch as smp

    cls = smp.MODEL_ARCHITECTURES_MAPPING[arch.lower()]
    params = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    ok = {k: v for k, v in kwargs.items() if k in params}
    dropped = sorted(set(kwargs) - set(ok))
    if dropped:
        log.warning("model.model_kwargs %s are not arguments of %s: ignored", dropped, arch)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in ok.items()}


def load_encoder_weights(net: SegmentNet, weights: str, encoder_name: str) -> None:
    """Load pretrained encoder weights: a local file (a state dict, ``.safetensors``, a checkpoint holding
    ``state_dict``, or a whole SegmentNet / SegmentModel state, read safely by :mod:`histolight.io.weights`), or an
    smp/timm weights name
    (downloads; fails offline with a clear error)."""
    from histolight.io.weights import load_matching, read_state_dict

    enc = net.model.encoder
    p = Path(weights).expanduser()
    if p.is_file():
        try:
            sd = read_state_dict(p)
            rep = load_matching(enc, sd, source=f"model.encoder_weights '{p}'")
        except HistolightError as e:
            raise ConfigError(f"model.encoder_weights={weights!r} is invalid: {e} ({encoder_name} encoder)") from None
        if rep.loaded < 0.5 * rep.total:
            log.warning("encoder weights: only %d of %d encoder tensors matched in %s", rep.loaded, rep.total, p)
        return
    # a weights name: smp / timm download it (needs internet)
    try:
        import segmentation_models_pytorch as smp

        if encoder_name.startswith("tu-"):
            fresh = smp.encoders.get_encoder(encoder_name, weights=True, depth=len(enc.out_channels) - 1)
        else:
            fresh = smp.encoders.get_encoder(encoder_name, weights=weights, depth=getattr(enc, "_depth", 5))
        enc.load_state_dict(fresh.state_dict())
    except Exception as e:  # noqa: BLE001 - hub / network errors of several kinds
        raise ConfigError(
            f"model.encoder_weights={weights!r}: cannot get pretrained weights ({type(e).__name__}: {e}). "
            "Without internet use encoder_weights=null or a local weights file."
        ) from None


__all__ = ["SegmentNet", "arch_kwargs", "load_encoder_weights"]
