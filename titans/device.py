"""Choosing the torch device from a user's setting (auto | cpu | cuda | cuda:N)."""

from __future__ import annotations

import torch

from .errors import TitansError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when available, else the CPU; a plain `cuda` is the process's local GPU."""
    if not isinstance(name, str):
        raise TitansError(f"the device must be a string ({DEVICE_CHOICES}), got {type(name).__name__}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        index = name[5:] if name.startswith("cuda:") else ""
        if name != "cuda" and not index.isdigit():
            raise TitansError(f"the device must be {DEVICE_CHOICES}, got {name!r}")
        if not torch.cuda.is_available():
            raise TitansError(f"device {name!r} was asked for but CUDA is not available; use cpu or auto")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    elif name != "cpu":
        raise TitansError(f"the device must be {DEVICE_CHOICES}, got {name!r}")
    return torch.device(name)
