"""The extractor registry: :func:`list_extractors` and :func:`build_feature_extractor` (Slideflow's names).

Every entry is built offline from an architecture definition (timm, torchvision, transformers) with random weights,
then loads **local** official weights through ``weights=`` strictly (:mod:`histolight.features.weights`). Without
weights an extractor still builds, with one WARNING that it is random, and bags record ``random_init: true``.

===============  ==========================================  =====  =====  =======================================
name             architecture                                D      input  official weights layout
===============  ==========================================  =====  =====  =======================================
uni              ViT-L/16 (timm)                             1024   224    timm (MahmoodLab/UNI pytorch_model.bin)
uni2             ViT-H/14, SwiGLU, 8 registers (timm)        1536   224    timm (MahmoodLab/UNI2-h)
virchow          ViT-H/14, SwiGLU; class + mean patch token  2560   224    timm (paige-ai/Virchow)
virchow2         as virchow, 4 registers                     2560   224    timm (paige-ai/Virchow2)
ctranspath       Swin-T/4 with CTransPath's conv stem        768    224    original Swin (TransPath ctranspath.pth)
retccl           ResNet-50 (torchvision)                     2048   256    torchvision, no fc (RetCCL best_ckpt.pth)
phikon           ViT-B/16 (timm)                             768    224    Hugging Face ViTModel (owkin/phikon)
phikon2          ViT-L/16, layer scale (timm)                1024   224    Hugging Face Dinov2Model (owkin/phikon-v2)
plip             CLIP ViT-B/32 image tower (transformers)    512    224    Hugging Face CLIPModel (vinid/plip)
gigapath         ViT-g, patch 16, SwiGLU (timm)              1536   224    timm (prov-gigapath tile encoder)
h_optimus_0      ViT-g/14, SwiGLU, 4 registers (timm)        1536   224    timm (bioptimus/H-optimus-0)
<arch>_imagenet  any torchvision / timm architecture         (arch) tile   torchvision / timm ImageNet files
simclr           ResNet backbone of a SimCLR checkpoint      (arch) tile   backbone + projection head (ckpt=)
dinov2           ViT from a DINOv2 config (cfg=)             (arch) cfg    DINOv2 teacher_checkpoint.pth
<model folder>   a trained histolight tile classifier        (arch) own    its model folder
===============  ==========================================  =====  =====  =======================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from histolight.errors import ConfigError
from histolight.features import archs
from histolight.features.extractor import ExtractorInfo, FeatureExtractor
from histolight.features.preprocess import CLIP_MEAN, CLIP_STD, Preprocessing, split_preprocess_options
from histolight.features.weights import load_weights, read_weights

log = logging.getLogger(__name__)

_C = {
    "uni": """@article{chen2024uni,
  title={Towards a General-Purpose Foundation Model for Computational Pathology},
  author={Chen, Richard J. and Ding, Tong and Lu, Ming Y. and Williamson, Drew F. K. and Jaume, Guillaume and others and Mahmood, Faisal},
  journal={Nature Medicine}, volume={30}, pages={850--862}, year={2024}
}""",
    "virchow": """@article{vorontsov2024virchow,
  title={A foundation model for clinical-grade computational pathology and rare cancers detection},
  author={Vorontsov, Eugene and Bozkurt, Alican and Casson, Adam and others},
  journal={Nature Medicine}, year={2024}
}""",
    "virchow2": """@article{zimmermann2024virchow2,
  title={Virchow2: Scaling Self-Supervised Mixed Magnification Models in Pathology},
  author={Zimmermann, Eric and Vorontsov, Eugene and Viret, Julian and others},
  journal={arXiv preprint arXiv:2408.00738}, year={2024}
}""",
    "ctranspath": """@article{wang2022,
  title={Transformer-based Unsupervised Contrastive Learning for Histopathological Image Classification},
  author={Wang, Xiyue and Yang, Sen and Zhang, Jun and Wang, Minghui and Zhang, Jing and Yang, Wei and Huang, Junzhou and Han, Xiao},
  journal={Medical Image Analysis}, year={2022}, publisher={Elsevier}
}""",
    "retccl": """@article{wang2023retccl,
  title={RetCCL: Clustering-guided contrastive learning for whole-slide image retrieval},
  author={Wang, Xiyue and Du, Yuexi and Yang, Sen and Zhang, Jun and Wang, Minghui and Zhang, Jing and Yang, Wei and Huang, Junzhou and Han, Xiao},
  journal={Medical Image Analysis}, volume={83}, pages={102645}, year={2023}
}""",
    "phikon": """@article{filiot2023scaling,
  title={Scaling Self-Supervised Learning for Histopathology with Masked Image Modeling},
  author={Filiot, Alexandre and Ghermi, Ridouane and Olivier, Antoine and Jacob, Paul and Fidon, Lucas and others},
  journal={medRxiv}, year={2023}
}""",
    "phikon2": """@article{filiot2024phikonv2,
  title={Phikon-v2, A large and public feature extractor for biomarker prediction},
  author={Filiot, Alexandre and Jacob, Paul and Mac Kain, Alice and Saillard, Charlie},
  journal={arXiv preprint arXiv:2409.09173}, year={2024}
}""",
    "plip": """@article{huang2023visual,
  title={A visual--language foundation model for pathology image analysis using medical Twitter},
  author={Huang, Zhi and Bianchi, Federico and Yuksekgonul, Mert and Montine, Thomas J and Zou, James},
  journal={Nature Medicine}, year={2023}
}""",
    "gigapath": """@article{xu2024gigapath,
  title={A whole-slide foundation model for digital pathology from real-world data},
  author={Xu, Hanwen and Usuyama, Naoto and Bagga, Jaspreet and Zhang, Sheng and Rao, Rajesh and others and Poon, Hoifung},
  journal={Nature}, year={2024}
}""",
    "h_optimus_0": """@software{hoptimus0,
  title={H-optimus-0},
  author={Saillard, Charlie and Jenatton, Rodolphe and Llinares-L{\\'o}pez, Felipe and others},
  url={https://github.com/bioptimus/releases/tree/main/models/h-optimus/v0}, year={2024}
}""",
    "simclr": """@inproceedings{chen2020simclr,
  title={A Simple Framework for Contrastive Learning of Visual Representations},
  author={Chen, Ting and Kornblith, Simon and Norouzi, Mohammad and Hinton, Geoffrey},
  booktitle={International Conference on Machine Learning}, year={2020}
}""",
    "dinov2": """@article{oquab2023dinov2,
  title={DINOv2: Learning Robust Visual Features without Supervision},
  author={Oquab, Maxime and Darcet, Timoth{\\'e}e and Moutakanni, Th{\\'e}o and others},
  journal={arXiv preprint arXiv:2304.07193}, year={2023}
}""",
}
NC_ND = "CC-BY-NC-ND 4.0 (non-commercial research use only; see {} on Hugging Face)"
OWN = "the license of your own model (its code and training data)"


@dataclass(frozen=True)
class Entry:
    """One registry entry: its :class:`ExtractorInfo`, default :class:`Preprocessing` and builder."""

    info: ExtractorInfo
    preprocessing: Preprocessing
    build: Callable[..., archs.Arch]
    takes_hf_config: bool = False
    layers_ok: bool = False
    options: dict = field(default_factory=dict)


def _info(name, arch, d, px, lic, source, layout, large=False, options=()) -> ExtractorInfo:
    return ExtractorInfo(
        name, arch, d, px, lic, _C.get(name, _C.get(name.rstrip("2"), "")), source, layout, large, tuple(options)
    )


def _pre(px: int, resize: Any = True, crop: Any = False, interp: str = "bilinear", mean=None, std=None) -> Preprocessing:
    kw = {} if mean is None else {"norm_mean": mean, "norm_std": std}
    return Preprocessing(input_px=px, resize=resize, center_crop=crop, interpolation=interp, **kw)


HOPT_MEAN, HOPT_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)

REGISTRY: dict[str, Entry] = {
    "uni": Entry(
        _info(
            "uni", "ViT-L/16 (timm vit_large_patch16_224)", 1024, 224, NC_ND.format("MahmoodLab/UNI"), "Mahmood Lab", "timm", True
        ),
        _pre(224, 224, 224),
        archs.build_uni,
    ),
    "uni2": Entry(
        _info(
            "uni2",
            "ViT-H/14, SwiGLU, 8 registers (timm)",
            1536,
            224,
            NC_ND.format("MahmoodLab/UNI2-h"),
            "Mahmood Lab",
            "timm",
            True,
        ),
        _pre(224, 224, 224),
        archs.build_uni2,
    ),
    "virchow": Entry(
        _info(
            "virchow",
            "ViT-H/14, SwiGLU; class + mean patch token (timm)",
            2560,
            224,
            "Apache-2.0 (paige-ai/Virchow)",
            "Paige",
            "timm",
            True,
        ),
        _pre(224, 224, interp="bicubic"),
        lambda: archs.build_virchow(0),
    ),
    "virchow2": Entry(
        _info(
            "virchow2",
            "ViT-H/14, SwiGLU, 4 registers; class + mean patch token (timm)",
            2560,
            224,
            NC_ND.format("paige-ai/Virchow2"),
            "Paige",
            "timm",
            True,
        ),
        _pre(224, 224, interp="bicubic"),
        lambda: archs.build_virchow(4),
    ),
    "ctranspath": Entry(
        _info(
            "ctranspath",
            "Swin-T/4 with convolutional stem (timm)",
            768,
            224,
            "GNU General Public License v3.0",
            "Tencent AI Lab",
            "original Swin (ctranspath.pth, 'model')",
        ),
        _pre(224, 224),
        archs.build_ctranspath,
    ),
    "retccl": Entry(
        _info(
            "retccl",
            "ResNet-50 (torchvision)",
            2048,
            256,
            "GNU General Public License v3.0",
            "Tencent AI Lab",
            "torchvision ResNet-50 without fc",
        ),
        _pre(256, 256),
        archs.build_retccl,
        layers_ok=True,
    ),
    "phikon": Entry(
        _info(
            "phikon",
            "ViT-B/16 (timm vit_base_patch16_224)",
            768,
            224,
            "Owkin non-commercial license (owkin/phikon)",
            "Owkin",
            "Hugging Face ViTModel",
        ),
        _pre(224, 224),
        archs.build_phikon,
        takes_hf_config=True,
    ),
    "phikon2": Entry(
        _info(
            "phikon2",
            "ViT-L/16 with layer scale (timm)",
            1024,
            224,
            "Owkin non-commercial license (owkin/phikon-v2)",
            "Owkin",
            "Hugging Face Dinov2Model",
            True,
        ),
        _pre(224, 224, 224),
        archs.build_phikon2,
        takes_hf_config=True,
    ),
    "plip": Entry(
        _info(
            "plip",
            "CLIP ViT-B/32 image tower + projection (transformers)",
            512,
            224,
            "No license provided by the authors.",
            "Zhao Lab",
            "Hugging Face CLIPModel",
        ),
        _pre(224, 224, 224, "bicubic", CLIP_MEAN, CLIP_STD),
        archs.build_plip,
        takes_hf_config=True,
    ),
    "gigapath": Entry(
        _info(
            "gigapath",
            "ViT-g (1536 wide, 40 blocks, patch 16), SwiGLU (timm)",
            1536,
            224,
            "Apache-2.0 (prov-gigapath)",
            "Microsoft / Providence",
            "timm",
            True,
        ),
        _pre(224, 256, 224, "bicubic"),
        archs.build_gigapath,
    ),
    "h_optimus_0": Entry(
        _info(
            "h_optimus_0",
            "ViT-g/14, SwiGLU, 4 registers (timm)",
            1536,
            224,
            "Apache-2.0 (bioptimus/H-optimus-0)",
            "Bioptimus",
            "timm",
            True,
        ),
        _pre(224, 224, mean=HOPT_MEAN, std=HOPT_STD),
        archs.build_h_optimus_0,
    ),
    "simclr": Entry(
        _info(
            "simclr",
            "ResNet backbone of a SimCLR model (torchvision)",
            None,
            None,
            OWN,
            "your SimCLR training",
            "backbone + projection head",
            options=("ckpt", "arch"),
        ),
        Preprocessing(),
        archs.build_simclr,
        layers_ok=True,
        options={"arch": "resnet50"},
    ),
    "dinov2": Entry(
        _info(
            "dinov2",
            "ViT of a DINOv2 training config (timm)",
            None,
            None,
            OWN,
            "your DINOv2 training",
            "DINOv2 teacher_checkpoint.pth",
            options=("cfg",),
        ),
        Preprocessing(),
        archs.build_dinov2,
    ),
}
ALIASES = {
    "gigapath.tile": "gigapath",
    "hoptimus0": "h_optimus_0",
    "h-optimus-0": "h_optimus_0",
    "phikon_v2": "phikon2",
    "uni_v1": "uni",
    "uni_v2": "uni2",
}
FAMILY_OPTIONS = {"imagenet": ("source",)}
#: registry entries too big to materialize in CI
LARGE = tuple(n for n, e in REGISTRY.items() if e.info.large)


def list_extractors() -> list[str]:
    """Names :func:`build_feature_extractor` accepts (plus ``<arch>_imagenet`` and a trained classifier folder)."""
    return [*REGISTRY, "<arch>_imagenet", "<classifier model folder>"]


def extractor_info(name: str) -> ExtractorInfo:
    return REGISTRY[ALIASES.get(name, name)].info


def _is_classifier(name: str) -> bool:
    p = Path(name)
    if p.suffix in (".json", ".ckpt") and p.is_file():
        return True
    if not p.is_dir():
        return False
    from histolight.training.artifacts import is_model_folder

    return is_model_folder(p, "classifier")


def _imagenet_source(arch: str, source: str) -> str:
    import timm
    import torchvision

    tv = arch in torchvision.models.list_models(module=torchvision.models)
    if source == "torchvision" or (source == "auto" and tv):
        if not tv:
            raise ConfigError(f"{arch!r} is not a torchvision architecture (source=torchvision)")
        return "torchvision"
    if source not in ("auto", "timm"):
        raise ConfigError(f"source={source!r} is invalid: use auto, timm or torchvision")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:5]}*")[:5]
        raise ConfigError(
            f"unknown extractor {arch + '_imagenet'!r}: {arch!r} is neither a torchvision nor a timm architecture"
            + (f" (similar timm names: {close})" if close else "")
            + f"; registered extractors: {', '.join(REGISTRY)}"
        )
    return "timm"


def _probe_dim(net: torch.nn.Module, px: int, device: torch.device) -> int:
    with torch.no_grad():
        return int(net(torch.zeros(1, 3, px, px, device=device)).shape[-1])


def _random_state(seed: int):
    ctx = torch.random.fork_rng(devices=[])
    ctx.__enter__()
    torch.manual_seed(int(seed))
    return ctx


def build_feature_extractor(
    name: str | os.PathLike | FeatureExtractor,
    weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    *,
    strict: bool = True,
    device: str | torch.device = "auto",
    mixed_precision: bool | None = None,
    layers: str | Sequence[str] | None = None,
    pooling: str = "avg",
    tile_px: int | None = None,
    tile_um: Any = None,
    seed: int = 0,
    **options: Any,
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` by registry name, ``<arch>_imagenet``, or trained-classifier model folder.

    Args:
        weights: local official weights (file, Hugging Face folder, or ``{name: tensor}``); None = random init.
            ``ckpt=`` is accepted as a synonym (Slideflow's name for SimCLR).
        strict: refuse checkpoints with missing / unexpected / mis-shaped keys (False: load what fits, log the rest).
        device: ``auto`` (cuda when available), ``cpu``, ``cuda[:n]``, or ``meta`` (no memory: shapes only).
        mixed_precision: None = on for GPUs; False = off; True = also on the CPU (bf16).
        layers, pooling: features from these submodules, pooled (``avg``/``max``) and concatenated
            (torchvision / timm / classifier networks).
        tile_px: the input size of ``<arch>_imagenet`` / ``simclr`` (default: the architecture's).
        tile_um: the tile size in microns the extractor is meant for (reading slides directly).
        seed: the random init (so a random-init extractor rebuilds identically).
        options: preprocessing (``resize``, ``center_crop``, ``interpolation``, ``antialias``, ``norm_mean``,
            ``norm_std``) and entry options (``source`` for ``_imagenet``, ``arch``/``ckpt`` for ``simclr``,
            ``cfg`` for ``dinov2``).
    """
    if isinstance(name, FeatureExtractor):
        return name
    from histolight.utils.device import resolve_device

    name = str(name)
    options = dict(options)
    pre_opts, options = split_preprocess_options(options)
    if options.get("ckpt") is not None:
        if weights is not None:
            raise ConfigError("give the weights once: weights= or ckpt=, not both")
        weights = options.pop("ckpt")
    options.pop("ckpt", None)
    dev = torch.device("meta") if str(device) == "meta" else torch.device(resolve_device(str(device)))
    layer_list = [layers] if isinstance(layers, str) else (list(layers) if layers else None)
    kwargs: dict[str, Any] = {"name": name}

    key = ALIASES.get(name, name)
    normalizer = None
    if key in REGISTRY or key.endswith("_imagenet"):
        entry = REGISTRY.get(key)
        if entry is None:
            arch_name = key[: -len("_imagenet")]
            src = _imagenet_source(arch_name, options.pop("source", "auto"))
            builder = (
                (lambda: archs.build_torchvision(arch_name))
                if src == "torchvision"
                else (lambda: archs.build_timm_imagenet(arch_name))
            )
            entry = Entry(
                ExtractorInfo(
                    key,
                    f"{arch_name} ({src})",
                    None,
                    tile_px,
                    "the license of the ImageNet weights you load (see the model card)",
                    src,
                    src,
                ),
                Preprocessing(input_px=tile_px),
                builder,
                layers_ok=True,
            )
            kwargs["source"] = src
        opts = {**entry.options, **{k: options.pop(k) for k in list(options) if k in entry.info.options}}
        if options:
            raise ConfigError(
                f"unknown option(s) {sorted(options)} for extractor {name!r}; allowed: {sorted(entry.info.options) + ['resize', 'center_crop', 'interpolation', 'antialias', 'norm_mean', 'norm_std']}"
            )
        sd, source, hf_cfg = (None, None, None)
        if weights is not None:
            sd, source, hf_cfg = read_weights(weights, container="teacher" if key == "dinov2" else None)
        build_args: dict[str, Any] = {}
        if entry.takes_hf_config:
            build_args["hf_config"] = hf_cfg
        if key == "simclr":
            build_args["arch"] = opts.get("arch", "resnet50")
        if key == "dinov2":
            settings = archs.dinov2_settings(opts.get("cfg"))
            build_args["settings"] = settings
            entry = replace(
                entry,
                info=replace(entry.info, input_px=settings["img_size"]),
                preprocessing=Preprocessing(input_px=settings["img_size"], resize=True, center_crop=True),
            )
        rng = _random_state(seed)
        try:
            with torch.device("meta") if dev.type == "meta" else torch.device("cpu"):
                arch = entry.build(**build_args)
        finally:
            rng.__exit__(None, None, None)
        if sd is not None:
            load_weights(
                arch.target, sd, arch.keymap, strict=strict, source=source, model_name=key, official_name=arch.official_name
            )
        info, preprocessing = entry.info, entry.preprocessing
        kwargs.update({k: v for k, v in opts.items() if k in entry.info.options})
    elif _is_classifier(name):
        if weights is not None:
            raise ConfigError(f"weights= does not apply to a trained classifier ({name}): its own weights are used")
        if options:
            raise ConfigError(f"unknown option(s) {sorted(options)} for a trained classifier")
        from histolight.classify.artifacts import load_model

        m = load_model(name, device="cpu")
        arch = archs.Arch(archs.TimmFeatures(m.net), m.net)
        tile_px, tile_um, normalizer = m.tile_px, m.tile_um, m.normalizer
        info = ExtractorInfo(
            "classifier", f"trained classifier ({m.config['timm_name']})", None, m.tile_px, OWN, "histolight", "model folder"
        )
        preprocessing = Preprocessing(input_px=m.tile_px, resize=m.tile_px, norm_mean=m.config["mean"], norm_std=m.config["std"])
        entry = Entry(info, preprocessing, lambda: arch, layers_ok=True)
        kwargs["name"] = str(Path(name).resolve())
        sd = "classifier"
    else:
        raise ConfigError(
            f"unknown extractor {name!r}: use one of {', '.join(REGISTRY)}, '<arch>_imagenet' (a torchvision or timm "
            "architecture, e.g. resnet50_imagenet), or the model folder of a trained classifier (task=train_tiles)"
        )

    net = arch.net
    if layer_list:
        if not entry.layers_ok:
            raise ConfigError(f"layers= applies to torchvision / timm networks and trained classifiers, not to {name!r}")
        net = archs.LayerFeatures(arch.target, layer_list, pooling)
    if dev.type not in ("meta", "cpu"):
        net.to(dev)
    net.eval()
    input_px = tile_px or info.input_px or (preprocessing.input_px or 224)
    preprocessing = replace(preprocessing, input_px=preprocessing.input_px or input_px).with_options(**pre_opts)
    dim = info.num_features if (info.num_features and not layer_list) else _probe_dim(net, preprocessing.output_px(input_px), dev)
    random_init = sd is None
    if random_init:
        log.warning(
            "feature extractor %r has RANDOM weights (no weights= given): its features are only good for testing; "
            "pass the official weights file with weights=<file> (extractor.weights=<file>)",
            name,
        )
    kwargs.update(
        weights=None
        if weights is None
        else (str(weights) if isinstance(weights, (str, os.PathLike)) else "<in-memory state dict>"),
        strict=strict,
        seed=seed,
        layers=layer_list,
        pooling=pooling,
        tile_px=tile_px,
        tile_um=tile_um,
        mixed_precision=mixed_precision,
        **pre_opts,
    )
    return FeatureExtractor(
        net,
        replace(info, num_features=dim),
        preprocessing,
        dim,
        dev,
        mixed_precision,
        tile_px,
        tile_um,
        normalizer,
        random_init,
        kwargs,
    )


build_extractor = build_feature_extractor

__all__ = ["REGISTRY", "LARGE", "list_extractors", "extractor_info", "build_feature_extractor", "build_extractor"]
