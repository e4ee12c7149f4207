"""Explicit converters between the official CrossMAE / MAE checkpoint layouts (``ckpt["model"]``,
see docs/reference.md) and ours. Ours nests the encoder under ``encoder.`` (a timm-compatible
ViT) and the decoder under ``decoder.``; tensors keep their shapes, only names change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_state_dict_strict
from .crossmae import CrossMAE
from .mae import MAE

KINDS = ("crossmae", "mae")

# (official name, our name): a name ending in "." is a prefix, any other an exact key.
_ENCODER = [
    ("cls_token", "encoder.cls_token"),
    ("pos_embed", "encoder.pos_embed"),
    ("patch_embed.", "encoder.patch_embed."),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
]
_NAMES: dict[str, list[tuple[str, str]]] = {
    "crossmae": _ENCODER
    + [
        ("mask_token", "decoder.mask_token"),
        ("decoder_pos_embed", "decoder.pos_embed"),
        ("wfm.linear.weight", "decoder.iba.weight"),
        ("dec_norms.", "decoder.kv_norms."),
        ("decoder_blocks.", "decoder.blocks."),
        ("decoder_norm.", "decoder.norm."),
        ("decoder_pred.", "decoder.pred."),
    ],
    "mae": _ENCODER
    + [
        ("mask_token", "decoder.mask_token"),
        ("decoder_pos_embed", "decoder.pos_embed"),
        ("decoder_embed.", "decoder.embed."),
        ("decoder_blocks.", "decoder.blocks."),
        ("decoder_norm.", "decoder.norm."),
        ("decoder_pred.", "decoder.pred."),
    ],
}

# official constructor settings -> our constructor arguments
_CONFIG_KEYS = {
    "common": {
        "img_size": "img_size",
        "patch_size": "patch_size",
        "in_chans": "in_chans",
        "embed_dim": "embed_dim",
        "depth": "depth",
        "num_heads": "num_heads",
        "decoder_embed_dim": "decoder_embed_dim",
        "decoder_depth": "decoder_depth",
        "decoder_num_heads": "decoder_num_heads",
        "mlp_ratio": "mlp_ratio",
        "norm_pix_loss": "norm_pix_loss",
        "norm_eps": "norm_eps",
        "mask_ratio": "mask_ratio",
    },
    "crossmae": {
        "kept_mask_ratio": "pred_ratio",
        "weight_fm": "weight_fm",
        "use_fm": "use_fm",
        "use_input": "use_input",
        "self_attn": "self_attn",
    },
    "mae": {},
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if src.endswith(".") and key.startswith(src):
            return dst + key[len(src) :]
        if key == src:
            return dst
    return None


def _rename_all(
    state_dict: Mapping[str, Any], pairs: list[tuple[str, str]], direction: str
) -> dict[str, Any]:
    out, unknown = {}, []
    for k, v in state_dict.items():
        new = _rename(k, pairs)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyError(f"{direction}: keys with no counterpart: {sorted(unknown)}")
    return out


def official_to_ours(state_dict: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """Rename an official state dict (or part of one) to our layout."""
    _check_kind(kind)
    return _rename_all(state_dict, _NAMES[kind], f"official {kind} -> ours")


def to_official(state_dict: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """Rename our state dict — or any part of it, e.g. only trainable tensors or their
    gradients — to the official layout. Keys without an official counterpart (the Table 9
    projections, MAE + IBA) are an error that lists them."""
    _check_kind(kind)
    return _rename_all(state_dict, [(b, a) for a, b in _NAMES[kind]], f"ours -> official {kind}")


def model_kwargs_from_official(config: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """Official constructor settings -> our constructor keyword arguments."""
    _check_kind(kind)
    names = {**_CONFIG_KEYS["common"], **_CONFIG_KEYS[kind]}
    unknown = sorted(set(config) - set(names))
    if unknown:
        raise KeyError(
            f"official {kind} config: unknown settings {unknown}; known: {sorted(names)}"
        )
    return {names[k]: v for k, v in config.items()}


def from_official(
    state_dict: Mapping[str, torch.Tensor], *, kind: str, config: Mapping[str, Any]
) -> nn.Module:
    """Build our model from official constructor settings and load official weights strictly.

    Args:
        state_dict: the official state dict (``ckpt["model"]``).
        kind: ``"crossmae"`` or ``"mae"``.
        config: official settings (img_size, patch_size, embed_dim, depth, num_heads,
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss,
            norm_eps; for CrossMAE also weight_fm, use_fm, use_input, self_attn).

    Returns:
        The model in the checkpoint's floating dtype, with every tensor loaded.
    """
    kwargs = model_kwargs_from_official(config, kind=kind)
    model = CrossMAE(**kwargs) if kind == "crossmae" else MAE(**kwargs)
    dtypes = {v.dtype for v in state_dict.values() if torch.is_floating_point(v)}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    load_state_dict_strict(
        model, official_to_ours(state_dict, kind=kind), what=f"official {kind} checkpoint"
    )
    return model
