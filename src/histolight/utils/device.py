"""One place that turns a device setting into a torch device string."""

from __future__ import annotations

from histolight.errors import ConfigError


def resolve_device(spec: str | None = "auto") -> str:
    """``"auto"``/None -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; ``"cpu"``, ``"cuda"``, ``"cuda:N"``
    and ``"mps"`` pass through after a check that the device exists (a clear error otherwise)."""
    import torch

    s = "auto" if spec is None else str(spec).strip().lower()
    if s == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return s
    if s == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device='mps' was asked for, but no Apple GPU is available; use device=auto or cpu")
        return s
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={spec!r} was asked for, but torch sees no CUDA GPU; use device=auto or cpu")
        idx = s.partition(":")[2]
        if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
            raise ConfigError(f"device={spec!r}: there are {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)")
        return s
    raise ConfigError(f"device={spec!r} is invalid: must be auto, cpu, cuda, cuda:N or mps")
