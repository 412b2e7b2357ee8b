"""Multiple-instance networks for slide-level labels from feature bags, written from the papers.

Every network maps a bag of ``N`` tile features ``(N, D)`` to class logits and one score per tile, and where the
bag logits are a sum over the tiles (mean pooling, attention pooling: a linear head on a weighted mean of tile
embeddings) also each tile's exact share of every logit, ``contributions`` ``(N, C)``: ``logits = bias +
contributions.sum(0)`` (``a_i W h_i``: the additive reading of attention MIL, Javed et al., NeurIPS 2022).
Attention says how much a tile counts, its contribution which class it counts for:

- ``mean_mlp`` / ``max_mlp``: a per-tile MLP ``D -> H``, mean- or max-pooled, then a linear head. Tile score:
  the tile's logit of the predicted class (mean: the bag logits are exactly the mean of these) or the share of
  the ``H`` pooled dimensions the tile wins (max).
- ``attention_mil``: gated attention MIL (Ilse, Tomczak & Welling, ICML 2018): ``a_i = softmax_i(w^T (tanh(V h_i)
  * sigmoid(U h_i)))``, ``z = sum_i a_i h_i``. Tile score: ``a_i``.
- ``clam_sb``: CLAM single branch (Lu et al., Nat. Biomed. Eng. 2021): gated attention pooling plus instance-level
  clustering: per class an instance classifier learns the ``k_sample`` highest-attention tiles of a bag of that
  class as positive and the ``k_sample`` lowest as negative (with ``subtyping``, the highest-attention tiles of
  other classes' bags as negative too). Loss ``bag_weight * CE(bag) + (1 - bag_weight) * CE(instances)``.
- ``clam_mb``: CLAM multi-branch: one attention branch and one bag classifier per class (``logit_c = w_c^T sum_i
  a^c_i h_i + b_c``); class ``c``'s instance classifier learns from the tiles ranked by branch ``c``. Tile score:
  the predicted class's attention.
- ``transmil``: TransMIL (Shao et al., NeurIPS 2021): class token + two Nystrom-attention transformer layers with
  the pyramid position encoding generator (PPEG, depth-wise 7/5/3 convolutions over the tokens laid on a
  square). Tile score: the class token's attention over the tiles in the last layer.

Build one by name with :func:`build_mil_model` (``in_dim`` = the bags' feature width).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histolight.config.schema import check


class MILNet(nn.Module):
    """Base class: :meth:`forward` standardises the features with the buffers ``in_mean`` / ``in_std`` (D,) (set
    from the training bags; saved with the weights) and runs :meth:`forward_bag` on each bag of a padded batch."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, label: torch.Tensor | None = None) -> dict:
        """Bags ``x`` (B, N, D) with ``mask`` (B, N) bool (True = a real tile; None = all) and, for CLAM's
        instance loss during training, ``label`` (B,) long.

        Returns ``{"logits": (B, C), "scores": (B, N) (0 at padding), "instance_loss": scalar tensor,
        "contributions": (B, N, C) (0 at padding) or None for networks whose logits do not add up over tiles}``.
        """
        b, n, _ = x.shape
        x = (x - self.in_mean) / self.in_std
        outs = []
        for i in range(b):
            xi = x[i] if mask is None else x[i][mask[i]]
            outs.append(self.forward_bag(xi, None if label is None else label[i]))
        scores = x.new_zeros(b, n)
        for i, o in enumerate(outs):
            if mask is None:
                scores[i] = o["scores"]
            else:
                scores[i, mask[i]] = o["scores"]
        contrib = None
        if all("contributions" in o for o in outs):
            contrib = x.new_zeros(b, n, outs[0]["logits"].shape[-1])
            for i, o in enumerate(outs):
                contrib[i, slice(None) if mask is None else mask[i]] = o["contributions"]
        inst = torch.stack([o.get("instance_loss", x.new_zeros(())) for o in outs]).mean()
        logits = torch.stack([o["logits"] for o in outs])
        return {"logits": logits, "scores": scores, "instance_loss": inst, "contributions": contrib}

    def forward_bag(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict:
        """One bag ``x`` (N, D) -> ``{"logits": (C,), "scores": (N,)[, "instance_loss": scalar][, "contributions":
        (N, C)]}``."""
        raise NotImplementedError


def _contributions(head: nn.Linear, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each tile's share of ``head(weights @ h)`` without the bias: ``weights_i * W h_i``, ``(N, C)`` (detached)."""
    return (weights[:, None] * F.linear(h, head.weight)).detach()


def _mlp(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class PoolMLP(MILNet):
    """Per-tile MLP ``(N, D) -> (N, H)``, ``mean`` or ``max`` pooling ``-> (H,)``, linear head ``-> (C,)``."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25, pool: str = "mean"):
        super().__init__(in_dim)
        check(pool in ("mean", "max"), "pool", pool, "must be mean or max")
        self.pool = pool
        self.encoder = _mlp(in_dim, hidden, dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward_bag(self, x, label=None):
        h = self.encoder(x)  # (N, H)
        if self.pool == "mean":
            logits = self.head(h.mean(0))
            scores = self.head(h)[:, int(logits.argmax())]
            weights = h.new_full((h.shape[0],), 1.0 / h.shape[0])
            return {"logits": logits, "scores": scores.detach(), "contributions": _contributions(self.head, h, weights)}
        z, win = h.max(0)
        scores = torch.bincount(win, minlength=x.shape[0]).to(x.dtype) / h.shape[1]
        return {"logits": self.head(z), "scores": scores.detach()}


class GatedAttention(nn.Module):
    """Gated attention scores: ``(N, H) -> (N,)`` logits ``w^T (tanh(V h) * sigmoid(U h))`` (``(N, branches)`` with
    ``branches`` > 1: one row of ``w`` per branch)."""

    def __init__(self, hidden: int, attn_dim: int, dropout: float, branches: int = 1):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(hidden, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.v(h) * self.u(h)).squeeze(-1)


class AttentionMIL(MILNet):
    """Gated attention MIL (Ilse et al. 2018): ``(N, D) -> (N, H)``, attention ``a (N,)``, ``z = a @ h``, head."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, attn_dim: int = 128, dropout: float = 0.25):
        super().__init__(in_dim)
        self.encoder = _mlp(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout)
        self.head = nn.Linear(hidden, n_classes)

    def forward_bag(self, x, label=None):
        h = self.encoder(x)
        a = torch.softmax(self.attention(h), 0)
        return {"logits": self.head(a @ h), "scores": a.detach(), "contributions": _contributions(self.head, h, a)}


class CLAMSingleBranch(MILNet):
    """CLAM-SB: gated attention pooling + per-class instance classifiers trained on the top/bottom-attention tiles.

    ``instance_loss`` is returned only with a ``label`` during training; the module combines it with the bag loss
    as ``bag_weight * bag + (1 - bag_weight) * instance``.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 256,
        attn_dim: int = 128,
        dropout: float = 0.25,
        k_sample: int = 8,
        subtyping: bool = False,
        bag_weight: float = 0.7,
    ):
        super().__init__(in_dim)
        check(isinstance(k_sample, int) and k_sample >= 1, "k_sample", k_sample, "must be an integer >= 1")
        check(0 < bag_weight <= 1, "bag_weight", bag_weight, "must be in (0, 1]")
        self.k_sample, self.subtyping, self.bag_weight = k_sample, subtyping, float(bag_weight)
        self.encoder = _mlp(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout)
        self.head = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def _instance_loss(self, h: torch.Tensor, a: torch.Tensor, label: int) -> torch.Tensor:
        """CE of the instance classifiers on the ``k`` top (positive) and bottom (negative) attention tiles; ``a``
        (N,) ranks the tiles for every class, ``a`` (N, C) by class (multi-branch)."""
        k = min(self.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.new_zeros(())
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            ac = a if a.dim() == 1 else a[:, c]
            top, bottom = torch.topk(ac, k).indices, torch.topk(-ac, k).indices
            if c == label:
                inst = torch.cat([h[top], h[bottom]])
                target = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()
            elif self.subtyping:
                inst, target = h[top], h.new_zeros(k).long()
            else:
                continue
            losses.append(F.cross_entropy(clf(inst), target))
        return torch.stack(losses).mean()

    def forward_bag(self, x, label=None):
        h = self.encoder(x)
        raw = self.attention(h)
        a = torch.softmax(raw, 0)
        out = {"logits": self.head(a @ h), "scores": a.detach(), "contributions": _contributions(self.head, h, a)}
        if label is not None and self.training:
            out["instance_loss"] = self._instance_loss(h, raw, int(label))
        return out


class CLAMMultiBranch(CLAMSingleBranch):
    """CLAM-MB: ``C`` gated attention branches ``a^c (N,)`` over shared embeddings ``h (N, H)``, bag embeddings
    ``z_c = a^c @ h`` and one linear bag classifier per class (``logit_c = w_c . z_c + b_c``, the rows of ``head``);
    instance clustering as in CLAM-SB with each class's tiles ranked by its own branch."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, attn_dim: int = 128, dropout: float = 0.25, **kw):
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, **kw)
        self.attention = GatedAttention(hidden, attn_dim, dropout, branches=n_classes)

    def forward_bag(self, x, label=None):
        h = self.encoder(x)
        raw = self.attention(h)  # (N, C)
        a = torch.softmax(raw, 0)
        logits = (a.T @ h * self.head.weight).sum(1) + self.head.bias
        contrib = (a * F.linear(h, self.head.weight)).detach()  # a^c_i * w_c . h_i
        out = {"logits": logits, "scores": a[:, int(logits.argmax())].detach(), "contributions": contrib}
        if label is not None and self.training:
            out["instance_loss"] = self._instance_loss(h, raw, int(label))
        return out


# ------------------------------------------------------------------------------------------ TransMIL


def _pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of ``x`` (..., m, m) by Newton-Schulz iterations (Nystromformer, eq. 11)."""
    absx = x.abs()
    z = x.transpose(-1, -2) / (absx.sum(-1).amax(-1) * absx.sum(-2).amax(-1))[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation (Xiong et al. 2021) over ``landmarks`` segment
    means: ``(1, T, C) -> (1, T, C)`` in O(T); exact softmax attention when ``T <= landmarks``. A depth-wise
    convolution over the values is added as a residual (as in TransMIL's implementation)."""

    def __init__(self, dim: int, heads: int = 8, landmarks: int = 256, dropout: float = 0.1):
        super().__init__()
        check(dim % heads == 0, "hidden", dim, f"must be divisible by heads={heads}")
        self.heads, self.landmarks, self.scale = heads, landmarks, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return q * self.scale, k, v  # (B, heads, T, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        m = self.landmarks
        pad = (m - t % m) % m if t > m else 0
        xp = F.pad(x, (0, 0, pad, 0)) if pad else x
        q, k, v = self._split(xp)
        if t <= m:
            out = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        else:
            seg = xp.shape[1] // m
            ql = q.reshape(b, self.heads, m, seg, -1).mean(3)
            kl = k.reshape(b, self.heads, m, seg, -1).mean(3)
            k1 = torch.softmax(q @ kl.transpose(-1, -2), -1)  # (B, h, T, m)
            k2 = torch.softmax(ql @ kl.transpose(-1, -2), -1)  # (B, h, m, m)
            k3 = torch.softmax(ql @ k.transpose(-1, -2), -1)  # (B, h, m, T)
            out = k1 @ (_pinv(k2) @ (k3 @ v))  # (T x m) @ ((m x m) @ (m x d)): O(T m d)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, -1, c)[:, pad:]
        return self.out(out)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Exact attention of token 0 (the class token) over tokens ``1..T-1``, mean over heads: (1, T, C) -> (T-1,)."""
        q, k, _ = self._split(x)
        return torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), -1)[0, :, 0, 1:].mean(0)


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention: ``x + attn(norm(x))``."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: depth-wise 7/5/3 convolutions of the tile tokens on an ``s x s`` square, plus
    identity; the class token passes through. ``(1, 1 + s*s, C) -> (1, 1 + s*s, C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)


class TransMIL(MILNet):
    """TransMIL: ``(N, D) -> (N, H)``, tokens padded to a square ``s x s`` by repeating the first tiles, a class
    token, TransLayer -> PPEG -> TransLayer, LayerNorm, linear head on the class token."""

    def __init__(
        self, in_dim: int, n_classes: int, hidden: int = 256, heads: int = 8, landmarks: int = 256, dropout: float = 0.1
    ):
        super().__init__(in_dim)
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.layer1 = TransLayer(hidden, heads, landmarks, dropout)
        self.ppeg = PPEG(hidden)
        self.layer2 = TransLayer(hidden, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward_bag(self, x, label=None):
        n = x.shape[0]
        h = self.encoder(x)[None]  # (1, N, H)
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:
            h = torch.cat([h, h[:, torch.arange(extra, device=x.device) % n]], 1)
        h = torch.cat([self.cls_token, h], 1)
        h = self.ppeg(self.layer1(h), side)
        scores = self.layer2.attn.cls_attention(self.layer2.norm(h))[:n]
        h = self.norm(self.layer2(h))
        return {"logits": self.head(h[0, 0]), "scores": scores.detach()}


#: model name -> (class, fixed keyword arguments)
MODELS: dict[str, tuple[type[MILNet], dict]] = {
    "mean_mlp": (PoolMLP, {"pool": "mean"}),
    "max_mlp": (PoolMLP, {"pool": "max"}),
    "attention_mil": (AttentionMIL, {}),
    "clam_sb": (CLAMSingleBranch, {}),
    "clam_mb": (CLAMMultiBranch, {}),
    "transmil": (TransMIL, {}),
}


def build_mil_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILNet:
    """The network ``name`` (one of :data:`MODELS`) for bags of width ``in_dim`` and ``n_classes`` classes;
    ``kwargs`` are its options (``hidden``, ``dropout``, ``attn_dim``, ``k_sample``, ``heads``, ...)."""
    check(name in MODELS, "model.name", name, f"must be one of {sorted(MODELS)}")
    check(isinstance(in_dim, int) and in_dim > 0, "in_dim", in_dim, "must be the bags' feature width (> 0)")
    cls, fixed = MODELS[name]
    try:
        return cls(in_dim, n_classes, **fixed, **kwargs)
    except TypeError as e:
        raise ValueError(f"model.model_kwargs={kwargs!r} is invalid for {name}: {e}") from None


__all__ = [
    "MILNet",
    "PoolMLP",
    "AttentionMIL",
    "CLAMSingleBranch",
    "CLAMMultiBranch",
    "NystromAttention",
    "TransMIL",
    "MODELS",
    "build_mil_model",
]
