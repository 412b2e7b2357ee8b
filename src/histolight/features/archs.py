"""Network architectures of the registered extractors, built offline from timm / torchvision / transformers.

Each builder returns an :class:`Arch`: ``net`` (``(B, 3, H, W)`` normalized float -> ``(B, D)``), ``target`` (the
module official checkpoints load into, with the publisher's names after :class:`~histolight.features.weights.KeyMap`)
and the key map. Nothing is downloaded: every model starts from random init (``pretrained=False``); weights come only
from a local file through :func:`histolight.features.weights.load_weights`. Builders run under a ``torch.device``
context, so a ``meta`` build allocates no memory (ViT-L/H/g in tests).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from histolight.errors import ConfigError
from histolight.features.weights import IDENTITY, KeyMap, Mapped


@dataclass
class Arch:
    net: nn.Module
    target: nn.Module
    keymap: KeyMap = IDENTITY
    official_name: Callable[[str], str] | None = None
    container: str | None = None


# ---------------------------------------------------------------------------------------------- heads


class TimmFeatures(nn.Module):
    """A timm model's pooled pre-logits features (its own global pool: class token or average)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class ClassAndMeanPatch(nn.Module):
    """Virchow's embedding: the class token concatenated with the mean of the patch tokens (``skip`` = the class and
    register tokens before the patches): ``(B, 2 C)``."""

    def __init__(self, model: nn.Module, skip: int):
        super().__init__()
        self.model, self.skip = model, int(skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.model.forward_features(x)
        return torch.cat([t[:, 0], t[:, self.skip :].mean(1)], dim=-1)


class Plain(nn.Module):
    """``model(x)`` (torchvision networks whose classifier was replaced by an identity)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model(x), 1)


class CLIPImage(nn.Module):
    """The image tower of a Hugging Face CLIP model: projected image embeddings ``(B, projection_dim)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds


class LayerFeatures(nn.Module):
    """Activations of named submodules of ``model``, pooled and concatenated: ``(B, sum of channels)``.

    4-D outputs ``(B, C, H, W)`` are pooled over ``H, W``, 3-D token outputs ``(B, N, C)`` over the tokens, with
    ``pooling`` (``avg`` or ``max``); 2-D outputs are used as they are.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], pooling: str = "avg"):
        super().__init__()
        if pooling not in ("avg", "max"):
            raise ConfigError(f"pooling={pooling!r} is invalid: use 'avg' or 'max'")
        mods = dict(model.named_modules())
        unknown = [n for n in layers if n not in mods or n == ""]
        if unknown:
            names = [n for n in mods if n][:40]
            raise ConfigError(f"layers={unknown} are not modules of the network; some of its module names: {names}")
        self.model, self.layers, self.pooling = model, list(layers), pooling
        self._acts: dict[str, torch.Tensor] = {}
        for n in self.layers:
            mods[n].register_forward_hook(partial(self._keep, n))

    def _keep(self, name: str, _module, _inp, out) -> None:
        self._acts[name] = out[0] if isinstance(out, (tuple, list)) else out

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 4:
            return t.amax((2, 3)) if self.pooling == "max" else t.mean((2, 3))
        if t.ndim == 3:
            return t.amax(1) if self.pooling == "max" else t.mean(1)
        return t.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._acts = {}
        self.model(x)
        out = torch.cat([self._pool(self._acts[n]) for n in self.layers], dim=1)
        self._acts = {}
        return out


# ---------------------------------------------------------------------------------------------- key maps

VIT_HF_RULES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"blocks.\1.attn.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"blocks.\1.attn.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"blocks.\1.attn.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layernorm\.", "norm."),
)
QKV = r"^(blocks\.\d+\.attn\.)(q|k|v)(\.(?:weight|bias))$"


def hf_vit_official(dinov2: bool) -> Callable[[str], str]:
    """timm ViT name -> the Hugging Face ``ViTModel`` / ``Dinov2Model`` name (to name missing keys)."""
    n1, n2 = ("norm1", "norm2") if dinov2 else ("layernorm_before", "layernorm_after")
    back = (
        (r"^cls_token$", "embeddings.cls_token"),
        (r"^pos_embed$", "embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        (r"^blocks\.(\d+)\.norm1\.", rf"encoder.layer.\1.{n1}."),
        (r"^blocks\.(\d+)\.norm2\.", rf"encoder.layer.\1.{n2}."),
        (r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$", r"encoder.layer.\1.attention.attention.{query,key,value}.\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.mlp.fc1." if dinov2 else r"encoder.layer.\1.intermediate.dense."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.mlp.fc2." if dinov2 else r"encoder.layer.\1.output.dense."),
        (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
        (r"^norm\.", "layernorm."),
    )

    def name(k: str) -> str:
        for pat, rep in back:
            k2 = re.sub(pat, rep, k)
            if k2 != k:
                return k2
        return k

    return name


HF_VIT = KeyMap(
    rules=VIT_HF_RULES,
    ignore=((r"^(vit\.)?pooler\.", "the Hugging Face pooler (not part of the class-token features)"),),
    strip=("module.", "vit."),
    fuse_qkv=QKV,
)
HF_DINOV2 = KeyMap(
    rules=VIT_HF_RULES,
    ignore=(
        (r"^(dinov2\.)?embeddings\.mask_token$", "the masked-image-modeling token (pretraining only)"),
        (r"^(dinov2\.)?pooler\.", "the Hugging Face pooler"),
    ),
    strip=("module.", "dinov2."),
    fuse_qkv=QKV,
)


def _swin_renumber(m: Mapped) -> None:
    """Original Swin checkpoints downsample at the end of a stage, timm at the start of the next one."""
    if "layers.0.downsample.reduction.weight" not in m.tensors:
        return
    for k in sorted(m.tensors, reverse=True):  # from the last stage down, so no key is overwritten
        new = re.sub(r"^layers\.(\d+)\.downsample", lambda g: f"layers.{int(g.group(1)) + 1}.downsample", k)
        if new != k:
            m.put(new, m.tensors.pop(k), m.origin.pop(k))


CTRANSPATH = KeyMap(
    ignore=((r"(relative_position_index|attn_mask)$", "a buffer recomputed from the window geometry"),),
    post=_swin_renumber,
)


def _ctranspath_official(k: str) -> str:
    return re.sub(r"^layers\.(\d+)\.downsample", lambda g: f"layers.{int(g.group(1)) - 1}.downsample", k)


CLIP_VISION = KeyMap(
    ignore=(
        (r"^text_model\.|^text_projection\.|^logit_scale$", "the CLIP text tower (not part of the image features)"),
        (r"position_ids$", "a position-index buffer"),
    ),
)


def _dinov2_registers(m: Mapped) -> None:
    """DINOv2 with registers -> timm (``no_embed_class``): the class token absorbs its position embedding."""
    if "register_tokens" not in m.tensors:
        return
    m.put("reg_token", m.tensors.pop("register_tokens"), m.origin.pop("register_tokens"))
    if "pos_embed" in m.tensors and "cls_token" in m.tensors:
        pos = m.tensors["pos_embed"]
        m.tensors["cls_token"] = m.tensors["cls_token"] + pos[:, :1]
        m.tensors["pos_embed"] = pos[:, 1:]


DINOV2_TEACHER = KeyMap(
    ignore=(
        (r"^(dino_head|ibot_head)\.", "a self-supervised training head"),
        (r"^(backbone\.)?mask_token$", "the masked-image-modeling token (pretraining only)"),
    ),
    strip=("module.", "backbone."),
    rules=(
        (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # block chunks
        (r"\.mlp\.w12\.", ".mlp.fc1."),
        (r"\.mlp\.w3\.", ".mlp.fc2."),
    ),
    post=_dinov2_registers,
)

SIMCLR = KeyMap(
    ignore=(
        (r"(^|\.)(projection_head|projector|projection|head|mlp_head)\.", "the SimCLR projection head (training only)"),
        (r"(^|\.)fc\.", "the classification layer of the backbone"),
        (r"^(queue|queue_ptr)$", "training state"),
    ),
    strip=("module.", "model.", "backbone.", "encoder.", "convnet.", "resnet."),
)


def head_keymap(head: str | Sequence[str] | None, base: KeyMap = IDENTITY) -> KeyMap:
    """``base`` plus: the classifier ``head`` module(s) of an ImageNet checkpoint are not used."""
    heads = [head] if isinstance(head, str) else list(head or [])
    extra = tuple((rf"^{re.escape(h)}\.", "the ImageNet classifier (features are taken before it)") for h in heads if h)
    return KeyMap(rules=base.rules, ignore=base.ignore + extra, strip=base.strip, fuse_qkv=base.fuse_qkv, post=base.post)


# ---------------------------------------------------------------------------------------------- builders


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def _ln(eps: float):
    return partial(nn.LayerNorm, eps=float(eps))


def build_timm_vit(name: str, virchow_skip: int | None = None, **kwargs: Any) -> Arch:
    m = timm_model(name, **kwargs)
    net = ClassAndMeanPatch(m, virchow_skip) if virchow_skip is not None else TimmFeatures(m)
    return Arch(net, m)


def build_uni() -> Arch:
    return build_timm_vit(
        "vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True
    )


def build_uni2() -> Arch:
    import timm

    return build_timm_vit(
        "vit_giant_patch14_224",
        img_size=224,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        num_classes=0,
        no_embed_class=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )


def build_virchow(registers: int) -> Arch:
    import timm

    kw: dict[str, Any] = {"reg_tokens": registers} if registers else {}
    return build_timm_vit(
        "vit_huge_patch14_224",
        virchow_skip=1 + registers,
        img_size=224,
        init_values=1e-5,
        num_classes=0,
        mlp_ratio=5.3375,
        global_pool="",
        dynamic_img_size=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=nn.SiLU,
        **kw,
    )


def build_gigapath() -> Arch:
    return build_timm_vit(
        "vit_giant_patch14_dinov2",
        img_size=224,
        in_chans=3,
        patch_size=16,
        embed_dim=1536,
        depth=40,
        num_heads=24,
        init_values=1e-5,
        mlp_ratio=5.33334,
        num_classes=0,
    )


def build_h_optimus_0() -> Arch:
    return build_timm_vit("vit_giant_patch14_reg4_dinov2", img_size=224, global_pool="token", init_values=1e-5, num_classes=0)


def build_phikon(hf_config: dict | None = None) -> Arch:
    c = hf_config or {}
    m = timm_model(
        "vit_base_patch16_224",
        img_size=int(c.get("image_size", 224)),
        num_classes=0,
        norm_layer=_ln(c.get("layer_norm_eps", 1e-12)),
        dynamic_img_size=True,
    )
    return Arch(TimmFeatures(m), m, HF_VIT, hf_vit_official(False))


def build_phikon2(hf_config: dict | None = None) -> Arch:
    c = hf_config or {}
    m = timm_model(
        "vit_large_patch16_224",
        img_size=int(c.get("image_size", 224)),
        patch_size=int(c.get("patch_size", 16)),
        init_values=float(c.get("layerscale_value", 1e-5)),
        num_classes=0,
        norm_layer=_ln(c.get("layer_norm_eps", 1e-6)),
        dynamic_img_size=True,
    )
    return Arch(TimmFeatures(m), m, HF_DINOV2, hf_vit_official(True))


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding (two stride-2 3x3 conv + BN + ReLU, then a 1x1 conv to the
    embedding width), producing timm Swin's ``NHWC`` token grid."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, output_fmt="NHWC", **_):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size=4 and an embedding width divisible by 8")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin, cout = cout, cout * 2
        stem.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_ctranspath() -> Arch:
    m = timm_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, num_classes=0)
    return Arch(TimmFeatures(m), m, CTRANSPATH, _ctranspath_official)


def _headless_torchvision(arch: str) -> tuple[nn.Module, str | None]:
    """A torchvision network with its last ``nn.Linear`` (the classifier) replaced by an identity."""
    import torchvision

    try:
        m = torchvision.models.get_model(arch, weights=None)
    except ValueError as e:
        raise ConfigError(f"unknown torchvision architecture {arch!r} ({e})") from None
    head = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    if not head:
        return m, None
    parent, _, leaf = head[-1].rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, leaf, nn.Identity())
    return m, head[-1]


def build_retccl() -> Arch:
    m, _ = _headless_torchvision("resnet50")
    return Arch(Plain(m), m)


def build_torchvision(arch: str) -> Arch:
    m, head = _headless_torchvision(arch)
    return Arch(Plain(m), m, head_keymap(head))


def build_timm_imagenet(arch: str) -> Arch:
    m = timm_model(arch, num_classes=0)
    return Arch(TimmFeatures(m), m, head_keymap(m.pretrained_cfg.get("classifier")))


def build_plip(hf_config: dict | None = None) -> Arch:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    c = dict(hf_config or {})
    vision = dict(c.get("vision_config") or {})
    defaults = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    keys = set(defaults) | {"projection_dim"}
    cfg = CLIPVisionConfig(
        **{**defaults, **{k: v for k, v in vision.items() if k in keys}, "projection_dim": int(c.get("projection_dim", 512))}
    )
    m = CLIPVisionModelWithProjection(cfg)
    return Arch(CLIPImage(m), m, CLIP_VISION)


def build_simclr(arch: str = "resnet50") -> Arch:
    m, _ = _headless_torchvision(arch)
    return Arch(Plain(m), m, SIMCLR, container=None)


DINOV2_ARCHS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_giant2": (1536, 40, 24)}


def dinov2_settings(cfg: str | dict | None) -> dict:
    """The architecture of a DINOv2 training config (its YAML file or dict; None: DINOv2's defaults)."""
    from omegaconf import OmegaConf

    if cfg is None:
        doc: dict = {}
    elif isinstance(cfg, dict):
        doc = cfg
    else:
        try:
            doc = OmegaConf.to_container(OmegaConf.load(str(cfg)), resolve=True)  # type: ignore[assignment]
        except (OSError, ValueError) as e:
            raise ConfigError(f"cfg={cfg!r}: cannot read the DINOv2 config YAML ({e})") from None
    st, crops = dict(doc.get("student") or {}), dict(doc.get("crops") or {})
    s = {
        "arch": st.get("arch", "vit_large"),
        "patch_size": int(st.get("patch_size", 16)),
        "layerscale": float(st.get("layerscale", 1e-5)),
        "ffn_layer": st.get("ffn_layer", "mlp"),
        "num_register_tokens": int(st.get("num_register_tokens", 0)),
        "qkv_bias": bool(st.get("qkv_bias", True)),
        "img_size": int(crops.get("global_crops_size", 224)),
    }
    if s["arch"] not in DINOV2_ARCHS:
        raise ConfigError(f"DINOv2 student.arch={s['arch']!r} is not supported: use one of {sorted(DINOV2_ARCHS)}")
    if s["ffn_layer"] not in ("mlp", "swiglu", "swiglufused"):
        raise ConfigError(f"DINOv2 student.ffn_layer={s['ffn_layer']!r} is not supported: use mlp, swiglu or swiglufused")
    for k in ("proj_bias", "ffn_bias"):
        if st.get(k, True) is False:
            raise ConfigError(f"DINOv2 student.{k}=false is not supported (timm's ViT always has these biases)")
    return s


def build_dinov2(settings: dict) -> Arch:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = DINOV2_ARCHS[settings["arch"]]
    kw: dict[str, Any] = {}
    if settings["ffn_layer"] != "mlp":
        hidden = (int(dim * 4 * 2 / 3) + 7) // 8 * 8
        kw.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=(2 * hidden + 0.5) / dim)
    if settings["num_register_tokens"]:
        kw.update(reg_tokens=settings["num_register_tokens"], no_embed_class=True)
    m = VisionTransformer(
        img_size=settings["img_size"],
        patch_size=settings["patch_size"],
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        init_values=settings["layerscale"],
        qkv_bias=settings["qkv_bias"],
        num_classes=0,
        global_pool="token",
        **kw,
    )
    return Arch(TimmFeatures(m), m, DINOV2_TEACHER, container="teacher")


__all__ = ["Arch", "TimmFeatures", "ClassAndMeanPatch", "LayerFeatures", "ConvStem", "dinov2_settings"]
