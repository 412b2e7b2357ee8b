"""Every registry entry: builds offline, has the documented output size, and loads a state dict in its publisher's
official key layout strictly through ``weights=``; a checkpoint with a missing key is refused naming the key.

ViT-L/H/g entries are never materialized here: they are built on the ``meta`` device and loaded with meta tensors
(shapes only, no memory). The official layouts are rebuilt independently of the loader: the publisher's names
(Hugging Face ViT / Dinov2 / CLIP, original Swin, DINOv2 teacher, SimCLR) are produced from the network's own by
the inverse renaming, so the loader's mapping is what is tested.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from histolight.errors import ConfigError
from histolight.features import build_feature_extractor, list_extractors
from histolight.features.registry import LARGE, REGISTRY
from histolight.features.weights import WeightsMismatch

DIMS = {
    "uni": 1024,
    "uni2": 1536,
    "virchow": 2560,
    "virchow2": 2560,
    "ctranspath": 768,
    "retccl": 2048,
    "phikon": 768,
    "phikon2": 1024,
    "plip": 512,
    "gigapath": 1536,
    "h_optimus_0": 1536,
    "simclr": 2048,
    "dinov2": 384,
}
# publisher facts about the big checkpoints (key: shape), checked against the meta network
FACTS = {
    "uni": {"pos_embed": (1, 197, 1024), "blocks.23.ls2.gamma": (1024,), "blocks.0.mlp.fc1.weight": (4096, 1024)},
    "uni2": {"pos_embed": (1, 256, 1536), "reg_token": (1, 8, 1536), "blocks.23.mlp.fc1.weight": (8192, 1536)},
    "virchow": {"pos_embed": (1, 257, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280), "blocks.0.mlp.fc2.weight": (1280, 3416)},
    "virchow2": {"pos_embed": (1, 261, 1280), "reg_token": (1, 4, 1280)},
    "gigapath": {
        "pos_embed": (1, 197, 1536),
        "patch_embed.proj.weight": (1536, 3, 16, 16),
        "blocks.39.mlp.fc1.weight": (8192, 1536),
    },
    "h_optimus_0": {"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "patch_embed.proj.weight": (1536, 3, 14, 14)},
    "phikon2": {"embeddings.position_embeddings": (1, 197, 1024), "encoder.layer.23.layer_scale2.lambda1": (1024,)},
}
#: entries checked in the fast lane (each entry is checked in the full suite)
FAST = ("retccl", "virchow2", "phikon")
DINO_CFG = "student:\n  arch: vit_small\n  patch_size: 14\n  block_chunks: 4\ncrops:\n  global_crops_size: 56\n"


def _opts(name: str, tmp_path) -> dict:
    if name == "dinov2":
        p = tmp_path / "dinov2.yaml"
        p.write_text(DINO_CFG)
        return {"cfg": str(p)}
    return {}


# ---------------------------------------------------------------------------------------------- official layouts


def _split_qkv(k: str, v: torch.Tensor, fmt: str) -> dict:
    m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(\w+)$", k)
    q, kk, vv = v.chunk(3)
    return {fmt.format(m.group(1), n, m.group(2)): t for n, t in zip(("query", "key", "value"), (q, kk, vv))}


def _hf_vit(sd: dict, dinov2: bool) -> dict:
    from histolight.features.archs import hf_vit_official

    name = hf_vit_official(dinov2)
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            out.update(_split_qkv(k, v, "encoder.layer.{}.attention.attention.{}.{}"))
        else:
            out[name(k)] = v
    return out


def official(name: str, sd: dict) -> dict:
    """The publisher's layout of network state dict ``sd`` (tensors shared or new, same device)."""
    like = next(iter(sd.values()))
    new = lambda *s: torch.zeros(*s, device=like.device)  # noqa: E731
    if name == "ctranspath":  # original Swin: downsample at the end of a stage, persistent index/mask buffers
        out = {
            re.sub(r"^layers\.(\d+)\.downsample", lambda g: f"layers.{int(g.group(1)) - 1}.downsample", k): v
            for k, v in sd.items()
        }
        for k in [k for k in sd if k.endswith("relative_position_bias_table")]:
            out[k.replace("relative_position_bias_table", "relative_position_index")] = new(49, 49).long()
        out["layers.0.blocks.1.attn_mask"] = new(64, 49, 49)
        return out
    if name == "phikon":
        return {**_hf_vit(sd, False), "pooler.dense.weight": new(768, 768), "pooler.dense.bias": new(768)}
    if name == "phikon2":
        return {**_hf_vit(sd, True), "embeddings.mask_token": new(1, 1024)}
    if name == "plip":  # the whole CLIPModel: text tower and logit scale too
        return {
            **sd,
            "text_model.embeddings.token_embedding.weight": new(49408, 512),
            "text_projection.weight": new(512, 512),
            "logit_scale": new(()),
        }
    if name == "dinov2":  # teacher checkpoint: backbone., 4 block chunks, heads, mask token
        out = {
            "backbone." + re.sub(r"^blocks\.(\d+)\.", lambda g: f"blocks.{int(g.group(1)) // 3}.{g.group(1)}.", k): v
            for k, v in sd.items()
        }
        return {**out, "backbone.mask_token": new(1, 384), "dino_head.last_layer.weight": new(10, 256)}
    if name == "simclr":
        return {**{f"backbone.{k}": v for k, v in sd.items()}, "projection_head.0.weight": new(128, 2048)}
    return dict(sd)


def _target_sd(ext) -> dict:
    net = ext.net
    return (net.model if hasattr(net, "model") else net).state_dict()


