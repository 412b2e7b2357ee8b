"""Reading weights files and loading state dicts into models, in one place for every model (timm, smp).

- :func:`read_state_dict`: ``.safetensors`` or a torch pickle read with ``torch.load(weights_only=True)``; the
  tensors are unwrapped from ``state_dict`` / ``model`` / ``module`` / ``model_state_dict`` containers
  (Lightning checkpoints, training scripts).
- :func:`read_checkpoint`: the whole (plain-data) dict of a Lightning ``.ckpt``, same safety rule.

Safety rule: a pickle that needs code execution to load (it names a class or function outside torch's allow-list,
e.g. an old checkpoint holding a whole model, or a crafted file that would run commands) is refused, naming the
file and what it holds, without running anything; there is no way around it (histolight never unpickles a user's
file): the message says how to re-save such a file as plain tensors, in your own Python session, from a source you
trust. This module is the only place in histolight that calls ``torch.load``.
- :func:`load_matching`: load a state dict into a module whose parameter names differ by a known prefix
  (``net.``, ``model.``, ``module.``, ``encoder.``, ...): the prefix that matches most tensors wins; tensors of
  another shape (e.g. a classifier head for another number of classes) are skipped; missing and unexpected
  keys are reported; nothing matching at all is an error.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histolight.errors import HistolightError

log = logging.getLogger(__name__)

#: prefixes stripped from state-dict keys (Lightning modules, DDP / DataParallel wrappers, smp encoders, timm)
PREFIXES = ("module.", "net.", "model.", "encoder.", "backbone.", "_orig_mod.")
#: container keys that hold the tensors of a checkpoint
CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "net")


def _refusal(path: Path, e: pickle.UnpicklingError) -> HistolightError:
    """The error for a file the weights-only unpickler refused (naming what it references, when it says)."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    if m is None:  # a damaged file, no pickle at all, or a pickle protocol the weights-only unpickler does not read
        reason = str(e).rpartition("WeightsUnpickler error:")[2].strip().split("\n")[0] or "UnpicklingError"
        return HistolightError(
            f"'{path}' is not a readable torch weights file ({reason}): it is damaged, not a torch file, or a "
            "pickle that needs full unpickling, which histolight never does; re-save it as .safetensors"
        )
    return HistolightError(
        f"'{path}' cannot be loaded safely (it holds a {m.group(1)} object): it is a pickle that needs code "
        "execution, and histolight only reads plain tensors (safetensors, or torch.load(weights_only=True)); "
        "nothing in it was run. If the file comes from a source you trust, load it in your own Python session, "
        "save its tensors (safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), or "
        "torch.save(model.state_dict(), path)) and give histolight the new file"
    )


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; what the weights-only unpickler refuses is refused here too (nothing in the
    file runs)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise HistolightError(f"'{path}' is not a readable torch weights file ({type(e).__name__}: {e})") from None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The dict stored in a torch/Lightning checkpoint (``weights_only=True``: tensors and plain Python data)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HistolightError(f"checkpoint '{p}' does not exist")
    ck = _torch_load(p)
    if not isinstance(ck, dict):
        raise HistolightError(f"'{p}' holds a {type(ck).__name__}, not a checkpoint dict")
    return ck


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: ``{name: tensor}`` on the CPU.

    Accepts ``.safetensors``, and ``.pt/.pth/.bin/.ckpt`` pickles readable with ``weights_only=True``; a dict
    nested under ``state_dict``, ``model_state_dict``, ``model``, ``module`` or ``net`` is unwrapped. Non-tensor
    entries are dropped. Raises :class:`HistolightError` for a missing file, an unsafe pickle (naming the class
    it references) or a file without tensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise HistolightError(f"weights file '{p}' does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            raise HistolightError(f"'{p}' is not a readable .safetensors file ({e})") from None
    else:
        sd = _torch_load(p)
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(sd, Mapping):
            break
        inner = next((sd[k] for k in CONTAINERS if isinstance(sd.get(k), Mapping)), None)
        if inner is None or any(torch.is_tensor(v) for v in sd.values()):
            break
        sd = inner
    if not isinstance(sd, Mapping):
        raise HistolightError(f"'{p}' holds a {type(sd).__name__}, not a state dict ({{name: tensor}})")
    out = {str(k): v for k, v in sd.items() if torch.is_tensor(v)}
    if not out:
        raise HistolightError(f"'{p}' holds no tensors (keys: {list(sd)[:5]})")
    return out


@dataclass
class LoadReport:
    """What :func:`load_matching` loaded: counts, the prefix rewrite used, and the keys left out.

    ``missing``: module tensors not in the file (left at init); ``unexpected``: file tensors with no place in the
    module; ``shape_mismatch``: names present in both with different shapes (skipped).
    """

    loaded: int
    total: int
    strip: str = ""
    add: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rw = f", keys '{self.strip}*' -> '{self.add}*'" if (self.strip or self.add) else ""
        return (
            f"{self.loaded}/{self.total} tensors loaded{rw}; {len(self.missing)} missing (e.g. {self.missing[:3]}), "
            f"{len(self.unexpected)} unexpected (e.g. {self.unexpected[:3]}), "
            f"{len(self.shape_mismatch)} shape mismatches (e.g. {self.shape_mismatch[:3]})"
        )


def _prefix_chains(keys: Sequence[str], prefixes: Sequence[str]) -> set[str]:
    """Every leading run of known prefixes found on ``keys`` (``''``, ``'net.'``, ``'net.model.'``, ...)."""
    out = {""}
    for k in keys:
        chain = ""
        while True:
            rest = k[len(chain) :]
            pre = next((p for p in prefixes if rest.startswith(p)), None)
            if pre is None:
                break
            chain += pre
            out.add(chain)
    return out


def load_matching(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    prefixes: Sequence[str] = PREFIXES,
    *,
    source: str = "the state dict",
    strict: bool = False,
) -> LoadReport:
    """Load ``state_dict`` into ``module``, rewriting one leading chain of known ``prefixes``.

    Every rewrite "strip chain A from the file's keys, add chain B to them" (A from the file's keys, B from the
    module's, each a run of ``prefixes`` or empty) is scored by the number of tensors that then match a module
    tensor of the same shape; the best one is loaded. ``strict=True`` also requires every module tensor to be
    loaded. Raises :class:`HistolightError` naming ``source`` when nothing matches (or, strict, when anything
    is missing or of another shape).
    """
    own = module.state_dict()
    keys = list(state_dict)
    best: tuple[int, str, str, dict] = (-1, "", "", {})
    for strip in sorted(_prefix_chains(keys, prefixes), key=len):
        for add in sorted(_prefix_chains(list(own), prefixes), key=len):
            cand = {add + k[len(strip) :]: v for k, v in state_dict.items() if k.startswith(strip)}
            n = sum(1 for k, v in cand.items() if k in own and tuple(own[k].shape) == tuple(v.shape))
            if n > best[0]:
                best = (n, strip, add, cand)
    n, strip, add, cand = best
    ok = {k: v for k, v in cand.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    report = LoadReport(
        loaded=len(ok),
        total=len(own),
        strip=strip,
        add=add,
        missing=sorted(k for k in own if k not in ok),
        unexpected=sorted(k for k in cand if k not in own),
        shape_mismatch=sorted(k for k, v in cand.items() if k in own and tuple(own[k].shape) != tuple(v.shape)),
    )
    if not ok:
        raise HistolightError(
            f"no tensor of {source} matches the {type(module).__name__} ({report}); is it a checkpoint of the same architecture?"
        )
    if strict and (report.missing or report.shape_mismatch):
        raise HistolightError(f"{source} does not fit the {type(module).__name__}: {report}")
    module.load_state_dict(ok, strict=False)
    log.info("weights from %s: %s", source, report)
    return report


__all__ = ["PREFIXES", "LoadReport", "read_checkpoint", "read_state_dict", "load_matching"]
