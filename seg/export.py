"""mmsegmentation interchange: our encoder as mmseg's MAE backbone loads a pretrained file, and
an mmseg MAE UperNet checkpoint read into our segmenter.

Below the backbone our modules carry mmseg's names (``neck``, ``decode_head``,
``auxiliary_head``); the backbone keeps the timm / MAE names and maps one to one to mmseg's MAE
backbone (``blocks`` <-> ``layers``, ``norm1/2`` <-> ``ln1/2``, ``mlp.fc1`` <->
``ffn.layers.0.0``, ``mlp.fc2`` <-> ``ffn.layers.1``, ``patch_embed.proj`` <->
``patch_embed.projection``), as mmseg's ``tools/model_converters/beit2mmseg.py`` maps an MAE
release.

The pretrained file (``crossmae convert to-mmseg``) holds the backbone keys without any prefix:
mmseg's MAE backbone loads its ``Pretrained`` file into itself, non-strictly, so prefixed keys
would silently load nothing. Then, in mmsegmentation 1.x:

    python tools/train.py configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py \\
        --cfg-options model.pretrained=pretrain/crossmae_b_mmseg.pth
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

# (ours, mmseg) name pieces inside one backbone block; the rest of a key is unchanged
_BLOCK = [(".norm1.", ".ln1."), (".norm2.", ".ln2."), (".mlp.fc1.", ".ffn.layers.0.0."),
          (".mlp.fc2.", ".ffn.layers.1.")]  # fmt: skip


def backbone_to_mmseg(name: str) -> str:
    """One of our backbone parameter names (no prefix) -> mmseg's MAE backbone name."""
    if name.startswith("blocks."):
        name = "layers." + name.removeprefix("blocks.")
        for ours, theirs in _BLOCK:
            name = name.replace(ours, theirs)
    elif name.startswith("patch_embed.proj."):
        name = "patch_embed.projection." + name.removeprefix("patch_embed.proj.")
    return name


def backbone_from_mmseg(name: str) -> str:
    """The inverse of ``backbone_to_mmseg``."""
    if name.startswith("layers."):
        name = "blocks." + name.removeprefix("layers.")
        for ours, theirs in _BLOCK:
            name = name.replace(theirs, ours)
    elif name.startswith("patch_embed.projection."):
        name = "patch_embed.proj." + name.removeprefix("patch_embed.projection.")
    return name


def to_mmseg(encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder (timm / MAE names) -> the pretrained file mmseg's MAE backbone loads: its
    keys, no prefix. The encoder's final norm, classifier and pooling norm are left out (mmseg's
    MAE backbone has none of them); the relative-position tables and layer scales are not in an
    MAE encoder and start from mmseg's initialisation."""
    skip = ("norm.", "fc_norm.", "head.")
    return {backbone_to_mmseg(k): v for k, v in encoder_state.items() if not k.startswith(skip)}


def to_ours(mmseg_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmseg MAE UperNet state dict -> ours: backbone names mapped, everything else kept;
    the backbone's ``relative_position_index`` buffers are left out (ours are built, not
    stored)."""
    out = {}
    for k, v in mmseg_state.items():
        if k.endswith(".relative_position_index"):
            continue
        if k.startswith("backbone."):
            k = "backbone." + backbone_from_mmseg(k.removeprefix("backbone."))
        out[k] = v
    return out


def mmseg_architecture(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What an mmseg MAE UperNet state dict holds, from its shapes: ``encoder`` (our encoder
    config names), ``crop`` (the backbone's input side), ``channels``, ``aux_channels``,
    ``num_classes``, the number of pooling scales."""
    need = ["backbone.pos_embed", "backbone.patch_embed.projection.weight",
            "backbone.layers.0.attn.relative_position_bias_table", "decode_head.conv_seg.weight",
            "decode_head.bottleneck.conv.weight", "auxiliary_head.convs.0.conv.weight"]  # fmt: skip
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"not an mmseg MAE UperNet state dict: no {missing}")
    pos = sd["backbone.pos_embed"]
    dim, side = pos.shape[-1], math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"backbone.pos_embed has {pos.shape[1]} slots: not a square grid + cls")
    patch = sd["backbone.patch_embed.projection.weight"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"backbone\.layers\.(\d+)\.", k)))
    pools = 1 + max(int(m.group(1)) for k in sd
                    if (m := re.match(r"decode_head\.psp_modules\.(\d+)\.", k)))  # fmt: skip
    encoder = {
        "img_size": side * patch, "patch_size": patch, "embed_dim": dim, "depth": depth,
        "num_heads": sd["backbone.layers.0.attn.relative_position_bias_table"].shape[1],
        "mlp_ratio": sd["backbone.layers.0.ffn.layers.0.0.weight"].shape[0] / dim,
        "norm_eps": 1e-6,
    }  # fmt: skip
    return {
        "encoder": encoder,
        "crop": side * patch,
        "channels": sd["decode_head.bottleneck.conv.weight"].shape[0],
        "aux_channels": sd["auxiliary_head.convs.0.conv.weight"].shape[0],
        "num_classes": sd["decode_head.conv_seg.weight"].shape[0],
        "num_pool_scales": pools,
    }


def read_mmseg_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an mmseg checkpoint (``state_dict`` of an mmengine checkpoint, or
    a bare state dict), read without running its pickled code."""
    from crossmae.checkpoint import load_foreign_checkpoint

    data = load_foreign_checkpoint(path)
    if isinstance(data, dict) and isinstance(data.get("format"), str):
        raise ValueError(f"{path} is a {data['format']!r} file, not an mmseg model checkpoint")
    sd = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: no mmseg state dict (expected a 'state_dict' of tensors)")
    return dict(sd)


def import_mmseg(path: str | Path, config: dict | None = None) -> dict:
    """An mmseg MAE UperNet checkpoint -> our segmentation checkpoint, loaded strictly (every
    tensor used, none missing; the stored ``relative_position_index`` buffers must equal the
    ones we build). ``config``: SegConfig values (nested) besides the inferred ones, e.g.
    ``model.out_indices``
    (not in a state dict; default: B 3, 5, 7, 11) or the dataset's settings."""
    from omegaconf import OmegaConf

    from crossmae.checkpoint import load_state_dict_strict
    from crossmae.config import load_config, to_plain

    from .config import SegConfig
    from .model import SEG_FORMAT, build_segmenter

    sd = read_mmseg_checkpoint(path)
    arch = mmseg_architecture(sd)
    inferred = {"data": {"crop": arch["crop"]},
                "model": {"channels": arch["channels"],
                          "aux_channels": arch["aux_channels"]}}  # fmt: skip
    cfg = load_config(SegConfig, base=OmegaConf.merge(inferred, config or {}))
    if len(cfg.model.pool_scales) != arch["num_pool_scales"]:
        raise ValueError(
            f"{path} has {arch['num_pool_scales']} pooling branches; set model.pool_scales to as "
            f"many scales (now {list(cfg.model.pool_scales)})"
        )
    model = build_segmenter(cfg, arch["num_classes"], arch["encoder"])
    for k, v in sd.items():
        if k.endswith(".relative_position_index"):
            ours = model.get_buffer("backbone." + backbone_from_mmseg(k.removeprefix("backbone.")))
            if not torch.equal(ours, v):
                raise ValueError(f"{path}: {k} differs from the index this model builds")
    load_state_dict_strict(model, to_ours(sd), what=str(path))
    return {"format": SEG_FORMAT, "model": model.state_dict(), "num_classes": arch["num_classes"],
            "encoder_config": arch["encoder"], "config": to_plain(cfg),
            "converted_from": str(path)}  # fmt: skip
