"""Named model variants, looked up by ``create_model(name, **overrides)``.

Every row of the size table (``sizes.SIZES``) and each of its patch sizes registers
``crossmae_vit_{size}_patch{p}`` and ``mae_vit_{size}_patch{p}`` with the paper's defaults (CrossMAE
arXiv:2401.14391, Tables 10 and 18; MAE arXiv:2111.06377): CrossMAE decoders have 12 blocks, MAE
decoders 8 (the classes' own defaults).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from .crossmae import CrossMAE
from .mae import MAE
from .sizes import SIZES, ViTSize


@dataclass(frozen=True)
class Variant:
    """A registered model: its class, size and constructor defaults."""

    cls: type[nn.Module]
    size: ViTSize | None
    defaults: dict[str, Any]


_REGISTRY: dict[str, Variant] = {}


def register_model(
    name: str, cls: type[nn.Module], defaults: dict[str, Any], size: ViTSize | None = None
) -> None:
    """Add a variant; a name registered twice is an error."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = Variant(cls, size, dict(defaults))


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def variant(name: str) -> Variant:
    """The registered variant ``name`` (its class, size and defaults), without building it."""
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise KeyError(f"unknown model {name!r}{hint} (see crossmae.list_models())")
    return _REGISTRY[name]


def model_class(name: str) -> type[nn.Module]:
    """The class of a registered model (``CrossMAE`` / ``MAE``): what kind of model it is."""
    return variant(name).cls


SIZE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
             "decoder_depth", "decoder_num_heads")  # fmt: skip


def sizes_beyond_name(name: str, config: dict) -> dict:
    """The sizes in a model's ``config`` that its registered name does not say (they differ
    from the variant's defaults), e.g. ``{"img_size": 64, "decoder_depth": 4}``."""
    v = variant(name)
    params = inspect.signature(v.cls).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty} | v.defaults
    return {k: config[k] for k in SIZE_KEYS if k in config and config[k] != defaults.get(k)}


def describe(name: str, config: dict) -> str:
    """A model's name and what the name does not say: ``crossmae_vit_tiny_patch8 (img_size=64,
    decoder_depth=4)``."""
    extra = sizes_beyond_name(name, config)
    return name + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered variant; keyword overrides replace its defaults (e.g. ``pred_ratio``,
    ``decoder_depth``, ``img_size``). The result carries ``model_name`` and ``config`` (every
    constructor argument), which checkpoints record."""
    v = variant(name)
    known = inspect.signature(v.cls).parameters
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"model {name!r} has no setting {', '.join(unknown)} (its settings: "
                         f"{', '.join(known)})")  # fmt: skip
    model = v.cls(**{**v.defaults, **overrides})
    model.model_name = name
    return model


for _size in SIZES:
    for _patch in _size.patch_sizes:
        for _cls in (CrossMAE, MAE):
            register_model(f"{_cls.kind}_vit_{_size.name}_patch{_patch}", _cls,
                           _size.model_defaults(_patch), _size)  # fmt: skip
