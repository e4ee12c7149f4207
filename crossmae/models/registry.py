"""Named model variants, looked up by ``create_model(name, **overrides)``.

Defaults are the paper's (CrossMAE arXiv:2401.14391, Tables 10 and 18; MAE arXiv:2111.06377):
CrossMAE decoders have 12 blocks, MAE decoders 8; ViT-S decoders are 256-d with 8 heads, ViT-B/L/H
decoders 512-d with 16 heads.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from functools import partial

from torch import nn

from .crossmae import CrossMAE
from .mae import MAE

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# encoder / decoder sizes of the paper's ViTs
VIT_SIZES: dict[str, dict] = {
    # not in the paper: DeiT-Ti widths, for CPU demos and small-data experiments
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                 decoder_embed_dim=128, decoder_num_heads=4),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                  decoder_embed_dim=256, decoder_num_heads=8),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_num_heads=16),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                  decoder_embed_dim=512, decoder_num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                 decoder_embed_dim=512, decoder_num_heads=16),
}  # fmt: skip


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a variant; a name registered twice is an error."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered variant; keyword overrides replace its defaults (e.g. ``pred_ratio``,
    ``decoder_depth``, ``img_size``). The result carries ``model_name`` and ``config`` (every
    constructor argument), which checkpoints record."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise KeyError(f"unknown model {name!r}{hint} (see crossmae.list_models())")
    model = _REGISTRY[name](**overrides)
    model.model_name = name
    return model


def _variant(cls: type, defaults: dict, **overrides) -> nn.Module:
    return cls(**{**defaults, **overrides})


_TINY_P8 = {**VIT_SIZES["tiny"], "patch_size": 8}  # the tiny widths on 64-px images: 64 patches
for _name, _dims in [*((f"{s}_patch{d['patch_size']}", d) for s, d in VIT_SIZES.items()),
                     ("tiny_patch8", _TINY_P8)]:  # fmt: skip
    register_model(f"crossmae_vit_{_name}", partial(_variant, CrossMAE, _dims))
    register_model(f"mae_vit_{_name}", partial(_variant, MAE, _dims))
