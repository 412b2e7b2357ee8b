"""Official checkpoints -> an extractor's network, strictly.

``weights=`` accepts a weights file (``.safetensors``, or a ``.bin/.pth/.pt/.ckpt`` torch pickle read with
``torch.load(weights_only=True)`` through :func:`histolight.io.weights.read_state_dict`), a Hugging Face model
folder (``model.safetensors`` / ``pytorch_model.bin``, sharded or not, with its ``config.json``), or an in-memory
``{name: tensor}`` dict. The tensors keep the **official key layout** of the model's publisher; a :class:`KeyMap`
per model family turns that layout into the network's own names (and, where the layouts differ, its tensors:
fused q/k/v projections, DINOv2 register tokens).

Loading is strict: a key the network expects and the file lacks (*missing*), a key of the file with no place in the
network (*unexpected*) or a tensor of another shape is an error that lists them all, in the official names.
Keys a model family declares unused (a classification head, the text tower of a CLIP checkpoint, buffers that are
recomputed) are dropped by design and logged at INFO. ``strict=False`` loads what fits and logs, at WARNING,
exactly what was dropped and what was left at its initial value.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from histolight.errors import HistolightError
from histolight.io.weights import read_checkpoint, read_state_dict

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


class WeightsMismatch(HistolightError):
    """A checkpoint does not fit the extractor's architecture (the message lists every offending key)."""


def read_weights(
    src: str | os.PathLike | Mapping[str, torch.Tensor], container: str | None = None
) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """``(tensors, description, hf_config)`` of a weights source (see the module docstring).

    ``container``: a top-level key holding the tensors (e.g. ``teacher`` in a DINOv2 training checkpoint).
    Files are read by :func:`~histolight.io.weights.read_state_dict` (safely). ``hf_config`` is the folder's
    ``config.json``.
    """
    if isinstance(src, Mapping):
        return {str(k): v for k, v in src.items() if torch.is_tensor(v)}, "the given state dict", None
    p = Path(src).expanduser()
    if p.is_dir():
        cfg_path = p / "config.json"
        hf_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
        index = sorted(p.glob("*.index.json"))
        if index:
            shards = sorted(set(json.loads(index[0].read_text()).get("weight_map", {}).values()))
            files = [p / s for s in shards]
        else:
            files = [p / f for f in HF_WEIGHT_FILES if (p / f).is_file()][:1]
        if not files:
            raise HistolightError(
                f"weights folder '{p}' holds no {' / '.join(HF_WEIGHT_FILES)} (nor a sharded *.index.json): "
                "pass the weights file itself, or the Hugging Face model folder"
            )
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(read_state_dict(f))
        return sd, f"'{p}'", hf_cfg
    if not p.is_file():
        raise HistolightError(f"weights '{p}' do not exist (give a weights file, a Hugging Face model folder, or null)")
    if container:
        ck = read_checkpoint(p)
        if isinstance(ck.get(container), Mapping):
            return {str(k): v for k, v in ck[container].items() if torch.is_tensor(v)}, f"'{p}' [{container}]", None
    return read_state_dict(p), f"'{p}'", None


# ---------------------------------------------------------------------------------------------- key maps


