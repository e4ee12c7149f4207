"""The one precision table of training and evaluation: a setting's name -> the autocast dtype."""

from __future__ import annotations

import torch

from .config import ConfigError

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # None: full precision


def resolve_precision(value: str, device: torch.device) -> str:
    """``train.precision`` on ``device``: ``auto`` is bf16 on a GPU and fp32 on a CPU (which
    mostly emulates bf16, many times slower); any other value is itself."""
    if value == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return value


def autocast_dtype(value: str, key: str = "train.precision") -> torch.dtype | None:
    """The autocast dtype of a precision setting (None = full precision), or an error naming
    ``key``."""
    if value not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {sorted(PRECISIONS)}, got {value!r}")
    return PRECISIONS[value]
