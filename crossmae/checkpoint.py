"""One checkpoint format for the whole project: plain dicts of tensors and plain values, loadable
with ``torch.load(weights_only=True)``; strict loading by assertion on the exact key sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    allow_missing: Iterable[str] = (),
    what: str = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module``; any unexpected key, any missing key not listed in
    ``allow_missing`` and any shape mismatch is an error that lists them all."""
    own = module.state_dict()
    allow = set(allow_missing)
    unexpected = sorted(set(state_dict) - set(own))
    missing = sorted(set(own) - set(state_dict) - allow)
    shapes = sorted(
        f"{k}: {tuple(v.shape)} in {what}, {tuple(own[k].shape)} in model"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    problems = []
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if missing:
        problems.append(f"missing keys {missing}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise KeyError(f"{what} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(state_dict), strict=not allow)