@dataclass
class Mapped:
    """A state dict in the network's names: ``tensors``; ``origin`` = network key -> official key(s);
    ``ignored`` = official key -> why it is not used."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    absent: dict[str, list[str]] = field(default_factory=dict)  # network key -> the official keys it lacks

    def put(self, key: str, value: torch.Tensor, official: str) -> None:
        self.tensors[key] = value
        self.origin[key] = official


@dataclass(frozen=True)
class KeyMap:
    """How one model family's official layout maps to the network's names.

    Attributes:
        rules: ``(pattern, replacement)`` regex substitutions applied in order to each official key.
        ignore: ``(pattern, reason)``: official keys matching ``pattern`` are dropped by design.
        strip: leading prefixes removed first when every key carries one of them (e.g. ``module.``).
        fuse_qkv: fold separate ``query/key/value`` projections into one ``qkv`` (Hugging Face ViT -> timm).
        post: a last transform of the whole mapped dict (e.g. DINOv2 register tokens).
    """

    rules: tuple[tuple[str, str], ...] = ()
    ignore: tuple[tuple[str, str], ...] = ()
    strip: tuple[str, ...] = ("module.",)
    fuse_qkv: str | None = None
    post: Callable[[Mapped], None] | None = None

    def apply(self, sd: Mapping[str, torch.Tensor]) -> Mapped:
        out = Mapped()
        kept: dict[str, tuple[str, torch.Tensor]] = {}  # key without wrapper prefixes -> (official key, tensor)
        for k, v in sd.items():
            why = next((r for pat, r in self.ignore if re.search(pat, k)), None)
            if why is not None:
                out.ignored[k] = why
            else:
                kept[k] = (k, v)
        for pre in self.strip:
            if kept and all(k.startswith(pre) for k in kept):
                kept = {k[len(pre) :]: kv for k, kv in kept.items()}
        qkv: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for short, (k, v) in kept.items():
            new = short
            for pat, rep in self.rules:
                new = re.sub(pat, rep, new)
            m = re.match(self.fuse_qkv, new) if self.fuse_qkv else None
            if m:  # '<prefix>{q|k|v}<suffix>' -> collect, fused below
                qkv.setdefault(m.group(1) + "qkv" + m.group(3), {})[m.group(2)] = (k, v)
                continue
            out.put(new, v, k)
        for key, parts in qkv.items():
            if set(parts) == {"q", "k", "v"}:
                out.put(key, torch.cat([parts[p][1] for p in "qkv"]), " + ".join(parts[p][0] for p in "qkv"))
            else:  # incomplete: the report names the pieces the file lacks
                words = {"q": "query", "k": "key", "v": "value"}
                have = next(iter(parts.values()))[0]
                word = words[next(iter(parts))]
                out.absent[key] = [have.replace(f".{word}.", f".{words[p]}.") for p in "qkv" if p not in parts]
        if self.post is not None:
            self.post(out)
        return out


IDENTITY = KeyMap()


@dataclass
class LoadReport:
    """What :func:`load_weights` did (names are the network's; ``official`` maps them back)."""

    source: str
    loaded: int
    total: int
    missing: list[str]
    unexpected: list[str]
    shape_mismatch: list[str]
    ignored: dict[str, str]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)


def _listing(what: str, items: list[str], limit: int = 25) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {what}: {', '.join(items[:limit])}{more}"


def load_weights(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    keymap: KeyMap = IDENTITY,
    *,
    strict: bool = True,
    source: str = "the checkpoint",
    model_name: str = "the extractor",
    official_name: Callable[[str], str] | None = None,
) -> LoadReport:
    """Load official-layout tensors ``sd`` into ``module`` through ``keymap`` (see the module docstring).

    Raises :class:`WeightsMismatch` listing every missing / unexpected / mis-shaped key (strict), or when nothing
    fits at all. A module on the ``meta`` device gets the tensors assigned (no copy, no memory).
    """
    mapped = keymap.apply(sd)
    own = module.state_dict()
    back = official_name or (lambda k: k)
    missing = sorted(
        o
        for k in own
        if k not in mapped.tensors and not k.endswith("num_batches_tracked")
        for o in mapped.absent.get(k, [back(k)])
    )
    unexpected = sorted(mapped.origin[k] for k in mapped.tensors if k not in own)
    bad = sorted(
        f"{mapped.origin[k]} {tuple(v.shape)} (the network's {k} is {tuple(own[k].shape)})"
        for k, v in mapped.tensors.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    ok = {k: v for k, v in mapped.tensors.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    # BatchNorm counters are not weights: a checkpoint without them keeps the network's own
    ok.update({k: own[k] for k in own if k.endswith("num_batches_tracked") and k not in ok})
    report = LoadReport(source, len(ok), len(own), missing, unexpected, bad, mapped.ignored)
    problems = [_listing(w, x) for w, x in (("missing", missing), ("unexpected", unexpected), ("of another shape", bad)) if x]
    if not ok or (strict and problems):
        hint = (
            "is it the official checkpoint of this model? (strict=false loads what fits and logs the rest)"
            if ok
            else "no tensor fits: is it a checkpoint of this model?"
        )
        raise WeightsMismatch(f"weights {source} do not fit {model_name}: {'; '.join(problems) or 'nothing matched'}; {hint}")
    meta = any(t.is_meta for t in own.values())
    module.load_state_dict(ok, strict=False, assign=meta)
    if mapped.ignored:
        log.info(
            "%s: %d tensors of %s are not used by the extractor (e.g. %s)",
            model_name,
            len(mapped.ignored),
            source,
            next(iter(mapped.ignored.items())),
        )
    if problems:
        log.warning(
            "%s: partial load of %s (strict=false): %d/%d tensors loaded; dropped or left at init: %s",
            model_name,
            source,
            len(ok),
            len(own),
            "; ".join(problems),
        )
    return report


__all__ = ["KeyMap", "Mapped", "IDENTITY", "LoadReport", "WeightsMismatch", "read_weights", "load_weights"]