def _lanes(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _lanes(sorted(REGISTRY)))
def test_entry_builds_on_meta_and_loads_official_layout(name, tmp_path):
    """Every entry on the meta device: output size, official key layout loaded strictly, publisher facts."""
    ext = build_feature_extractor(name, device="meta", **_opts(name, tmp_path))
    assert ext.num_features == DIMS[name] and ext.random_init
    assert ext.license and (ext.citation or name in ("simclr",)) is not None
    sd = _target_sd(ext)
    for k, shape in FACTS.get(name, {}).items():
        off = official(name, sd)
        assert tuple(off[k].shape) == shape, (k, tuple(off[k].shape))
    loaded = build_feature_extractor(name, weights=official(name, sd), device="meta", **_opts(name, tmp_path))
    assert not loaded.random_init and loaded.num_features == DIMS[name]
    out = loaded(torch.zeros(2, 3, 64, 64, dtype=torch.uint8, device="meta"))
    assert tuple(out.shape) == (2, DIMS[name])


@pytest.mark.parametrize("name", _lanes(["uni", "ctranspath", "phikon"]))
def test_missing_key_is_refused_by_name(name, tmp_path):
    ext = build_feature_extractor(name, device="meta")
    off = official(name, _target_sd(ext))
    drop = {
        "uni": "blocks.3.ls1.gamma",
        "ctranspath": "layers.1.downsample.reduction.weight",
        "phikon": "encoder.layer.2.attention.attention.key.weight",
    }[name]
    del off[drop]
    with pytest.raises(WeightsMismatch, match=f"1 missing: {re.escape(drop)}"):
        build_feature_extractor(name, weights=off, device="meta")
    off["not_in_the_model"] = torch.zeros(3, device="meta")
    with pytest.raises(WeightsMismatch, match="unexpected: not_in_the_model"):
        build_feature_extractor(name, weights=off, device="meta")
    # strict=false loads the rest and says exactly what was dropped
    part = build_feature_extractor(name, weights=off, device="meta", strict=False)
    assert not part.random_init


def test_shape_mismatch_and_unknown_names():
    ext = build_feature_extractor("virchow2", device="meta")
    off = official("virchow2", _target_sd(ext))
    off["pos_embed"] = torch.zeros(1, 257, 1280, device="meta")  # a Virchow (v1) checkpoint
    with pytest.raises(WeightsMismatch, match=r"pos_embed \(1, 257, 1280\)"):
        build_feature_extractor("virchow2", weights=off, device="meta")
    with pytest.raises(ConfigError, match="unknown extractor 'nope'"):
        build_feature_extractor("nope")
    with pytest.raises(ConfigError, match="unknown option"):
        build_feature_extractor("uni", device="meta", bogus=1)
    assert "uni" in list_extractors() and "<arch>_imagenet" in list_extractors() and set(LARGE) >= {"uni", "gigapath"}


def test_preprocessing_defaults_and_transform():
    giga = build_feature_extractor("gigapath", device="meta")
    steps = [type(s).__name__ for s in giga.transform.transforms]
    assert steps == ["ConvertImageDtype", "Resize", "CenterCrop", "Normalize"]
    assert "size=256, interpolation=bicubic" in repr(giga.transform) and "CenterCrop(size=(224, 224))" in repr(giga.transform)
    vir = build_feature_extractor("virchow", device="meta", antialias=True)
    assert "bicubic" in repr(vir.transform) and "antialias=True" in repr(vir.transform)
    plip = build_feature_extractor("plip", device="meta")
    assert plip.preprocessing.norm_mean[0] == pytest.approx(0.48145466)
    c = build_feature_extractor("ctranspath", device="meta", resize=256, interpolation="bicubic", center_crop=224)
    assert c.preprocessing.resize_px == 256 and c.preprocessing.crop_px == 224
    with pytest.raises(ConfigError, match="interpolation"):
        build_feature_extractor("ctranspath", device="meta", interpolation="lanczos9")


def test_mixed_precision_settings():
    import contextlib

    e = build_feature_extractor("retccl", device="meta")
    assert isinstance(e.autocast(), contextlib.nullcontext)  # meta/CPU: fp32 unless asked
    e.device = torch.device("cpu")
    assert isinstance(e.autocast(), contextlib.nullcontext)
    e.mixed_precision = True
    assert e.autocast().fast_dtype == torch.bfloat16
    e.device, e.mixed_precision = torch.device("cuda"), False
    assert isinstance(e.autocast(), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------- real, small models

SMALL = ["retccl", "ctranspath", "phikon", "plip", "simclr", "dinov2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_small_entry_saved_official_checkpoint_loads_and_runs(name, tmp_path):
    """CPU: a random state dict in the official layout, saved as the publisher ships it, loads strictly; the
    loaded tensors are the file's; a forward pass on tiles gives (B, D)."""
    from safetensors.torch import save_file

    ext = build_feature_extractor(name, device="cpu", seed=1, **_opts(name, tmp_path))
    sd = {
        k: (torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) * 0.02) if v.is_floating_point() else v
        for k, v in _target_sd(ext).items()
    }
    off = official(name, sd)
    if name == "dinov2":
        path = tmp_path / "teacher_checkpoint.pth"
        torch.save({"teacher": off}, path)
    elif name in ("phikon", "plip"):  # a Hugging Face model folder
        path = tmp_path / "hf"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in off.items()}, str(path / "model.safetensors"))
    else:
        path = tmp_path / "weights.pth"
        torch.save(off, path)
    loaded = build_feature_extractor(name, weights=path, device="cpu", **_opts(name, tmp_path))
    own = _target_sd(loaded)
    k = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim > 1)
    assert torch.equal(own[k], sd[k])
    px = loaded.preprocessing.output_px(96) or 96
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 3, px, px), dtype=np.uint8))
    out = loaded(tiles)
    assert out.shape == (2, DIMS[name]) and out.dtype == torch.float32 and torch.isfinite(out).all()
